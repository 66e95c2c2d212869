//! The event catalog in Postgres (`event_types`), and [`Catalog`]: every type's schema
//! compiled once, for payload validation and subscription patterns.
//!
//! The table has one row per name; an incompatible schema change is a migration that bumps
//! `version`. Compiled validators are keyed by (name, version): [`Catalog::reload`]
//! recompiles only the types whose version changed.

use std::{
    collections::BTreeMap,
    ops::Bound,
    sync::{Arc, RwLock},
};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use jsonschema::error::ValidationErrorKind;
use serde_json::Value;

use super::EventError;
use crate::{
    db::{StoreError, schema::event_types},
    validation::{Violations, quote},
};

/// The request field a payload arrives in; payload violations are reported under it.
pub const PAYLOAD_FIELD: &str = "payload";

/// The subscription pattern that matches every event type.
pub const ALL: &str = "*";

/// One catalog entry, as stored.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = event_types, check_for_backend(diesel::pg::Pg))]
pub struct EventType {
    /// Dotted, e.g. `generation.completed`; also the RabbitMQ routing key.
    pub name: String,
    /// The first segment of the name (`generation`), for filtering the list.
    pub category: String,
    pub description: String,
    /// JSON Schema draft 2020-12 of the event's `data`.
    pub schema: Value,
    /// A payload that validates against `schema`; SendTestEvent sends it.
    pub sample: Value,
    pub version: i32,
    pub create_time: DateTime<Utc>,
    /// Still delivered and publishable, but new integrations should not subscribe.
    pub deprecated: bool,
}

/// One page in name order: at most `limit` types after `after` (exclusive), optionally of
/// one category.
pub async fn list(
    conn: &mut AsyncPgConnection,
    category: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<EventType>, StoreError> {
    let mut query = event_types::table.into_boxed();
    if let Some(category) = category {
        query = query.filter(event_types::category.eq(category));
    }
    if let Some(after) = after {
        query = query.filter(event_types::name.gt(after));
    }
    Ok(query
        .order(event_types::name.asc())
        .limit(limit)
        .select(EventType::as_select())
        .load(conn)
        .await?)
}

/// One type by name; `NotFound` if the catalog has no such type.
pub async fn get(conn: &mut AsyncPgConnection, name: &str) -> Result<EventType, StoreError> {
    Ok(event_types::table
        .find(name)
        .select(EventType::as_select())
        .first(conn)
        .await?)
}

/// Every type, in name order (the catalog is small: tens of rows).
pub async fn all(conn: &mut AsyncPgConnection) -> Result<Vec<EventType>, StoreError> {
    Ok(event_types::table
        .order(event_types::name.asc())
        .select(EventType::as_select())
        .load(conn)
        .await?)
}

/// Whether an endpoint subscribed with `subscription` receives `event_type`: `*` matches
/// everything, `prefix.*` every type under `prefix.`, anything else only itself.
pub fn matches(subscription: &str, event_type: &str) -> bool {
    if subscription == ALL {
        return true;
    }
    match subscription.strip_suffix(".*") {
        Some(prefix) => event_type
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.')),
        None => subscription == event_type,
    }
}

/// `*`, a name, or a name prefix followed by `.*`; segments are `[a-z_]+`.
fn well_formed_pattern(pattern: &str) -> bool {
    if pattern == ALL {
        return true;
    }
    let name = pattern.strip_suffix(".*").unwrap_or(pattern);
    !name.is_empty()
        && name
            .split('.')
            .all(|seg| !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
}

/// A type with its schema compiled.
struct Compiled {
    version: i32,
    validator: jsonschema::Validator,
}

/// The compiled catalog: cheap to clone and share; [`Catalog::reload`] swaps in a new
/// snapshot while readers keep the one they hold.
#[derive(Clone)]
pub struct Catalog {
    current: Arc<RwLock<Arc<Snapshot>>>,
}

type Snapshot = BTreeMap<String, Arc<Compiled>>;

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("types", &self.snapshot().len())
            .finish()
    }
}

impl Catalog {
    /// Reads the catalog and compiles every schema (off the async threads).
    pub async fn load(conn: &mut AsyncPgConnection) -> Result<Catalog, EventError> {
        let types = all(conn).await?;
        let snapshot = compile_all(types, Arc::default()).await?;
        Ok(Catalog {
            current: Arc::new(RwLock::new(Arc::new(snapshot))),
        })
    }

    /// Compiles `types` in the calling thread: for tests and tools, not async code.
    pub fn from_types(types: Vec<EventType>) -> Result<Catalog, EventError> {
        let snapshot = compile(types, &Snapshot::new())?;
        Ok(Catalog {
            current: Arc::new(RwLock::new(Arc::new(snapshot))),
        })
    }

    /// Re-reads the table; types whose version is unchanged keep their compiled validator.
    /// On error the previous snapshot stays in use.
    pub async fn reload(&self, conn: &mut AsyncPgConnection) -> Result<(), EventError> {
        let types = all(conn).await?;
        let snapshot = compile_all(types, self.snapshot()).await?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
        Ok(())
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many types the catalog has.
    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    pub fn is_empty(&self) -> bool {
        self.snapshot().is_empty()
    }

    /// The version of `name`'s schema, or `None` for an unknown type.
    pub fn version(&self, name: &str) -> Option<i32> {
        self.snapshot().get(name).map(|c| c.version)
    }

    /// Checks `payload` against the schema of `name`. Violations name the payload field
    /// (`payload.assets[0].url`) and are capped like every request's violations; messages
    /// never quote payload values, which may carry personal data and end up in logs.
    /// Cheap enough for an async thread: payloads are size-limited before this.
    pub fn validate(&self, name: &str, payload: &Value) -> Result<(), EventError> {
        let snapshot = self.snapshot();
        let compiled = snapshot
            .get(name)
            .ok_or_else(|| EventError::UnknownType(name.to_string()))?;
        let mut v = Violations::new();
        for error in compiled.validator.iter_errors(payload) {
            let at = field_path(payload, error.instance_path().as_str());
            match error.kind() {
                // Name the missing or unexpected property itself, not its parent object.
                ValidationErrorKind::Required { property } => {
                    let property = property
                        .as_str()
                        .map_or_else(|| property.to_string(), str::to_string);
                    v.add(join(&at, &property), "is required");
                }
                ValidationErrorKind::AdditionalProperties { unexpected } => {
                    for property in unexpected {
                        v.add(join(&at, property), "is not a property of this event type");
                    }
                }
                _ => v.add(at, error.masked().to_string()),
            }
        }
        if v.is_empty() {
            Ok(())
        } else {
            Err(EventError::InvalidPayload(v))
        }
    }

    /// Whether `pattern` is a valid subscription: well formed and matching at least one
    /// catalog type (so a typo such as `generaton.*` is refused instead of never firing).
    pub fn check_pattern(&self, pattern: &str) -> Result<(), String> {
        if !well_formed_pattern(pattern) {
            return Err(format!(
                "{} is not an event type, `*`, or a prefix like `generation.*`",
                quote(pattern)
            ));
        }
        let snapshot = self.snapshot();
        let known = match pattern.strip_suffix(".*") {
            _ if pattern == ALL => !snapshot.is_empty(),
            // Names under `prefix.` sort right after it: one range probe.
            Some(prefix) => {
                let start = format!("{prefix}.");
                snapshot
                    .range::<str, _>((Bound::Excluded(start.as_str()), Bound::Unbounded))
                    .next()
                    .is_some_and(|(name, _)| name.starts_with(&start))
            }
            None => snapshot.contains_key(pattern),
        };
        if known {
            Ok(())
        } else {
            Err(format!(
                "{} matches no event type in the catalog",
                quote(pattern)
            ))
        }
    }

    /// Checks every pattern of a subscription list; violations are `field[i]`.
    pub fn check_patterns(&self, patterns: &[String], field: &str) -> Result<(), EventError> {
        let mut v = Violations::new();
        for (i, pattern) in patterns.iter().enumerate() {
            if let Err(why) = self.check_pattern(pattern) {
                v.add(format!("{field}[{i}]"), why);
            }
        }
        v.into_result(()).map_err(EventError::InvalidPattern)
    }

    /// The catalog types `pattern` matches, in name order.
    pub fn expand(&self, pattern: &str) -> Vec<String> {
        self.snapshot()
            .keys()
            .filter(|name| matches(pattern, name))
            .cloned()
            .collect()
    }
}

async fn compile_all(
    types: Vec<EventType>,
    previous: Arc<Snapshot>,
) -> Result<Snapshot, EventError> {
    tokio::task::spawn_blocking(move || compile(types, &previous))
        .await
        .map_err(|e| EventError::BadSchema {
            name: "*".into(),
            version: 0,
            reason: format!("compiler task failed: {e}"),
        })?
}

/// Compiles each type unless `previous` has the same (name, version).
fn compile(types: Vec<EventType>, previous: &Snapshot) -> Result<Snapshot, EventError> {
    let mut out = Snapshot::new();
    for t in types {
        if let Some(same) = previous.get(&t.name).filter(|c| c.version == t.version) {
            out.insert(t.name, same.clone());
            continue;
        }
        let validator = jsonschema::draft202012::options()
            // Formats (uuid, date-time, email, uri) are assertions here, not annotations.
            .should_validate_formats(true)
            .build(&t.schema)
            .map_err(|e| EventError::BadSchema {
                name: t.name.clone(),
                version: t.version,
                reason: e.to_string(),
            })?;
        out.insert(
            t.name,
            Arc::new(Compiled {
                version: t.version,
                validator,
            }),
        );
    }
    Ok(out)
}

/// `payload.a.b[2]` for the JSON pointer `/a/b/2`, looking at the payload to tell array
/// indexes from property names that happen to be digits.
fn field_path(payload: &Value, pointer: &str) -> String {
    let mut path = PAYLOAD_FIELD.to_string();
    let mut node = Some(payload);
    for raw in pointer.split('/').skip(1) {
        let segment = raw.replace("~1", "/").replace("~0", "~");
        match node {
            Some(Value::Array(items)) => {
                let index = segment.parse::<usize>().ok();
                path.push_str(&format!("[{segment}]"));
                node = index.and_then(|i| items.get(i));
            }
            Some(Value::Object(map)) => {
                node = map.get(&segment);
                path = join(&path, &segment);
            }
            _ => {
                node = None;
                path = join(&path, &segment);
            }
        }
    }
    path
}

/// Appends a property to a field path, bracket-quoting names that are not identifiers.
fn join(path: &str, property: &str) -> String {
    let plain = !property.is_empty()
        && property
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if plain {
        format!("{path}.{property}")
    } else {
        format!("{path}[{property:?}]")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn t(name: &str, schema: Value) -> EventType {
        EventType {
            name: name.into(),
            category: name.split('.').next().unwrap().into(),
            description: String::new(),
            schema,
            sample: json!({}),
            version: 1,
            create_time: Utc::now(),
            deprecated: false,
        }
    }

    fn catalog() -> Catalog {
        let obj = json!({"type": "object"});
        Catalog::from_types(vec![
            t("generation.completed", obj.clone()),
            t("generation.failed", obj.clone()),
            t("generations.archived", obj.clone()),
            t("usage.quota.warning", obj.clone()),
            t(
                "asset.created",
                json!({
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}},
                        "0": {"type": "object", "properties": {"x y": {"type": "integer"}}},
                    },
                    "required": ["id"],
                    "additionalProperties": false,
                }),
            ),
        ])
        .unwrap()
    }

    #[test]
    fn patterns_match_exact_prefix_and_all() {
        assert!(matches("*", "generation.completed"));
        assert!(matches("generation.*", "generation.completed"));
        assert!(matches("usage.*", "usage.quota.warning"));
        assert!(matches("usage.quota.*", "usage.quota.warning"));
        assert!(matches("generation.completed", "generation.completed"));
        // A prefix stops at a dot: `generation.*` is not `generations.*`.
        assert!(!matches("generation.*", "generations.archived"));
        assert!(!matches("generation.*", "generation"));
        assert!(!matches("generation.completed", "generation.completed_v2"));
        assert!(!matches("generation", "generation.completed"));
    }

    #[test]
    fn patterns_must_be_well_formed_and_match_the_catalog() {
        let c = catalog();
        for ok in [
            "*",
            "generation.*",
            "usage.*",
            "usage.quota.*",
            "asset.created",
        ] {
            assert_eq!(c.check_pattern(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "**",
            "generation.",
            ".generation",
            "Generation.*",
            "gen*",
            "a..b",
            "*.completed",
        ] {
            let why = c.check_pattern(bad).unwrap_err();
            assert!(why.contains("is not an event type"), "{bad}: {why}");
        }
        for unknown in [
            "generaton.*",
            "asset.deleted",
            "generation.completed.*",
            "user.*",
        ] {
            let why = c.check_pattern(unknown).unwrap_err();
            assert!(why.contains("matches no event type"), "{unknown}: {why}");
        }
        let err = c
            .check_patterns(&["generation.*".into(), "nope.*".into()], "event_types")
            .unwrap_err();
        let EventError::InvalidPattern(v) = err else {
            panic!("{err:?}")
        };
        let fields: Vec<_> = v.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["event_types[1]"]);
        assert_eq!(
            c.expand("generation.*"),
            ["generation.completed", "generation.failed"]
        );
    }

    #[test]
    fn violations_name_the_field_and_hide_values() {
        let c = catalog();
        c.validate(
            "asset.created",
            &json!({"id": "0b8e2f6c-4d71-4a2b-8c0e-5a9d3f1b7e22"}),
        )
        .unwrap();
        let err = c
            .validate(
                "asset.created",
                &json!({"id": "secret-ish", "tags": ["ok", "toolong"], "extra": 1, "0": {"x y": "s"}}),
            )
            .unwrap_err();
        let EventError::InvalidPayload(v) = err else {
            panic!("{err:?}")
        };
        let mut got: Vec<_> = v
            .iter()
            .map(|f| (f.field.clone(), f.description.clone()))
            .collect();
        got.sort();
        let fields: Vec<_> = got.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "payload.0[\"x y\"]",
                "payload.extra",
                "payload.id",
                "payload.tags[1]"
            ]
        );
        assert!(
            got.iter()
                .all(|(_, d)| !d.contains("secret-ish") && !d.contains("toolong")),
            "{got:?}"
        );
        let missing = c.validate("asset.created", &json!({})).unwrap_err();
        let EventError::InvalidPayload(v) = missing else {
            panic!()
        };
        assert_eq!(
            v.iter().map(|f| f.field.as_str()).collect::<Vec<_>>(),
            ["payload.id"]
        );
        assert!(matches!(
            c.validate("asset.exploded", &json!({})),
            Err(EventError::UnknownType(n)) if n == "asset.exploded"
        ));
    }

    #[test]
    fn a_schema_that_does_not_compile_is_named() {
        let err =
            Catalog::from_types(vec![t("bad.schema", json!({"type": "nonsense"}))]).unwrap_err();
        assert!(
            matches!(err, EventError::BadSchema { ref name, .. } if name == "bad.schema"),
            "{err:?}"
        );
    }
}
