//! What every load scenario shares: ~1 KB tokens, the release agent and the ceiling server as
//! processes, a keep-alive load generator with HDR histograms, and the table row.

use crate::fake_eks_auth::FakeEksAuth;
use crate::{jwt, process};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};

pub const CLUSTER: &str = "bench";
pub const CEILING_ENV: &str = "PIA_BENCH_CEILING";

// ---------------------------------------------------------------------------------------------
// Tokens and processes

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A ~1 KB projected-token-shaped JWT, distinct per `n`.
pub fn token(n: usize) -> String {
    token_in(n, &format!("ns-{}", n % 50))
}

/// [`token`] in namespace `namespace`.
pub fn token_in(n: usize, namespace: &str) -> String {
    let t = now();
    jwt::encode_unsigned(
        &json!({"alg": "RS256", "kid": "bench-key-0123456789abcdef"}),
        &json!({"aud": ["pods.eks.amazonaws.com"], "exp": t + 86400, "iat": t, "nbf": t,
            "iss": "https://oidc.eks.us-west-2.amazonaws.com/id/0123456789ABCDEF0123456789ABCDEF",
            "sub": format!("system:serviceaccount:{namespace}:sa-{n}"), "jti": format!("{n:08}-bench"),
            "kubernetes.io": {"namespace": namespace,
                "pod": {"name": format!("workload-{n}-7d9f8c6b5d-x2k4q"), "uid": format!("3b1f0a2e-6c4d-4e8f-9a1b-{n:012}")},
                "serviceaccount": {"name": format!("sa-{n}"), "uid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"}},
            "padding": "p".repeat(260)}),
    )
}

/// The release agent, started with the tests' hermetic environment.
pub struct Agent {
    pub process: process::Spawned,
    pub addr: SocketAddr,
    pub probe: SocketAddr,
}

impl Agent {
    pub fn rss_kib(&self) -> u64 {
        let pid = self.process.child.id().unwrap_or(0);
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .map(str::to_owned)
            })
            .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }
}

/// Start the release agent; returns once its credential and probe listeners are up.
pub async fn agent(fake: &FakeEksAuth, extra: &[&str]) -> Agent {
    let mut args = LIFTED_BUDGETS.to_vec();
    args.extend_from_slice(extra);
    agent_with_defaults(fake, &args).await
}

/// Budgets out of the way, for scenarios that measure something else from one address (warming
/// 100,000 entries, 1,000 connections for one token).
pub const LIFTED_BUDGETS: &[&str] = &[
    "--client-exchange-qps",
    "1000000",
    "--client-exchange-burst",
    "1000000",
    "--client-max-concurrent-exchanges",
    "100000",
    "--exchange-qps",
    "1000000",
    "--exchange-burst",
    "1000000",
    "--max-concurrent-exchanges",
    "100000",
    "--max-connections",
    "20000",
    "--max-connections-per-client",
    "20000",
    // The storm and herd connect every client first and send later: headers may take seconds.
    "--header-timeout",
    "60s",
];

/// `PIA_BENCH_BASELINE`: another build of the agent, measured alternately with this one in the
/// throughput and storm scenarios, so that a comparison does not depend on the machine's speed
/// from one minute to the next. Only flags every build understands are passed to it.
pub fn baseline() -> Option<String> {
    std::env::var("PIA_BENCH_BASELINE")
        .ok()
        .filter(|b| !b.is_empty())
}

/// The baseline build (see [`baseline`]) with `extra`.
pub async fn baseline_agent(bin: &str, fake: &FakeEksAuth, extra: &[&str]) -> Agent {
    start_agent(Some(bin), fake, extra).await
}

/// The release agent with its default budgets (plus `extra`).
pub async fn agent_with_defaults(fake: &FakeEksAuth, extra: &[&str]) -> Agent {
    start_agent(None, fake, extra).await
}

async fn start_agent(bin: Option<&str>, fake: &FakeEksAuth, extra: &[&str]) -> Agent {
    let endpoint = fake.endpoint();
    let mut args = process::loopback_server(CLUSTER, ["0"; 3]);
    args.extend(["--endpoint", &endpoint]);
    args.extend_from_slice(extra);
    let command = match bin {
        Some(bin) => process::binary_command(bin, &args),
        None => process::agent_command(&args),
    };
    let process = process::spawn(command);
    let addr = process.listening("serving credentials").await;
    let probe = process.listening("serving probes").await;
    Agent {
        process,
        addr,
        probe,
    }
}

/// The ceiling: this binary re-executed as a minimal hyper server answering `body`.
pub async fn ceiling(body: &Bytes) -> (Child, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .env(CEILING_ENV, String::from_utf8_lossy(body).as_ref())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start ceiling");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = lines
        .next_line()
        .await
        .ok()
        .flatten()
        .and_then(|l| l.parse().ok())
        .expect("ceiling address");
    (child, addr)
}

/// Ceiling mode: the same runtime the agent builds, a bare hyper server, the same body.
pub fn run_ceiling(body: String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let body = Bytes::from(body);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("{}", listener.local_addr().expect("addr"));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let mut res = hyper::Response::new(Full::new(body.clone()));
                    res.headers_mut().insert(
                        "content-type",
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    async move { Ok::<_, std::convert::Infallible>(res) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Load generation

#[derive(Default)]
pub struct Run {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub hist: Option<Histogram<u64>>,
    pub min_remaining_s: Option<i64>,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn q(&self, q: f64) -> Duration {
        Duration::from_micros(
            self.hist
                .as_ref()
                .map(|h| h.value_at_quantile(q))
                .unwrap_or(0),
        )
    }
}

pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")
}

pub async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    connect_from(None, addr).await
}

/// A TCP connection to `addr` from source address `from` (any 127.x.y.z is local on Linux, so
/// one machine can play many pods).
pub async fn tcp_from(from: Option<IpAddr>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect(addr).await;
    };
    let socket = if from.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// `127.1.x.y` for client number `n`: one loopback address per simulated pod.
pub fn pod_ip(n: usize) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(
        127,
        1,
        (n / 250) as u8,
        (n % 250 + 1) as u8,
    ))
}

pub async fn connect_from(
    from: Option<IpAddr>,
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = tcp_from(from, addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

pub fn request(addr: SocketAddr, token: &str) -> hyper::Request<Empty<Bytes>> {
    hyper::Request::get("/v1/credentials")
        .header("host", addr.to_string())
        .header("authorization", token)
        .body(Empty::new())
        .expect("request")
}

/// Seconds left in a served body's `Expiration`, for the refresh scenario.
pub fn remaining_s(body: &[u8]) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let exp = aws_smithy_types::DateTime::from_str(
        v["Expiration"].as_str()?,
        aws_smithy_types::date_time::Format::DateTime,
    )
    .ok()?;
    Some(exp.secs() - now() as i64)
}

/// `conns` keep-alive connections for `duration`, each picking tokens at random; `rate` (total
/// requests/s) paces them, or none for as fast as possible.
pub async fn drive(
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    tokens: Arc<Vec<String>>,
    rate: Option<f64>,
    track_remaining: bool,
) -> Run {
    drive_with(None, addr, conns, duration, tokens, rate, track_remaining).await
}

/// [`drive`] from source address `from`.
pub async fn drive_from(
    from: Option<IpAddr>,
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    tokens: Arc<Vec<String>>,
    rate: Option<f64>,
) -> Run {
    drive_with(from, addr, conns, duration, tokens, rate, false).await
}

async fn drive_with(
    from: Option<IpAddr>,
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    tokens: Arc<Vec<String>>,
    rate: Option<f64>,
    track_remaining: bool,
) -> Run {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for c in 0..conns {
        let tokens = tokens.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect_from(from, addr).await;
            let mut h = hist();
            let (mut ok, mut errors, mut min_rem) = (0u64, 0u64, None::<i64>);
            let interval = rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
            let mut next = Instant::now()
                + interval
                    .map(|i| i.mul_f64(c as f64 / conns as f64))
                    .unwrap_or_default();
            let mut rng = fastrand::Rng::with_seed(c as u64);
            while Instant::now() < deadline {
                if let Some(i) = interval {
                    tokio::time::sleep_until(next.into()).await;
                    next += i;
                }
                let t = &tokens[rng.usize(..tokens.len())];
                let sent = Instant::now();
                match sender.send_request(request(addr, t)).await {
                    Ok(res) => {
                        let good = res.status() == 200;
                        let body = res
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let _ = h.record(sent.elapsed().as_micros() as u64);
                        if good {
                            ok += 1;
                            if track_remaining {
                                if let Some(r) = remaining_s(&body) {
                                    min_rem = Some(min_rem.map_or(r, |m| m.min(r)));
                                }
                            }
                        } else {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        sender = connect_from(from, addr).await;
                    }
                }
            }
            (ok, errors, h, min_rem)
        }));
    }
    let mut run = Run {
        hist: Some(hist()),
        ..Run::default()
    };
    for t in tasks {
        let (ok, errors, h, rem) = t.await.expect("driver");
        run.ok += ok;
        run.errors += errors;
        if let Some(all) = run.hist.as_mut() {
            let _ = all.add(h);
        }
        if let Some(r) = rem {
            run.min_remaining_s = Some(run.min_remaining_s.map_or(r, |m: i64| m.min(r)));
        }
    }
    run.elapsed = start.elapsed();
    run
}

/// One request per token on its own connection, all released together (or spread over
/// `spread`); returns per-request latency.
pub async fn burst(addr: SocketAddr, tokens: Vec<String>, spread: Duration) -> Run {
    burst_from(addr, tokens, spread, |_| None).await
}

/// [`burst`], with request `i` sent from source address `from(i)`.
pub async fn burst_from(
    addr: SocketAddr,
    tokens: Vec<String>,
    spread: Duration,
    from: fn(usize) -> Option<IpAddr>,
) -> Run {
    let n = tokens.len();
    let gate = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::new();
    for (i, t) in tokens.into_iter().enumerate() {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect_from(from(i), addr).await;
            gate.wait().await;
            if !spread.is_zero() {
                tokio::time::sleep(spread.mul_f64(i as f64 / n as f64)).await;
            }
            let sent = Instant::now();
            let res = sender.send_request(request(addr, &t)).await;
            let ok = match res {
                Ok(r) => r.status() == 200 && r.into_body().collect().await.is_ok(),
                Err(_) => false,
            };
            (ok, sent.elapsed())
        }));
    }
    gate.wait().await;
    let start = Instant::now();
    let mut run = Run {
        hist: Some(hist()),
        ..Run::default()
    };
    for t in tasks {
        let (ok, took) = t.await.expect("burst task");
        if ok {
            run.ok += 1;
        } else {
            run.errors += 1;
        }
        if let Some(h) = run.hist.as_mut() {
            let _ = h.record(took.as_micros() as u64);
        }
    }
    run.elapsed = start.elapsed();
    run
}

/// Exchange every token once (warm the cache), `conns` at a time.
pub async fn warm(addr: SocketAddr, tokens: &Arc<Vec<String>>, conns: usize) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (tokens, next) = (tokens.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(t) = tokens.get(i) else { break };
                let res = sender
                    .send_request(request(addr, t))
                    .await
                    .expect("warm request");
                assert_eq!(res.status(), 200, "warming token {i}");
                let _ = res.into_body().collect().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("warm");
    }
}

pub async fn ready_ms(probe: SocketAddr, started: Instant) -> Duration {
    loop {
        if let Ok(stream) = tokio::net::TcpStream::connect(probe).await {
            if let Ok((mut s, c)) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
            {
                tokio::spawn(c);
                let req = hyper::Request::get("/readyz")
                    .header("host", "localhost")
                    .body(Empty::new())
                    .expect("req");
                if s.send_request(req).await.is_ok_and(|r| r.status() == 200) {
                    return started.elapsed();
                }
            }
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios

pub struct Row {
    pub scenario: &'static str,
    pub figures: String,
    pub target: String,
    pub met: Option<bool>,
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

pub fn lat(r: &Run) -> String {
    format!(
        "p50 {} p99 {} p99.9 {}",
        ms(r.q(0.5)),
        ms(r.q(0.99)),
        ms(r.q(0.999))
    )
}

pub async fn sample_body(fake: &FakeEksAuth) -> Bytes {
    let a = agent(fake, &[]).await;
    let stream = tokio::net::TcpStream::connect(a.addr)
        .await
        .expect("connect");
    let (mut s, c) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("hs");
    tokio::spawn(c);
    let res = s
        .send_request(request(a.addr, &token(0)))
        .await
        .expect("sample");
    res.into_body().collect().await.expect("body").to_bytes()
}
