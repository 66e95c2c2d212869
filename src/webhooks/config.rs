//! The webhook sections of the configuration; `crate::config` reads them from the
//! environment (`DEVGATE_ENCRYPTION_KEYS`, `DEVGATE_WEBHOOK_*`).

use std::{fmt, str::FromStr, time::Duration};

use super::{secret_box::KeyRing, ssrf::AllowList};

/// Secrets at rest and the SSRF allow-list.
#[derive(Debug, Clone)]
pub struct WebhookSecurityConfig {
    /// `None` when unset: devgate runs, but nothing can store or read an endpoint secret
    /// (whatever needs one must refuse with a configuration error).
    pub encryption_keys: Option<KeyRing>,
    pub allowed_cidrs: AllowList,
}

/// How the worker delivers: `DEVGATE_WEBHOOK_{CONCURRENCY,TIMEOUT,RETRY_SCHEDULE,DISABLE_AFTER}`.
#[derive(Debug, Clone)]
pub struct WebhookDeliveryConfig {
    /// Deliveries in flight per worker process (also the RabbitMQ prefetch).
    pub concurrency: usize,
    /// The whole HTTP exchange of one attempt.
    pub timeout: Duration,
    pub retry_schedule: RetrySchedule,
    /// Consecutive deliveries that exhausted their retries before the endpoint is disabled.
    pub disable_after: u32,
}

/// The waits before the 2nd, 3rd, … attempt; its length is the number of retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(pub Vec<Duration>);

/// The longest wait devgate schedules, also for a `Retry-After`.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 3600);

impl FromStr for RetrySchedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let steps = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let d = humantime::parse_duration(p).map_err(|e| format!("{p:?}: {e}"))?;
                if d < Duration::from_millis(10) || d > MAX_RETRY_DELAY {
                    return Err(format!("{p:?}: each step must be between 10ms and 24h"));
                }
                Ok(d)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if steps.len() > 20 {
            return Err("at most 20 retries".into());
        }
        Ok(RetrySchedule(steps))
    }
}

impl fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|d| humantime::format_duration(*d).to_string())
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_parses() {
        let s: RetrySchedule = "1m,5m,30m,2h,24h".parse().unwrap();
        assert_eq!(s.0.len(), 5);
        assert_eq!(s.0[4], MAX_RETRY_DELAY);
        assert_eq!(
            "".parse::<RetrySchedule>().unwrap().0,
            Vec::<Duration>::new()
        );
        assert!("25h".parse::<RetrySchedule>().is_err());
        assert!("1ms".parse::<RetrySchedule>().is_err());
        assert!("soon".parse::<RetrySchedule>().is_err());
    }
}
