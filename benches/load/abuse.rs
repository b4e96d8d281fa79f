//! Scenarios 8 and 9: what one hostile pod can cost the others.
//!
//! 8 *flood*: with the agent's default budgets, one client address floods it with distinct
//! forged tokens (which EKS Auth refuses) on 32 connections, and another repeats one refused
//! token, for 10 s; meanwhile a legitimate pod at another address asks for its cached
//! credentials 100 times a second and a new pod starts every second. Reported: the legitimate
//! pod's p99 and errors, and the EKS Auth calls the flood caused (the bound: the client burst
//! plus its rate times the duration).
//!
//! 9 *connections*: memory per open connection, idle and holding 30 KiB of unfinished headers
//! (the worst a client can make one cost), and the default per-client cap at work: one address
//! opening 1,000 connections while another pod is served.

use crate::fake_eks_auth::FakeEksAuth;
use crate::harness::*;
use http_body_util::BodyExt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const FLOOD: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

pub async fn flood(fake: &FakeEksAuth) -> Vec<Row> {
    fake.answer_namespace("attacker", "error-invalid-token");
    let a = agent_with_defaults(fake, &[]).await;
    let addr = a.addr;
    let legit = ip("127.1.0.1");
    let attacker = ip("127.2.0.1");
    let mine = Arc::new(vec![token(7_000_000)]);
    // The legitimate pod's credentials are cached before the flood starts.
    let mut warm = connect_from(Some(legit), addr).await;
    let res = warm
        .send_request(request(addr, &mine[0]))
        .await
        .expect("warm");
    assert_eq!(res.status(), 200, "legitimate pod warmed");
    // Control: the same pod, the same rate, nobody flooding.
    let control = drive_from(
        Some(legit),
        addr,
        4,
        Duration::from_secs(5),
        mine.clone(),
        Some(100.0),
    )
    .await;
    let before = fake.calls();
    let deadline = Instant::now() + FLOOD;

    // Distinct forged tokens, as fast as 32 connections go.
    let statuses: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    let forged = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..32usize {
        let (statuses, forged) = (statuses.clone(), forged.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect_from(Some(attacker), addr).await;
            let mut n = c * 10_000_000;
            while Instant::now() < deadline {
                n += 1;
                let t = token_in(n, "attacker");
                match sender.send_request(request(addr, &t)).await {
                    Ok(res) => {
                        let i = match res.status().as_u16() {
                            200 => 0,
                            400 => 1,
                            429 => 2,
                            503 => 3,
                            _ => 4,
                        };
                        statuses[i].fetch_add(1, Ordering::Relaxed);
                        let _ = res.into_body().collect().await;
                        forged.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        statuses[5].fetch_add(1, Ordering::Relaxed);
                        sender = connect_from(Some(attacker), addr).await;
                    }
                }
            }
        }));
    }
    // One refused token, repeated.
    let repeated = Arc::new(AtomicU64::new(0));
    {
        let repeated = repeated.clone();
        tasks.push(tokio::spawn(async move {
            let t = token_in(9_999_999, "attacker");
            let mut sender = connect_from(Some(attacker), addr).await;
            while Instant::now() < deadline {
                if let Ok(res) = sender.send_request(request(addr, &t)).await {
                    let _ = res.into_body().collect().await;
                    repeated.fetch_add(1, Ordering::Relaxed);
                } else {
                    sender = connect_from(Some(attacker), addr).await;
                }
            }
        }));
    }
    // EKS Auth calls per second while it lasts.
    let sampler = {
        let fake = fake.clone();
        tokio::spawn(async move {
            let mut per_s = Vec::new();
            let mut last = fake.calls();
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let c = fake.calls();
                per_s.push(c - last);
                last = c;
            }
            per_s
        })
    };
    // A new legitimate pod every second, from its own address.
    let starts = tokio::spawn(async move {
        let mut took = Vec::new();
        let mut n = 0;
        while Instant::now() < deadline {
            n += 1;
            let t = token(7_100_000 + n);
            let mut s = connect_from(Some(pod_ip(n)), addr).await;
            let sent = Instant::now();
            let ok = matches!(s.send_request(request(addr, &t)).await, Ok(r) if r.status() == 200);
            took.push((ok, sent.elapsed()));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        took
    });
    // The legitimate pod: its cached credentials, 100 times a second.
    let legit_run = drive_from(Some(legit), addr, 4, FLOOD, mine, Some(100.0)).await;
    for t in tasks {
        let _ = t.await;
    }
    let per_s = sampler.await.unwrap_or_default();
    let starts = starts.await.unwrap_or_default();
    let calls = fake.calls() - before - starts.len();
    let budget = 10 + FLOOD.as_secs() as usize; // burst + qps × duration
    let counts: Vec<u64> = statuses.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let starts_ok = starts.iter().filter(|(ok, _)| *ok).count();
    let slowest_start = starts.iter().map(|(_, d)| *d).max().unwrap_or_default();
    fake.answer_namespace("attacker", "success");
    vec![
        Row {
            scenario: "8 flood: EKS Auth calls",
            figures: format!(
                "one address, 10 s: {} forged tokens (200 {}, 400 {}, 429 {}, 503 {}, other {}, conn errors {}) and one refused token {} times: {calls} EKS Auth calls caused, max {} calls/s (all sources)",
                forged.load(Ordering::Relaxed), counts[0], counts[1], counts[2], counts[3], counts[4], counts[5],
                repeated.load(Ordering::Relaxed), per_s.iter().max().copied().unwrap_or(0)
            ),
            target: format!("<= {budget} (burst 10 + 1/s)"),
            met: Some(calls <= budget && counts[0] == 0),
        },
        Row {
            scenario: "8 flood: other pods",
            figures: format!(
                "cached pod at 100 req/s during the flood: {} ok, {} errors, {}; without the flood: {}; new pods: {starts_ok}/{} got credentials, slowest {}",
                legit_run.ok, legit_run.errors, lat(&legit_run), lat(&control), starts.len(), ms(slowest_start)
            ),
            target: "0 errors; p99 within 2x of no flood (+1 ms)".into(),
            met: Some(
                legit_run.errors == 0
                    && legit_run.q(0.99) <= control.q(0.99) * 2 + Duration::from_millis(1)
                    && starts_ok == starts.len(),
            ),
        },
    ]
}

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

    // The default per-client cap: one address opens 1,000 connections and holds them.
    let a = agent_with_defaults(fake, &[]).await;
    let addr = a.addr;
    let attacker = ip("127.3.0.1");
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..1000 {
        let Ok(mut s) = tcp_from(Some(attacker), addr).await else {
            refused += 1;
            continue;
        };
        // An accepted connection stays open; a refused one gets its 429 and is closed.
        let _ = s.write_all(b"GET /v1/credentials HTTP/1.1\r\n").await;
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open = {
        let mut n = 0;
        for s in &held {
            let mut b = [0u8; 1];
            match s.try_read(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => n += 1,
                _ => {}
            }
        }
        n
    };
    let mine = Arc::new(vec![token(8_100_000)]);
    let legit = drive_from(
        Some(ip("127.1.0.9")),
        addr,
        4,
        Duration::from_secs(3),
        mine,
        Some(200.0),
    )
    .await;
    rows.push(Row {
        scenario: "9 per-client connection cap",
        figures: format!(
            "one address opened 1000: {open} held open, {} refused (connect errors {refused}); another pod meanwhile: {} ok, {} errors, {}",
            1000 - open, legit.ok, legit.errors, lat(&legit)
        ),
        target: "held <= 128; the other pod unaffected".into(),
        met: Some(open <= 128 && legit.errors == 0),
    });
    rows
}
