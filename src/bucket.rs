//! A token bucket: at most `rate` takes per second on average, at most `burst` at once.
//!
//! Contract: [`TokenBucket::acquire`] returns once a token is available, sleeping exactly as long
//! as the refill needs (no polling); [`TokenBucket::try_take`] takes one now or says how long
//! until one would be there; [`TokenBucket::give_back`] returns a token taken for work that did
//! not happen.
//! Each call takes one token: the reference agent's refresh limiter took two per
//! refresh, halving its real rate. With a burst of 1 no one-second window sees more than
//! `rate + 1` takes: the refresh scheduler uses that, so `--max-service-qps` means per second.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// Tokens available now (negative: booked ahead) and when that was computed.
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A bucket that refills at `rate_per_second` and holds one token.
    pub fn new(rate_per_second: f64) -> Self {
        TokenBucket::with_burst(rate_per_second, 1)
    }

    /// A bucket that refills at `rate_per_second`, holds `burst` tokens, and starts full.
    pub fn with_burst(rate_per_second: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: rate_per_second.max(0.001),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Apply `f` to the refilled state under the lock.
    fn with_state<T>(&self, f: impl FnOnce(&mut f64) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
        s.0 = (s.0 + refill).min(self.burst);
        s.1 = now;
        f(&mut s.0)
    }

    fn wait_for(&self, tokens: f64) -> Duration {
        Duration::from_secs_f64(((1.0 - tokens) / self.rate).max(0.0))
    }

    /// Take a token now, or `Err(time until one is there)`.
    pub fn try_take(&self) -> Result<(), Duration> {
        self.with_state(|tokens| {
            if *tokens >= 1.0 {
                *tokens -= 1.0;
                Ok(())
            } else {
                Err(self.wait_for(*tokens))
            }
        })
    }

    /// Return a token taken for work that did not happen (up to the burst).
    pub fn give_back(&self) {
        self.with_state(|tokens| *tokens = (*tokens + 1.0).min(self.burst));
    }

    /// Wait for a token and take it.
    pub async fn acquire(&self) {
        loop {
            let wait = match self.try_take() {
                Ok(()) => return,
                Err(wait) => wait,
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

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate() {
        let bucket = TokenBucket::with_burst(2.0, 3);
        for _ in 0..3 {
            assert_eq!(bucket.try_take(), Ok(()));
        }
        let wait = bucket.try_take().expect_err("empty");
        assert!(wait > Duration::from_millis(490) && wait <= Duration::from_millis(500));
        // A token given back is there at once.
        bucket.give_back();
        assert_eq!(bucket.try_take(), Ok(()));
        tokio::time::sleep(Duration::from_secs(10)).await;
        // Refilled to the burst, not beyond.
        for _ in 0..3 {
            assert_eq!(bucket.try_take(), Ok(()));
        }
        assert!(bucket.try_take().is_err());
    }
}
