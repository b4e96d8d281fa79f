//! Property tests of the three parsers that hostile pods and broken upstreams feed: the token
//! (any `Authorization` bytes), the `Host` header, and EKS Auth's answer (any status, headers
//! and body). Arbitrary input never panics and never gets a 200 it should not.
//!
//! `cargo test --test it parsers::` runs a few hundred cases of each (CI). The ignored test runs
//! 50,000 of each: `cargo test --release --test it parsers:: -- --ignored`. No case is written to
//! disk (no `proptest-regressions/` in the repository): a failure prints its input.

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use pod_identity_agent::admission::{Admission, AdmissionSettings};
use pod_identity_agent::cache::{CacheSettings, CredentialCache};
use pod_identity_agent::client::Clients;
use pod_identity_agent::credentials::{Credentials, Unvalidated};
use pod_identity_agent::eks_auth::{
    CredentialSource, EksAuthClient, ExchangeSettings, FetchFuture,
};
use pod_identity_agent::metrics::Metrics;
use pod_identity_agent::request::AllowedHosts;
use pod_identity_agent::server::handler::CredentialHandler;
use pod_identity_agent::token::Token;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SMALL: u32 = 256;
const LARGE: u32 = 50_000;

fn check<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The token and the Host header, through the whole credential handler in process.

/// Answers every exchange with fixed, valid credentials.
struct Always;

impl CredentialSource for Always {
    fn fetch(&self, _: &Token) -> FetchFuture {
        Box::pin(async {
            Ok(Credentials::validate(
                Unvalidated {
                    access_key_id: "ASIAEXAMPLE",
                    secret_access_key: "secret",
                    session_token: "session",
                    expiration: SystemTime::now() + Duration::from_secs(3600),
                    assumed_role_arn: "arn:aws:sts::111122223333:assumed-role/r/s",
                },
                SystemTime::now(),
            )?
            .into())
        })
    }
}

struct InProcess {
    rt: tokio::runtime::Runtime,
    handler: CredentialHandler,
}

impl InProcess {
    fn new() -> InProcess {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let leeway = Duration::from_secs(60);
        let handler = rt.block_on(async {
            let admission = Arc::new(Admission::new(
                AdmissionSettings::unlimited(),
                Arc::new(Clients::new(&[], 128)),
                None,
                None,
            ));
            CredentialHandler {
                cache: CredentialCache::new(
                    Arc::new(Always),
                    admission.clone(),
                    &CacheSettings::default(),
                    leeway,
                    metrics.clone(),
                ),
                hosts: AllowedHosts::new(&[
                    "169.254.170.23".parse().expect("ip"),
                    "fd00:ec2::23".parse().expect("ip"),
                ]),
                leeway,
                admission,
                metrics,
                refusal_lines: Default::default(),
                delivery_lines: Default::default(),
                deliveries: pod_identity_agent::server::handler::deliveries(),
                events: None,
            }
        });
        InProcess { rt, handler }
    }

    /// Status of `GET /v1/credentials` with these header values (as bytes; values HTTP cannot
    /// carry are left out, as hyper would refuse them before the handler).
    fn status(&self, host: &[u8], authorization: &[u8]) -> u16 {
        let mut req = hyper::Request::get("/v1/credentials");
        if let Ok(h) = hyper::header::HeaderValue::from_bytes(host) {
            req = req.header("host", h);
        }
        if let Ok(a) = hyper::header::HeaderValue::from_bytes(authorization) {
            req = req.header("authorization", a);
        }
        let Ok(req) = req.body(()) else { return 0 };
        let peer = SocketAddr::new(IpAddr::from([10, 0, 0, 1]), 40_000);
        self.rt
            .block_on(self.handler.handle(req, peer))
            .status()
            .as_u16()
    }
}

fn b64(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// A valid, unexpired token.
fn good_token() -> String {
    let n = now();
    format!(
        "{}.{}.{}",
        b64(json!({"alg": "RS256"}).to_string().as_bytes()),
        b64(
            json!({"exp": n + 3600, "nbf": n, "kubernetes.io": {"namespace": "ns"}})
                .to_string()
                .as_bytes()
        ),
        b64(b"sig")
    )
}

/// JWT-shaped strings with arbitrary pieces: segment counts, alg values, time claims of every
/// JSON type and size, claims of any length and content.
fn jwt_like() -> impl Strategy<Value = String> {
    let time = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        (0u64..4_000_000_000).prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
    ];
    let alg = prop_oneof![Just("RS256".to_owned()), Just("none".to_owned()), ".{0,12}"];
    (
        alg,
        time.clone(),
        time,
        ".{0,300}",
        vec(any::<u8>(), 0..64),
        0usize..5,
    )
        .prop_map(|(alg, exp, nbf, ns, sig, segments)| {
            let header = b64(json!({"alg": alg, "kid": "k"}).to_string().as_bytes());
            let payload = b64(
                json!({"exp": exp, "nbf": nbf, "kubernetes.io": {"namespace": ns, "pod": {"name": ns}}})
                    .to_string()
                    .as_bytes(),
            );
            let parts = [header, payload, b64(&sig), "x".into()];
            parts[..segments.min(4)].join(".")
        })
}

/// Tokens that may be answered 200: structurally valid, `alg` not none, within exp/nbf with the
/// 60 s leeway.
fn may_succeed(raw: &[u8]) -> bool {
    Token::parse(raw).is_ok_and(|t| {
        t.check_time(SystemTime::now(), Duration::from_secs(60))
            .is_ok()
    })
}

fn token_property(cases: u32) {
    let p = InProcess::new();
    check(cases, vec(any::<u8>(), 0..20_000), |bytes| {
        let _ = Token::parse(&bytes);
        let status = p.status(b"169.254.170.23", &bytes);
        prop_assert!(status != 200, "arbitrary bytes got credentials");
        prop_assert!(matches!(status, 0 | 400), "{status}");
        Ok(())
    });
    check(cases, jwt_like(), |t| {
        let status = p.status(b"169.254.170.23", t.as_bytes());
        prop_assert!(matches!(status, 200 | 400), "{status}");
        prop_assert_eq!(status == 200, may_succeed(t.as_bytes()), "token {:?}", t);
        Ok(())
    });
}

/// The IP a `Host` names, by the plain rules: `[v6]`, `[v6]:port`, `v4`, `v4:port`.
fn named_ip(host: &str) -> Option<IpAddr> {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let port_ok = after.is_empty()
            || after.strip_prefix(':').is_some_and(|p| {
                !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
            });
        let inside = inside.split('%').next()?;
        return port_ok.then(|| inside.parse().ok()).flatten();
    }
    let name = match host.rsplit_once(':') {
        Some((n, p)) if !n.contains(':') => {
            (!p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())).then_some(n)?
        }
        _ => host,
    };
    name.parse().ok()
}

fn host_property(cases: u32) {
    let p = InProcess::new();
    let token = good_token();
    let bound: [IpAddr; 2] = [
        "169.254.170.23".parse().expect("ip"),
        "fd00:ec2::23".parse().expect("ip"),
    ];
    let host = prop_oneof![
        vec(any::<u8>(), 0..80),
        "\\[?[0-9a-fA-F:.%]{0,40}\\]?(:[0-9]{0,6})?".prop_map(String::into_bytes),
        "(169\\.254\\.170\\.23|\\[fd00:ec2::23\\]|\\[FD00:EC2:0:0::23\\]|localhost)(:[0-9a-z]{0,6})?"
            .prop_map(String::into_bytes),
    ];
    check(cases, host, |host| {
        let status = p.status(&host, token.as_bytes());
        let named = std::str::from_utf8(&host)
            .ok()
            .and_then(named_ip)
            .map(|ip| ip.to_canonical());
        let allowed = named.is_some_and(|ip| bound.contains(&ip));
        prop_assert_eq!(
            status == 200,
            allowed,
            "Host {:?}: {}",
            String::from_utf8_lossy(&host),
            status
        );
        prop_assert!(matches!(status, 200 | 403), "{status}");
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// EKS Auth's answer, through the real SDK client, from a canned HTTP response.

/// The next answer: status, headers, body.
type Answer = (u16, Vec<(String, String)>, Vec<u8>);

#[derive(Debug, Clone, Default)]
struct Canned(Arc<Mutex<Answer>>);

impl HttpConnector for Canned {
    fn call(&self, _: HttpRequest) -> HttpConnectorFuture {
        let (status, headers, body) = self.0.lock().map(|g| g.clone()).unwrap_or_default();
        let mut res = hyper::Response::builder().status(status);
        for (k, v) in headers {
            res = res.header(k, v);
        }
        let result = res
            .body(SdkBody::from(body))
            .map_err(|e| ConnectorError::other(e.into(), None))
            .and_then(|r| {
                HttpResponse::try_from(r).map_err(|e| ConnectorError::other(e.into(), None))
            });
        HttpConnectorFuture::ready(result)
    }
}

impl HttpClient for Canned {
    fn http_connector(
        &self,
        _: &HttpConnectorSettings,
        _: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(self.clone())
    }
}

/// What a usable answer is: a success status (the SDK takes any 2xx) and JSON with non-empty
/// key id, secret and session token and a numeric expiration in the future but within the
/// plausible lifetime.
fn usable(status: u16, body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let c = &v["credentials"];
    let nonempty = |k: &str| c[k].as_str().is_some_and(|s| !s.is_empty());
    let exp = c["expiration"].as_f64().unwrap_or(0.0);
    let n = now() as f64;
    (200..300).contains(&status)
        && nonempty("accessKeyId")
        && nonempty("secretAccessKey")
        && nonempty("sessionToken")
        && exp > n + 1.0
        && exp < n + 7.0 * 24.0 * 3600.0 - 1.0
}

fn answer() -> impl Strategy<Value = (u16, Option<String>, Vec<u8>)> {
    let text = prop_oneof![
        Just(String::new()),
        ".{0,40}",
        Just("ASIAEXAMPLE".to_owned())
    ];
    let exp = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        (0u64..20_000).prop_map(|d| Value::from(now() + d)),
        (0u64..20_000).prop_map(|d| Value::from(now().saturating_sub(d))),
        ".{0,12}".prop_map(Value::from),
    ];
    let shaped = (text.clone(), text.clone(), text, exp, ".{0,60}").prop_map(|(k, s, t, e, arn)| {
        json!({"subject": {"namespace": "ns", "serviceAccount": "sa"},
            "assumedRoleUser": {"arn": arn, "assumeRoleId": "x"},
            "credentials": {"accessKeyId": k, "secretAccessKey": s, "sessionToken": t, "expiration": e}})
        .to_string()
        .into_bytes()
    });
    let status = prop_oneof![Just(200u16), 100u16..600];
    let code = prop_oneof![
        Just(None),
        Just(Some("InvalidTokenException".to_owned())),
        Just(Some("ThrottlingException".to_owned())),
        "[A-Za-z:/.]{0,30}".prop_map(Some),
    ];
    (status, code, prop_oneof![vec(any::<u8>(), 0..600), shaped])
}

fn answer_property(cases: u32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let canned = Canned::default();
    let client = rt.block_on(async {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-west-2"))
            .credentials_provider(aws_credential_types::Credentials::new(
                "AKID", "s", None, None, "t",
            ))
            .http_client(SharedHttpClient::new(canned.clone()))
            .load()
            .await;
        let mut x = ExchangeSettings::new("c");
        x.max_attempts = 1;
        EksAuthClient::new(&sdk, &x)
    });
    let token = Token::parse(good_token().as_bytes()).expect("token");
    check(cases, answer(), |(status, code, body)| {
        let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
        if let Some(code) = code {
            if hyper::header::HeaderValue::from_str(&code).is_ok() {
                headers.push(("x-amzn-errortype".to_owned(), code));
            }
        }
        if let Ok(mut c) = canned.0.lock() {
            *c = (status, headers, body.clone());
        }
        let result = rt.block_on(client.fetch(&token));
        let want = usable(status, &body);
        prop_assert_eq!(
            result.is_ok(),
            want,
            "HTTP {} {:?}: {:?}",
            status,
            String::from_utf8_lossy(&body),
            result
        );
        if let Ok(creds) = result {
            let v: Value = serde_json::from_slice(creds.credentials.body())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let exp = v["Expiration"].as_str().unwrap_or_default();
            prop_assert!(
                exp.len() == 20 && exp.ends_with('Z') && !exp.starts_with("1970"),
                "{exp}"
            );
        } else if let Err(e) = &result {
            // Every failure has a status an SDK understands.
            let s = pod_identity_agent::error::Error::Exchange(e.clone()).status();
            prop_assert!((400..600).contains(&s), "{s}");
        }
        Ok(())
    });
}

#[test]
fn authorization_bytes_never_panic_and_only_valid_tokens_succeed() {
    token_property(SMALL);
}

#[test]
fn host_values_never_panic_and_only_bound_addresses_succeed() {
    host_property(SMALL);
}

#[test]
fn eks_auth_answers_never_panic_and_only_usable_ones_succeed() {
    answer_property(SMALL);
}

#[test]
#[ignore = "50,000 cases of each property: cargo test --release --test it parsers:: -- --ignored"]
fn parsers_hold_for_a_large_case_count() {
    token_property(LARGE);
    host_property(LARGE);
    answer_property(LARGE);
}
