//! API-key domain types and the validation of their fields.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use ipnetwork::IpNetwork;

use crate::{
    identity::{Environment, KeyId, Scopes, TenantId},
    ratelimit::LimitOverrides,
    validation::{Violations, quote},
};

pub const MAX_NAME_CHARS: usize = 100;
pub const MAX_DESCRIPTION_CHARS: usize = 1000;
pub const MAX_REVOKE_REASON_CHARS: usize = 500;
pub const MAX_ALLOWED_CIDRS: usize = 50;
/// More names than there are scopes (with room for repeats) is never a real request.
pub const MAX_SCOPES: usize = 2 * crate::identity::Scope::EVERY.len();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Revoked,
    Expired,
}

/// A stored key, without its secret.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: KeyId,
    pub tenant_id: TenantId,
    pub name: String,
    pub description: String,
    pub environment: Environment,
    pub scopes: Scopes,
    pub allowed_cidrs: Vec<IpNetwork>,
    pub created_by: String,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    pub last_used_time: Option<DateTime<Utc>>,
    pub expire_time: Option<DateTime<Utc>>,
    pub revoke_time: Option<DateTime<Utc>>,
    pub revoke_reason: Option<String>,
    pub previous_secret_expire_time: Option<DateTime<Utc>>,
    /// The key's own limits; unset fields follow the tenant's plan.
    pub rate_limits: LimitOverrides,
}

impl ApiKey {
    pub fn state(&self, now: DateTime<Utc>) -> KeyState {
        state_of(self.revoke_time, self.expire_time, now)
    }

    /// `dg_<env>_<id>`: the non-secret start of the token.
    pub fn prefix(&self) -> String {
        format!("dg_{}_{}", self.environment.as_str(), self.id)
    }

    /// The previous secret's end, while it still works (in its grace period, key active).
    pub fn live_previous_secret_expire_time(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.previous_secret_expire_time
            .filter(|t| *t > now && self.state(now) == KeyState::Active)
    }
}

/// Revocation wins over expiry.
pub fn state_of(
    revoke_time: Option<DateTime<Utc>>,
    expire_time: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> KeyState {
    if revoke_time.is_some() {
        KeyState::Revoked
    } else if expire_time.is_some_and(|t| t <= now) {
        KeyState::Expired
    } else {
        KeyState::Active
    }
}

/// Whether `ip` may use a key with these allowed networks (none: any address).
pub fn ip_allowed(allowed: &[IpNetwork], ip: Option<IpAddr>) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(ip) = ip else { return false };
    // IPv4 clients reach dual-stack listeners as ::ffff:a.b.c.d.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    allowed.iter().any(|net| net.contains(ip))
}

/// A validated CreateApiKey request.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub name: String,
    pub description: String,
    pub scopes: Scopes,
    pub environment: Environment,
    pub expire_time: Option<DateTime<Utc>>,
    pub allowed_cidrs: Vec<IpNetwork>,
    pub rate_limits: LimitOverrides,
}

/// A validated UpdateApiKey request: `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ApiKeyChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub scopes: Option<Scopes>,
    /// `Some(None)` removes the expiry.
    pub expire_time: Option<Option<DateTime<Utc>>>,
    pub allowed_cidrs: Option<Vec<IpNetwork>>,
    /// Replaces all four overrides (unset ones inherit again).
    pub rate_limits: Option<LimitOverrides>,
}

impl ApiKeyChanges {
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.description.is_none()
            && self.scopes.is_none()
            && self.expire_time.is_none()
            && self.allowed_cidrs.is_none()
            && self.rate_limits.is_none()
    }
}

impl ApiKeyChanges {
    /// The fields (as the `api_key.updated` schema names them) whose new value differs
    /// from `current`'s; empty means the update is a no-op. Times within a microsecond
    /// are the same: Postgres rounds what it stores to microseconds.
    pub fn changed_fields(&self, current: &ApiKey) -> Vec<&'static str> {
        let same_time = |a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>| match (a, b) {
            (Some(a), Some(b)) => (a - b).abs() < chrono::Duration::microseconds(1),
            (a, b) => a.is_none() && b.is_none(),
        };
        let mut changed = Vec::new();
        if self.name.as_ref().is_some_and(|n| *n != current.name) {
            changed.push("name");
        }
        if self
            .description
            .as_ref()
            .is_some_and(|d| *d != current.description)
        {
            changed.push("description");
        }
        if self.scopes.as_ref().is_some_and(|s| *s != current.scopes) {
            changed.push("scopes");
        }
        if self
            .allowed_cidrs
            .as_ref()
            .is_some_and(|c| *c != current.allowed_cidrs)
        {
            changed.push("allowed_cidrs");
        }
        if self
            .rate_limits
            .as_ref()
            .is_some_and(|l| *l != current.rate_limits)
        {
            changed.push("rate_limits");
        }
        if self
            .expire_time
            .is_some_and(|t| !same_time(t, current.expire_time))
        {
            changed.push("expire_time");
        }
        changed
    }
}

/// The payloads of the `api_key.*` events (schemas in the event catalog migration). They
/// carry ids, names and times, never a secret or its hash; actors are cut to the schemas'
/// 200 characters.
pub mod events {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde_json::{Value, json};

    use super::ApiKey;
    use crate::webhooks::model::actor;

    fn rfc3339(t: DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    fn base(k: &ApiKey) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("api_key_id".into(), k.id.as_str().into());
        m.insert("name".into(), k.name.clone().into());
        m.insert("environment".into(), k.environment.as_str().into());
        m
    }

    fn with(k: &ApiKey, more: Value) -> Value {
        let mut m = base(k);
        if let Value::Object(more) = more {
            m.extend(more);
        }
        Value::Object(m)
    }

    /// `api_key.created`.
    pub fn created(k: &ApiKey) -> Value {
        with(
            k,
            json!({
                "scopes": k.scopes.to_strings(),
                "created_by": actor(k.created_by.clone()),
                "create_time": rfc3339(k.create_time),
                "expire_time": k.expire_time.map(rfc3339),
            }),
        )
    }

    /// `api_key.updated`, naming the fields that changed.
    pub fn updated(k: &ApiKey, changed: &[&str], by: &str) -> Value {
        with(
            k,
            json!({
                "changed_fields": changed,
                "updated_by": by,
                "update_time": rfc3339(k.update_time),
            }),
        )
    }

    /// `api_key.rotated`; `previous_secret_expire_time` is null when the old secret
    /// stopped at once.
    pub fn rotated(k: &ApiKey, by: &str) -> Value {
        with(
            k,
            json!({
                "rotated_by": by,
                "rotate_time": rfc3339(k.update_time),
                "previous_secret_expire_time": k.previous_secret_expire_time.map(rfc3339),
            }),
        )
    }

    /// `api_key.revoked`; the reason only when one was given.
    pub fn revoked(k: &ApiKey, by: &str) -> Value {
        let mut more = json!({
            "revoked_by": by,
            "revoke_time": rfc3339(k.revoke_time.unwrap_or(k.update_time)),
        });
        if let Some(reason) = k.revoke_reason.as_deref().filter(|r| !r.is_empty()) {
            more["reason"] = reason.into();
        }
        with(k, more)
    }

    /// `api_key.deleted`.
    pub fn deleted(k: &ApiKey, by: &str, at: DateTime<Utc>) -> Value {
        with(
            k,
            json!({
                "deleted_by": by,
                "delete_time": rfc3339(at),
            }),
        )
    }

    /// `api_key.expiring`: `days_left` whole days until `expire_time` (0 on its last day).
    pub fn expiring(k: &ApiKey, expire_time: DateTime<Utc>, days_left: i64) -> Value {
        with(
            k,
            json!({
                "expire_time": rfc3339(expire_time),
                "days_left": days_left,
            }),
        )
    }
}

/// Filters of ListApiKeys.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListFilter {
    pub state: Option<KeyState>,
    pub environment: Option<Environment>,
}

pub fn validate_name(name: &str, field: &str, v: &mut Violations) -> String {
    let trimmed = name.trim();
    v.check(!trimmed.is_empty(), field, "required: 1 to 100 characters");
    v.check(
        trimmed.chars().count() <= MAX_NAME_CHARS,
        field,
        "at most 100 characters",
    );
    v.check(
        !trimmed.chars().any(char::is_control),
        field,
        "must not contain control characters",
    );
    trimmed.to_string()
}

pub fn validate_description(description: &str, field: &str, v: &mut Violations) -> String {
    v.check(
        description.chars().count() <= MAX_DESCRIPTION_CHARS,
        field,
        "at most 1000 characters",
    );
    description.to_string()
}

pub fn validate_scopes(names: &[String], field: &str, v: &mut Violations) -> Scopes {
    if names.is_empty() {
        v.add(
            field,
            "at least one scope is required, e.g. usage:read or *",
        );
        return Scopes::default();
    }
    // Checked before parsing: the work and the report stay bounded by the cap.
    if names.len() > MAX_SCOPES {
        v.add(field, format!("at most {MAX_SCOPES} scopes"));
        return Scopes::default();
    }
    match Scopes::parse(names) {
        Ok(scopes) => scopes,
        Err(unknown) => {
            // The known scopes are listed once, not once per unknown name.
            for (i, u) in unknown.iter().enumerate() {
                let description = if i == 0 {
                    format!(
                        "unknown scope {}; known scopes: {}",
                        quote(&u.0),
                        crate::identity::Scope::EVERY.map(|s| s.as_str()).join(", ")
                    )
                } else {
                    format!("unknown scope {}", quote(&u.0))
                };
                v.add(field, description);
            }
            Scopes::default()
        }
    }
}

/// Parses CIDR networks; host bits must be zero (`10.0.0.0/8`, not `10.1.2.3/8`). A bare
/// address means just that host.
pub fn validate_cidrs(cidrs: &[String], field: &str, v: &mut Violations) -> Vec<IpNetwork> {
    // Checked before parsing: a request cannot make us parse (or report) thousands.
    if cidrs.len() > MAX_ALLOWED_CIDRS {
        v.add(field, format!("at most {MAX_ALLOWED_CIDRS} networks"));
        return Vec::new();
    }
    let mut nets = Vec::with_capacity(cidrs.len());
    for (i, text) in cidrs.iter().enumerate() {
        let at = format!("{field}[{i}]");
        match text.trim().parse::<IpNetwork>() {
            Ok(net) if net.network() != net.ip() => v.add(
                at,
                format!(
                    "{} has host bits set; did you mean {}/{}?",
                    quote(text),
                    net.network(),
                    net.prefix()
                ),
            ),
            Ok(net) => nets.push(net),
            Err(_) => v.add(
                at,
                format!(
                    "{} is not a CIDR network such as 203.0.113.0/24 or 2001:db8::/32",
                    quote(text)
                ),
            ),
        }
    }
    nets
}

pub fn validate_expire_time(t: DateTime<Utc>, now: DateTime<Utc>, field: &str, v: &mut Violations) {
    v.check(t > now, field, "must be in the future");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNetwork> {
        let mut v = Violations::new();
        let owned: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        let n = validate_cidrs(&owned, "allowed_cidrs", &mut v);
        assert!(v.is_empty(), "{v}");
        n
    }

    #[test]
    fn cidr_matching() {
        let allowed = nets(&["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"]);
        assert!(ip_allowed(&allowed, Some("203.0.113.9".parse().unwrap())));
        assert!(ip_allowed(&allowed, Some("198.51.100.7".parse().unwrap())));
        assert!(!ip_allowed(&allowed, Some("198.51.100.8".parse().unwrap())));
        assert!(ip_allowed(&allowed, Some("2001:db8:1::1".parse().unwrap())));
        assert!(!ip_allowed(&allowed, Some("2001:db9::1".parse().unwrap())));
        assert!(
            ip_allowed(&allowed, Some("::ffff:203.0.113.5".parse().unwrap())),
            "v4-mapped v6"
        );
        assert!(
            !ip_allowed(&allowed, None),
            "unknown address is refused when a list is set"
        );
        assert!(ip_allowed(&[], None), "no list allows all");
    }

    #[test]
    fn cidr_validation_explains_errors() {
        let mut v = Violations::new();
        let input = vec![
            "10.1.2.3/8".to_string(),
            "banana".to_string(),
            "10.0.0.0/33".to_string(),
        ];
        validate_cidrs(&input, "allowed_cidrs", &mut v);
        let all: Vec<_> = v
            .iter()
            .map(|f| (f.field.clone(), f.description.clone()))
            .collect();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].0, "allowed_cidrs[0]");
        assert!(all[0].1.contains("10.0.0.0/8"));
        assert_eq!(all[1].0, "allowed_cidrs[1]");
    }

    #[test]
    fn state_precedence() {
        let now = Utc::now();
        let past = now - chrono::Duration::seconds(1);
        assert_eq!(state_of(None, None, now), KeyState::Active);
        assert_eq!(state_of(None, Some(past), now), KeyState::Expired);
        assert_eq!(state_of(Some(past), Some(past), now), KeyState::Revoked);
    }

    #[test]
    fn names_and_scopes() {
        let mut v = Violations::new();
        assert_eq!(validate_name("  ci  ", "name", &mut v), "ci");
        validate_name("", "name", &mut v);
        validate_name(&"x".repeat(101), "name", &mut v);
        validate_scopes(&[], "scopes", &mut v);
        validate_scopes(&["usage:read".into(), "nope".into()], "scopes", &mut v);
        assert_eq!(v.iter().count(), 4);
    }

    #[test]
    fn changed_fields_name_only_real_changes() {
        let at = "2027-01-01T00:00:00.123457Z"
            .parse::<DateTime<Utc>>()
            .unwrap();
        let key = ApiKey {
            id: KeyId::new_unchecked("Kx7pQ2mZ9aB4".into()),
            tenant_id: TenantId(uuid::Uuid::nil()),
            name: "ci".into(),
            description: String::new(),
            environment: Environment::Test,
            scopes: Scopes::all(),
            allowed_cidrs: Vec::new(),
            created_by: "user:ada".into(),
            create_time: at,
            update_time: at,
            last_used_time: None,
            expire_time: Some(at),
            revoke_time: None,
            revoke_reason: None,
            previous_secret_expire_time: None,
            rate_limits: LimitOverrides::default(),
        };
        // The same values (the expiry as sent, before Postgres rounds it) change nothing.
        let same = ApiKeyChanges {
            name: Some("ci".into()),
            scopes: Some(Scopes::all()),
            expire_time: Some(Some(at - chrono::Duration::nanoseconds(211))),
            allowed_cidrs: Some(Vec::new()),
            ..Default::default()
        };
        assert!(same.changed_fields(&key).is_empty());
        let changes = ApiKeyChanges {
            name: Some("ci".into()),
            description: Some("now described".into()),
            expire_time: Some(None),
            ..Default::default()
        };
        assert_eq!(changes.changed_fields(&key), ["description", "expire_time"]);
    }

    #[test]
    fn lists_are_capped_before_parsing() {
        let mut v = Violations::new();
        let many: Vec<String> = (0..10_000).map(|i| format!("bad{i}")).collect();
        assert!(validate_cidrs(&many, "allowed_cidrs", &mut v).is_empty());
        validate_scopes(&many, "scopes", &mut v);
        let all: Vec<_> = v.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(all, ["allowed_cidrs", "scopes"]);
        let mut v = Violations::new();
        validate_scopes(&["x".repeat(100_000)], "scopes", &mut v);
        let d = &v.iter().next().unwrap().description;
        assert!(d.len() < 300, "{d}");
    }
}
