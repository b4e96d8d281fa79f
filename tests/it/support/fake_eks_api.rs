//! A fake of the two EKS API calls behind `--from-cluster`, serving only the recordings in
//! `proto-fixtures/eks/`, matched by method, path and query.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn recordings() -> Vec<Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto-fixtures/eks");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)
        .expect("proto-fixtures/eks")
        .flatten()
    {
        // Only the recorded exchanges beside it: not the emulator's (identity/, catalogues).
        if !entry.path().is_file() {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).expect("read");
        let v: Value = serde_json::from_str(&text).expect("fixture JSON");
        if v.get("request").is_some() {
            out.push(v);
        }
    }
    out
}

fn query_map(q: Option<&str>) -> serde_json::Map<String, Value> {
    q.unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "nextToken")
        .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
        .collect()
}

/// Serve on 127.0.0.1; returns the address and a counter of requests answered.
pub async fn start() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let recorded = Arc::new(recordings());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let recorded = recorded.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let recorded = recorded.clone();
                        let counter = counter.clone();
                        async move {
                            let query = Value::Object(query_map(req.uri().query()));
                            let found = recorded.iter().find(|f| {
                                f["request"]["method"] == req.method().as_str()
                                    && f["request"]["path"] == req.uri().path()
                                    && f["request"]["query"] == query
                            });
                            let res = match found {
                                Some(f) => {
                                    counter.fetch_add(1, Ordering::SeqCst);
                                    let mut r = Response::new(Full::new(Bytes::from(
                                        f["response"]["body"].to_string(),
                                    )));
                                    *r.status_mut() = StatusCode::OK;
                                    r.headers_mut().insert(
                                        "content-type",
                                        "application/json".parse().expect("h"),
                                    );
                                    r
                                }
                                None => {
                                    let mut r = Response::new(Full::new(Bytes::from_static(
                                        b"{\"message\":\"no recording\"}",
                                    )));
                                    *r.status_mut() = StatusCode::NOT_FOUND;
                                    r.headers_mut().insert(
                                        "x-amzn-errortype",
                                        "ResourceNotFoundException".parse().expect("h"),
                                    );
                                    r
                                }
                            };
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
    (addr, hits)
}
