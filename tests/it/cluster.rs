//! Redis Cluster: the limiter (rate windows and the monthly quota in one script) and the
//! cache-invalidation broadcast against a local 3-node cluster started by the test.

use devgate::proto::internal::v1 as internal;
use std::time::Duration;

use devgate::proto::v1;
use devgate::{
    identity::TenantId,
    kv::Redis,
    kv::RedisConfig,
    ratelimit::{Limits, RateLimitError, RateLimiter},
};
use tonic::Code;
use uuid::Uuid;

use crate::harness::{redis_cluster::RedisCluster, *};

fn cluster_config(cluster: &RedisCluster, prefix: &str) -> RedisConfig {
    RedisConfig {
        url: "redis://127.0.0.1:1".to_string().into(), // unused in cluster mode
        cluster_nodes: cluster
            .nodes_from(0)
            .split(',')
            .map(|n| n.to_string().into())
            .collect(),
        prefix: prefix.to_string(),
    }
}

/// The limiter without a quota (`check`) on a cluster: fail closed, so a refused script
/// (CROSSSLOT, as with the placeholder second key) shows as an error instead of being hidden
/// by the in-process fallback; two limiters share the buckets through the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limiter_shares_buckets_through_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let prefix = format!("devgate-test:{}:", Uuid::new_v4().simple());
    let config = cluster_config(&cluster, &prefix);
    let a = RateLimiter::new(Redis::connect(&config).unwrap(), true);
    let b = RateLimiter::new(Redis::connect(&config).unwrap(), true);
    assert!(Redis::connect(&config).unwrap().is_cluster());
    let tenant = TenantId(Uuid::new_v4());
    let limits = Limits {
        per_minute: 6,
        per_hour: 100_000,
        per_day: 1_000_000,
        burst: 3,
    };
    let mut allowed = 0;
    for i in 0..6 {
        let limiter = if i % 2 == 0 { &a } else { &b };
        match limiter.check(tenant, "key1", &limits, 1).await {
            Ok(d) if d.allowed => allowed += 1,
            Ok(_) => {}
            Err(RateLimitError::Unavailable) => panic!("the cluster refused the limiter's script"),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(allowed, 3, "the burst, shared by both limiters");
    // The bucket lives on the node that owns its (tenant-tagged) slot.
    let bucket = format!("{prefix}rl:{{{tenant}}}:key1");
    let owner = cluster.node_of(&bucket);
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&bucket)
        .query(&mut cluster.node(owner))
        .unwrap();
    assert_eq!(exists, 1);
}

async fn limited_key(app: &TestApp, tenant: Uuid, burst: u32) -> (v1::ApiKey, String) {
    let mut req = create_request("limited", &["*"]);
    req.rate_limits = Some(v1::RateLimits {
        per_minute: 6,
        per_hour: 100_000,
        per_day: 1_000_000,
        burst,
    });
    create_key_with(app, tenant, req).await
}

/// Two replicas on the cluster, subscribed through different seed nodes: API-key calls are
/// limited (windows and quota in one script) and a revocation on one is seen by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_calls_and_revocations_work_on_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let w = World::with(|s| s.set("DEVGATE_REDIS_CLUSTER_NODES", &cluster.nodes_from(0))).await;
    let b = TestApp::spawn(
        w.app
            .settings
            .clone()
            .set("DEVGATE_REDIS_CLUSTER_NODES", &cluster.nodes_from(1)),
    )
    .await;
    b.wait_invalidations_live().await;
    let tenant = Uuid::new_v4();
    let (key, token) = limited_key(&w.app, tenant, 3).await;

    let mut codes = Vec::new();
    for app in [&w.app, &b, &w.app, &b, &w.app] {
        let result = app
            .public_client()
            .await
            .list_api_keys(api_key(
                v1::ListApiKeysRequest {
                    page_size: 1,
                    ..Default::default()
                },
                &token,
            ))
            .await;
        codes.push(result.err().map(|s| s.code()));
    }
    assert_eq!(
        codes,
        vec![
            None,
            None,
            None,
            Some(Code::ResourceExhausted),
            Some(Code::ResourceExhausted)
        ]
    );
    // The tenant's monthly counter counted the three admitted calls, on the cluster.
    let month = devgate::ratelimit::quota::month_bounds(chrono::Utc::now()).0;
    let counter = format!(
        "{}quota:{{{tenant}}}:monthly_requests:{}",
        w.prefix,
        month.format("%Y-%m")
    );
    let used: i64 = redis::cmd("GET")
        .arg(&counter)
        .query(&mut cluster.node(cluster.node_of(&counter)))
        .unwrap();
    assert_eq!(used, 3);

    // B caches the key; A revokes; B refuses long before its cache TTL.
    assert!(verify(&b, &token).await.valid);
    revoke(&w.app, tenant, &key.id).await.unwrap();
    wait_until(Duration::from_secs(2), || async {
        !verify(&b, &token).await.valid
    })
    .await;
    assert_eq!(
        reason(&verify(&b, &token).await),
        internal::VerifyFailureReason::Revoked
    );
    b.stop().await;
}
