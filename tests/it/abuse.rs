//! One hostile process against the others (issues 8 and 16): with the default budgets, a flood
//! of forged tokens from 500 loopback addresses and a repeated refused token cost one client's
//! budget of EKS Auth calls (every host-local address is one client) and nothing to pods with
//! cached credentials; with verification, forged tokens cost no call at all and new pods are
//! served meanwhile, and an unreachable issuer never blocks a pod; soft connection shares.
//!
//! Clients bind loopback addresses (127.0.x.y), which is what any process on a node can do.
//! Pods on addresses of their own, which are not the host, are in `tests/netns_clients.rs`.

use crate::support::*;
use pod_identity_agent::admission::AdmissionSettings;
use pod_identity_agent::emulator::issuer::{Issuer, MintRequest};
use pod_identity_agent::server::limits::ConnectionLimits;
use serde_json::json;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A token for a namespace the fake refuses (`InvalidTokenException`), as EKS Auth refuses forgeries.
fn forged() -> String {
    mint("attacker", "x", 3600)
}

async fn real_budgets() -> Harness {
    let h = Harness::start_with(|s, _| s.admission = AdmissionSettings::default()).await;
    h.fake.answer_namespace("attacker", "error-invalid-token");
    h
}

/// The attacker's address for its `i`th request: any of 500 loopback addresses, which any
/// process on the node can bind.
fn loopback_alias(i: usize) -> IpAddr {
    let n = i % 500;
    ip(&format!("127.0.{}.{}", n / 250 + 2, n % 250 + 2))
}

/// `n` forged tokens, `parallel` at a time, each from the next of 500 loopback addresses;
/// the statuses they got.
async fn flood(
    addr: std::net::SocketAddr,
    n: usize,
    parallel: usize,
    forge: impl Fn() -> String,
) -> std::collections::BTreeMap<u16, usize> {
    let mut statuses = std::collections::BTreeMap::new();
    let mut i = 0;
    while i < n {
        let wave: Vec<_> = (i..(i + parallel).min(n))
            .map(|j| {
                let t = forge();
                tokio::spawn(async move {
                    get_from(
                        loopback_alias(j),
                        addr,
                        "/v1/credentials",
                        &[("authorization", &t)],
                    )
                    .await
                })
            })
            .collect();
        i += wave.len();
        for w in wave {
            let r = w.await.expect("join");
            if r.status == 429 {
                assert!(r.headers.contains_key("retry-after"), "429 names a wait");
                assert_eq!(r.json()["code"], "ExchangeRateExceeded");
            }
            *statuses.entry(r.status).or_insert(0) += 1;
        }
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_500_host_addresses_is_one_client_and_costs_cached_pods_nothing() {
    let _one_at_a_time = FLOODS.lock().await;
    let h = real_budgets().await;
    let addr = h.addr();
    let mine = token();
    assert_eq!(h.get(&mine).await.status, 200);
    let started = Instant::now();
    let flooding = tokio::spawn(flood(addr, 3000, 50, forged));
    // Meanwhile a pod on the node reads its cached credentials (hits are never limited).
    let mut slowest = Duration::ZERO;
    for i in 0..40 {
        let sent = Instant::now();
        let r = h.get(&mine).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        slowest = slowest.max(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let statuses = flooding.await.expect("flood");
    let elapsed = started.elapsed();
    assert!(
        slowest < Duration::from_millis(250),
        "the cached pod's slowest hit: {slowest:?}"
    );
    assert_eq!(
        statuses.get(&200),
        None,
        "no forged token got credentials: {statuses:?}"
    );
    // However many addresses it came from: one client's budget, the burst (10) plus 1/s.
    let attacker_calls = h
        .fake
        .tokens()
        .iter()
        .filter(|t| namespace_of(t).as_deref() == Some("attacker"))
        .count();
    let budget = 10 + elapsed.as_secs() as usize + 1;
    assert!(
        attacker_calls <= budget,
        "{attacker_calls} EKS Auth calls from the flood in {elapsed:?}; budget {budget}: {statuses:?}"
    );
    assert!(
        statuses.get(&429).copied().unwrap_or(0) > 2900,
        "most were refused for the budget: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_verification_a_flood_costs_no_call_and_new_pods_are_served_within_a_second() {
    let _one_at_a_time = FLOODS.lock().await;
    let e = emulator().await;
    let emu_addr = e.addr;
    let h = Harness::start_with(|s, x| {
        s.admission = AdmissionSettings::default();
        s.verification = Some(verify_with_issuer(emu_addr));
        x.endpoint = Some(format!("http://{emu_addr}"));
    })
    .await;
    let calls = || e.emu.calls.load(Ordering::SeqCst);
    let stranger_dir = tempfile::tempdir().expect("tempdir");
    let stranger = Issuer::load_or_create(stranger_dir.path()).expect("issuer");
    let addr = h.addr();
    // Forgeries of every kind: another key (an unknown kid), unsigned (support's tokens), and
    // the cluster's key's kid with a payload that was changed.
    let real = e
        .emu
        .issuer
        .mint(&MintRequest::new("default", "app"))
        .expect("mint");
    let forge = move || match fastrand::u8(0..3) {
        0 => stranger
            .mint(&MintRequest::new("default", "app"))
            .expect("mint"),
        1 => mint("attacker", "x", 3600),
        _ => {
            let parts: Vec<&str> = real.split('.').collect();
            let junk = base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                format!(
                    "{{\"exp\":{},\"n\":{}}}",
                    now_secs() + 600,
                    fastrand::u64(..)
                ),
            );
            format!("{}.{junk}.{}", parts[0], parts[2])
        }
    };
    // 1,000 here (forgeries naming unknown keys wait for the next fetch, a second apart);
    // `cargo bench --bench load -- identity` runs 3,000.
    let flooding = tokio::spawn(flood(addr, 1000, 100, forge));
    // Meanwhile new pods start, from the same host: verified, each is its own client.
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let t = e
            .emu
            .issuer
            .mint(&MintRequest::new("default", &format!("pod-{i}")))
            .expect("mint");
        let sent = Instant::now();
        let r = get_from(
            loopback_alias(i),
            addr,
            "/v1/credentials",
            &[("authorization", &t)],
        )
        .await;
        assert_eq!(r.status, 200, "a new pod during the flood: {}", r.text());
        slowest = slowest.max(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let statuses = flooding.await.expect("flood");
    assert!(
        slowest < Duration::from_secs(1),
        "a new pod waited {slowest:?}"
    );
    assert_eq!(statuses.get(&200), None, "{statuses:?}");
    assert_eq!(
        calls(),
        10,
        "the forgeries cost no EKS Auth call: {statuses:?}"
    );
}

#[tokio::test]
async fn a_refused_token_costs_one_call_per_negative_cache_period() {
    let h = Harness::start_with(|s, _| {
        s.admission = AdmissionSettings::default();
        s.cache.negative.ttl = Duration::from_secs(1);
    })
    .await;
    h.fake.answer_namespace("attacker", "error-invalid-token");
    let t = forged();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        let sent = Instant::now();
        let r = h.get(&t).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["code"], "InvalidTokenException");
        // Remembered refusals are paced: a flood on one connection gets ~10 answers a second.
        let remembered = r.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("remembered"));
        if remembered {
            assert!(
                sent.elapsed() >= Duration::from_millis(95),
                "{:?}",
                sent.elapsed()
            );
        }
        n += 1;
    }
    // 2.5 s with a 1 s memory: at most 3 calls, for ~24 requests.
    assert!(
        h.fake.calls() <= 3,
        "{} calls for {n} requests",
        h.fake.calls()
    );
    assert!(n >= 15, "{n}");
    let m = h.metrics().await;
    assert!(
        metric(
            &m,
            "pod_identity_rejected_locally_total{reason=\"negative_cache\"}"
        ) >= (n - 3) as f64,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_token_issuer_forged_tokens_cost_no_exchange() {
    let e = emulator().await;
    let (emu, emu_addr) = (e.emu.clone(), e.addr);
    let h = Harness::start_with(|s, x| {
        s.admission = AdmissionSettings::default();
        s.verification = Some(verify_with_issuer(emu_addr));
        x.endpoint = Some(format!("http://{emu_addr}"));
    })
    .await;
    let calls = || emu.calls.load(Ordering::SeqCst);
    // A real token: verified, exchanged once.
    let real = emu
        .issuer
        .mint(&MintRequest::new("default", "app"))
        .expect("mint");
    let r = h.get(&real).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(calls(), 1);

    let stranger_dir = tempfile::tempdir().expect("tempdir");
    let stranger = Issuer::load_or_create(stranger_dir.path()).expect("issuer");
    let tampered = jwt::tampered(&real, "\"app\"", "\"admin\"");
    let mut wrong_aud = MintRequest::new("default", "app");
    wrong_aud.audience = "sts.amazonaws.com".into();
    let now = now_secs();
    // Signed with the cluster's key (a kid the agent holds): provably not the cluster's token,
    // so remembered.
    let provable = [
        ("tampered payload", tampered),
        ("wrong audience", emu.issuer.mint(&wrong_aud).expect("mint")),
        (
            "another issuer",
            emu.issuer
                .sign(&json!({"iss": "https://evil.example", "aud": ["pods.eks.amazonaws.com"],
                    "exp": now + 3600, "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "app"}}}))
                .expect("sign"),
        ),
    ];
    // Naming keys the cluster does not publish, checked against keys fetched after they
    // arrived: refused, but not remembered (a cluster that publishes a new key late heals).
    let unknown_key = [
        (
            "signed by another key",
            stranger
                .mint(&MintRequest::new("default", "app"))
                .expect("mint"),
        ),
        ("unsigned", mint("default", "app", 3600)),
    ];
    for (what, t) in &provable {
        let r = h.get(t).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(r.json()["code"], "InvalidToken", "{what}");
        let again = h.get(t).await;
        assert!(
            again.text().contains("refused without asking"),
            "{what}: {}",
            again.text()
        );
    }
    for (what, t) in &unknown_key {
        for _ in 0..2 {
            let r = h.get(t).await;
            assert_eq!(r.status, 400, "{what}: {}", r.text());
            assert_eq!(r.json()["code"], "InvalidToken", "{what}");
        }
    }
    assert_eq!(calls(), 1, "forged tokens never reached EKS Auth");
    let m = h.metrics().await;
    let reason = |r: &str| {
        metric(
            &m,
            &format!("pod_identity_rejected_locally_total{{reason=\"{r}\"}}"),
        )
    };
    assert_eq!(
        reason("signature"),
        7.0,
        "3 provable + 2×2 unknown keys: {m}"
    );
    assert_eq!(
        reason("negative_cache"),
        3.0,
        "the provable ones, asked again: {m}"
    );
    assert_eq!(verifications(&m, "refused"), 7.0, "{m}");
    // The unknown keys cost a few fetches of the issuer's keys, not one per request.
    let fetches = emu.key_fetches.load(Ordering::SeqCst);
    assert!(
        fetches <= 8,
        "discovery + JWKS at start and at most once a second for unknown kids: {fetches}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_issuer_never_blocks_a_pod() {
    // An issuer that accepts connections and never answers: tokens go on to EKS Auth as
    // without verification, after waiting at most 1.5 s for the keys (the fetch's own timeout
    // is 5 s).
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let nowhere = hanging.local_addr().expect("addr");
    let h = Harness::start_with(|s, _| s.verification = Some(verify_with_issuer(nowhere))).await;
    let started = Instant::now();
    let r = h.get(&token()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "{:?}",
        started.elapsed()
    );
    let m = h.metrics().await;
    assert!(verifications(&m, "unverifiable") >= 1.0, "{m}");

    // Reachable once, then gone: tokens signed by a key already fetched still verify, at once.
    let e = emulator().await;
    let (emu, emu_addr, stop) = (e.emu.clone(), e.addr, e.stop.clone());
    let h = Harness::start_with(|s, _| s.verification = Some(verify_with_issuer(emu_addr))).await;
    let first = emu
        .issuer
        .mint(&MintRequest::new("default", "a"))
        .expect("mint");
    assert_eq!(h.get(&first).await.status, 200);
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = emu
        .issuer
        .mint(&MintRequest::new("default", "b"))
        .expect("mint");
    let started = Instant::now();
    assert_eq!(h.get(&second).await.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let m = h.metrics().await;
    assert_eq!(verifications(&m, "verified"), 2.0, "{m}");
}

#[tokio::test]
async fn connection_shares_are_soft_until_pressure_and_the_silent_are_closed() {
    let h = Harness::start_with(|s, _| {
        s.connections = ConnectionLimits {
            max_connections: 40,
            max_per_client: 10,
            header_timeout: Duration::from_secs(1),
        }
    })
    .await;
    let addr = h.addr();
    // Past its share while the pool has room, up to half of it: 20 connections (of 40) from
    // the host, from 20 loopback addresses, are all accepted and held with unfinished headers.
    let mut held = Vec::new();
    for i in 0..20 {
        let mut s = connect_from(Some(loopback_alias(i)), addr)
            .await
            .expect("connect");
        s.write_all(b"GET /v1/credentials HTTP/1.1\r\n")
            .await
            .expect("write");
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // At half the pool, the host holds more than its share: refused at once with a 429 and
    // closed, from whatever loopback address.
    let mut extra = connect_from(Some(ip("127.9.9.9")), addr)
        .await
        .expect("connect");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(2), extra.read_to_string(&mut answer))
        .await
        .expect("answered at once")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("TooManyConnections"), "{answer}");
    // Connections that never finish their headers are closed after the header timeout.
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), held[0].read_to_end(&mut buf))
        .await
        .expect("closed by the agent");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // With them gone, the host is served again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.get(&token()).await.status, 200);
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "pod_identity_rejected_locally_total{reason=\"connection_limit\"}"
        ),
        1.0,
        "{m}"
    );
    drop(held);
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_header_timeout() {
    let h = Harness::start_with(|s, _| s.connections.header_timeout = Duration::from_secs(1)).await;
    let mut s = connect_from(None, h.addr()).await.expect("connect");
    let req = format!(
        "GET /v1/credentials HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\n\r\n",
        h.addr(),
        token()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 16 * 1024];
    let n = s.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive, then idle: the agent closes it instead of holding it (and its slot) forever.
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "idle keep-alive connection still open after 5 s"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_the_metrics_port_never_starves_the_probes() {
    let _one_at_a_time = FLOODS.lock().await;
    let h = Harness::start().await;
    let metrics = h.agent.metrics_addr.expect("metrics");
    let probe = h.agent.probe_addr.expect("probe");
    // Silent connections to /metrics, as many as the pool takes and more.
    let mut held = Vec::new();
    for _ in 0..80 {
        if let Ok(mut s) = connect_from(None, metrics).await {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n").await;
            held.push(s);
        }
    }
    // Several probes in a row: a pool shared with the metrics could at most lend the first one
    // the slot its accept loop had parked.
    for i in 0..3 {
        let started = Instant::now();
        let r = get(probe, "/healthz", &[]).await;
        assert_eq!(r.status, 200);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "probe {i} waited {:?}",
            started.elapsed()
        );
    }
    drop(held);
}

/// Review H2: every host process is one client, the kubelet included; a process holding the
/// whole probe pool (probing on its own every second, from 127.0.0.x) must not make the
/// kubelet's probes fail, or the agent is restarted and loses its cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_process_holding_the_probe_pool_never_fails_the_kubelets_probes() {
    let h = Harness::start().await;
    let probe = h.agent.probe_addr.expect("probe");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 64 connections, each re-opened as soon as it closes, each sending a probe's first line and
    // then the rest a second later, and again.
    let hog: Vec<_> = (0..64u8)
        .map(|i| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let from = IpAddr::from([127, 0, 0, i + 2]);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut s) = connect_from(Some(from), probe).await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n").await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = s.write_all(b"host: localhost\r\n\r\n").await;
                    let mut buf = [0u8; 512];
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        tokio::io::AsyncReadExt::read(&mut s, &mut buf),
                    )
                    .await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..5 {
        let started = Instant::now();
        let r = get(probe, "/healthz", &[]).await;
        assert_eq!(r.status, 200, "probe {i}: {}", r.text());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "probe {i} waited {:?}",
            started.elapsed()
        );
        assert_eq!(
            r.headers["connection"], "close",
            "one request per probe connection"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Scrapes go to the metrics port, within its own pool.
    assert_eq!(get(probe, "/metrics", &[]).await.status, 404);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in hog {
        let _ = t.await;
    }
}
