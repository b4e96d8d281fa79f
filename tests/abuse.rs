//! One hostile pod against the others (issue 8): with the default budgets, a flood of forged
//! tokens and a repeated refused token from one address cost a bounded number of EKS Auth calls
//! and nothing to a pod at another address; `--token-issuer` refuses forged tokens with no call
//! at all and never blocks on an unreachable issuer; connection caps; what is logged.
//!
//! Clients bind distinct loopback addresses (127.0.0.2, 127.0.0.3, …): every 127.x.y.z is local.

mod support;

use pod_identity_agent::admission::AdmissionSettings;
use pod_identity_agent::emulator::associations::Associations;
use pod_identity_agent::emulator::issuer::{Issuer, MintRequest};
use pod_identity_agent::emulator::minting::Minting;
use pod_identity_agent::emulator::Emulator;
use pod_identity_agent::issuer::IssuerSettings;
use pod_identity_agent::server::limits::ConnectionLimits;
use pod_identity_agent::server::listener::{self, Connections};
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A token for a namespace the fake refuses (`InvalidTokenException`), as EKS Auth refuses forgeries.
fn forged() -> String {
    mint("attacker", "x", 3600)
}

/// The `kubernetes.io.namespace` claim of a JWT.
fn namespace_of(token: &str) -> String {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    v["kubernetes.io"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn real_budgets() -> Harness {
    let h = Harness::start_with(|s, _| s.admission = AdmissionSettings::default()).await;
    h.fake.answer_namespace("attacker", "error-invalid-token");
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_is_bounded_and_costs_others_nothing() {
    let h = real_budgets().await;
    let addr = h.addr();
    let (attacker, pod) = (ip("127.0.0.2"), ip("127.0.0.3"));
    let mine = token();
    assert_eq!(
        get_from(pod, addr, "/v1/credentials", &[("authorization", &mine)])
            .await
            .status,
        200
    );
    let started = Instant::now();
    let flood = tokio::spawn(async move {
        let mut statuses = std::collections::BTreeMap::new();
        let mut tasks = Vec::new();
        // 300 distinct forged tokens, 20 at a time, and one refused token 200 times.
        for _ in 0..15 {
            let mut wave = Vec::new();
            for _ in 0..20 {
                let t = forged();
                wave.push(tokio::spawn(async move {
                    get_from(attacker, addr, "/v1/credentials", &[("authorization", &t)]).await
                }));
            }
            for w in wave {
                let r = w.await.expect("join");
                if r.status == 429 {
                    assert!(r.headers.contains_key("retry-after"), "429 names a wait");
                    assert_eq!(r.json()["code"], "ExchangeRateExceeded");
                }
                *statuses.entry(r.status).or_insert(0) += 1;
            }
        }
        let repeated = forged();
        for _ in 0..200 {
            let t = repeated.clone();
            tasks.push(tokio::spawn(async move {
                get_from(attacker, addr, "/v1/credentials", &[("authorization", &t)])
                    .await
                    .status
            }));
        }
        for t in tasks {
            *statuses.entry(t.await.expect("join")).or_insert(0) += 1;
        }
        statuses
    });
    // Meanwhile the other pod: its cached credentials, and a new pod's first exchange.
    let mut slowest = Duration::ZERO;
    for i in 0..40 {
        let sent = Instant::now();
        let r = get_from(pod, addr, "/v1/credentials", &[("authorization", &mine)]).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        slowest = slowest.max(sent.elapsed());
        if i % 10 == 0 {
            let newcomer = ip(&format!("127.0.1.{}", i + 1));
            let r = get_from(
                newcomer,
                addr,
                "/v1/credentials",
                &[("authorization", &token())],
            )
            .await;
            assert_eq!(
                r.status,
                200,
                "a new pod starting during the flood: {}",
                r.text()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let statuses = flood.await.expect("flood");
    let elapsed = started.elapsed();
    assert!(
        slowest < Duration::from_millis(250),
        "the other pod's slowest hit: {slowest:?}"
    );
    assert_eq!(
        statuses.get(&200),
        None,
        "no forged token got credentials: {statuses:?}"
    );
    // EKS Auth calls caused by the attacker: the client burst (10) plus 1/s, the repeated token
    // included (its one call came out of the same budget).
    let attacker_calls = h
        .fake
        .tokens()
        .iter()
        .filter(|t| namespace_of(t) == "attacker")
        .count();
    let budget = 10 + elapsed.as_secs() as usize + 1;
    assert!(
        attacker_calls <= budget,
        "{attacker_calls} EKS Auth calls from the flood in {elapsed:?}; budget {budget}: {statuses:?}"
    );
    assert!(
        statuses.get(&429).copied().unwrap_or(0) > 200,
        "most were refused for the budget: {statuses:?}"
    );
    let m = h.metrics().await;
    assert!(
        metric(
            &m,
            "pod_identity_rejected_locally_total{reason=\"client_budget\"}"
        ) > 200.0,
        "{m}"
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

/// An emulator (EKS Auth and OIDC issuer) on loopback, in this process.
async fn emulator() -> (
    Arc<Emulator>,
    SocketAddr,
    CancellationToken,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let issuer = Arc::new(Issuer::load_or_create(dir.path()).expect("issuer"));
    let emu = Arc::new(Emulator::new(issuer, Associations::Default, Minting::Fake));
    let bound = listener::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = bound.addr;
    let stop = CancellationToken::new();
    emu.clone()
        .serve(bound, stop.clone(), Connections::default());
    (emu, addr, stop, dir)
}

fn verifying(emu_addr: SocketAddr) -> IssuerSettings {
    let mut s = IssuerSettings::new(Issuer::ISSUER);
    s.discovery_url = format!("http://{emu_addr}/.well-known/openid-configuration");
    s.min_refresh_interval = Duration::from_secs(60);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_token_issuer_forged_tokens_cost_no_exchange() {
    let (emu, emu_addr, _stop, _dir) = emulator().await;
    let h = Harness::start_with(|s, x| {
        s.admission = AdmissionSettings::default();
        s.token_issuer = Some(verifying(emu_addr));
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
    let parts: Vec<&str> = real.split('.').collect();
    let tampered = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = String::from_utf8(b64.decode(parts[1]).expect("b64")).expect("utf8");
        format!(
            "{}.{}.{}",
            parts[0],
            b64.encode(payload.replace("\"app\"", "\"admin\"")),
            parts[2]
        )
    };
    let mut wrong_aud = MintRequest::new("default", "app");
    wrong_aud.audience = "sts.amazonaws.com".into();
    let now = now_secs();
    let forgeries = [
        (
            "signed by another key",
            stranger.mint(&MintRequest::new("default", "app")).expect("mint"),
        ),
        ("tampered payload", tampered),
        ("wrong audience", emu.issuer.mint(&wrong_aud).expect("mint")),
        (
            "another issuer",
            emu.issuer
                .sign(&json!({"iss": "https://evil.example", "aud": ["pods.eks.amazonaws.com"],
                    "exp": now + 3600, "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "app"}}}))
                .expect("sign"),
        ),
        ("unsigned", mint("default", "app", 3600)),
    ];
    for (what, t) in &forgeries {
        let r = h.get(t).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(r.json()["code"], "InvalidToken", "{what}");
        // Asked again: remembered, still no call.
        assert_eq!(h.get(t).await.status, 400, "{what}");
    }
    assert_eq!(calls(), 1, "forged tokens never reached EKS Auth");
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "pod_identity_rejected_locally_total{reason=\"signature\"}"
        ),
        5.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "pod_identity_rejected_locally_total{reason=\"negative_cache\"}"
        ),
        5.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "pod_identity_token_verifications_total{result=\"invalid\"}"
        ),
        5.0,
        "{m}"
    );
    // The unknown key caused one re-fetch of the issuer's keys, not one per request.
    let fetches = emu.key_fetches.load(Ordering::SeqCst);
    assert!(
        fetches <= 4,
        "discovery + JWKS at start and once for the unknown kid: {fetches}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_issuer_never_blocks_a_pod() {
    // An issuer that accepts connections and never answers: tokens go on to EKS Auth as
    // without verification, after waiting at most a second for the keys (the fetch's own
    // timeout is 5 s).
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let nowhere = hanging.local_addr().expect("addr");
    let h = Harness::start_with(|s, _| s.token_issuer = Some(verifying(nowhere))).await;
    let started = Instant::now();
    let r = h.get(&token()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let m = h.metrics().await;
    assert!(
        metric(
            &m,
            "pod_identity_token_verifications_total{result=\"unverifiable\"}"
        ) >= 1.0,
        "{m}"
    );

    // Reachable once, then gone: tokens signed by a key already fetched still verify, at once.
    let (emu, emu_addr, stop, _dir) = emulator().await;
    let h = Harness::start_with(|s, _| s.token_issuer = Some(verifying(emu_addr))).await;
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
    assert_eq!(
        metric(
            &m,
            "pod_identity_token_verifications_total{result=\"valid\"}"
        ),
        2.0,
        "{m}"
    );
}

#[tokio::test]
async fn connection_caps_refuse_the_excess_and_close_the_silent() {
    let h = Harness::start_with(|s, _| {
        s.connections = ConnectionLimits {
            max_connections: 1000,
            max_per_client: 20,
            header_timeout: Duration::from_secs(1),
        }
    })
    .await;
    let addr = h.addr();
    let hog = ip("127.0.0.4");
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = connect_from(Some(hog), addr).await.expect("connect");
        s.write_all(b"GET /v1/credentials HTTP/1.1\r\n")
            .await
            .expect("write");
        held.push(s);
    }
    // The 21st from the same address: refused at once with a 429 and closed.
    let mut extra = connect_from(Some(hog), addr).await.expect("connect");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(2), extra.read_to_string(&mut answer))
        .await
        .expect("answered at once")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("TooManyConnections"), "{answer}");
    // Another address is served meanwhile.
    let r = get_from(
        ip("127.0.0.5"),
        addr,
        "/v1/credentials",
        &[("authorization", &token())],
    )
    .await;
    assert_eq!(r.status, 200);
    // Connections that never finish their headers are closed after the header timeout.
    let mut silent = connect_from(Some(ip("127.0.0.6")), addr)
        .await
        .expect("connect");
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut buf))
        .await
        .expect("closed by the agent");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
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
