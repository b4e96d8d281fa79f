//! Scenarios 1 and 2: cache-hit throughput against the ceiling, for one token (and p99 at half
//! that rate) and for 10,000 tokens picked at random.

use crate::fake_eks_auth::FakeEksAuth;
use crate::harness::*;
use std::sync::Arc;
use std::time::Duration;

/// Alternate agent and ceiling runs; the best of each makes the ratio.
pub async fn versus_ceiling(
    fake: &FakeEksAuth,
    scenario: &'static str,
    n_tokens: usize,
    conns: usize,
    target: f64,
) -> Vec<Row> {
    let tokens = Arc::new((0..n_tokens).map(token).collect::<Vec<_>>());
    let size = (n_tokens + 1000).to_string();
    let a = agent(fake, &["--max-cache-size", &size]).await;
    warm(a.addr, &tokens, 64).await;
    let base = match baseline() {
        Some(bin) => {
            let b = baseline_agent(&bin, fake, &["--max-cache-size", &size]).await;
            warm(b.addr, &tokens, 64).await;
            Some(b)
        }
        None => None,
    };
    let (_c, caddr) = ceiling(&sample_body(fake).await).await;
    let secs = Duration::from_secs(3);
    let (mut best_a, mut best_b, mut best_c) = (Run::default(), Run::default(), Run::default());
    for _ in 0..2 {
        let r = drive(a.addr, conns, secs, tokens.clone(), None, false).await;
        if r.rate() > best_a.rate() {
            best_a = r;
        }
        if let Some(b) = &base {
            let r = drive(b.addr, conns, secs, tokens.clone(), None, false).await;
            if r.rate() > best_b.rate() {
                best_b = r;
            }
        }
        let r = drive(caddr, conns, secs, tokens.clone(), None, false).await;
        if r.rate() > best_c.rate() {
            best_c = r;
        }
    }
    let ratio = best_a.rate() / best_c.rate().max(1.0);
    if base.is_some() {
        println!(
            "{scenario}: baseline {:.0} req/s ({}), ratio {:.2}; this build {:.0} req/s, ratio {ratio:.2}",
            best_b.rate(),
            lat(&best_b),
            best_b.rate() / best_c.rate().max(1.0),
            best_a.rate()
        );
    }
    let mut rows = vec![Row {
        scenario,
        figures: format!(
            "agent {:.0} req/s ({}, {} errors), ceiling {:.0} req/s ({}); ratio {:.2}; RSS {} KiB",
            best_a.rate(),
            lat(&best_a),
            best_a.errors,
            best_c.rate(),
            lat(&best_c),
            ratio,
            a.rss_kib()
        ),
        target: format!("ratio >= {target}"),
        met: Some(ratio >= target && best_a.errors == 0),
    }];
    if scenario == "1 hit path" {
        let half = best_a.rate() / 2.0;
        let paced = drive(a.addr, conns, secs, tokens.clone(), Some(half), false).await;
        let paced_ceiling = drive(caddr, conns, secs, tokens.clone(), Some(half), false).await;
        rows.push(Row {
            scenario: "1 hit path @50%",
            figures: format!(
                "agent {:.0} req/s paced: {}; ceiling at the same rate: {}",
                paced.rate(),
                lat(&paced),
                lat(&paced_ceiling)
            ),
            target: "p99 < 1 ms".into(),
            met: Some(paced.q(0.99) < Duration::from_millis(1) && paced.errors == 0),
        });
    }
    rows
}
