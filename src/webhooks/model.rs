//! Webhook endpoints as the service sees them, the request rules that need no I/O (headers,
//! description, rate limit, subscription list shape), and the payloads of the
//! `webhook_endpoint.*` events (their schemas are in the catalog migration).

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    identity::TenantId,
    validation::{Violations, quote},
};

/// Endpoints one tenant may have; creating more is FAILED_PRECONDITION.
pub const MAX_ENDPOINTS_PER_TENANT: i64 = 50;
pub const MAX_DESCRIPTION_CHARS: usize = 1000;
/// The catalog's `event_types` schema allows 1 to 100 patterns.
pub const MAX_EVENT_TYPES: usize = 100;
pub const MAX_HEADERS: usize = 20;
pub const MAX_HEADER_NAME_LEN: usize = 100;
pub const MAX_HEADER_VALUE_LEN: usize = 1024;
pub const MAX_RATE_LIMIT_PER_SECOND: u32 = 1000;

/// Header names devgate sets itself or that would change how the request is framed or
/// routed. `authorization` is allowed: receivers behind API gateways often need a static
/// token (the signature stays the authentication that counts).
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "user-agent",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "cookie",
];
/// Reserved name prefixes: Standard Webhooks headers, body description, proxies.
const RESERVED_HEADER_PREFIXES: &[&str] = &["webhook-", "content-", "proxy-"];

/// Why an endpoint was disabled (`disabled_reason`; the `webhook_endpoint.disabled` enum).
pub const DISABLED_REASONS: [&str; 3] = ["consecutive_failures", "gone", "manual"];

/// An endpoint as stored, without its secrets.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookEndpoint {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub url: String,
    pub description: String,
    pub event_types: Vec<String>,
    pub headers: BTreeMap<String, String>,
    pub rate_limit_per_second: u32,
    pub previous_secret_expire_time: Option<DateTime<Utc>>,
    pub disabled_time: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
    pub consecutive_failures: i32,
    pub created_by: String,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
}

impl WebhookEndpoint {
    pub fn state(&self) -> EndpointState {
        if self.disabled_time.is_some() {
            EndpointState::Disabled
        } else {
            EndpointState::Enabled
        }
    }

    /// The previous secret's grace end while it lasts (a past one is not shown).
    pub fn live_previous_secret_expire_time(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.previous_secret_expire_time.filter(|t| *t > now)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    Enabled,
    Disabled,
}

/// A validated create request.
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    pub url: String,
    pub description: String,
    pub event_types: Vec<String>,
    pub headers: BTreeMap<String, String>,
    pub rate_limit_per_second: u32,
}

/// A validated update: `Some` fields change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointChanges {
    pub url: Option<String>,
    pub description: Option<String>,
    pub event_types: Option<Vec<String>>,
    pub headers: Option<BTreeMap<String, String>>,
    pub rate_limit_per_second: Option<u32>,
}

impl EndpointChanges {
    /// The fields that would differ from `current` (`changed_fields` of the event).
    pub fn changed_fields(&self, current: &WebhookEndpoint) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.url.as_ref().is_some_and(|v| *v != current.url) {
            out.push("url");
        }
        if self
            .description
            .as_ref()
            .is_some_and(|v| *v != current.description)
        {
            out.push("description");
        }
        if self
            .event_types
            .as_ref()
            .is_some_and(|v| *v != current.event_types)
        {
            out.push("event_types");
        }
        if self.headers.as_ref().is_some_and(|v| *v != current.headers) {
            out.push("headers");
        }
        if self
            .rate_limit_per_second
            .is_some_and(|v| v != current.rate_limit_per_second)
        {
            out.push("rate_limit_per_second");
        }
        out
    }
}

pub fn validate_description(raw: &str, field: &str, v: &mut Violations) -> String {
    let d = raw.trim();
    v.check(
        d.chars().count() <= MAX_DESCRIPTION_CHARS,
        field,
        format!("at most {MAX_DESCRIPTION_CHARS} characters"),
    );
    d.to_string()
}

pub fn validate_rate_limit(raw: u32, field: &str, v: &mut Violations) -> u32 {
    v.check(
        raw <= MAX_RATE_LIMIT_PER_SECOND,
        field,
        format!("between 0 (no limit) and {MAX_RATE_LIMIT_PER_SECOND}"),
    );
    raw
}

/// The list's shape (count, duplicates); the catalog checks each pattern afterwards.
/// Returns the patterns trimmed, in the caller's order.
pub fn validate_event_types_shape(raw: &[String], field: &str, v: &mut Violations) -> Vec<String> {
    if raw.is_empty() {
        v.add(
            field,
            "required: at least one event type, `generation.*`-style prefix, or `*`",
        );
        return Vec::new();
    }
    if raw.len() > MAX_EVENT_TYPES {
        v.add(field, format!("at most {MAX_EVENT_TYPES} event types"));
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        let p = p.trim().to_string();
        if out.contains(&p) {
            v.add(
                format!("{field}[{i}]"),
                format!("{} is listed twice", quote(&p)),
            );
        }
        out.push(p);
    }
    out
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn reserved(name: &str) -> bool {
    RESERVED_HEADERS.contains(&name) || RESERVED_HEADER_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Custom headers: names lowercased (HTTP names are case-insensitive, so `X-A` and `x-a`
/// are one header and listed twice is an error), values visible ASCII, space or tab.
pub fn validate_headers(
    raw: &BTreeMap<String, String>,
    field: &str,
    v: &mut Violations,
) -> BTreeMap<String, String> {
    if raw.len() > MAX_HEADERS {
        v.add(field, format!("at most {MAX_HEADERS} headers"));
        return BTreeMap::new();
    }
    let mut out = BTreeMap::new();
    for (name, value) in raw {
        let at = format!("{field}[{}]", quote(name));
        let lower = name.to_ascii_lowercase();
        if name.is_empty() || name.len() > MAX_HEADER_NAME_LEN || !name.bytes().all(is_token_byte) {
            v.add(
                &at,
                format!("a header name is 1 to {MAX_HEADER_NAME_LEN} HTTP token characters"),
            );
            continue;
        }
        if reserved(&lower) {
            v.add(
                &at,
                format!(
                    "{} is reserved (webhook-*, content-*, proxy-*, host, user-agent and hop-by-hop headers are set by devgate)",
                    quote(&lower)
                ),
            );
            continue;
        }
        if value.len() > MAX_HEADER_VALUE_LEN {
            v.add(
                &at,
                format!("a value is at most {MAX_HEADER_VALUE_LEN} bytes"),
            );
            continue;
        }
        if !value
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
        {
            v.add(&at, "a value is visible ASCII, spaces and tabs only");
            continue;
        }
        if out
            .insert(lower.clone(), value.trim().to_string())
            .is_some()
        {
            v.add(
                &at,
                format!(
                    "{} is given twice (names are case-insensitive)",
                    quote(&lower)
                ),
            );
        }
    }
    out
}

/// Longest actor the event schemas (`created_by`, `updated_by`, …) and the column accept.
pub const MAX_ACTOR_CHARS: usize = 200;

/// The principal's actor (`user:<sub>`, `api_key:<id>`) cut to [`MAX_ACTOR_CHARS`]: a JWT
/// `sub` may be 200 characters itself, and an over-long actor must not fail the change.
pub fn actor(full: String) -> String {
    match full.char_indices().nth(MAX_ACTOR_CHARS) {
        Some((at, _)) => full[..at].to_string(),
        None => full,
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// `webhook_endpoint.created`.
pub fn created_payload(e: &WebhookEndpoint) -> Value {
    json!({
        "webhook_endpoint_id": e.id,
        "url": e.url,
        "event_types": e.event_types,
        "created_by": e.created_by,
        "create_time": rfc3339(e.create_time),
    })
}

/// `webhook_endpoint.updated`.
pub fn updated_payload(e: &WebhookEndpoint, changed: &[&str], actor: &str) -> Value {
    json!({
        "webhook_endpoint_id": e.id,
        "url": e.url,
        "event_types": e.event_types,
        "changed_fields": changed,
        "updated_by": actor,
        "update_time": rfc3339(e.update_time),
    })
}

/// `webhook_endpoint.deleted`.
pub fn deleted_payload(e: &WebhookEndpoint, actor: &str, at: DateTime<Utc>) -> Value {
    json!({
        "webhook_endpoint_id": e.id,
        "url": e.url,
        "deleted_by": actor,
        "delete_time": rfc3339(at),
    })
}

/// `webhook_endpoint.enabled`.
pub fn enabled_payload(e: &WebhookEndpoint, actor: &str) -> Value {
    json!({
        "webhook_endpoint_id": e.id,
        "url": e.url,
        "event_types": e.event_types,
        "enabled_by": actor,
        "enable_time": rfc3339(e.update_time),
    })
}

/// `webhook_endpoint.disabled` (by the delivery worker: `gone` or `consecutive_failures`).
pub fn disabled_payload(
    e: &WebhookEndpoint,
    reason: &str,
    consecutive_failures: Option<i32>,
    last_status_code: Option<i32>,
) -> Value {
    let mut payload = json!({
        "webhook_endpoint_id": e.id,
        "url": e.url,
        "event_types": e.event_types,
        "reason": reason,
        "last_status_code": last_status_code.filter(|c| (100..=599).contains(c)),
        "disable_time": rfc3339(e.disabled_time.unwrap_or(e.update_time)),
    });
    if let Some(n) = consecutive_failures {
        payload["consecutive_failures"] = json!(n.max(0));
    }
    payload
}

/// `webhook_endpoint.secret_rotated`.
pub fn secret_rotated_payload(
    e: &WebhookEndpoint,
    actor: &str,
    previous_expires: DateTime<Utc>,
) -> Value {
    json!({
        "webhook_endpoint_id": e.id,
        "rotated_by": actor,
        "rotate_time": rfc3339(e.update_time),
        "previous_secret_expire_time": rfc3339(previous_expires),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn fields(v: &Violations) -> Vec<String> {
        v.iter().map(|f| f.field.clone()).collect()
    }

    #[test]
    fn headers_are_lowercased_and_reserved_names_refused() {
        let mut v = Violations::new();
        let ok = validate_headers(
            &headers(&[("X-Team", " blue "), ("Authorization", "Bearer abc")]),
            "headers",
            &mut v,
        );
        assert!(v.is_empty(), "{v}");
        assert_eq!(
            ok,
            headers(&[("authorization", "Bearer abc"), ("x-team", "blue")])
        );

        for name in [
            "Webhook-Id",
            "webhook-signature",
            "Content-Type",
            "content-length",
            "Host",
            "User-Agent",
            "Transfer-Encoding",
            "Proxy-Authorization",
            "Connection",
        ] {
            let mut v = Violations::new();
            validate_headers(&headers(&[(name, "x")]), "headers", &mut v);
            let d = &v.iter().next().expect(name).description;
            assert!(d.contains("is reserved"), "{name}: {d}");
        }
    }

    #[test]
    fn header_names_values_and_counts_are_bounded() {
        let mut v = Violations::new();
        let long = "v".repeat(MAX_HEADER_VALUE_LEN + 1);
        validate_headers(
            &headers(&[
                ("bad name", "x"),
                ("", "x"),
                ("x-long", &long),
                ("x-crlf", "a\r\nb: c"),
                ("X-Dup", "1"),
                ("x-dup", "2"),
            ]),
            "headers",
            &mut v,
        );
        let mut got = fields(&v);
        got.sort();
        assert_eq!(
            got,
            [
                "headers[\"\"]",
                "headers[\"bad name\"]",
                "headers[\"x-crlf\"]",
                "headers[\"x-dup\"]",
                "headers[\"x-long\"]",
            ]
        );
        let many: BTreeMap<String, String> = (0..=MAX_HEADERS)
            .map(|i| (format!("x-{i}"), "v".into()))
            .collect();
        let mut v = Violations::new();
        validate_headers(&many, "headers", &mut v);
        assert_eq!(fields(&v), ["headers"]);
    }

    #[test]
    fn event_type_lists_need_one_to_a_hundred_distinct_entries() {
        let mut v = Violations::new();
        validate_event_types_shape(&[], "event_types", &mut v);
        assert_eq!(fields(&v), ["event_types"]);
        let mut v = Violations::new();
        let got = validate_event_types_shape(
            &["generation.*".into(), " *".into(), "generation.*".into()],
            "event_types",
            &mut v,
        );
        assert_eq!(got, ["generation.*", "*", "generation.*"]);
        assert_eq!(fields(&v), ["event_types[2]"]);
        let mut v = Violations::new();
        validate_event_types_shape(&vec!["*".to_string(); 101], "event_types", &mut v);
        assert_eq!(fields(&v), ["event_types"]);
    }

    #[test]
    fn actors_fit_the_event_schemas() {
        assert_eq!(actor("user:ada".into()), "user:ada");
        let long = format!("user:{}", "é".repeat(200));
        assert_eq!(actor(long).chars().count(), MAX_ACTOR_CHARS);
    }

    #[test]
    fn description_and_rate_limit_bounds() {
        let mut v = Violations::new();
        validate_description(&"d".repeat(1000), "description", &mut v);
        validate_rate_limit(1000, "rate_limit_per_second", &mut v);
        assert!(v.is_empty());
        validate_description(&"d".repeat(1001), "description", &mut v);
        validate_rate_limit(1001, "rate_limit_per_second", &mut v);
        assert_eq!(fields(&v), ["description", "rate_limit_per_second"]);
    }
}
