//! Scenario 3: 1,000 concurrent first requests for one token make one EKS Auth call.

use crate::fake_eks_auth::{FakeEksAuth, Step};
use crate::harness::*;
use std::sync::Arc;
use std::time::Duration;

pub async fn herd(fake: &FakeEksAuth) -> Row {
    fake.set_default(Step {
        fixture: "success".into(),
        delay: Duration::from_millis(100),
        hang: false,
    });
    let a = agent(fake, &[]).await;
    // A running agent: its EKS Auth client has made a call before (connection, endpoint and
    // identity set up). The herd is the first requests for *this* token.
    warm(a.addr, &Arc::new(vec![token(424241)]), 1).await;
    let before = fake.calls();
    let t = token(424242);
    let r = burst(a.addr, vec![t; 1000], Duration::ZERO).await;
    let calls = fake.calls() - before;
    fake.set_default(Step::fixture("success"));
    Row {
        scenario: "3 herd",
        figures: format!(
            "1000 first requests, EKS Auth 100 ms: {} EKS Auth call(s), {} errors, {}",
            calls,
            r.errors,
            lat(&r)
        ),
        target: "1 call; p99 <= 115 ms".into(),
        met: Some(calls == 1 && r.errors == 0 && r.q(0.99) <= Duration::from_millis(115)),
    }
}
