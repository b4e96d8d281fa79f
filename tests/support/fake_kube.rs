//! A fake Kubernetes API server on loopback, serving only the recordings in `proto-fixtures/kube/`
//! (matched by method and path), with what a test controls filled in: the issuer the discovery
//! document names, the signing keys published beside the recorded one, and a failure mode
//! (another recording, such as `keys/forbidden`, or an API server that accepts and never answers).
//! It records every request, and whether it carried a bearer token. Self-contained: the load
//! benchmark includes it.

#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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

struct State {
    /// Recordings by name (`keys/jwks`).
    recordings: Vec<(String, Value)>,
    issuer: Mutex<String>,
    /// Keys published after the recorded ones.
    keys: Mutex<Vec<Value>>,
    mode: Mutex<Mode>,
    /// Method, path and whether a bearer token came with it.
    seen: Mutex<Vec<(String, String, bool)>>,
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

impl State {
    fn recording(&self, name: &str) -> Option<Value> {
        self.recordings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    fn answer(&self, method: &str, path: &str) -> Option<(u16, Value)> {
        let fixture = match &*lock(&self.mode) {
            Mode::Always(name) => self.recording(name)?,
            _ => self
                .recordings
                .iter()
                .find(|(_, f)| {
                    f["request"]["method"] == method
                        && f["request"]["path"] == path
                        && f["response"]["status"] == 200
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
                                let bearer = req
                                    .headers()
                                    .get("authorization")
                                    .and_then(|v| v.to_str().ok())
                                    .is_some_and(|v| v.starts_with("Bearer ") && v.len() > 7);
                                lock(&state.seen).push((method.clone(), path.clone(), bearer));
                                if *lock(&state.mode) == Mode::Hang {
                                    std::future::pending::<()>().await;
                                }
                                let (status, body) = state.answer(&method, &path).unwrap_or((
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

    /// Requests for `path` so far.
    pub fn requests(&self, path: &str) -> usize {
        lock(&self.state.seen)
            .iter()
            .filter(|(_, p, _)| p == path)
            .count()
    }

    /// Whether every request carried a bearer token.
    pub fn always_bearer(&self) -> bool {
        lock(&self.state.seen).iter().all(|(_, _, b)| *b)
    }
}

/// The keys of an emulator issuer, as its JWKS publishes them.
pub fn keys_of(issuer: &pod_identity_agent::emulator::issuer::Issuer) -> Vec<Value> {
    issuer.jwks()["keys"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}
