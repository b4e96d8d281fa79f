//! The in-process hit path, request in to bytes out without sockets: Host and token checks,
//! SHA-256 of the token, cache lookup, response assembly. Regressions here hide under socket
//! noise in the load harness. `cargo bench --bench hit_path`.
//!
//! Timings on a shared 2-core machine swing by ±20% from run to run. For a figure that does not,
//! count instructions: with `PIA_HIT_PATH_ITERATIONS=N` the bench binary serves exactly N hits and
//! exits, so `valgrind --tool=callgrind` on it gives instructions per hit (see BENCHMARKS.md).

// Only `encode_unsigned` of the tests' JWT helpers.
#[allow(dead_code)]
#[path = "../tests/it/support/jwt.rs"]
mod jwt;

use criterion::{criterion_group, Criterion};
use pod_identity_agent::admission::{Admission, AdmissionSettings};
use pod_identity_agent::cache::{CacheSettings, CredentialCache};
use pod_identity_agent::client::Clients;
use pod_identity_agent::credentials::{Credentials, Unvalidated};
use pod_identity_agent::eks_auth::{CredentialSource, FetchFuture};
use pod_identity_agent::metrics::Metrics;
use pod_identity_agent::request::AllowedHosts;
use pod_identity_agent::server::handler::CredentialHandler;
use pod_identity_agent::token::Token;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Answers every exchange at once with fixed credentials of realistic size.
struct Instant;

impl CredentialSource for Instant {
    fn fetch(&self, _token: &Token) -> FetchFuture {
        let session = "IQoJb3JpZ2luX2Vj".repeat(64);
        Box::pin(async move {
            Ok(Credentials::validate(
                Unvalidated {
                    access_key_id: "ASIAEXAMPLEEXAMPLE01",
                    secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                    session_token: &session,
                    expiration: SystemTime::now() + Duration::from_secs(6 * 3600),
                    assumed_role_arn: "arn:aws:sts::111122223333:assumed-role/r/s",
                },
                SystemTime::now(),
            )?
            .into())
        })
    }
}

fn token() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    jwt::encode_unsigned(
        &json!({"alg": "RS256", "kid": "bench-key"}),
        &json!({"aud": ["pods.eks.amazonaws.com"], "exp": now + 86400, "nbf": now, "iat": now,
            "sub": "system:serviceaccount:default:app", "padding": "p".repeat(600),
            "kubernetes.io": {"namespace": "default", "pod": {"name": "app-1", "uid": "u"}, "serviceaccount": {"name": "app", "uid": "s"}}}),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

fn handler(rt: &tokio::runtime::Runtime) -> CredentialHandler {
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let settings = CacheSettings::default();
    rt.block_on(async {
        let leeway = Duration::from_secs(60);
        let admission = Arc::new(Admission::new(
            AdmissionSettings::default(),
            Arc::new(Clients::new(&[], 128)),
            None,
            None,
        ));
        let cache = CredentialCache::new(
            Arc::new(Instant),
            admission.clone(),
            &settings,
            leeway,
            metrics.clone(),
        );
        CredentialHandler {
            cache,
            hosts: AllowedHosts::new(&["169.254.170.23".parse().expect("ip")]),
            leeway,
            admission,
            metrics,
            refusal_lines: Default::default(),
            delivery_lines: Default::default(),
            deliveries: pod_identity_agent::server::handler::deliveries(),
            events: None,
        }
    })
}

/// A pod's address.
const PEER: std::net::SocketAddr = std::net::SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 3, 7)),
    40_000,
);

fn request(t: &str) -> hyper::Request<()> {
    hyper::Request::get("/v1/credentials")
        .header("host", "169.254.170.23")
        .header("authorization", t)
        .body(())
        .expect("request")
}

fn hit_path(c: &mut Criterion) {
    let rt = runtime();
    let handler = handler(&rt);
    let t = token();
    let request = || request(&t);
    // Warm: the first request exchanges, every measured one hits.
    let warm = rt.block_on(handler.handle(request(), PEER));
    assert_eq!(warm.status(), 200);
    c.bench_function("hit path: request -> response", |b| {
        b.to_async(&rt).iter(|| async {
            let res = handler.handle(request(), PEER).await;
            debug_assert_eq!(res.status(), 200);
            res
        })
    });
    c.bench_function("token parse + SHA-256 (1 KB)", |b| {
        b.iter(|| Token::parse(t.as_bytes()).map(|t| t.hash()))
    });
}

/// Exactly `n` hits after one warming exchange, for instruction counting.
fn fixed_iterations(n: u64) {
    let rt = runtime();
    let handler = handler(&rt);
    let t = token();
    rt.block_on(async {
        assert_eq!(handler.handle(request(&t), PEER).await.status(), 200);
        for _ in 0..n {
            let res = handler.handle(request(&t), PEER).await;
            debug_assert_eq!(res.status(), 200);
        }
    });
}

criterion_group!(benches, hit_path);

fn main() {
    if let Some(n) = std::env::var("PIA_HIT_PATH_ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        return fixed_iterations(n);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
