//! The upstream simulator as a real process, over real gRPC and RabbitMQ, with the test in
//! devgate's place: it reads seeded assets, users and teams, publishes jobs and cancels to
//! the jobs exchange and reads the updates from devgate's updates queue.

use std::{collections::HashSet, time::Duration};

use devgate::{
    mq::{Mq, QueueType},
    proto::{
        convert::timestamp,
        upstream::{
            assets::v1::{Asset, GetAssetRequest, ListAssetsRequest},
            orchestrator::v1::{
                GenerationCancel, GenerationJob, GenerationState, GenerationUpdate, routing,
            },
            users::v1::{GetTeamRequest, GetUserRequest, ListTeamMembersRequest},
        },
    },
};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Consumer,
    options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions},
    types::FieldTable,
};
use prost::{Message, Name};
use uuid::Uuid;

use crate::harness::upstream_sim::{self, UpstreamSim};

fn prefix() -> String {
    format!("devgate-test-{}", Uuid::new_v4().simple())
}

/// Every asset of a listing, page by page (`page_size` each).
async fn list_all(sim: &UpstreamSim, tenant: Uuid, project: &str, page_size: i32) -> Vec<Asset> {
    let mut client = sim.assets().await;
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_assets(ListAssetsRequest {
                tenant_id: tenant.to_string(),
                project_id: project.to_string(),
                page_size,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.tenant_id, tenant.to_string());
        assert!(page.assets.len() <= page_size as usize);
        all.extend(page.assets);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn the_asset_and_user_team_services_answer_seeded_data_with_its_tenant() {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let sim = UpstreamSim::start(&prefix(), &[a, b], &[]).await;
    let seed_a = sim.tenant(a).clone();
    let seed_b = sim.tenant(b).clone();

    // Paged listing: every seeded asset once, all the tenant's, newest first.
    let listed = list_all(&sim, a, "", 2).await;
    let ids: Vec<&str> = listed.iter().map(|x| x.id.as_str()).collect();
    assert_eq!(
        ids.iter().copied().collect::<HashSet<_>>(),
        seed_a
            .assets
            .iter()
            .map(String::as_str)
            .collect::<HashSet<_>>()
    );
    assert_eq!(ids.len(), seed_a.assets.len(), "no asset twice: {ids:?}");
    assert!(listed.iter().all(|x| x.tenant_id == a.to_string()));
    let times: Vec<_> = listed
        .iter()
        .map(|x| x.create_time.unwrap().seconds)
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");

    // One project's.
    let launch = &seed_a.projects["launch"];
    let in_launch = list_all(&sim, a, launch, 100).await;
    assert_eq!(in_launch.len(), 3);
    assert!(in_launch.iter().all(|x| &x.project_id == launch));

    // The other tenant's are its own.
    let listed_b = list_all(&sim, b, "", 100).await;
    assert_eq!(listed_b.len(), seed_b.assets.len());
    assert!(listed_b.iter().all(|x| x.tenant_id == b.to_string()));
    assert!(listed_b.iter().all(|x| !seed_a.assets.contains(&x.id)));

    let mut assets = sim.assets().await;
    let got = assets
        .get_asset(GetAssetRequest {
            tenant_id: a.to_string(),
            asset_id: listed[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, listed[0]);
    // By id alone, as the contract says: the answer names its owner, and the caller checks.
    let foreign = assets
        .get_asset(GetAssetRequest {
            tenant_id: b.to_string(),
            asset_id: listed[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(foreign.tenant_id, a.to_string());
    let missing = assets
        .get_asset(GetAssetRequest {
            tenant_id: a.to_string(),
            asset_id: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let no_tenant = assets
        .get_asset(GetAssetRequest {
            tenant_id: String::new(),
            asset_id: listed[0].id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(no_tenant.code(), tonic::Code::InvalidArgument);
    let bad_token = assets
        .list_assets(ListAssetsRequest {
            tenant_id: a.to_string(),
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_token.code(), tonic::Code::InvalidArgument);

    let mut users = sim.users().await;
    let alice = users
        .get_user(GetUserRequest {
            tenant_id: a.to_string(),
            user_id: seed_a.users["alice"].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alice.tenant_id, a.to_string());
    assert_eq!(alice.display_name, "Alice Martin");
    let bob_of_b = users
        .get_user(GetUserRequest {
            tenant_id: a.to_string(),
            user_id: seed_b.users["bob"].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bob_of_b.tenant_id, b.to_string());
    let research = users
        .get_team(GetTeamRequest {
            tenant_id: a.to_string(),
            team_id: seed_a.teams["research"].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            research.tenant_id.as_str(),
            research.name.as_str(),
            research.member_count
        ),
        (a.to_string().as_str(), "Research", 3)
    );

    // Members page by page, in joining order.
    let mut members = Vec::new();
    let mut token = String::new();
    loop {
        let page = users
            .list_team_members(ListTeamMembersRequest {
                tenant_id: a.to_string(),
                team_id: research.id.clone(),
                page_size: 1,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.tenant_id, a.to_string());
        assert_eq!(page.team_id, research.id);
        assert_eq!(page.members.len(), 1);
        members.extend(page.members);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let names: Vec<(&str, &str)> = members
        .iter()
        .map(|m| {
            let name = seed_a
                .users
                .iter()
                .find(|(_, id)| **id == m.user_id)
                .map(|(name, _)| name.as_str())
                .expect("a seeded user");
            (name, m.role.as_str())
        })
        .collect();
    assert_eq!(
        names,
        [("carol", "owner"), ("alice", "member"), ("bob", "member")]
    );
    assert!(members.iter().all(|m| m.tenant_id == a.to_string()));
    let unknown_team = users
        .list_team_members(ListTeamMembersRequest {
            tenant_id: a.to_string(),
            team_id: Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown_team.code(), tonic::Code::NotFound);
}

/// The test in devgate's place on the broker: publishes jobs and cancels, reads updates.
struct Devgate {
    channel: Channel,
    updates: Consumer,
    jobs_exchange: String,
}

/// How long a test waits for an update that must come.
const UPDATE_WAIT: Duration = Duration::from_secs(30);

impl Devgate {
    /// Declares the updates queue as devgate does (durable) and consumes it.
    async fn connect(sim: &UpstreamSim) -> Devgate {
        let mq: Mq = upstream_sim::mq(&sim.prefix);
        let channel = mq
            .confirm_channel()
            .await
            .expect("RabbitMQ at 127.0.0.1:5672");
        channel
            .queue_declare(
                sim.ready.updates_queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                QueueType::Classic.arguments(),
            )
            .await
            .unwrap();
        let updates = channel
            .basic_consume(
                sim.ready.updates_queue.as_str().into(),
                "test".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Devgate {
            channel,
            updates,
            jobs_exchange: sim.ready.jobs_exchange.clone(),
        }
    }

    /// Publishes like devgate's relay: persistent, mandatory, confirmed.
    async fn publish<M: Message + Name>(&self, routing_key: &str, id: &str, message: &M) {
        let properties = BasicProperties::default()
            .with_content_type(routing::CONTENT_TYPE.into())
            .with_type(M::full_name().into())
            .with_message_id(id.into())
            .with_delivery_mode(2);
        let confirm = self
            .channel
            .basic_publish(
                self.jobs_exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.encode_to_vec(),
                properties,
            )
            .await
            .unwrap();
        Mq::confirmed(confirm, id)
            .await
            .expect("the simulator's queue took the message");
    }

    async fn submit(&self, job: &GenerationJob) {
        self.publish(routing::JOB_ROUTING_KEY, &job.generation_id, job)
            .await
    }

    async fn cancel(&self, job: &GenerationJob, reason: &str) {
        let cancel = GenerationCancel {
            generation_id: job.generation_id.clone(),
            tenant_id: job.tenant_id.clone(),
            reason: reason.into(),
        };
        self.publish(routing::CANCEL_ROUTING_KEY, &job.generation_id, &cancel)
            .await
    }

    /// The next update on the queue, with its AMQP properties checked.
    async fn next(&mut self) -> GenerationUpdate {
        let delivery = tokio::time::timeout(UPDATE_WAIT, self.updates.next())
            .await
            .expect("an update within 30 s")
            .expect("the consumer is open")
            .unwrap();
        let props = &delivery.properties;
        assert_eq!(
            props.content_type().as_ref().map(|c| c.as_str()),
            Some(routing::CONTENT_TYPE)
        );
        assert_eq!(
            props.kind().as_ref().map(|k| k.to_string()),
            Some(GenerationUpdate::full_name())
        );
        assert_eq!(props.delivery_mode(), &Some(2));
        let update = GenerationUpdate::decode(delivery.data.as_slice()).unwrap();
        assert_eq!(
            props.message_id().as_ref().map(|m| m.to_string()),
            Some(format!("{}/{}", update.generation_id, update.sequence))
        );
        update
    }

    /// `job`'s updates up to its terminal one (this test's only job in flight).
    async fn until_terminal(&mut self, job: &GenerationJob) -> Vec<GenerationUpdate> {
        let mut updates = Vec::new();
        loop {
            let update = self.next().await;
            assert_eq!(update.generation_id, job.generation_id);
            assert_eq!(update.tenant_id, job.tenant_id);
            let terminal = is_terminal(update.state());
            updates.push(update);
            if terminal {
                return updates;
            }
        }
    }
}

fn is_terminal(state: GenerationState) -> bool {
    matches!(
        state,
        GenerationState::Succeeded | GenerationState::Failed | GenerationState::Cancelled
    )
}

fn job(tenant: Uuid, prompt: &str, count: u32, project: &str) -> GenerationJob {
    let style = prost_types::Struct {
        fields: [(
            "palette".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("warm".into())),
            },
        )]
        .into(),
    };
    GenerationJob {
        generation_id: Uuid::new_v4().to_string(),
        tenant_id: tenant.to_string(),
        kind: "image".into(),
        prompt: prompt.into(),
        output_format: "webp".into(),
        style: Some(style),
        count,
        project_id: project.into(),
        metadata: [("campaign".to_string(), "spring".to_string())].into(),
        requested_by: "api_key:key_test".into(),
        create_time: Some(timestamp(chrono::Utc::now())),
    }
}

fn states(updates: &[GenerationUpdate]) -> Vec<GenerationState> {
    updates.iter().map(|u| u.state()).collect()
}

fn sequences(updates: &[GenerationUpdate]) -> Vec<u64> {
    updates.iter().map(|u| u.sequence).collect()
}

#[tokio::test]
async fn a_job_runs_to_success_and_its_assets_are_readable() {
    let tenant = Uuid::new_v4();
    let sim = UpstreamSim::start(
        &prefix(),
        &[tenant],
        &["--job-duration", "400ms", "--progress-steps", "4"],
    )
    .await;
    let mut devgate = Devgate::connect(&sim).await;
    let project = sim.tenant(tenant).projects["launch"].clone();
    let job = job(tenant, "a red fox in the snow", 2, &project);
    devgate.submit(&job).await;

    let updates = devgate.until_terminal(&job).await;
    use GenerationState::{Running, Succeeded};
    assert_eq!(
        states(&updates),
        [Running, Running, Running, Running, Succeeded]
    );
    assert_eq!(sequences(&updates), [1, 2, 3, 4, 5]);
    let progress: Vec<u32> = updates.iter().map(|u| u.progress).collect();
    assert_eq!(progress, [0, 25, 50, 75, 100]);
    let done = updates.last().unwrap();
    assert_eq!(done.asset_ids.len(), 2);
    assert_eq!(done.result_urls.len(), 2);
    assert!(done.error.is_none());
    let usage = done.usage.unwrap();
    assert_eq!((usage.seconds, usage.outputs), (1, 2));

    // The outputs are assets of the job's tenant and project.
    let mut assets = sim.assets().await;
    for (id, url) in done.asset_ids.iter().zip(&done.result_urls) {
        let asset = assets
            .get_asset(GetAssetRequest {
                tenant_id: tenant.to_string(),
                asset_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(asset.tenant_id, tenant.to_string());
        assert_eq!(asset.project_id, project);
        assert_eq!(asset.generation_id, job.generation_id);
        assert_eq!(&asset.url, url);
        assert_eq!(asset.media_type, "image/webp");
        assert_eq!(asset.created_by, "api_key:key_test");
    }
    let in_project: HashSet<String> = list_all(&sim, tenant, &project, 100)
        .await
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(in_project.len(), 3 + 2, "3 seeded and the 2 outputs");
    assert!(done.asset_ids.iter().all(|id| in_project.contains(id)));
}

#[tokio::test]
async fn a_prompt_containing_fail_fails_without_assets() {
    let tenant = Uuid::new_v4();
    let sim = UpstreamSim::start(
        &prefix(),
        &[],
        &["--job-duration", "400ms", "--progress-steps", "4"],
    )
    .await;
    let mut devgate = Devgate::connect(&sim).await;
    let job = job(tenant, "please FAIL this one", 1, "");
    devgate.submit(&job).await;

    let updates = devgate.until_terminal(&job).await;
    use GenerationState::{Failed, Running};
    assert_eq!(states(&updates), [Running, Running, Failed]);
    assert_eq!(sequences(&updates), [1, 2, 3]);
    let failed = updates.last().unwrap();
    assert_eq!(failed.error.as_ref().unwrap().code, "MODEL_ERROR");
    assert!(failed.asset_ids.is_empty() && failed.result_urls.is_empty());
    assert_eq!(failed.usage.unwrap().outputs, 0);
    assert!(list_all(&sim, tenant, "", 100).await.is_empty());
}

#[tokio::test]
async fn a_cancel_stops_a_running_job() {
    let tenant = Uuid::new_v4();
    // Far longer than the test: only the cancel can end the job.
    let sim = UpstreamSim::start(
        &prefix(),
        &[],
        &["--job-duration", "10m", "--progress-steps", "100"],
    )
    .await;
    let mut devgate = Devgate::connect(&sim).await;
    let job = job(tenant, "a very long film", 1, "");
    devgate.submit(&job).await;
    let first = devgate.next().await;
    assert_eq!(
        (first.state(), first.sequence, first.progress),
        (GenerationState::Running, 1, 0)
    );

    devgate.cancel(&job, "cancelled by the developer").await;
    let mut updates = vec![first];
    updates.extend(devgate.until_terminal(&job).await);
    let cancelled = updates.last().unwrap();
    assert_eq!(cancelled.state(), GenerationState::Cancelled);
    let error = cancelled.error.as_ref().unwrap();
    assert_eq!(
        (error.code.as_str(), error.message.as_str()),
        ("CANCELLED", "cancelled by the developer")
    );
    assert!(cancelled.asset_ids.is_empty());
    let seq = sequences(&updates);
    assert!(seq.windows(2).all(|w| w[0] < w[1]), "{seq:?}");
}

#[tokio::test]
async fn duplicate_and_out_of_order_updates_on_request() {
    let tenant = Uuid::new_v4();
    let sim = UpstreamSim::start(
        &prefix(),
        &[],
        &[
            "--job-duration",
            "200ms",
            "--progress-steps",
            "2",
            "--duplicate-updates",
            "--out-of-order-updates",
        ],
    )
    .await;
    let mut devgate = Devgate::connect(&sim).await;
    let job = job(tenant, "twice and late", 1, "");
    devgate.submit(&job).await;

    // Each update is sent twice, then the one before it again: RUNNING 0 (1), RUNNING 50
    // (2), SUCCEEDED (3), published by one task on one channel, hence in this order.
    let mut received = Vec::new();
    for _ in 0..8 {
        received.push(devgate.next().await);
    }
    assert_eq!(sequences(&received), [1, 1, 2, 2, 1, 3, 3, 2]);
    use GenerationState::{Running, Succeeded};
    assert_eq!(
        states(&received),
        [
            Running, Running, Running, Running, Running, Succeeded, Succeeded, Running
        ]
    );
    // A re-sent update is the same update.
    assert_eq!(received[0], received[1]);
    assert_eq!(received[0], received[4]);
    assert_eq!(received[5], received[6]);
}
