//! Rate limits and plans on the wire: the protobuf forms the API-key and usage services
//! share.

use crate::{identity::Plan, proto::v1, ratelimit::LimitOverrides, validation::Violations};

/// The most calls any window may allow (keeps the columns and the Lua arithmetic sane).
const MAX_LIMIT: u32 = 100_000_000;

/// 0 fields inherit; others must be at most [`MAX_LIMIT`].
pub fn rate_limits_from_proto(
    r: Option<&v1::RateLimits>,
    field: &str,
    v: &mut Violations,
) -> LimitOverrides {
    let Some(r) = r else {
        return LimitOverrides::default();
    };
    let mut get = |value: u32, name: &str| {
        v.check(
            value <= MAX_LIMIT,
            format!("{field}.{name}"),
            format!("at most {MAX_LIMIT}"),
        );
        (value > 0).then_some(value)
    };
    LimitOverrides {
        per_minute: get(r.per_minute, "per_minute"),
        per_hour: get(r.per_hour, "per_hour"),
        per_day: get(r.per_day, "per_day"),
        burst: get(r.burst, "burst"),
    }
}

pub fn rate_limits_to_proto(o: &LimitOverrides) -> Option<v1::RateLimits> {
    (!o.is_empty()).then(|| v1::RateLimits {
        per_minute: o.per_minute.unwrap_or(0),
        per_hour: o.per_hour.unwrap_or(0),
        per_day: o.per_day.unwrap_or(0),
        burst: o.burst.unwrap_or(0),
    })
}

pub fn plan_to_proto(p: Plan) -> v1::Plan {
    match p {
        Plan::Free => v1::Plan::Free,
        Plan::Standard => v1::Plan::Standard,
        Plan::Professional => v1::Plan::Professional,
        Plan::Business => v1::Plan::Business,
        Plan::Enterprise => v1::Plan::Enterprise,
    }
}
