//! Scenario 5: refresh load: entries in use renewed within `--max-service-qps`, never expired.

use crate::fake_eks_auth::FakeEksAuth;
use crate::harness::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Scaled: `n` entries in use with credentials of `life`, `--max-service-qps 20`.
pub async fn refresh(fake: &FakeEksAuth, n: usize, life: Duration) -> Row {
    fake.set_lifetime(life);
    let a = agent(
        fake,
        &[
            "--max-service-qps",
            "20",
            "--max-cache-size",
            &(n * 2).to_string(),
        ],
    )
    .await;
    let tokens = Arc::new((0..n).map(|i| token(2_000_000 + i)).collect::<Vec<_>>());
    warm(a.addr, &tokens, 64).await;
    let base = fake.calls();
    let observe = life + life / 4;
    let calls_per_s = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = {
        let (fake, calls_per_s) = (fake.clone(), calls_per_s.clone());
        tokio::spawn(async move {
            let mut last = fake.calls();
            let end = Instant::now() + observe;
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let c = fake.calls();
                calls_per_s.lock().expect("lock").push(c - last);
                last = c;
            }
        })
    };
    // Every entry in use: each is asked about every 2 s.
    let rate = (n as f64 / 2.0).max(50.0);
    let r = drive(a.addr, 32, observe, tokens.clone(), Some(rate), true).await;
    let _ = sampler.await;
    fake.set_lifetime(Duration::from_secs(6 * 3600));
    let per_s = calls_per_s.lock().expect("lock").clone();
    let max = per_s.iter().copied().max().unwrap_or(0);
    let min_left = r.min_remaining_s.unwrap_or(-1);
    Row {
        scenario: "5 refresh load",
        figures: format!(
            "{n} entries, {}s credentials, qps 20, {}s observed: {} refreshes, max {max} EKS Auth calls/s, min {min_left}s left served, {} errors",
            life.as_secs(), observe.as_secs(), fake.calls() - base, r.errors
        ),
        target: "<= 20 calls/s (+1 pacing edge); never expired".into(),
        met: Some(max <= 21 && min_left > 0 && r.errors == 0),
    }
}
