//! The asset, user and team reads of `devgate.v1.GenerationProxy` (GetAsset, ListAssets,
//! GetUser, GetTeam, ListTeamMembers) against the upstream simulator as a real process, over
//! gRPC and as REST through Envoy: devgate's own messages, paging, tenant isolation (another
//! tenant's ids answer 404 like unknown ones), scopes (403), validation (400 naming the
//! fields, before any upstream call), a slow upstream (503 at the deadline) and a stopped
//! one: 503 within the deadline, the breaker failing fast, recovery once the simulator is
//! back.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use devgate::{
    app::Roles,
    proto::{
        upstream::assets::v1::GetAssetRequest as UpstreamGetAsset,
        v1::{self, generation_proxy_client::GenerationProxyClient},
    },
};
use reqwest::StatusCode;
use serde_json::Value;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::harness::{envoy::Edge, upstream_sim::UpstreamSim, *};

/// Slack over the deadline for scheduling and process noise: a bound on a hang, not a
/// latency target.
const MARGIN: Duration = Duration::from_millis(750);

const READ_SCOPES: &[&str] = &["assets:read", "users:read", "teams:read"];

fn sim_prefix() -> String {
    format!("devgate-test-{}", Uuid::new_v4().simple())
}

/// An instance that reads from `sim`.
fn upstream(settings: Settings, sim: &UpstreamSim) -> Settings {
    settings
        .set(
            "DEVGATE_ASSET_SERVICE_ADDR",
            &sim.ready.asset_addr.to_string(),
        )
        .set(
            "DEVGATE_USER_TEAM_SERVICE_ADDR",
            &sim.ready.user_team_addr.to_string(),
        )
}

async fn client(app: &TestApp) -> GenerationProxyClient<Channel> {
    GenerationProxyClient::new(channel(app.public).await)
}

fn denied<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) {
    assert_refused(&r.unwrap_err(), Code::PermissionDenied, "PERMISSION_DENIED");
}

fn get_asset(id: &str) -> v1::GetAssetRequest {
    v1::GetAssetRequest { id: id.into() }
}

fn list_assets(project_id: &str, page_size: i32, page_token: &str) -> v1::ListAssetsRequest {
    v1::ListAssetsRequest {
        project_id: project_id.into(),
        page_size,
        page_token: page_token.into(),
    }
}

fn members(team_id: &str, page_size: i32, page_token: &str) -> v1::ListTeamMembersRequest {
    v1::ListTeamMembersRequest {
        team_id: team_id.into(),
        page_size,
        page_token: page_token.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_reads_over_grpc_are_devgates_own_paged_and_tenant_isolated() {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let sim = UpstreamSim::start(&sim_prefix(), &[a, b], &[]).await;
    let w = World::with_roles(Roles::API, |s| upstream(s, &sim)).await;
    let (seed_a, seed_b) = (sim.tenant(a).clone(), sim.tenant(b).clone());
    let (_, key) = create_key(&w.app, a, READ_SCOPES).await;
    let mut c = client(&w.app).await;

    // GetAsset: what the Asset service holds, in devgate's message.
    let asset_id = &seed_a.assets[0];
    let got = c
        .get_asset(api_key(get_asset(asset_id), &key))
        .await
        .unwrap()
        .into_inner();
    let original = sim
        .assets()
        .await
        .get_asset(UpstreamGetAsset {
            tenant_id: a.to_string(),
            asset_id: asset_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, original.id);
    assert_eq!(got.project_id, original.project_id);
    assert_eq!(got.kind, original.kind);
    assert_eq!(got.media_type, original.media_type);
    assert_eq!(got.url, original.url);
    assert_eq!(got.size_bytes as u64, original.size_bytes);
    assert_eq!(got.created_by, original.created_by);
    assert_eq!(got.create_time, original.create_time);
    // An upper-case UUID is the same asset.
    let upper = c
        .get_asset(api_key(get_asset(&asset_id.to_uppercase()), &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(upper.id, *asset_id);

    // Another tenant's asset and an unknown one: the same NOT_FOUND.
    for id in [seed_b.assets[0].clone(), Uuid::new_v4().to_string()] {
        let status = c
            .get_asset(api_key(get_asset(&id), &key))
            .await
            .unwrap_err();
        assert_refused(&status, Code::NotFound, "ASSET_NOT_FOUND");
        assert!(!status.message().contains(&b.to_string()));
    }

    // ListAssets: every one of a's assets over pages of 2, none of b's, newest first.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_assets(api_key(list_assets("", 2, &token), &key))
            .await
            .unwrap()
            .into_inner();
        assert!(page.assets.len() <= 2);
        seen.extend(page.assets);
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 10, "paging ends");
    }
    assert_eq!(pages, 3);
    let ids: BTreeSet<_> = seen.iter().map(|x| x.id.clone()).collect();
    assert_eq!(ids, seed_a.assets.iter().cloned().collect());
    let times: Vec<_> = seen
        .iter()
        .map(|x| x.create_time.as_ref().unwrap().seconds)
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
    // One project's, and a token of another filter refused.
    let launch = &seed_a.projects["launch"];
    let page = c
        .list_assets(api_key(list_assets(launch, 2, ""), &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.assets.len(), 2);
    assert!(page.assets.iter().all(|x| x.project_id == *launch));
    let status = c
        .list_assets(api_key(list_assets("", 2, &page.next_page_token), &key))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(field_violations(&status), ["page_token"]);
    let rest = c
        .list_assets(api_key(list_assets(launch, 2, &page.next_page_token), &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.assets.len(), 1);
    assert!(rest.next_page_token.is_empty());

    // Users and teams.
    let alice = c
        .get_user(api_key(
            v1::GetUserRequest {
                id: seed_a.users["alice"].clone(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alice.display_name, "Alice Martin");
    assert!(alice.email.starts_with("alice@"));
    let status = c
        .get_user(api_key(
            v1::GetUserRequest {
                id: seed_b.users["alice"].clone(),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_refused(&status, Code::NotFound, "USER_NOT_FOUND");
    let research = c
        .get_team(api_key(
            v1::GetTeamRequest {
                id: seed_a.teams["research"].clone(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (research.name.as_str(), research.member_count),
        ("Research", 3)
    );
    let status = c
        .get_team(api_key(
            v1::GetTeamRequest {
                id: seed_b.teams["research"].clone(),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_refused(&status, Code::NotFound, "TEAM_NOT_FOUND");
    let first = c
        .list_team_members(api_key(members(&research.id, 2, ""), &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.members.len(), 2);
    assert_eq!(first.members[0].user_id, seed_a.users["carol"]);
    assert_eq!(first.members[0].role, "owner");
    assert!(!first.next_page_token.is_empty());
    let second = c
        .list_team_members(api_key(
            members(&research.id, 2, &first.next_page_token),
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.members.len(), 1);
    assert_eq!(second.members[0].user_id, seed_a.users["bob"]);
    assert!(second.next_page_token.is_empty());
    // A token of one team is not one of another's.
    let status = c
        .list_team_members(api_key(
            members(&seed_a.teams["design"], 2, &first.next_page_token),
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&status), ["page_token"]);
    let status = c
        .list_team_members(api_key(members(&seed_b.teams["design"], 2, ""), &key))
        .await
        .unwrap_err();
    assert_refused(&status, Code::NotFound, "TEAM_NOT_FOUND");

    // A portal member (no admin role) holds the read scopes too; tenant b's member sees b's.
    let member_b = user_token(b, "bob", &[]);
    let own = c
        .get_team(bearer(
            v1::GetTeamRequest {
                id: seed_b.teams["design"].clone(),
            },
            &member_b,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.id, seed_b.teams["design"]);
    let status = c
        .get_asset(bearer(get_asset(&seed_a.assets[1]), &member_b))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_refuses_missing_scopes_and_bad_input_before_calling_upstream() {
    let tenant = Uuid::new_v4();
    let sim = UpstreamSim::start(&sim_prefix(), &[tenant], &[]).await;
    let w = World::with_roles(Roles::API, |s| upstream(s, &sim)).await;
    let seed = sim.tenant(tenant).clone();
    let mut c = client(&w.app).await;

    // Each read needs its own scope; a key with the other two is refused (before its bad
    // ids are even looked at).
    let (_, no_assets) = create_key(&w.app, tenant, &["users:read", "teams:read"]).await;
    let (_, no_users) = create_key(&w.app, tenant, &["assets:read", "teams:read"]).await;
    let (_, no_teams) = create_key(&w.app, tenant, &["assets:read", "users:read"]).await;
    denied(
        c.get_asset(api_key(get_asset("not-a-uuid"), &no_assets))
            .await,
    );
    denied(
        c.list_assets(api_key(list_assets("", 0, ""), &no_assets))
            .await,
    );
    denied(
        c.get_user(api_key(
            v1::GetUserRequest {
                id: seed.users["alice"].clone(),
            },
            &no_users,
        ))
        .await,
    );
    denied(
        c.get_team(api_key(
            v1::GetTeamRequest {
                id: seed.teams["design"].clone(),
            },
            &no_teams,
        ))
        .await,
    );
    denied(
        c.list_team_members(api_key(members("design", -1, ""), &no_teams))
            .await,
    );

    // Bad input: 400 naming every bad field.
    let (_, key) = create_key(&w.app, tenant, READ_SCOPES).await;
    let status = c
        .get_asset(api_key(get_asset("asset-1"), &key))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&status), ["id"]);
    for size in [-1, 101] {
        let status = c
            .list_assets(api_key(list_assets("", size, ""), &key))
            .await
            .unwrap_err();
        assert_eq!(field_violations(&status), ["page_size"], "{size}");
    }
    let status = c
        .list_assets(api_key(list_assets(&"p".repeat(201), 500, "garbage"), &key))
        .await
        .unwrap_err();
    assert_eq!(
        field_violations(&status),
        ["project_id", "page_size", "page_token"]
    );
    let page = c
        .list_assets(api_key(list_assets("", 100, ""), &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.assets.len(), seed.assets.len(), "100 is allowed");
    let long = "u".repeat(201);
    for id in ["", "a b", "a/b", long.as_str()] {
        let status = c
            .get_user(api_key(v1::GetUserRequest { id: id.into() }, &key))
            .await
            .unwrap_err();
        assert_eq!(field_violations(&status), ["id"], "{id:?}");
    }
    let status = c
        .get_team(api_key(
            v1::GetTeamRequest {
                id: "design".into(),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&status), ["id"]);
    let status = c
        .list_team_members(api_key(members("design", 0, ""), &key))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&status), ["team_id"]);
    let status = c
        .list_team_members(api_key(members(&seed.teams["design"], 1000, "x"), &key))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&status), ["page_size", "page_token"]);
}

/// `GET path` through Envoy with an API key: status, headers, JSON body.
async fn rest(e: &Edge, path: &str, key: &str) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let resp = e
        .http
        .get(e.url(path))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_every_rest_path_through_envoy() {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let sim = UpstreamSim::start(&sim_prefix(), &[a, b], &[]).await;
    let e = Edge::on(World::with_roles(Roles::API, |s| upstream(s, &sim)).await).await;
    let (seed_a, seed_b) = (sim.tenant(a).clone(), sim.tenant(b).clone());
    let (_, key) = create_key(&e.world.app, a, READ_SCOPES).await;

    let asset_id = &seed_a.assets[0];
    let (status, headers, asset) = rest(&e, &format!("/v1/assets/{asset_id}"), &key).await;
    assert_eq!(status, StatusCode::OK, "{asset}");
    assert_eq!(asset["id"], asset_id.as_str());
    assert!(
        asset["size_bytes"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    assert!(asset["url"].as_str().unwrap().starts_with("https://"));
    assert!(asset.get("tenant_id").is_none(), "devgate's own message");
    // Rate limited like every call: the headers of the key's buckets.
    assert!(
        headers.get("x-ratelimit-remaining").is_some(),
        "{headers:?}"
    );

    let launch = &seed_a.projects["launch"];
    let (status, _, page) = rest(
        &e,
        &format!("/v1/assets?project_id={launch}&page_size=2"),
        &key,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["assets"].as_array().unwrap().len(), 2);
    let token = page["next_page_token"].as_str().unwrap();
    let (status, _, page) = rest(
        &e,
        &format!("/v1/assets?project_id={launch}&page_size=2&page_token={token}"),
        &key,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["assets"].as_array().unwrap().len(), 1);
    assert_eq!(page["next_page_token"], "");

    let alice = &seed_a.users["alice"];
    let (status, _, user) = rest(&e, &format!("/v1/users/{alice}"), &key).await;
    assert_eq!(
        (status, user["display_name"].as_str()),
        (StatusCode::OK, Some("Alice Martin"))
    );
    let design = &seed_a.teams["design"];
    let (status, _, team) = rest(&e, &format!("/v1/teams/{design}"), &key).await;
    assert_eq!(status, StatusCode::OK, "{team}");
    assert_eq!(
        (team["name"].as_str(), team["member_count"].as_i64()),
        (Some("Design"), Some(2))
    );
    let (status, _, listed) =
        rest(&e, &format!("/v1/teams/{design}/members?page_size=1"), &key).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["members"][0]["user_id"], alice.as_str());
    assert_eq!(listed["members"][0]["role"], "owner");
    assert_ne!(listed["next_page_token"], "");

    // Another tenant's: 404 with the reason, like an unknown id.
    for path in [
        format!("/v1/assets/{}", seed_b.assets[0]),
        format!("/v1/users/{}", seed_b.users["alice"]),
        format!("/v1/teams/{}", seed_b.teams["design"]),
        format!("/v1/teams/{}/members", seed_b.teams["design"]),
        format!("/v1/assets/{}", Uuid::new_v4()),
    ] {
        let (status, _, body) = rest(&e, &path, &key).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(body["code"], 5, "{body}");
    }

    // A key without the scope: 403.
    let (_, narrow) = create_key(&e.world.app, a, &["generations:read"]).await;
    for path in [
        format!("/v1/assets/{asset_id}"),
        "/v1/assets".to_string(),
        format!("/v1/users/{alice}"),
        format!("/v1/teams/{design}"),
        format!("/v1/teams/{design}/members"),
    ] {
        let (status, _, body) = rest(&e, &path, &narrow).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
    }

    // Bad input: 400 with the field violations.
    for (path, field) in [
        ("/v1/assets/not-a-uuid".to_string(), "id"),
        ("/v1/assets?page_size=101".to_string(), "page_size"),
        ("/v1/assets?page_token=nope".to_string(), "page_token"),
        ("/v1/teams/design".to_string(), "id"),
        (
            format!("/v1/teams/{design}/members?page_size=-3"),
            "page_size",
        ),
        ("/v1/teams/design/members".to_string(), "team_id"),
    ] {
        let (status, _, body) = rest(&e, &path, &key).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(
            body["details"][0]["field_violations"][0]["field"], field,
            "{path}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_upstream_stopped_is_503_in_time_breaker_fails_fast_then_recovers() {
    let tenant = Uuid::new_v4();
    let prefix = sim_prefix();
    let sim = UpstreamSim::start(&prefix, &[tenant], &[]).await;
    let (asset_addr, user_team_addr) = (sim.ready.asset_addr, sim.ready.user_team_addr);
    let seed = sim.tenant(tenant).clone();
    let timeout = Duration::from_secs(1);
    let cooldown = Duration::from_secs(3);
    let e = Edge::on(
        World::with_roles(Roles::API, |s| {
            upstream(s, &sim)
                .set("DEVGATE_UPSTREAM_TIMEOUT", "1s")
                .set("DEVGATE_UPSTREAM_BREAKER_FAILURES", "2")
                .set("DEVGATE_UPSTREAM_BREAKER_COOLDOWN", "3s")
        })
        .await,
    )
    .await;
    let (_, key) = create_key(&e.world.app, tenant, READ_SCOPES).await;
    let mut c = client(&e.world.app).await;
    let asset_path = format!("/v1/assets/{}", seed.assets[0]);
    let (status, _, _) = rest(&e, &asset_path, &key).await;
    assert_eq!(status, StatusCode::OK);

    drop(sim); // Kills the process.

    // Two failed calls (the breaker's threshold), each a 503 within the deadline.
    for _ in 0..2 {
        let started = Instant::now();
        let (status, headers, body) = rest(&e, &asset_path, &key).await;
        let elapsed = started.elapsed();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(elapsed < timeout + MARGIN, "no hang: {elapsed:?}");
        assert!(headers.get("retry-after").is_some(), "{headers:?}");
        assert_eq!(body["code"], 14, "{body}");
    }
    // Open: failed fast without calling, with RetryInfo for the rest of the cooldown.
    let started = Instant::now();
    let status = c
        .get_asset(api_key(get_asset(&seed.assets[0]), &key))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert_refused(&status, Code::Unavailable, "UPSTREAM_CIRCUIT_OPEN");
    assert!(
        elapsed < Duration::from_millis(300),
        "fast fail: {elapsed:?}"
    );
    let retry = status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(retry <= cooldown, "{retry:?}");
    let (status, _, body) = rest(&e, "/v1/assets?page_size=5", &key).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("failing"),
        "the breaker's answer: {body}"
    );
    // The User/Team service has a breaker of its own, still closed: it is called (and down).
    let status = c
        .get_user(api_key(
            v1::GetUserRequest {
                id: seed.users["alice"].clone(),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_ne!(
        status.get_error_details().error_info().unwrap().reason,
        "UPSTREAM_CIRCUIT_OPEN"
    );

    // The simulator comes back on the same ports; after the cooldown one probe closes the
    // breaker and every read works again.
    let sim = UpstreamSim::start_at(
        &prefix,
        &[tenant],
        &asset_addr.to_string(),
        &user_team_addr.to_string(),
        &[],
    )
    .await;
    assert_eq!(sim.ready.asset_addr, asset_addr);
    tokio::time::sleep(retry).await;
    wait_until(Duration::from_secs(10), || async {
        rest(&e, &asset_path, &key).await.0 == StatusCode::OK
    })
    .await;
    let (status, _, page) = rest(&e, "/v1/assets?page_size=5", &key).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["assets"].as_array().unwrap().len(), 5);
    let user = c
        .get_user(api_key(
            v1::GetUserRequest {
                id: seed.users["alice"].clone(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(user.id, seed.users["alice"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_slow_upstream_is_unavailable_at_the_deadline_over_grpc_and_rest() {
    let tenant = Uuid::new_v4();
    // Every answer of the simulator waits 10 s: far past devgate's deadline.
    let sim = UpstreamSim::start(&sim_prefix(), &[tenant], &["--rpc-delay", "10s"]).await;
    let seed = sim.tenant(tenant).clone();
    let timeout = Duration::from_millis(500);
    let e = Edge::on(
        World::with_roles(Roles::API, |s| {
            upstream(s, &sim).set("DEVGATE_UPSTREAM_TIMEOUT", "500ms")
        })
        .await,
    )
    .await;
    let (_, key) = create_key(&e.world.app, tenant, READ_SCOPES).await;
    let mut c = client(&e.world.app).await;

    let started = Instant::now();
    let status = c
        .get_team(api_key(
            v1::GetTeamRequest {
                id: seed.teams["design"].clone(),
            },
            &key,
        ))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert_refused(&status, Code::Unavailable, "UPSTREAM_DEADLINE_EXCEEDED");
    assert!(status.get_error_details().retry_info().is_some());
    assert!(elapsed < timeout + MARGIN, "no hang: {elapsed:?}");

    let started = Instant::now();
    let (status, headers, body) = rest(&e, &format!("/v1/assets/{}", seed.assets[0]), &key).await;
    let elapsed = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["retry-after"], "1");
    assert!(elapsed < timeout + MARGIN, "no hang: {elapsed:?}");
}
