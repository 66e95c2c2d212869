//! Field-level validation errors, collected so one response names every bad field
//! (as `google.rpc.BadRequest` details).
//!
//! Bounded: at most [`MAX_VIOLATIONS`] are kept and each field and description is cut short,
//! so a 1 MiB request cannot produce an error larger than the response headers Envoy
//! accepts (the gRPC status travels in headers; an overflow became a 502).

use std::fmt;

/// Most violations one error reports; the rest are only counted.
pub const MAX_VIOLATIONS: usize = 20;
/// Longest field path kept, in characters.
pub const MAX_FIELD_CHARS: usize = 100;
/// Longest description kept, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 300;
/// Longest part of a client's value echoed in a description (see [`quote`]).
pub const MAX_QUOTED_CHARS: usize = 40;

/// One bad field: its path in the request (`api_key.allowed_cidrs[2]`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// Every violation found in one request (the first [`MAX_VIOLATIONS`] of them). Empty
/// means valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations {
    kept: Vec<FieldViolation>,
    /// Violations found beyond [`MAX_VIOLATIONS`].
    omitted: usize,
}

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    /// A single violation, for errors found one at a time.
    pub fn one(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut v = Self::new();
        v.add(field, description);
        v
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        if self.kept.len() >= MAX_VIOLATIONS {
            self.omitted += 1;
            return;
        }
        self.kept.push(FieldViolation {
            field: truncate(field.into(), MAX_FIELD_CHARS),
            description: truncate(description.into(), MAX_DESCRIPTION_CHARS),
        });
    }

    /// Whether the report is full: callers looping over client-sized input may stop.
    pub fn is_full(&self) -> bool {
        self.kept.len() >= MAX_VIOLATIONS
    }

    /// How many violations were found but not kept.
    pub fn omitted(&self) -> usize {
        self.omitted
    }

    /// Records `description` for `field` unless `ok`.
    pub fn check(&mut self, ok: bool, field: impl Into<String>, description: impl Into<String>) {
        if !ok {
            self.add(field, description);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &FieldViolation> {
        self.kept.iter()
    }

    /// `Ok(value)` when nothing was recorded, otherwise the violations.
    pub fn into_result<T>(self, value: T) -> Result<T, Violations> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

/// Most violations spelled out in the message (the details carry all kept ones).
const MESSAGE_VIOLATIONS: usize = 3;

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .kept
            .iter()
            .take(MESSAGE_VIOLATIONS)
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect();
        f.write_str(&parts.join("; "))?;
        let more = self.kept.len().saturating_sub(MESSAGE_VIOLATIONS) + self.omitted;
        if more > 0 {
            write!(f, "; and {more} more")?;
        }
        Ok(())
    }
}

/// Cuts `s` to `max` characters, marking the cut with `…`.
fn truncate(mut s: String, max: usize) -> String {
    if let Some((at, _)) = s.char_indices().nth(max) {
        s.truncate(at);
        s.push('…');
    }
    s
}

/// A client's value for a description: debug-quoted and cut to [`MAX_QUOTED_CHARS`].
pub fn quote(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((at, _)) => format!("{:?}…", &value[..at]),
        None => format!("{value:?}"),
    }
}

/// The fields an AIP update names: the mask's paths or, with no mask, every updatable field
/// the patch sets (`present[i]` for `updatable[i]`). Too many paths (each may appear once)
/// refuses the whole mask before looking at any; unknown paths are `update_mask`
/// violations. Only names from `updatable` are returned.
pub fn update_paths(
    mask: Option<&prost_types::FieldMask>,
    updatable: &[&'static str],
    present: &[bool],
    v: &mut Violations,
) -> Vec<&'static str> {
    let updatable_list = || updatable.join(", ");
    let Some(paths) = mask.map(|m| &m.paths).filter(|p| !p.is_empty()) else {
        return updatable
            .iter()
            .zip(present)
            .filter(|(_, set)| **set)
            .map(|(f, _)| *f)
            .collect();
    };
    if paths.len() > updatable.len() {
        v.add(
            "update_mask",
            format!(
                "at most {} paths; updatable fields: {}",
                updatable.len(),
                updatable_list()
            ),
        );
        return Vec::new();
    }
    let mut named = Vec::with_capacity(paths.len());
    for path in paths {
        match updatable.iter().find(|f| **f == path.as_str()) {
            Some(f) => named.push(*f),
            None => v.add(
                "update_mask",
                format!(
                    "{} cannot be updated; updatable fields: {}",
                    quote(path),
                    updatable_list()
                ),
            ),
        }
    }
    named
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_bounded() {
        let mut v = Violations::new();
        for i in 0..1000 {
            v.add(format!("f{i}{}", "x".repeat(500)), "d".repeat(10_000));
        }
        assert_eq!(v.iter().count(), MAX_VIOLATIONS);
        assert_eq!(v.omitted(), 1000 - MAX_VIOLATIONS);
        assert!(v.is_full());
        for f in v.iter() {
            assert!(f.field.chars().count() <= MAX_FIELD_CHARS + 1);
            assert!(f.description.chars().count() <= MAX_DESCRIPTION_CHARS + 1);
        }
        let message = v.to_string();
        assert!(message.len() < 2_000, "{}", message.len());
        assert!(message.ends_with("and 997 more"), "{message}");
    }

    #[test]
    fn quotes_are_short_and_char_safe() {
        assert_eq!(quote("ab"), "\"ab\"");
        let long = "é".repeat(100);
        let q = quote(&long);
        assert_eq!(q.chars().filter(|c| *c == 'é').count(), MAX_QUOTED_CHARS);
        assert!(q.ends_with('…'));
    }
}
