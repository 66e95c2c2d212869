//! The events outbox and its relay against the real Postgres and RabbitMQ: only committed
//! events are published, each with its id as message_id and its type as routing key; an
//! idempotent repeat is a duplicate; two relays never publish an event twice; RabbitMQ down
//! keeps the rows in the outbox until it is back. Each test uses its own exchange prefix
//! and deletes its exchange and queue at the end.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::Duration,
};

use devgate::{
    db::{self, DatabaseConfig, PgPool},
    events::{
        outbox::{self, Event, EventMessage, NewEvent},
        relay::{Relay, RelayConfig, RelayStats},
    },
    identity::TenantId,
    mq::{Mq, MqConfig, QueueType},
};
use diesel::result::Error as DieselError;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use futures_util::StreamExt;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::harness::{TestDb, proxy::Proxy, wait_until};

const RABBITMQ_ADDR: &str = "127.0.0.1:5672";

fn amqp_url(addr: &str) -> String {
    format!("amqp://guest:guest@{addr}/%2f")
}

fn pool(db: &TestDb) -> PgPool {
    db::pool(&DatabaseConfig {
        url: db.url().to_string().into(),
        pool_size: 4,
        connect_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(15),
    })
}

async fn connect(db: &TestDb) -> AsyncPgConnection {
    AsyncPgConnection::establish(db.url())
        .await
        .expect("connect to the test database")
}

fn new_event(tenant: TenantId, event_type: &str, key: Option<&str>) -> NewEvent {
    NewEvent {
        tenant,
        event_type: event_type.into(),
        payload: json!({"api_key_id": "k_123", "n": 1}),
        idempotency_id: key.map(Into::into),
        source: "service:test".into(),
        endpoint_id: None,
    }
}

/// Appends `n` events in one committed transaction.
async fn append_committed(db: &TestDb, tenant: TenantId, event_type: &str, n: usize) -> Vec<Event> {
    let mut conn = connect(db).await;
    let event_type = event_type.to_string();
    conn.transaction::<_, devgate::db::StoreError, _>(async move |c| {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            let (event, duplicate) =
                outbox::append(c, new_event(tenant, &event_type, None)).await?;
            assert!(!duplicate);
            events.push(event);
        }
        Ok(events)
    })
    .await
    .unwrap()
}

async fn pending(db: &TestDb) -> i64 {
    outbox::pending(&mut connect(db).await).await.unwrap()
}

/// One message as a bound queue received it.
struct Received {
    message_id: String,
    routing_key: String,
    content_type: String,
    delivery_mode: u8,
    body: EventMessage,
}

/// The test's own exchange prefix, and a queue bound to its events exchange with `#`.
struct Bus {
    mq: Mq,
    consumer: lapin::Consumer,
    channel: lapin::Channel,
    queue: String,
}

impl Bus {
    /// The test's listener connects directly; the relay may go through `relay_addr`.
    async fn new() -> Bus {
        let prefix = format!("devgate-test-{}", Uuid::new_v4().simple());
        let mq = Mq::new(MqConfig {
            url: amqp_url(RABBITMQ_ADDR).into(),
            queue_type: QueueType::Classic,
            prefix,
        });
        // Declares the exchange (the topology), as the relay would.
        let (channel, consumer, queue) = crate::harness::mq::bind_all(&mq, "relay-test").await;
        Bus {
            mq,
            consumer,
            channel,
            queue,
        }
    }

    /// The same prefix through another address (a proxy in front of RabbitMQ).
    fn mq_via(&self, addr: SocketAddr) -> Mq {
        Mq::new(MqConfig {
            url: amqp_url(&addr.to_string()).into(),
            queue_type: QueueType::Classic,
            prefix: self.mq.config().prefix.clone(),
        })
    }

    /// Messages until `n` arrived (panics after `limit`), then whatever else arrives within
    /// `quiet` (to see duplicates).
    async fn receive(&mut self, n: usize, limit: Duration, quiet: Duration) -> Vec<Received> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let wait = if got.len() < n {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            } else {
                quiet
            };
            match tokio::time::timeout(wait, self.consumer.next()).await {
                Ok(Some(delivery)) => {
                    let d = delivery.expect("delivery");
                    let props = &d.properties;
                    got.push(Received {
                        message_id: props.message_id().as_ref().unwrap().to_string(),
                        routing_key: d.routing_key.to_string(),
                        content_type: props.content_type().as_ref().unwrap().to_string(),
                        delivery_mode: props.delivery_mode().unwrap(),
                        body: serde_json::from_slice(&d.data).expect("the body is an event"),
                    });
                }
                Ok(None) => panic!("the consumer ended"),
                Err(_) if got.len() < n => {
                    panic!("{} of {n} messages within {limit:?}", got.len())
                }
                Err(_) => return got,
            }
        }
    }

    /// Deletes the test's queue and exchange.
    async fn delete(self) {
        self.channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        self.channel
            .exchange_delete(
                self.mq.events_exchange().as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .unwrap();
        self.mq.reset().await;
    }
}

fn relay_config(batch_size: usize, poll_interval: Duration) -> RelayConfig {
    RelayConfig {
        batch_size,
        poll_interval,
        confirm_timeout: Duration::from_secs(5),
    }
}

fn spawn_relay(
    db: &TestDb,
    mq: Mq,
    config: RelayConfig,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<RelayStats> {
    let relay = Relay::new(pool(db), db.url().to_string().into(), mq, config);
    tokio::spawn(relay.run(stop.clone()))
}

/// Events rolled back with their transaction never leave; committed ones reach a bound
/// queue promptly through NOTIFY (the relay's poll interval is a minute), persistent, with
/// their id as message_id, their type as routing key and the event as JSON body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_committed_events_are_published_with_their_ids() {
    let db = TestDb::create().await;
    let mut bus = Bus::new().await;
    let stop = CancellationToken::new();
    let relay = spawn_relay(
        &db,
        bus.mq.clone(),
        relay_config(100, Duration::from_secs(60)),
        &stop,
    );
    // Let the relay subscribe and run its first (empty) pass.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tenant = TenantId(Uuid::new_v4());

    let mut conn = connect(&db).await;
    let rolled_back = conn
        .transaction::<(), DieselError, _>(async move |c| {
            outbox::append(c, new_event(tenant, "api_key.revoked", Some("gone")))
                .await
                .unwrap();
            Err(DieselError::RollbackTransaction)
        })
        .await;
    assert!(rolled_back.is_err());
    assert_eq!(pending(&db).await, 0, "nothing of a rollback stays");

    let mut committed = append_committed(&db, tenant, "api_key.created", 2).await;
    committed.extend(append_committed(&db, tenant, "usage.quota.warning", 1).await);

    let got = bus
        .receive(3, Duration::from_secs(10), Duration::from_millis(700))
        .await;
    assert_eq!(got.len(), 3, "exactly the committed events, once each");
    let by_id: HashMap<_, _> = got.iter().map(|r| (r.message_id.clone(), r)).collect();
    for event in &committed {
        let r = by_id
            .get(&event.id.to_string())
            .unwrap_or_else(|| panic!("event {} was not published", event.id));
        assert_eq!(r.routing_key, event.event_type);
        assert_eq!(r.content_type, "application/json");
        assert_eq!(r.delivery_mode, 2, "persistent");
        assert_eq!(r.body, event.message());
        assert_eq!(r.body.tenant_id, tenant.0);
    }
    wait_until(Duration::from_secs(5), || async { pending(&db).await == 0 }).await;

    stop.cancel();
    let stats = relay.await.unwrap();
    assert_eq!(stats.published, 3);
    assert_eq!(stats.failed_passes, 0);
    bus.delete().await;
}

/// A repeat of (tenant, idempotency_id) returns the first event and queues nothing; the
/// same key of another tenant, or no key, makes a new event.
#[tokio::test]
async fn an_idempotent_repeat_returns_the_first_event() {
    let db = TestDb::create().await;
    let mut conn = connect(&db).await;
    let (a, b) = (TenantId(Uuid::new_v4()), TenantId(Uuid::new_v4()));

    let (first, duplicate) = outbox::append(&mut conn, new_event(a, "credits.granted", Some("k1")))
        .await
        .unwrap();
    assert!(!duplicate);
    let mut repeat = new_event(a, "credits.granted", Some("k1"));
    repeat.payload = json!({"different": true});
    let (again, duplicate) = outbox::append(&mut conn, repeat).await.unwrap();
    assert!(duplicate);
    assert_eq!(again, first, "the first event, not the repeat's payload");
    assert_eq!(pending(&db).await, 1, "a duplicate queues nothing");

    let (other, duplicate) = outbox::append(&mut conn, new_event(b, "credits.granted", Some("k1")))
        .await
        .unwrap();
    assert!(!duplicate, "keys are per tenant");
    assert_ne!(other.id, first.id);
    for _ in 0..2 {
        let (_, duplicate) = outbox::append(&mut conn, new_event(a, "credits.granted", None))
            .await
            .unwrap();
        assert!(!duplicate, "no key, no deduplication");
    }
    assert_eq!(pending(&db).await, 4);
    assert_eq!(outbox::get(&mut conn, a, first.id).await.unwrap(), first);
    assert!(
        outbox::get(&mut conn, b, first.id).await.is_err(),
        "another tenant's event is not found"
    );
    assert!(first.id.get_version_num() == 7, "ids are UUIDv7");
}

/// Two relays on one database: SKIP LOCKED gives each row to one of them, so ~500 events
/// arrive once each and the relays' counts add up to exactly 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_publish_each_event_once() {
    let db = TestDb::create().await;
    let mut bus = Bus::new().await;
    let tenant = TenantId(Uuid::new_v4());
    let stop = CancellationToken::new();
    let relays: Vec<_> = (0..2)
        .map(|_| {
            spawn_relay(
                &db,
                bus.mq_via(RABBITMQ_ADDR.parse().unwrap()),
                relay_config(25, Duration::from_millis(100)),
                &stop,
            )
        })
        .collect();
    // Appended while both relays run, in 20 commits, so both keep waking up.
    let mut ids = HashSet::new();
    for i in 0..20 {
        let event_type = if i % 2 == 0 {
            "generation.completed"
        } else {
            "asset.created"
        };
        for e in append_committed(&db, tenant, event_type, 25).await {
            ids.insert(e.id.to_string());
        }
    }
    assert_eq!(ids.len(), 500);

    let got = bus
        .receive(500, Duration::from_secs(30), Duration::from_secs(1))
        .await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for r in &got {
        *counts.entry(r.message_id.as_str()).or_default() += 1;
    }
    let doubles: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubles.is_empty(), "published twice: {doubles:?}");
    assert_eq!(
        counts.keys().map(|k| k.to_string()).collect::<HashSet<_>>(),
        ids
    );
    wait_until(Duration::from_secs(5), || async { pending(&db).await == 0 }).await;

    stop.cancel();
    let mut total = 0;
    for relay in relays {
        total += relay.await.unwrap().published;
    }
    assert_eq!(total, 500, "no relay published a row the other one did");
    bus.delete().await;
}

/// RabbitMQ unreachable (a proxy in front of it is cut): committed events wait in the
/// outbox; when it is back, the relay reconnects, re-declares and publishes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_wait_in_the_outbox_while_rabbitmq_is_down() {
    let db = TestDb::create().await;
    let mut bus = Bus::new().await;
    let proxy = Proxy::start(RABBITMQ_ADDR.parse().unwrap()).await;
    let tenant = TenantId(Uuid::new_v4());
    let stop = CancellationToken::new();
    let relay = spawn_relay(
        &db,
        bus.mq_via(proxy.addr),
        relay_config(100, Duration::from_millis(200)),
        &stop,
    );

    // Connected and publishing through the proxy first.
    let first = append_committed(&db, tenant, "user.created", 1).await;
    let got = bus
        .receive(1, Duration::from_secs(10), Duration::from_millis(100))
        .await;
    assert_eq!(got[0].message_id, first[0].id.to_string());

    proxy.cut();
    let waiting = append_committed(&db, tenant, "user.updated", 20).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        pending(&db).await,
        20,
        "unconfirmed events stay in the outbox"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), bus.consumer.next())
            .await
            .is_err(),
        "nothing was published while RabbitMQ was unreachable"
    );

    proxy.restore();
    let got = bus
        .receive(20, Duration::from_secs(30), Duration::from_millis(700))
        .await;
    let received: HashSet<_> = got.iter().map(|r| r.message_id.clone()).collect();
    let expected: HashSet<_> = waiting.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(received, expected);
    assert_eq!(got.len(), 20, "each once");
    wait_until(Duration::from_secs(5), || async { pending(&db).await == 0 }).await;

    stop.cancel();
    let stats = relay.await.unwrap();
    assert_eq!(stats.published, 21);
    assert!(stats.failed_passes > 0, "the outage was seen: {stats:?}");
    bus.delete().await;
}

/// A ready-made message (a generation job) waits in the outbox while no queue is bound to its
/// exchange (mandatory publish, returned), then is published once with its properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_for_other_exchanges_wait_until_routable() {
    use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
    let db = TestDb::create().await;
    let mut bus = Bus::new().await;
    let stop = CancellationToken::new();
    let relay = spawn_relay(
        &db,
        bus.mq.clone(),
        relay_config(100, Duration::from_millis(200)),
        &stop,
    );
    let exchange = format!("{}.generation.jobs", bus.mq.config().prefix);
    let mut conn = connect(&db).await;
    outbox::enqueue(
        &mut conn,
        &outbox::OutboxMessage {
            exchange: &exchange,
            routing_key: "generation.requested",
            body: b"\x0a\x03abc",
            content_type: "application/x-protobuf",
            message_type: Some("upstream.orchestrator.v1.GenerationJob"),
            message_id: "job-1",
        },
    )
    .await
    .unwrap();
    // Nobody bound yet: returned, kept — and set aside, so an event queued behind it goes out.
    let tenant = TenantId(Uuid::new_v4());
    let behind = append_committed(&db, tenant, "api_key.created", 1).await;
    let got = bus
        .receive(1, Duration::from_secs(10), Duration::from_millis(300))
        .await;
    assert_eq!(got[0].message_id, behind[0].id.to_string());
    assert_eq!(
        pending(&db).await,
        1,
        "an unroutable message stays in the outbox"
    );

    let channel = bus.mq.channel().await.unwrap();
    let queue = format!("{}.orchestrator", bus.mq.config().prefix);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "generation.*".into(),
            QueueBindOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "orchestrator".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .expect("published once routable")
        .unwrap()
        .unwrap();
    assert_eq!(got.data, b"\x0a\x03abc");
    assert_eq!(got.routing_key.as_str(), "generation.requested");
    let p = &got.properties;
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "job-1");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/x-protobuf"
    );
    assert_eq!(
        p.kind().as_ref().unwrap().as_str(),
        "upstream.orchestrator.v1.GenerationJob"
    );
    assert_eq!(p.delivery_mode(), &Some(2));
    wait_until(Duration::from_secs(5), || async { pending(&db).await == 0 }).await;
    stop.cancel();
    relay.await.unwrap();
    let _ = channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    bus.delete().await;
}
