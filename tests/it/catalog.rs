//! The event catalog as the migration seeds it: every sample validates against its own
//! schema, names and categories are well formed, wrong payloads get precise violations,
//! listing pages through every type once, and subscription patterns are checked against it.

use std::collections::{BTreeMap, BTreeSet};

use devgate::{
    db::StoreError,
    events::{
        Catalog, EventError, EventType,
        catalog::{self, matches},
    },
    validation::MAX_VIOLATIONS,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde_json::json;

use crate::harness::TestDb;

async fn connect(db: &TestDb) -> AsyncPgConnection {
    AsyncPgConnection::establish(db.url())
        .await
        .expect("connect to the test database")
}

/// The types the issue names; the catalog may have more.
const REQUIRED: &[&str] = &[
    "generation.queued",
    "generation.started",
    "generation.completed",
    "generation.failed",
    "generation.cancelled",
    "asset.created",
    "asset.updated",
    "asset.deleted",
    "api_key.created",
    "api_key.updated",
    "api_key.rotated",
    "api_key.revoked",
    "api_key.deleted",
    "api_key.expiring",
    "usage.quota.warning",
    "usage.quota.exceeded",
    "credits.granted",
    "credits.low",
    "credits.exhausted",
    "credits.refunded",
    "webhook_endpoint.created",
    "webhook_endpoint.disabled",
    "webhook_endpoint.enabled",
    "webhook_endpoint.secret_rotated",
    "team.member.added",
    "team.member.removed",
    "user.created",
    "user.updated",
    "subscription.updated",
    "subscription.cancelled",
    "webhook.test",
];

/// `^[a-z_]+(\.[a-z_]+)+$` without a regex dependency.
fn well_formed(name: &str) -> bool {
    let segments: Vec<&str> = name.split('.').collect();
    segments.len() >= 2
        && segments
            .iter()
            .all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
}

fn violations(err: EventError) -> (Vec<(String, String)>, usize) {
    let EventError::InvalidPayload(v) = err else {
        panic!("expected payload violations, got {err:?}")
    };
    let mut got: Vec<_> = v
        .iter()
        .map(|f| (f.field.clone(), f.description.clone()))
        .collect();
    got.sort();
    (got, v.omitted())
}

#[tokio::test]
async fn every_seeded_sample_validates_against_its_own_schema() {
    let db = TestDb::create().await;
    let mut conn = connect(&db).await;
    let types = catalog::all(&mut conn).await.unwrap();
    // Compiles every stored schema: a schema that is not valid draft 2020-12 fails here.
    let compiled = Catalog::load(&mut conn)
        .await
        .expect("every schema compiles");
    assert_eq!(compiled.len(), types.len());
    for t in &types {
        assert_eq!(
            t.schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{} declares its draft",
            t.name
        );
        assert_eq!(t.schema["type"], "object", "{}: data is an object", t.name);
        if let Err(e) = compiled.validate(&t.name, &t.sample) {
            panic!("the sample of {} does not match its schema: {e}", t.name);
        }
        // The schemas are strict enough to matter: an empty payload is refused by every
        // type that has required fields (all of them).
        assert!(
            compiled.validate(&t.name, &json!({})).is_err(),
            "{} accepts an empty payload",
            t.name
        );
    }
}

#[tokio::test]
async fn the_catalog_is_complete_and_well_formed() {
    let db = TestDb::create().await;
    let mut conn = connect(&db).await;
    let types = catalog::all(&mut conn).await.unwrap();
    assert!(types.len() >= 30, "only {} types", types.len());
    let names: BTreeSet<&str> = types.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), types.len(), "names are unique");
    for required in REQUIRED {
        assert!(names.contains(required), "{required} is missing");
    }
    let mut by_category: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &types {
        assert!(well_formed(&t.name), "{} is not a well-formed name", t.name);
        assert_eq!(
            Some(t.category.as_str()),
            t.name.split('.').next(),
            "{}: the category is the first segment",
            t.name
        );
        assert!(t.description.len() >= 20, "{}: describe it", t.name);
        assert!(t.version >= 1);
        assert!(!t.deprecated, "{}: nothing is deprecated yet", t.name);
        *by_category.entry(&t.category).or_default() += 1;
    }
    // Every category is non-empty through the filtered list too.
    for (category, count) in &by_category {
        let listed = catalog::list(&mut conn, Some(category), None, 100)
            .await
            .unwrap();
        assert_eq!(listed.len(), *count, "{category}");
        assert!(listed.iter().all(|t| &t.category == category));
    }
    let expected: BTreeSet<&str> = [
        "api_key",
        "asset",
        "credits",
        "generation",
        "subscription",
        "team",
        "usage",
        "user",
        "webhook",
        "webhook_endpoint",
    ]
    .into();
    assert_eq!(
        by_category.keys().copied().collect::<BTreeSet<_>>(),
        expected
    );
    // The table refuses a malformed name.
    let bad = diesel::sql_query(
        "INSERT INTO event_types (name, category, description, schema, sample) \
         VALUES ('Generation', 'generation', 'x', '{}', '{}')",
    )
    .execute(&mut conn)
    .await;
    assert!(
        bad.is_err(),
        "a name without a dot or with capitals is refused"
    );
}

#[tokio::test]
async fn a_wrong_payload_gets_precise_violations() {
    let db = TestDb::create().await;
    let mut conn = connect(&db).await;
    let compiled = Catalog::load(&mut conn).await.unwrap();
    let completed = catalog::get(&mut conn, "generation.completed")
        .await
        .unwrap();

    let mut payload = completed.sample.clone();
    let obj = payload.as_object_mut().unwrap();
    obj.remove("generation_id");
    obj.insert("modality".into(), json!("hologram"));
    obj.insert("credits_charged".into(), json!(-1));
    obj.insert("complete_time".into(), json!("yesterday at noon"));
    obj.insert("surprise".into(), json!(true));
    payload["assets"][0]["asset_id"] = json!("not-a-uuid");
    payload["assets"][0]["size_bytes"] = json!("2 MB");
    let (got, omitted) = violations(
        compiled
            .validate("generation.completed", &payload)
            .unwrap_err(),
    );
    assert_eq!(omitted, 0);
    let fields: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            "payload.assets[0].asset_id",
            "payload.assets[0].size_bytes",
            "payload.complete_time",
            "payload.credits_charged",
            "payload.generation_id",
            "payload.modality",
            "payload.surprise",
        ],
        "{got:#?}"
    );
    let why: BTreeMap<&str, &str> = got.iter().map(|(f, d)| (f.as_str(), d.as_str())).collect();
    assert!(
        why["payload.assets[0].asset_id"].contains("uuid"),
        "{why:?}"
    );
    assert!(
        why["payload.assets[0].size_bytes"].contains("integer"),
        "{why:?}"
    );
    assert!(
        why["payload.complete_time"].contains("date-time"),
        "{why:?}"
    );
    assert!(
        why["payload.credits_charged"].contains("minimum"),
        "{why:?}"
    );
    assert_eq!(why["payload.generation_id"], "is required");
    assert!(
        why["payload.modality"].contains("image"),
        "names the allowed values: {why:?}"
    );
    assert_eq!(
        why["payload.surprise"],
        "is not a property of this event type"
    );
    // Payload values are never echoed (they may be personal data and errors are logged).
    assert!(
        got.iter()
            .all(|(_, d)| !d.contains("hologram") && !d.contains("not-a-uuid"))
    );

    // A flood of errors (45 non-string metadata values, under maxProperties 50) is capped at MAX_VIOLATIONS, the rest counted.
    let mut flood = completed.sample.clone();
    flood["metadata"] = (0..45)
        .map(|i| (format!("k{i}"), json!(i)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let (got, omitted) = violations(
        compiled
            .validate("generation.completed", &flood)
            .unwrap_err(),
    );
    assert_eq!(got.len(), MAX_VIOLATIONS);
    assert_eq!(got.len() + omitted, 45);
    assert!(got.iter().all(|(f, _)| f.starts_with("payload.metadata.k")));

    // The wrong type is not a payload problem.
    let err = compiled
        .validate("generation.exploded", &payload)
        .unwrap_err();
    assert!(
        matches!(err, EventError::UnknownType(ref n) if n == "generation.exploded"),
        "{err:?}"
    );
    // Another type's sample does not pass for this one.
    let queued = catalog::get(&mut conn, "generation.queued").await.unwrap();
    assert!(
        compiled
            .validate("generation.completed", &queued.sample)
            .is_err()
    );
}

#[tokio::test]
async fn listing_pages_through_every_type_once() {
    let db = TestDb::create().await;
    let mut conn = connect(&db).await;
    let all: Vec<String> = catalog::all(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();

    let walk = async |conn: &mut AsyncPgConnection, category: Option<&str>, size: i64| {
        let mut seen = Vec::new();
        let mut pages = 0;
        let mut after: Option<String> = None;
        loop {
            let page = catalog::list(conn, category, after.as_deref(), size)
                .await
                .unwrap();
            assert!(page.len() as i64 <= size);
            pages += 1;
            let full = page.len() as i64 == size;
            after = page.last().map(|t| t.name.clone());
            seen.extend(page.into_iter().map(|t| t.name));
            if !full {
                break;
            }
        }
        (seen, pages)
    };

    let (seen, pages) = walk(&mut conn, None, 7).await;
    assert_eq!(seen, all, "every type once, in name order");
    assert_eq!(pages, all.len() / 7 + 1);

    let (api_keys, pages) = walk(&mut conn, Some("api_key"), 4).await;
    assert_eq!(
        api_keys,
        [
            "api_key.created",
            "api_key.deleted",
            "api_key.expiring",
            "api_key.revoked",
            "api_key.rotated",
            "api_key.updated"
        ]
    );
    assert_eq!(pages, 2);
    assert!(
        catalog::list(&mut conn, Some("nope"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A cursor past the end is an empty page, not an error.
    assert!(
        catalog::list(&mut conn, None, Some("zzz"), 10)
            .await
            .unwrap()
            .is_empty()
    );

    let one: EventType = catalog::get(&mut conn, "webhook.test").await.unwrap();
    assert_eq!(one.category, "webhook");
    assert_eq!(one.version, 1);
    assert!(matches!(
        catalog::get(&mut conn, "webhook.nope").await,
        Err(StoreError::NotFound)
    ));
}

#[tokio::test]
async fn subscription_patterns_are_checked_against_the_catalog() {
    let db = TestDb::create().await;
    let mut conn = connect(&db).await;
    let compiled = Catalog::load(&mut conn).await.unwrap();

    for ok in [
        "*",
        "generation.*",
        "usage.*",
        "usage.quota.*",
        "team.member.*",
        "api_key.revoked",
        "webhook.test",
    ] {
        assert_eq!(compiled.check_pattern(ok), Ok(()), "{ok}");
    }
    for (bad, why) in [
        ("generaton.*", "matches no event type"),
        ("api_key.exploded", "matches no event type"),
        ("webhook.test.*", "matches no event type"),
        ("usage.quota", "matches no event type"),
        ("generation.*.completed", "is not an event type"),
        ("Generation.completed", "is not an event type"),
        ("generation*", "is not an event type"),
        ("", "is not an event type"),
    ] {
        let got = compiled.check_pattern(bad).unwrap_err();
        assert!(got.contains(why), "{bad:?}: {got}");
    }
    let err = compiled
        .check_patterns(
            &[
                "generation.*".into(),
                "credit.*".into(),
                "credits.*".into(),
                "x".into(),
            ],
            "webhook_endpoint.event_types",
        )
        .unwrap_err();
    let EventError::InvalidPattern(v) = err else {
        panic!("{err:?}")
    };
    let fields: Vec<&str> = v.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "webhook_endpoint.event_types[1]",
            "webhook_endpoint.event_types[3]"
        ]
    );

    // `webhook_endpoint.*` is not `webhook.*`, and the reverse.
    let webhook = compiled.expand("webhook.*");
    assert_eq!(webhook, ["webhook.test"]);
    assert!(
        compiled
            .expand("webhook_endpoint.*")
            .iter()
            .all(|n| n.starts_with("webhook_endpoint."))
    );
    assert_eq!(compiled.expand("generation.*").len(), 6);
    assert_eq!(compiled.expand("*").len(), compiled.len());
    assert!(matches("usage.*", "usage.quota.exceeded"));
    assert!(!matches("webhook.*", "webhook_endpoint.disabled"));
}

#[tokio::test]
async fn reload_recompiles_a_type_whose_version_changed() {
    let db = TestDb::create().await;
    let mut conn = connect(&db).await;
    let compiled = Catalog::load(&mut conn).await.unwrap();
    let sample = catalog::get(&mut conn, "webhook.test")
        .await
        .unwrap()
        .sample;
    compiled.validate("webhook.test", &sample).unwrap();

    // Same version, changed schema (now also requiring `attempt`, which the sample lacks):
    // the compiled validator is kept, because a schema change must bump the version.
    diesel::sql_query(
        "UPDATE event_types \
         SET schema = jsonb_set(schema, '{required}', schema->'required' || '[\"attempt\"]') \
         WHERE name = 'webhook.test'",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    compiled.reload(&mut conn).await.unwrap();
    assert_eq!(compiled.version("webhook.test"), Some(1));
    compiled.validate("webhook.test", &sample).unwrap();

    diesel::sql_query("UPDATE event_types SET version = 2 WHERE name = 'webhook.test'")
        .execute(&mut conn)
        .await
        .unwrap();
    compiled.reload(&mut conn).await.unwrap();
    assert_eq!(compiled.version("webhook.test"), Some(2));
    let (got, _) = violations(compiled.validate("webhook.test", &sample).unwrap_err());
    assert_eq!(
        got,
        [("payload.attempt".to_string(), "is required".to_string())]
    );

    // A broken schema is refused on reload and the previous snapshot stays in use.
    diesel::sql_query(
        "UPDATE event_types SET version = 3, schema = '{\"type\": 12}' WHERE name = 'asset.created'",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let err = compiled.reload(&mut conn).await.unwrap_err();
    assert!(
        matches!(err, EventError::BadSchema { ref name, version: 3, .. } if name == "asset.created"),
        "{err:?}"
    );
    assert_eq!(compiled.version("asset.created"), Some(1));
}
