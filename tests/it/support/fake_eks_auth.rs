//! A fake EKS Auth endpoint on loopback, answering only with the recorded exchanges in
//! `proto-fixtures/eks-auth/`, so tests and the wire format cannot drift apart.
//!
//! It checks each request the way EKS Auth would see it (method, path with the cluster name,
//! JSON body with a token, a SigV4 `Authorization` header for service `eks-auth`), counts calls,
//! records the signing access key ids, and can be told to add latency, hang, walk through a
//! scripted sequence of fixtures before falling back to a default, or answer tokens of one
//! namespace with a fixture of their own (forged tokens refused while real pods get credentials).

// Beside `jwt.rs` wherever it is included (the tests' support, the load bench).
use super::jwt::namespace_of;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto-fixtures/eks-auth")
}

/// Every fixture by name (file stem).
pub fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .expect("proto-fixtures/eks-auth exists")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.path()
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    names
}

pub fn load_fixture(name: &str) -> Value {
    let path = fixtures_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(Clone, Debug)]
pub struct Step {
    pub fixture: String,
    pub delay: Duration,
    pub hang: bool,
}

impl Step {
    pub fn fixture(name: &str) -> Step {
        Step {
            fixture: name.to_owned(),
            delay: Duration::ZERO,
            hang: false,
        }
    }
}

struct State {
    cluster: String,
    script: Mutex<VecDeque<Step>>,
    default: Mutex<Step>,
    lifetime: Mutex<Duration>,
    calls: AtomicUsize,
    bad_requests: AtomicUsize,
    access_key_ids: Mutex<Vec<String>>,
    tokens: Mutex<Vec<String>>,
    by_namespace: Mutex<std::collections::HashMap<String, String>>,
}

#[derive(Clone)]
pub struct FakeEksAuth {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl FakeEksAuth {
    /// Serve on 127.0.0.1 with `success` and 6-hour credentials by default.
    pub async fn start(cluster: &str) -> FakeEksAuth {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            cluster: cluster.to_owned(),
            script: Mutex::default(),
            default: Mutex::new(Step::fixture("success")),
            lifetime: Mutex::new(Duration::from_secs(6 * 3600)),
            calls: AtomicUsize::new(0),
            bad_requests: AtomicUsize::new(0),
            access_key_ids: Mutex::default(),
            tokens: Mutex::default(),
            by_namespace: Mutex::default(),
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(s, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeEksAuth { addr, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Requests that EKS Auth would have refused as malformed (wrong path, unsigned, no token).
    pub fn bad_requests(&self) -> usize {
        self.state.bad_requests.load(Ordering::SeqCst)
    }

    pub fn access_key_ids(&self) -> Vec<String> {
        self.state.access_key_ids.lock().expect("lock").clone()
    }

    pub fn tokens(&self) -> Vec<String> {
        self.state.tokens.lock().expect("lock").clone()
    }

    pub fn set_default(&self, step: Step) {
        *self.state.default.lock().expect("lock") = step;
    }

    pub fn respond_with(&self, fixture: &str) {
        self.set_default(Step::fixture(fixture));
    }

    /// Answer the next calls with these steps, in order, then fall back to the default.
    pub fn script(&self, steps: impl IntoIterator<Item = Step>) {
        self.state.script.lock().expect("lock").extend(steps);
    }

    /// Answer every token whose `kubernetes.io.namespace` claim is `namespace` with `fixture`.
    pub fn answer_namespace(&self, namespace: &str, fixture: &str) {
        self.state
            .by_namespace
            .lock()
            .expect("lock")
            .insert(namespace.to_owned(), fixture.to_owned());
    }

    pub fn set_lifetime(&self, lifetime: Duration) {
        *self.state.lifetime.lock().expect("lock") = lifetime;
    }
}

fn error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(
        serde_json::json!({ "message": message }).to_string(),
    )));
    *res.status_mut() = StatusCode::from_u16(status).expect("status");
    res.headers_mut()
        .insert("x-amzn-errortype", code.parse().expect("header"));
    res
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let call = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let path_ok = req.method() == hyper::Method::POST
        && req.uri().path() == format!("/clusters/{}/assume-role-for-pod-identity", state.cluster);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let token = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["token"].as_str().map(str::to_owned));
    // SigV4: "AWS4-HMAC-SHA256 Credential=AKID/20260101/us-west-2/eks-auth/aws4_request, ..."
    let signed =
        auth.starts_with("AWS4-HMAC-SHA256 Credential=") && auth.contains("/eks-auth/aws4_request");
    if let Some(akid) = auth
        .strip_prefix("AWS4-HMAC-SHA256 Credential=")
        .and_then(|r| r.split('/').next())
    {
        state
            .access_key_ids
            .lock()
            .expect("lock")
            .push(akid.to_owned());
    }
    let Some(token) = token.filter(|_| path_ok && signed) else {
        state.bad_requests.fetch_add(1, Ordering::SeqCst);
        return error(
            400,
            "InvalidRequestException",
            "fake EKS Auth: unexpected request shape",
        );
    };
    let by_namespace = {
        let map = state.by_namespace.lock().expect("lock");
        (!map.is_empty())
            .then(|| namespace_of(&token).and_then(|ns| map.get(&ns).cloned()))
            .flatten()
    };
    if state.tokens.lock().expect("lock").len() < 100_000 {
        state.tokens.lock().expect("lock").push(token);
    }
    let step = match by_namespace {
        Some(fixture) => Step::fixture(&fixture),
        None => {
            let next = state.script.lock().expect("lock").pop_front();
            next.unwrap_or_else(|| state.default.lock().expect("lock").clone())
        }
    };
    if !step.delay.is_zero() {
        tokio::time::sleep(step.delay).await;
    }
    if step.hang {
        std::future::pending::<()>().await;
    }
    let lifetime = *state.lifetime.lock().expect("lock");
    render(&load_fixture(&step.fixture), call, lifetime)
}

/// Turn a fixture's recorded response into a real one, filling its placeholders.
pub fn render(fixture: &Value, call: usize, lifetime: Duration) -> Response<Full<Bytes>> {
    let r = &fixture["response"];
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let text = match (&r["body"], &r["body_text"]) {
        (Value::Null, Value::String(t)) => t.clone(),
        (body, _) => body.to_string(),
    };
    let text = text
        .replace(
            "\"{{expiration}}\"",
            &(now + lifetime.as_secs()).to_string(),
        )
        .replace("\"{{expired}}\"", &(now - 60).to_string())
        .replace("{{call}}", &format!("{call:04}"));
    let mut res = Response::new(Full::new(Bytes::from(text)));
    *res.status_mut() =
        StatusCode::from_u16(r["status"].as_u64().expect("status") as u16).expect("status");
    if let Some(headers) = r["headers"].as_object() {
        for (k, v) in headers {
            res.headers_mut().insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                v.as_str()
                    .expect("header value")
                    .parse()
                    .expect("header value"),
            );
        }
    }
    res
}
