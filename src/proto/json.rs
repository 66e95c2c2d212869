//! `google.protobuf.Struct` ⇄ JSON: the free-form fields of the API (event payloads,
//! generation styles) are Structs on the wire and JSON in devgate (schemas, jsonb columns).

use crate::validation::Violations;

/// Postgres's jsonb cannot store U+0000: such a value would fail as a database error.
const NUL: &str = "contains a NUL character (U+0000), which cannot be stored";

/// A `google.protobuf.Struct` as a JSON object. Whole numbers within 2^53 become JSON
/// integers (so `"type": "integer"` schemas accept them); NaN and infinities, which JSON
/// cannot carry, are violations at their path under `field`.
pub fn struct_to_json(
    s: &prost_types::Struct,
    field: &str,
    v: &mut Violations,
) -> Option<serde_json::Value> {
    let mut found = Violations::new();
    let object = struct_fields_to_json(s, field, &mut found);
    for f in found.iter() {
        v.add(&f.field, &f.description);
    }
    found.is_empty().then_some(object)
}

fn struct_fields_to_json(
    s: &prost_types::Struct,
    at: &str,
    v: &mut Violations,
) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, val)| {
                let at = format!("{at}.{k}");
                if k.contains('\0') {
                    v.add(&at, NUL);
                }
                (k.clone(), value_to_json(val, &at, v))
            })
            .collect(),
    )
}

fn value_to_json(val: &prost_types::Value, at: &str, v: &mut Violations) -> serde_json::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    /// The largest integer every JSON reader holds exactly.
    const SAFE_INTEGER: f64 = 9_007_199_254_740_992.0;
    match &val.kind {
        None | Some(Kind::NullValue(_)) => J::Null,
        Some(Kind::BoolValue(b)) => J::Bool(*b),
        Some(Kind::StringValue(s)) => {
            if s.contains('\0') {
                v.add(at, NUL);
            }
            J::String(s.clone())
        }
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() <= SAFE_INTEGER => {
            J::from(*n as i64)
        }
        Some(Kind::NumberValue(n)) => match serde_json::Number::from_f64(*n) {
            Some(n) => J::Number(n),
            None => {
                v.add(at, "not a finite number");
                J::Null
            }
        },
        Some(Kind::ListValue(l)) => J::Array(
            l.values
                .iter()
                .enumerate()
                .map(|(i, item)| value_to_json(item, &format!("{at}[{i}]"), v))
                .collect(),
        ),
        Some(Kind::StructValue(s)) => struct_fields_to_json(s, at, v),
    }
}

/// A JSON object as a `google.protobuf.Struct` (`None` for anything but an object).
pub fn json_to_struct(v: &serde_json::Value) -> Option<prost_types::Struct> {
    match json_to_value(v).kind {
        Some(prost_types::value::Kind::StructValue(s)) => Some(s),
        _ => None,
    }
}

fn json_to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        J::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_objects_become_structs() {
        use prost_types::value::Kind;
        let s = json_to_struct(&json!({"a": [1, "x", null, {"b": true}]})).unwrap();
        let Some(Kind::ListValue(list)) = &s.fields["a"].kind else {
            panic!("{s:?}")
        };
        let kinds: Vec<_> = list
            .values
            .iter()
            .map(|v| v.kind.clone().unwrap())
            .collect();
        assert_eq!(kinds[0], Kind::NumberValue(1.0));
        assert_eq!(kinds[1], Kind::StringValue("x".into()));
        assert_eq!(kinds[2], Kind::NullValue(0));
        let Kind::StructValue(inner) = &kinds[3] else {
            panic!("{kinds:?}")
        };
        assert_eq!(inner.fields["b"].kind, Some(Kind::BoolValue(true)));
        assert!(json_to_struct(&json!([1])).is_none());
    }

    #[test]
    fn structs_become_json_with_integers_and_no_nan() {
        let payload = json!({"n": 3, "f": 2.5, "big": 1e300, "l": [{"x": null}, "s", true]});
        let s = json_to_struct(&payload).unwrap();
        let mut v = Violations::new();
        // Whole numbers come back as JSON integers, so `"type": "integer"` schemas match.
        assert_eq!(struct_to_json(&s, "payload", &mut v), Some(payload));
        assert!(v.is_empty());

        use prost_types::{Value, value::Kind};
        let mut bad = s.clone();
        bad.fields.insert(
            "nan".into(),
            Value {
                kind: Some(Kind::ListValue(prost_types::ListValue {
                    values: vec![Value {
                        kind: Some(Kind::NumberValue(f64::NAN)),
                    }],
                })),
            },
        );
        assert_eq!(struct_to_json(&bad, "payload", &mut v), None);
        let fields: Vec<_> = v.iter().map(|f| f.field.clone()).collect();
        assert_eq!(fields, ["payload.nan[0]"]);
    }
}
