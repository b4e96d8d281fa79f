//! A token bucket: at most `rate` acquisitions per second, evenly paced.
//!
//! Contract: [`TokenBucket::acquire`] returns once a token is available, sleeping exactly as long
//! as the refill needs (no polling). It takes one token per call; the reference agent's limiter
//! took two per refresh, halving its real rate. The burst is one token, so no one-second window
//! sees more than `rate + 1` acquisitions: `--max-service-qps` means per second, not on average.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(rate_per_second: f64) -> Self {
        let rate = rate_per_second.max(0.001);
        let burst = 1.0;
        TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
                s.0 = (s.0 + refill).min(self.burst);
                s.1 = now;
                if s.0 >= 1.0 {
                    s.0 -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - s.0) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_at_the_rate() {
        let bucket = TokenBucket::new(5.0);
        let start = Instant::now();
        for _ in 0..15 {
            bucket.acquire().await;
        }
        // One at once, then one every 200 ms: never a burst above the rate.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(2790) && elapsed <= Duration::from_millis(2900),
            "{elapsed:?}"
        );
    }
}
