//! Page sizes and opaque page tokens (keyset cursors, base64url JSON) shared by list RPCs.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Serialize, de::DeserializeOwned};

use crate::validation::Violations;

pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 100;

/// 0 means the default; negative or above the maximum is an error.
pub fn page_size(requested: i32, v: &mut Violations) -> i64 {
    match i64::from(requested) {
        0 => DEFAULT_PAGE_SIZE,
        n if (1..=MAX_PAGE_SIZE).contains(&n) => n,
        _ => {
            v.add(
                "page_size",
                format!(
                    "must be between 1 and {MAX_PAGE_SIZE} (0 for the default {DEFAULT_PAGE_SIZE})"
                ),
            );
            DEFAULT_PAGE_SIZE
        }
    }
}

pub fn encode_token<T: Serialize>(cursor: &T) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(cursor).expect("cursors serialize"))
}

/// An empty token is the first page.
pub fn decode_token<T: DeserializeOwned>(token: &str, v: &mut Violations) -> Option<T> {
    if token.is_empty() {
        return None;
    }
    let cursor = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    if cursor.is_none() {
        v.add("page_token", "not a page token returned by this method");
    }
    cursor
}
