//! Limits, windows and decisions, and the response headers that report them.

use std::{fmt, str::FromStr, time::Duration};

use crate::identity::Plan;

/// A key's effective limits: calls per minute, hour and day, and the burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub per_minute: u32,
    pub per_hour: u32,
    pub per_day: u32,
    pub burst: u32,
}

/// Optional overrides of some fields (a key's or a tenant's); `None` inherits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOverrides {
    pub per_minute: Option<u32>,
    pub per_hour: Option<u32>,
    pub per_day: Option<u32>,
    pub burst: Option<u32>,
}

impl LimitOverrides {
    /// Limit columns (NULL or positive, by CHECK) as overrides: how keys and tenants store
    /// them.
    pub fn from_columns(m: Option<i32>, h: Option<i32>, d: Option<i32>, b: Option<i32>) -> Self {
        let positive = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok());
        LimitOverrides {
            per_minute: positive(m),
            per_hour: positive(h),
            per_day: positive(d),
            burst: positive(b),
        }
    }

    pub fn apply(&self, base: Limits) -> Limits {
        Limits {
            per_minute: self.per_minute.unwrap_or(base.per_minute),
            per_hour: self.per_hour.unwrap_or(base.per_hour),
            per_day: self.per_day.unwrap_or(base.per_day),
            burst: self.burst.unwrap_or(base.burst),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// A key's limits under its tenant's `ceiling`: a key's own values may only lower what
    /// the tenant's plan grants (raising is SetPlan's), so a stored value above the ceiling
    /// (the plan went down since) is capped here, at use time.
    pub fn lower(&self, ceiling: Limits) -> Limits {
        let cap = |own: Option<u32>, max: u32| own.map_or(max, |v| v.min(max));
        Limits {
            per_minute: cap(self.per_minute, ceiling.per_minute),
            per_hour: cap(self.per_hour, ceiling.per_hour),
            per_day: cap(self.per_day, ceiling.per_day),
            burst: cap(self.burst, ceiling.burst),
        }
    }

    /// The fields set above `ceiling`: (field name, value, ceiling).
    pub fn above(&self, ceiling: Limits) -> Vec<(&'static str, u32, u32)> {
        [
            ("per_minute", self.per_minute, ceiling.per_minute),
            ("per_hour", self.per_hour, ceiling.per_hour),
            ("per_day", self.per_day, ceiling.per_day),
            ("burst", self.burst, ceiling.burst),
        ]
        .into_iter()
        .filter_map(|(name, own, max)| own.filter(|v| *v > max).map(|v| (name, v, max)))
        .collect()
    }
}

/// One token bucket of a key.
///
/// It refills `limit` tokens per `seconds`. Its capacity is the burst for the minute window
/// and the next shorter window's limit for the hour and the day: a client may spend its
/// burst at once, a minute's allowance at the minute rate, an hour's at the hour rate.
/// Over any span of one window, at most `limit + capacity` calls are admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub name: &'static str,
    pub seconds: u64,
    pub limit: u32,
    pub capacity: u32,
}

impl Limits {
    /// What makes the limits contradict themselves: each window must allow at least what
    /// the shorter one does (burst ≤ per minute ≤ per hour ≤ per day), else the longer
    /// window silently becomes the real limit of the shorter. (field, message) pairs.
    pub fn inconsistencies(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.burst > self.per_minute {
            out.push((
                "burst",
                format!("{} exceeds per_minute ({})", self.burst, self.per_minute),
            ));
        }
        if self.per_minute > self.per_hour {
            out.push((
                "per_minute",
                format!("{} exceeds per_hour ({})", self.per_minute, self.per_hour),
            ));
        }
        if self.per_hour > self.per_day {
            out.push((
                "per_hour",
                format!("{} exceeds per_day ({})", self.per_hour, self.per_day),
            ));
        }
        out
    }

    pub fn windows(&self) -> [Window; 3] {
        [
            Window {
                name: "minute",
                seconds: 60,
                limit: self.per_minute,
                capacity: self.burst.max(1),
            },
            Window {
                name: "hour",
                seconds: 3_600,
                limit: self.per_hour,
                capacity: self.per_minute.max(1),
            },
            Window {
                name: "day",
                seconds: 86_400,
                limit: self.per_day,
                capacity: self.per_hour.max(1),
            },
        ]
    }
}

/// `per_minute/per_hour/per_day/burst`, e.g. `100/2000/20000/10` (the config syntax).
impl FromStr for Limits {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let [m, h, d, b] = parse_positive_parts(
            s,
            "per_minute/per_hour/per_day/burst, e.g. 100/2000/20000/10",
        )?;
        let small = |v: u64| u32::try_from(v).map_err(|_| format!("{v} is too large"));
        let limits = Limits {
            per_minute: small(m)?,
            per_hour: small(h)?,
            per_day: small(d)?,
            burst: small(b)?,
        };
        match limits.inconsistencies().first() {
            Some((field, why)) => Err(format!("{field} {why}")),
            None => Ok(limits),
        }
    }
}

/// `N` positive whole numbers separated by `/` (the config syntax of limits and quotas).
pub(crate) fn parse_positive_parts<const N: usize>(
    s: &str,
    expected: &str,
) -> Result<[u64; N], String> {
    let parts: Vec<u64> = s
        .split('/')
        .map(|p| {
            p.trim()
                .parse::<u64>()
                .map_err(|_| format!("{p:?} is not a whole number"))
        })
        .collect::<Result<_, _>>()?;
    let parts: [u64; N] = parts
        .try_into()
        .map_err(|_| format!("expected {expected}"))?;
    if parts.contains(&0) {
        return Err("every value must be at least 1".into());
    }
    Ok(parts)
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.per_minute, self.per_hour, self.per_day, self.burst
        )
    }
}

/// Default limits of every plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLimits {
    pub free: Limits,
    pub standard: Limits,
    pub professional: Limits,
    pub business: Limits,
    /// Enterprise tenants get theirs through SetPlan; this is what they have until then.
    pub enterprise: Limits,
}

impl PlanLimits {
    pub fn of(&self, plan: Plan) -> Limits {
        match plan {
            Plan::Free => self.free,
            Plan::Standard => self.standard,
            Plan::Professional => self.professional,
            Plan::Business => self.business,
            Plan::Enterprise => self.enterprise,
        }
    }
}

/// The state of one window after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowState {
    pub window: Window,
    /// Whole tokens left after this call.
    pub remaining: u64,
    /// Seconds until the bucket is full again.
    pub reset: u64,
}

/// The answer for one call: allowed or not, and every window's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub windows: Vec<WindowState>,
    /// When refused: how long until every window has room for the call.
    pub retry_after: Option<Duration>,
}

impl Decision {
    /// The window closest to refusing: the fewest remaining calls (the shorter window on a tie).
    pub fn tightest(&self) -> &WindowState {
        self.windows
            .iter()
            .min_by_key(|w| (w.remaining, w.window.seconds))
            .expect("a decision has windows")
    }

    /// The headers every API-key response carries: `ratelimit-policy` and `ratelimit`
    /// (draft-ietf-httpapi-ratelimit-headers structured fields), the common
    /// `x-ratelimit-*` trio for the tightest window and, when refused, `retry-after`.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let policy: Vec<String> = self
            .windows
            .iter()
            .map(|w| {
                format!(
                    "\"{}\";q={};w={}",
                    w.window.name, w.window.limit, w.window.seconds
                )
            })
            .collect();
        let t = self.tightest();
        let mut headers = vec![
            ("ratelimit-policy", policy.join(", ")),
            (
                "ratelimit",
                format!("\"{}\";r={};t={}", t.window.name, t.remaining, t.reset),
            ),
            ("x-ratelimit-limit", t.window.limit.to_string()),
            ("x-ratelimit-remaining", t.remaining.to_string()),
            ("x-ratelimit-reset", t.reset.to_string()),
        ];
        if let Some(after) = self.retry_after {
            headers.push(("retry-after", retry_after_secs(after).to_string()));
        }
        headers
    }
}

/// Whole seconds, rounded up, at least 1 (a client told 0 would retry at once).
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_config_syntax() {
        let l: Limits = "100/2000/20000/10".parse().unwrap();
        assert_eq!(
            l,
            Limits {
                per_minute: 100,
                per_hour: 2000,
                per_day: 20000,
                burst: 10
            }
        );
        assert_eq!(l.to_string(), "100/2000/20000/10");
        assert!("100/2000/20000".parse::<Limits>().is_err());
        assert!("100/0/20000/10".parse::<Limits>().is_err());
        assert!("a/b/c/d".parse::<Limits>().is_err());
        // burst ≤ per minute ≤ per hour ≤ per day.
        assert!("100/2000/20000/101".parse::<Limits>().is_err());
        assert!("100/99/20000/10".parse::<Limits>().is_err());
        assert!("100/2000/1999/10".parse::<Limits>().is_err());
    }

    #[test]
    fn a_key_only_lowers_its_tenants_limits() {
        let plan: Limits = "30/500/5000/5".parse().unwrap();
        let key = LimitOverrides {
            per_minute: Some(100_000_000),
            burst: Some(2),
            ..Default::default()
        };
        assert_eq!(key.lower(plan), "30/500/5000/2".parse().unwrap());
        assert_eq!(key.above(plan), vec![("per_minute", 100_000_000, 30)]);
        assert!(LimitOverrides::default().above(plan).is_empty());
    }

    #[test]
    fn overrides_inherit_what_they_do_not_set() {
        let base: Limits = "100/2000/20000/10".parse().unwrap();
        let o = LimitOverrides {
            per_minute: Some(5),
            burst: Some(1),
            ..Default::default()
        };
        assert_eq!(o.apply(base), "5/2000/20000/1".parse().unwrap());
    }

    #[test]
    fn headers_follow_the_draft() {
        let limits: Limits = "100/2000/20000/10".parse().unwrap();
        let [m, h, d] = limits.windows();
        let decision = Decision {
            allowed: false,
            windows: vec![
                WindowState {
                    window: m,
                    remaining: 0,
                    reset: 6,
                },
                WindowState {
                    window: h,
                    remaining: 90,
                    reset: 18,
                },
                WindowState {
                    window: d,
                    remaining: 1990,
                    reset: 40,
                },
            ],
            retry_after: Some(Duration::from_millis(600)),
        };
        let headers: std::collections::HashMap<_, _> = decision.headers().into_iter().collect();
        assert_eq!(
            headers["ratelimit-policy"],
            "\"minute\";q=100;w=60, \"hour\";q=2000;w=3600, \"day\";q=20000;w=86400"
        );
        assert_eq!(headers["ratelimit"], "\"minute\";r=0;t=6");
        assert_eq!(headers["x-ratelimit-limit"], "100");
        assert_eq!(headers["x-ratelimit-remaining"], "0");
        assert_eq!(headers["retry-after"], "1");
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }
}
