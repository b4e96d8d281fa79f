//! When an entry should be refreshed, and how long to wait after a failed refresh.
//!
//! Contract, for credentials fetched at `f` that expire at `e` (lifetime `L = e - f`):
//! - *refresh point* `f + min(L/2, max_retention) - jitter` (jitter up to 10% of that interval):
//!   the scheduler refreshes the entry then, if a pod used it since it was fetched. Spreading by
//!   jitter keeps entries created together (a node restart) from renewing together.
//! - *hard point* `e - min(20 min, L/3)`: past it a request does not get the cached credentials
//!   without first trying a fresh exchange. botocore treats credentials with under 15 minutes
//!   left as stale and refetches on every call, so with 6 h credentials pods always get at least
//!   3 h, and with 59-minute cross-account credentials at least ~20 minutes, never less unless
//!   EKS Auth issued less.
//! - *serve-queued point* `e - min(60 s, L/10)`: between the hard point and here, an entry whose
//!   refresh is already queued keeps being served while the scheduler gets to it, so that when
//!   more refreshes are due than `--max-service-qps` allows (10,000 pods with short credentials),
//!   the scheduler stays the only caller of EKS Auth instead of every request becoming one. Past
//!   it, or for an entry nobody was going to refresh (dormant), a request exchanges at once.
//! - *backoff* after a recoverable refresh failure: 1 s doubling to 60 s, with jitter in
//!   [d/2, d]. Retries are scheduled while the cached credentials are still valid (static
//!   stability serves them until then), past the hard point included.

use std::time::{Duration, SystemTime};

const HARD_FLOOR: Duration = Duration::from_secs(20 * 60);
const SERVE_QUEUED_FLOOR: Duration = Duration::from_secs(60);
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct RefreshPolicy {
    /// `--max-credential-retention-before-renewal`.
    pub max_retention: Duration,
}

/// The points of one entry's life; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub refresh_at: SystemTime,
    pub hard_at: SystemTime,
    pub serve_queued_until: SystemTime,
}

impl RefreshPolicy {
    pub fn plan(&self, fetched_at: SystemTime, expires_at: SystemTime) -> Plan {
        let lifetime = expires_at.duration_since(fetched_at).unwrap_or_default();
        let interval = (lifetime / 2).min(self.max_retention);
        let jitter = interval.mul_f64(fastrand::f64() * 0.1);
        let refresh_at = fetched_at + interval - jitter;
        let hard_at = (expires_at - HARD_FLOOR.min(lifetime / 3)).max(refresh_at);
        let serve_queued_until = (expires_at - SERVE_QUEUED_FLOOR.min(lifetime / 10)).max(hard_at);
        Plan {
            refresh_at,
            hard_at,
            serve_queued_until,
        }
    }
}

/// Delay before the `failures`-th retry of a refresh (1-based).
pub fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(10));
    let d = exp.min(BACKOFF_CAP);
    d.mul_f64(0.5 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;

    fn plan(lifetime: u64, retention: u64) -> (Duration, Duration) {
        let f = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let p = RefreshPolicy {
            max_retention: Duration::from_secs(retention),
        }
        .plan(f, f + Duration::from_secs(lifetime));
        (
            p.refresh_at.duration_since(f).unwrap_or_default(),
            p.hard_at.duration_since(f).unwrap_or_default(),
        )
    }

    #[test]
    fn six_hour_credentials_renew_at_three_hours() {
        let (soft, hard) = plan(6 * H, 3 * H);
        assert!(soft <= Duration::from_secs(3 * H) && soft >= Duration::from_secs(3 * H * 9 / 10));
        assert_eq!(hard, Duration::from_secs(6 * H - 20 * 60));
    }

    #[test]
    fn cross_account_credentials_keep_well_over_fifteen_minutes() {
        let (soft, hard) = plan(59 * 60, 3 * H);
        // Refreshed with at least 29.5 min left; never served with under ~19.7 min left.
        assert!(soft <= Duration::from_secs(59 * 30));
        assert!(Duration::from_secs(59 * 60) - hard > Duration::from_secs(19 * 60));
    }

    #[test]
    fn retention_caps_the_interval() {
        let (soft, _) = plan(6 * H, 60);
        assert!(soft <= Duration::from_secs(60) && soft >= Duration::from_secs(54));
    }

    #[test]
    fn points_are_ordered() {
        let f = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for lifetime in [1, 10, 600, 3540, 21600] {
            let p = RefreshPolicy {
                max_retention: Duration::from_secs(3 * H),
            }
            .plan(f, f + Duration::from_secs(lifetime));
            assert!(
                p.refresh_at <= p.hard_at && p.hard_at <= p.serve_queued_until,
                "lifetime {lifetime}"
            );
            assert!(p.serve_queued_until < f + Duration::from_secs(lifetime) || lifetime < 10);
        }
        // 10-minute credentials: queued refreshes are waited for until one minute before expiry.
        let p = RefreshPolicy {
            max_retention: Duration::from_secs(3 * H),
        }
        .plan(f, f + Duration::from_secs(600));
        assert_eq!(p.serve_queued_until, f + Duration::from_secs(540));
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(1) <= Duration::from_secs(1) && backoff(1) >= Duration::from_millis(500));
        assert!(backoff(3) >= Duration::from_secs(2) && backoff(3) <= Duration::from_secs(4));
        assert!(backoff(40) <= Duration::from_secs(60) && backoff(40) >= Duration::from_secs(30));
    }
}
