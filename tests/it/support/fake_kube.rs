//! A fake Kubernetes API server on loopback, serving only the recordings in `proto-fixtures/kube/`
//! (matched by method and path; a `{name}` segment of a recorded path matches any one segment),
//! with what a test controls filled in: the issuer the discovery document names, the signing
//! keys published beside the recorded one, a failure mode for every request (another
//! recording, such as `keys/forbidden`, or an API server that accepts and never answers), and
//! scripts for one method and path (answers in turn, the last one repeated: "first 409, then
//! 200"; a hang for one path while the others answer). It records every request: method, path,
//! whether it carried a bearer token, its body and when it came. Self-contained: the load
//! benchmark includes it.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How the fake answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The recording for the request.
    Recorded,
    /// This recording (e.g. `keys/forbidden`), whatever was asked.
    Always(String),
    /// Accept, read, never answer.
    Hang,
}

/// One answer of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// This recording (`nodes/patch-conflict`).
    Recording(String),
    /// Accept, read, never answer.
    Hang,
    /// This recording after this long.
    After(std::time::Duration, String),
}

impl Answer {
    pub fn recording(name: &str) -> Answer {
        Answer::Recording(name.to_owned())
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Whether a bearer token came with it.
    pub bearer: bool,
    pub content_type: String,
    pub body: Bytes,
    pub at: Instant,
}

impl Seen {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A script: method, path pattern, the answers left (the last one stays).
type Script = (String, String, Vec<Answer>);

struct State {
    /// Recordings by name (`keys/jwks`).
    recordings: Vec<(String, Value)>,
    issuer: Mutex<String>,
    /// Keys published after the recorded ones.
    keys: Mutex<Vec<Value>>,
    mode: Mutex<Mode>,
    scripts: Mutex<Vec<Script>>,
    seen: Mutex<Vec<Seen>>,
}

pub struct FakeKube {
    pub addr: SocketAddr,
    state: Arc<State>,
}

fn recordings() -> Vec<(String, Value)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto-fixtures/kube");
    let mut out = Vec::new();
    for sub in std::fs::read_dir(&root)
        .expect("proto-fixtures/kube")
        .flatten()
    {
        if !sub.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(sub.path()).expect("dir").flatten() {
            let path = f.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let name = format!(
                "{}/{}",
                sub.file_name().to_string_lossy(),
                path.file_stem().unwrap_or_default().to_string_lossy()
            );
            let text = std::fs::read_to_string(&path).expect("read");
            out.push((name, serde_json::from_str(&text).expect("fixture JSON")));
        }
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `path` is what `pattern` names: equal segments, or `{…}` for any one segment.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (pattern.split('/').collect(), path.split('/').collect());
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .all(|(p, s)| p == s || (p.starts_with('{') && p.ends_with('}') && !s.is_empty()))
}

impl State {
    /// The next scripted answer for this request, if a script names it.
    fn scripted(&self, method: &str, path: &str) -> Option<Answer> {
        let mut scripts = lock(&self.scripts);
        let (_, _, answers) = scripts
            .iter_mut()
            .find(|(m, p, _)| m == method && path_matches(p, path))?;
        if answers.len() > 1 {
            Some(answers.remove(0))
        } else {
            answers.first().cloned()
        }
    }

    fn recording(&self, name: &str) -> Option<Value> {
        self.recordings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    fn answer(&self, method: &str, path: &str, scripted: Option<String>) -> Option<(u16, Value)> {
        let fixture = match (scripted, &*lock(&self.mode)) {
            (Some(name), _) => self.recording(&name)?,
            (None, Mode::Always(name)) => self.recording(name)?,
            (None, _) => self
                .recordings
                .iter()
                .find(|(_, f)| {
                    f["request"]["method"] == method
                        && path_matches(f["request"]["path"].as_str().unwrap_or_default(), path)
                        && f["response"]["status"]
                            .as_u64()
                            .is_some_and(|s| (200..300).contains(&s))
                })
                .map(|(_, f)| f.clone())?,
        };
        let status = fixture["response"]["status"].as_u64().unwrap_or(500) as u16;
        let mut body = fixture["response"]["body"].clone();
        if status == 200 && path == "/.well-known/openid-configuration" {
            body["issuer"] = Value::String(lock(&self.issuer).clone());
        }
        if status == 200 && path == "/openid/v1/jwks" {
            if let Some(keys) = body["keys"].as_array_mut() {
                keys.extend(lock(&self.keys).iter().cloned());
            }
        }
        Some((status, body))
    }
}

impl FakeKube {
    pub async fn start() -> FakeKube {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            recordings: recordings(),
            issuer: Mutex::new(String::new()),
            keys: Mutex::default(),
            mode: Mutex::new(Mode::Recorded),
            scripts: Mutex::default(),
            seen: Mutex::default(),
        });
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let state = state.clone();
                            async move {
                                let method = req.method().as_str().to_owned();
                                let path = req.uri().path().to_owned();
                                let header = |name: &str| {
                                    req.headers()
                                        .get(name)
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or_default()
                                        .to_owned()
                                };
                                let bearer = header("authorization");
                                let bearer = bearer.starts_with("Bearer ") && bearer.len() > 7;
                                let content_type = header("content-type");
                                let at = Instant::now();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                lock(&state.seen).push(Seen {
                                    method: method.clone(),
                                    path: path.clone(),
                                    bearer,
                                    content_type,
                                    body,
                                    at,
                                });
                                let scripted = match state.scripted(&method, &path) {
                                    Some(Answer::Hang) => {
                                        std::future::pending::<()>().await;
                                        None
                                    }
                                    Some(Answer::Recording(name)) => Some(name),
                                    Some(Answer::After(delay, name)) => {
                                        tokio::time::sleep(delay).await;
                                        Some(name)
                                    }
                                    None => None,
                                };
                                if scripted.is_none() && *lock(&state.mode) == Mode::Hang {
                                    std::future::pending::<()>().await;
                                }
                                let (status, body) =
                                    state.answer(&method, &path, scripted).unwrap_or((
                                        404,
                                        serde_json::json!({"kind": "Status", "code": 404}),
                                    ));
                                let mut res =
                                    Response::new(Full::new(Bytes::from(body.to_string())));
                                *res.status_mut() =
                                    StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                                res.headers_mut().insert(
                                    "content-type",
                                    hyper::header::HeaderValue::from_static("application/json"),
                                );
                                Ok::<_, std::convert::Infallible>(res)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeKube { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The issuer its discovery document names.
    pub fn set_issuer(&self, issuer: &str) {
        *lock(&self.state.issuer) = issuer.to_owned();
    }

    /// Publish these JWKs (besides the recorded one), replacing those published before.
    pub fn publish(&self, keys: Vec<Value>) {
        *lock(&self.state.keys) = keys;
    }

    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.state.mode) = mode;
    }

    /// Answer `method` on paths matching `pattern` with `answers` in turn, the last one from
    /// then on, whatever the mode (replaces an earlier script for the same method and pattern).
    pub fn script(&self, method: &str, pattern: &str, answers: Vec<Answer>) {
        assert!(!answers.is_empty(), "a script needs an answer");
        let mut scripts = lock(&self.state.scripts);
        scripts.retain(|(m, p, _)| !(m == method && p == pattern));
        scripts.push((method.to_owned(), pattern.to_owned(), answers));
    }

    /// Requests for `path` so far.
    pub fn requests(&self, path: &str) -> usize {
        lock(&self.state.seen)
            .iter()
            .filter(|s| s.path == path)
            .count()
    }

    /// Every request so far, in the order they came.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    /// The requests of `method` on paths matching `pattern`, in order.
    pub fn seen_matching(&self, method: &str, pattern: &str) -> Vec<Seen> {
        lock(&self.state.seen)
            .iter()
            .filter(|s| s.method == method && path_matches(pattern, &s.path))
            .cloned()
            .collect()
    }

    /// Whether every request carried a bearer token.
    pub fn always_bearer(&self) -> bool {
        lock(&self.state.seen).iter().all(|s| s.bearer)
    }
}

/// The keys of an emulator issuer, as its JWKS publishes them.
pub fn keys_of(issuer: &pod_identity_agent::emulator::issuer::Issuer) -> Vec<Value> {
    issuer.jwks()["keys"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}
