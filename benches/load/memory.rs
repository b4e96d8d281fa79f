//! Scenario 6: resident memory idle, with 10,000 entries and with 100,000.

use crate::fake_eks_auth::FakeEksAuth;
use crate::harness::*;
use std::sync::Arc;
use std::time::Duration;

/// RSS idle and full, each size on an agent configured for it (`--max-cache-size N`, as an
/// operator would), with ~1 KB tokens and ~1 KB session tokens.
pub async fn memory(fake: &FakeEksAuth) -> Vec<Row> {
    fake.respond_with("success-realistic-size");
    if let Some(bin) = baseline() {
        // The same 10,000 entries in the baseline build and this one, one after the other.
        for (name, which) in [("baseline", Some(bin.as_str())), ("this build", None)] {
            let a = match which {
                Some(bin) => baseline_agent(bin, fake, &["--max-cache-size", "10000"]).await,
                None => agent(fake, &["--max-cache-size", "10000"]).await,
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            let idle = a.rss_kib();
            let tokens = Arc::new(
                (0..10_000)
                    .map(|i| token(3_500_000 + i))
                    .collect::<Vec<_>>(),
            );
            warm(a.addr, &tokens, 64).await;
            tokio::time::sleep(Duration::from_secs(11)).await;
            let rss = a.rss_kib();
            println!(
                "6 memory, {name}: idle {idle} KiB, 10k entries {rss} KiB ({:.0} bytes/entry)",
                (rss.saturating_sub(idle) * 1024) as f64 / 10_000.0
            );
        }
    }
    let mut rows = Vec::new();
    for (n, limit) in [(10_000usize, Some(48 * 1024)), (100_000, None)] {
        let a = agent(fake, &["--max-cache-size", &n.to_string()]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let idle = a.rss_kib();
        if n == 10_000 {
            rows.push(Row {
                scenario: "6 memory idle",
                figures: format!("{idle} KiB"),
                target: "<= 16 MiB".into(),
                met: Some(idle <= 16 * 1024),
            });
        }
        let tokens = Arc::new((0..n).map(|i| token(3_000_000 + i)).collect::<Vec<_>>());
        warm(a.addr, &tokens, 64).await;
        // Steady state, as the kubelet sees it between bursts: after the agent's periodic trim
        // (10 s) has returned memory freed by the fill (connections, response parsing).
        tokio::time::sleep(Duration::from_secs(11)).await;
        let rss = a.rss_kib();
        let per = (rss.saturating_sub(idle) * 1024) as f64 / n as f64;
        rows.push(Row {
            scenario: if n == 10_000 {
                "6 memory 10k"
            } else {
                "6 memory 100k"
            },
            figures: format!("{rss} KiB with {n} entries ({per:.0} bytes/entry over idle)"),
            target: limit.map_or("report".into(), |l| format!("<= {} MiB", l / 1024)),
            met: limit.map(|l| rss <= l),
        });
    }
    fake.respond_with("success");
    rows
}
