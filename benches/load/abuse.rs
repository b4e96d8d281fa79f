//! Scenario 9: what a connection costs: memory per open connection, idle and holding 30 KiB of
//! unfinished headers (the worst a client can make one cost). The flood of forged tokens and
//! connections held by one client, against pods on addresses of their own, are scenario 10
//! ([`crate::identity`]).

use crate::fake_eks_auth::FakeEksAuth;
use crate::harness::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

pub async fn connections(fake: &FakeEksAuth) -> Vec<Row> {
    let mut rows = Vec::new();
    // Cost per connection: no caps in the way, and headers allowed a minute to arrive (both
    // in LIFTED_BUDGETS).
    let a = agent(fake, &[]).await;
    let addr = a.addr;
    warm(addr, &Arc::new(vec![token(8_000_000)]), 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = a.rss_kib();
    let n = 2000usize;
    let mut idle = Vec::with_capacity(n);
    for i in 0..n {
        idle.push(tcp_from(Some(pod_ip(i % 20)), addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with_idle = a.rss_kib();
    let mut heavy = Vec::with_capacity(n);
    let header = format!(
        "GET /v1/credentials HTTP/1.1\r\nHost: {addr}\r\nX-Padding: {}",
        "p".repeat(30 * 1024)
    );
    for i in 0..n {
        let mut s = tcp_from(Some(pod_ip(100 + i % 20)), addr)
            .await
            .expect("connect");
        s.write_all(header.as_bytes()).await.expect("write");
        heavy.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with_heavy = a.rss_kib();
    let per_idle = with_idle.saturating_sub(base) as f64 / n as f64;
    let per_heavy = with_heavy.saturating_sub(with_idle) as f64 / n as f64;
    // The worst the defaults allow: 2048 connections each holding unfinished headers, on top
    // of an agent with 10,000 cached pods (47 MiB, scenario 6).
    let worst_default = 2048.0 * per_heavy / 1024.0;
    let worst_total = base as f64 / 1024.0 + worst_default + 47.0;
    rows.push(Row {
        scenario: "9 memory per connection",
        figures: format!(
            "{n} idle: {per_idle:.1} KiB each; {n} with 30 KiB of unfinished headers: {per_heavy:.1} KiB each (RSS {base} -> {with_idle} -> {with_heavy} KiB); the default 2048 connections at the worst cost {worst_default:.0} MiB, {worst_total:.0} MiB with 10,000 cached pods"
        ),
        target: "worst case under the 256 MiB limit".into(),
        met: Some(worst_total < 200.0),
    });
    drop((idle, heavy));
    drop(a);

    rows
}
