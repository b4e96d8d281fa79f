//! Scenario 4: a cold storm, 5,000 distinct tokens within a second, every one exchanged.

use crate::fake_eks_auth::{FakeEksAuth, Step};
use crate::harness::*;
use std::time::Duration;

pub async fn storm(fake: &FakeEksAuth) -> Row {
    fake.set_default(Step {
        fixture: "success".into(),
        delay: Duration::from_millis(50),
        hang: false,
    });
    if let Some(bin) = baseline() {
        // Alternate: baseline, this build, baseline, this build; fresh tokens each time.
        for round in 0..2 {
            for (name, which) in [("baseline", Some(bin.as_str())), ("this build", None)] {
                let a = match which {
                    Some(bin) => baseline_agent(bin, fake, &["--max-cache-size", "10000"]).await,
                    None => agent(fake, &["--max-cache-size", "10000"]).await,
                };
                let offset = 2_000_000 + round * 20_000 + usize::from(which.is_some()) * 10_000;
                let tokens: Vec<String> = (0..5000).map(|i| token(offset + i)).collect();
                let r = burst(a.addr, tokens, Duration::from_secs(1)).await;
                println!("4 cold storm, {name}: {} errors, {}", r.errors, lat(&r));
            }
        }
    }
    let a = agent(fake, &["--max-cache-size", "10000"]).await;
    let before = fake.calls();
    let tokens: Vec<String> = (0..5000).map(|i| token(1_000_000 + i)).collect();
    let r = burst(a.addr, tokens, Duration::from_secs(1)).await;
    let calls = fake.calls() - before;
    fake.set_default(Step::fixture("success"));
    Row {
        scenario: "4 cold storm",
        figures: format!(
            "5000 tokens in 1 s, EKS Auth 50 ms: {} calls, {} errors, {}, done in {}",
            calls,
            r.errors,
            lat(&r),
            ms(r.elapsed)
        ),
        target: "0 errors; 5000 calls".into(),
        met: Some(r.errors == 0 && calls == 5000),
    }
}
