//! Scenario 12: Events under a flood of refusals (issue 19), the release agent with `--events`,
//! its default budgets, tokens verified against a fake API server's keys.
//!
//! - *one pod*: a verified pod whose service account has no association asks 3,000 times in
//!   10 s (30 connections at 300 requests a second in all), while another pod reads its cached
//!   credentials 100 times a second. Reported: the Events created and series updates the fake
//!   API server received, the agent's counts, and the cached pod's latency beside the flood
//!   against alone.
//! - *many pods*: 500 verified pods refused within 10 s, one request each. Reported: Events
//!   created against the node's budget (10 at once, then one a second).

use crate::fake_eks_auth::FakeEksAuth;
use crate::harness::*;
use crate::identity::{pod_token, Keys};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/{namespace}/events";
const EVENT: &str = "/apis/events.k8s.io/v1/namespaces/{namespace}/events/{name}";
/// Pods `n` with `n % 50 == 7` are in `ns-7`, which has no association.
const REFUSED_NAMESPACE: &str = "ns-7";

async fn metrics(probe: SocketAddr) -> String {
    let mut sender = connect(probe).await;
    let req = hyper::Request::get("/metrics")
        .header("host", probe.to_string())
        .body(Empty::<Bytes>::new())
        .expect("request");
    let res = sender.send_request(req).await.expect("metrics");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// `pod_identity_events_total{object="pod",result}` from an exposition.
fn counted(text: &str, result: &str) -> u64 {
    let sample = format!(r#"pod_identity_events_total{{object="pod",result="{result}"}} "#);
    text.lines()
        .find_map(|l| l.strip_prefix(&sample))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn counts(text: &str) -> String {
    [
        "sent",
        "updated",
        "deduplicated",
        "rate_limited",
        "dropped",
        "failed",
    ]
    .map(|r| format!("{r} {}", counted(text, r)))
    .join(", ")
}

pub async fn events() -> Vec<Row> {
    let fake = FakeEksAuth::start(CLUSTER).await;
    fake.answer_namespace(REFUSED_NAMESPACE, "error-resource-not-found");
    let keys = Keys::new().await;
    let mut args = keys.args();
    // The many-pods burst holds its connections open until each one's turn.
    args.extend([
        "--node-name",
        "node-a",
        "--events",
        "true",
        "--header-timeout",
        "60s",
    ]);
    let a = agent_with_defaults(&fake, &args).await;
    // The counts are on the metrics listener (the probe port answers /metrics with 404).
    let counts_at = a.process.listening("serving metrics").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let posts = || keys.kube.seen_matching("POST", EVENTS).len();
    let patches = || keys.kube.seen_matching("PATCH", EVENT).len();

    // One pod refused 3,000 times in 10 s, beside a cached pod.
    let mine = Arc::new(vec![pod_token(&keys.issuer, 3_000_000, 0)]);
    warm(a.addr, &mine, 1).await;
    let control = drive_from(
        None,
        a.addr,
        4,
        Duration::from_secs(3),
        mine.clone(),
        Some(100.0),
    )
    .await;
    let refused = Arc::new(vec![pod_token(&keys.issuer, 1_000_007, 0)]);
    let started = Instant::now();
    let flood = tokio::spawn(drive_from(
        None,
        a.addr,
        30,
        Duration::from_secs(10),
        refused,
        Some(300.0),
    ));
    let cached = drive_from(None, a.addr, 4, Duration::from_secs(10), mine, Some(100.0)).await;
    let flood = flood.await.expect("flood");
    let elapsed = started.elapsed();
    // Series are sent at most every 30 s: the flood's count goes out with the next one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = metrics(counts_at).await;
    let (created, updates) = (posts(), patches());
    let one_pod = Row {
        scenario: "12 events, one pod",
        figures: format!(
            "{} refusals of one verified pod (no association) in {}: {created} Event created, {updates} series updates; agent: {}; a cached pod at 100 req/s: {} ok, {} errors, {} (alone: {})",
            flood.errors,
            ms(elapsed),
            counts(&m),
            cached.ok,
            cached.errors,
            lat(&cached),
            lat(&control)
        ),
        target: "1 Event, its count updated at most every 30 s; the cached pod without errors".into(),
        met: Some(
            flood.ok == 0
                && flood.errors >= 2_500
                && created == 1
                && updates <= 1
                && cached.errors == 0,
        ),
    };

    // 500 pods refused within 10 s, one request each.
    let (before, before_m) = (posts(), metrics(counts_at).await);
    let tokens: Vec<String> = (0..500)
        .map(|i| pod_token(&keys.issuer, 2_000_007 + 50 * i, 0))
        .collect();
    let started = Instant::now();
    let run = burst(a.addr, tokens, Duration::from_secs(10)).await;
    let elapsed = started.elapsed();
    let created = posts() - before;
    let m = metrics(counts_at).await;
    let limited = counted(&m, "rate_limited") - counted(&before_m, "rate_limited");
    let allowed = 10 + elapsed.as_secs_f64().ceil() as usize;
    let many = Row {
        scenario: "12 events, many pods",
        figures: format!(
            "500 verified pods refused in {} ({} answered): {created} Events created, {limited} held back by the node's budget",
            ms(elapsed),
            run.ok + run.errors,
        ),
        target: format!("<= {allowed} Events (10 at once, then 1/s)"),
        met: Some(created <= allowed && created >= 10),
    };
    vec![one_pod, many]
}
