//! Generation domain types, request validation and the `generation.*` event payloads.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;
use uuid::Uuid;

use super::config::KindCatalog;
use crate::{identity::TenantId, validation::Violations};

pub const MAX_PROMPT_CHARS: usize = 4000;
pub const MAX_COUNT: i32 = 8;
pub const MAX_STYLE_BYTES: usize = 16 * 1024;
pub const MAX_METADATA_ENTRIES: usize = 16;
pub const MAX_METADATA_KEY_CHARS: usize = 40;
pub const MAX_METADATA_VALUE_CHARS: usize = 500;
pub const MAX_PROJECT_ID_CHARS: usize = 200;
/// The prompt's share of a `generation.*` event (the catalog's `prompt_excerpt`).
const PROMPT_EXCERPT_CHARS: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "queued" => State::Queued,
            "running" => State::Running,
            "succeeded" => State::Succeeded,
            "failed" => State::Failed,
            "cancelled" => State::Cancelled,
            _ => return None,
        })
    }

    /// Nothing changes a generation in a terminal state.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Succeeded | State::Failed | State::Cancelled)
    }
}

/// A stored generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub kind: String,
    pub prompt: String,
    pub output_format: String,
    pub style: serde_json::Value,
    pub count: i32,
    pub project_id: String,
    pub metadata: BTreeMap<String, String>,
    pub state: State,
    pub progress: i32,
    pub cost: i64,
    pub refunded: bool,
    pub asset_ids: Vec<String>,
    pub result_urls: Vec<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub created_by: String,
    pub create_time: DateTime<Utc>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    pub update_time: DateTime<Utc>,
}

/// A validated CreateGeneration request.
#[derive(Debug, Clone, PartialEq)]
pub struct NewGeneration {
    pub kind: String,
    pub prompt: String,
    pub output_format: String,
    /// A JSON object (`{}` when none was sent).
    pub style: serde_json::Value,
    pub count: i32,
    pub project_id: String,
    pub metadata: BTreeMap<String, String>,
}

/// The raw request fields, as the gRPC layer received them (style already as JSON).
pub struct CreateRequest<'a> {
    pub kind: &'a str,
    pub prompt: &'a str,
    pub output_format: &'a str,
    pub style: Option<serde_json::Value>,
    pub count: i32,
    pub project_id: &'a str,
    pub metadata: &'a BTreeMap<String, String>,
}

/// Checks every field against the catalog and the limits; all problems at once.
pub fn validate(r: CreateRequest<'_>, kinds: &KindCatalog, v: &mut Violations) -> NewGeneration {
    let prompt_chars = r.prompt.chars().count();
    if r.prompt.trim().is_empty() {
        v.add("prompt", "required");
    } else if prompt_chars > MAX_PROMPT_CHARS {
        v.add(
            "prompt",
            format!("at most {MAX_PROMPT_CHARS} characters (got {prompt_chars})"),
        );
    }
    // Postgres text cannot hold U+0000: refused here, not failed as a database error.
    let nul = "contains a NUL character (U+0000)";
    v.check(!r.prompt.contains('\0'), "prompt", nul);
    v.check(!r.project_id.contains('\0'), "project_id", nul);
    for (k, val) in r.metadata {
        v.check(
            !k.contains('\0') && !val.contains('\0'),
            format!("metadata[{k}]"),
            nul,
        );
    }
    let count = if r.count == 0 { 1 } else { r.count };
    v.check(
        (1..=MAX_COUNT).contains(&count),
        "count",
        format!("must be between 1 and {MAX_COUNT} (0 means 1)"),
    );
    let kind = r.kind.trim();
    let format = r.output_format.trim();
    match kinds.get(kind) {
        _ if kind.is_empty() => v.add(
            "kind",
            format!(
                "required: one of {}",
                kinds.names().collect::<Vec<_>>().join(", ")
            ),
        ),
        None => v.add(
            "kind",
            format!(
                "unknown kind {kind:?}: one of {}",
                kinds.names().collect::<Vec<_>>().join(", ")
            ),
        ),
        Some(spec) if format.is_empty() => v.add(
            "output_format",
            format!("required: one of {}", spec.formats.join(", ")),
        ),
        Some(spec) if !spec.formats.iter().any(|f| f == format) => v.add(
            "output_format",
            format!("{kind} makes {}, not {format:?}", spec.formats.join(", ")),
        ),
        Some(_) => {}
    }
    let style = r.style.unwrap_or_else(|| json!({}));
    let style_bytes = serde_json::to_vec(&style).map(|b| b.len()).unwrap_or(0);
    v.check(
        style_bytes <= MAX_STYLE_BYTES,
        "style",
        format!(
            "at most {} KiB as JSON (got {style_bytes} bytes)",
            MAX_STYLE_BYTES / 1024
        ),
    );
    let project_id = r.project_id.trim();
    v.check(
        project_id.chars().count() <= MAX_PROJECT_ID_CHARS,
        "project_id",
        format!("at most {MAX_PROJECT_ID_CHARS} characters"),
    );
    v.check(
        r.metadata.len() <= MAX_METADATA_ENTRIES,
        "metadata",
        format!("at most {MAX_METADATA_ENTRIES} entries"),
    );
    let metadata: BTreeMap<String, String> = r
        .metadata
        .iter()
        .map(|(k, val)| (k.clone(), val.clone()))
        .collect();
    for (k, val) in &metadata {
        let key_chars = k.chars().count();
        v.check(
            (1..=MAX_METADATA_KEY_CHARS).contains(&key_chars),
            format!("metadata[{k}]"),
            format!("keys are 1 to {MAX_METADATA_KEY_CHARS} characters"),
        );
        v.check(
            val.chars().count() <= MAX_METADATA_VALUE_CHARS,
            format!("metadata[{k}]"),
            format!("values are at most {MAX_METADATA_VALUE_CHARS} characters"),
        );
    }
    NewGeneration {
        kind: kind.to_string(),
        prompt: r.prompt.to_string(),
        output_format: format.to_string(),
        style,
        count,
        project_id: project_id.to_string(),
        metadata,
    }
}

/// The catalog's `modality` of a kind (`image_hd` is an image).
fn modality(kind: &str) -> &'static str {
    match kind.split('_').next().unwrap_or(kind) {
        "video" => "video",
        "audio" => "audio",
        "text" => "text",
        "3d" => "3d",
        _ => "image",
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The fields every `generation.*` event carries.
fn common(g: &Generation) -> serde_json::Map<String, serde_json::Value> {
    let api_key_id = g.created_by.strip_prefix("api_key:");
    let mut m = serde_json::Map::new();
    m.insert("generation_id".into(), json!(g.id.to_string()));
    m.insert("model".into(), json!(g.kind));
    m.insert("modality".into(), json!(modality(&g.kind)));
    m.insert("api_key_id".into(), json!(api_key_id));
    m.insert("metadata".into(), json!(g.metadata));
    m
}

pub fn queued_payload(g: &Generation) -> serde_json::Value {
    let mut m = common(g);
    let excerpt: String = g.prompt.chars().take(PROMPT_EXCERPT_CHARS).collect();
    m.insert("prompt_excerpt".into(), json!(excerpt));
    m.insert("credits_charged".into(), json!(g.cost));
    m.insert("queue_time".into(), json!(rfc3339(g.create_time)));
    serde_json::Value::Object(m)
}

/// The catalog caps a cancel reason at this many characters.
const REASON_CHARS: usize = 500;
/// The catalog caps an error message at this many characters.
const ERROR_MESSAGE_CHARS: usize = 1000;

pub fn cancelled_payload(
    g: &Generation,
    cancelled_by: &str,
    reason: &str,
    refunded: i64,
) -> serde_json::Value {
    let mut m = common(g);
    m.insert("cancelled_by".into(), json!(cancelled_by));
    let reason: String = reason.chars().take(REASON_CHARS).collect();
    m.insert("reason".into(), json!(reason));
    m.insert("credits_refunded".into(), json!(refunded));
    m.insert(
        "cancel_time".into(),
        json!(rfc3339(g.end_time.unwrap_or(g.update_time))),
    );
    serde_json::Value::Object(m)
}

pub fn started_payload(g: &Generation) -> serde_json::Value {
    let mut m = common(g);
    m.insert(
        "start_time".into(),
        json!(rfc3339(g.start_time.unwrap_or(g.update_time))),
    );
    serde_json::Value::Object(m)
}

/// `generation.completed`: one asset per id, in the order of `asset_ids` (the orchestrator
/// sends the URLs in the same order). The update carries no sizes, so none are claimed.
pub fn completed_payload(g: &Generation) -> serde_json::Value {
    let mut m = common(g);
    let kind = modality(&g.kind);
    let mime_type = mime_type(&g.output_format, kind);
    let assets: Vec<_> = g
        .asset_ids
        .iter()
        .zip(&g.result_urls)
        .map(|(id, url)| json!({"asset_id": id, "kind": kind, "mime_type": mime_type, "url": url}))
        .collect();
    m.insert("assets".into(), json!(assets));
    m.insert("credits_charged".into(), json!(g.cost));
    let end = g.end_time.unwrap_or(g.update_time);
    if let Some(start) = g.start_time {
        let ms = (end - start).num_milliseconds().max(0);
        m.insert("duration_ms".into(), json!(ms));
    }
    m.insert("complete_time".into(), json!(rfc3339(end)));
    serde_json::Value::Object(m)
}

pub fn failed_payload(g: &Generation, refunded: i64) -> serde_json::Value {
    let mut m = common(g);
    let code = g.error_code.as_deref().unwrap_or("");
    let (public, retryable) = public_error(code);
    let message: String = g
        .error_message
        .as_deref()
        .unwrap_or("")
        .chars()
        .take(ERROR_MESSAGE_CHARS)
        .collect();
    m.insert(
        "error".into(),
        json!({"code": public, "message": message, "retryable": retryable}),
    );
    m.insert("credits_refunded".into(), json!(refunded));
    m.insert(
        "fail_time".into(),
        json!(rfc3339(g.end_time.unwrap_or(g.update_time))),
    );
    serde_json::Value::Object(m)
}

/// The catalog's public error code of an orchestrator's (or devgate's) `UPPER_SNAKE` code,
/// and whether trying again may work. Unknown codes are `internal`: the catalog's enum is a
/// contract with developers, the orchestrator's codes are not.
pub fn public_error(code: &str) -> (&'static str, bool) {
    match code {
        "CONTENT_POLICY" => ("content_policy", false),
        "INVALID_INPUT" | "INVALID_ARGUMENT" => ("invalid_input", false),
        "MODEL_UNAVAILABLE" | "UNAVAILABLE" => ("model_unavailable", true),
        "TIMEOUT" | "DEADLINE_EXCEEDED" => ("timeout", true),
        _ => ("internal", true),
    }
}

/// The MIME type of a generation's outputs: the orchestrator makes the requested format.
fn mime_type(format: &str, modality: &str) -> &'static str {
    match format {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "ogg" => "audio/ogg",
        "txt" => "text/plain",
        "md" => "text/markdown",
        "json" => "application/json",
        _ if modality == "text" => "text/plain",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap as Map;

    use super::*;
    use crate::generation::config::{Formats, Prices};

    fn kinds() -> KindCatalog {
        KindCatalog::new(
            "image=10,image_hd=25".parse::<Prices>().unwrap(),
            "image=png|jpeg,image_hd=png".parse::<Formats>().unwrap(),
        )
        .unwrap()
    }

    fn request<'a>(metadata: &'a Map<String, String>) -> CreateRequest<'a> {
        CreateRequest {
            kind: "image",
            prompt: "a lighthouse",
            output_format: "png",
            style: None,
            count: 0,
            project_id: "",
            metadata,
        }
    }

    #[test]
    fn a_good_request_passes_with_defaults() {
        let metadata = Map::new();
        let mut v = Violations::new();
        let new = validate(request(&metadata), &kinds(), &mut v);
        assert!(v.is_empty(), "{v}");
        assert_eq!(new.count, 1);
        assert_eq!(new.style, json!({}));
    }

    #[test]
    fn every_bad_field_is_named() {
        let metadata: Map<String, String> = (0..17)
            .map(|i| (format!("k{i}"), "x".repeat(501)))
            .collect();
        let mut r = request(&metadata);
        r.prompt = "";
        r.count = 9;
        r.output_format = "gif";
        r.style = Some(json!({"s": "x".repeat(17 * 1024)}));
        let mut v = Violations::new();
        validate(r, &kinds(), &mut v);
        let fields: Vec<_> = v.iter().map(|f| f.field.clone()).collect();
        for f in ["prompt", "count", "output_format", "style", "metadata"] {
            assert!(fields.iter().any(|x| x == f), "{f} in {fields:?}");
        }
        assert!(fields.iter().any(|x| x.starts_with("metadata[")));

        let empty = Map::new();
        let mut r = request(&empty);
        r.kind = "hologram";
        let mut v = Violations::new();
        validate(r, &kinds(), &mut v);
        assert_eq!(v.iter().next().unwrap().field, "kind");
    }

    #[test]
    fn modalities_follow_the_catalog() {
        assert_eq!(modality("image_hd"), "image");
        assert_eq!(modality("video"), "video");
        assert_eq!(modality("text"), "text");
    }
}
