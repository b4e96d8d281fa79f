//! `/v1/credentials` over real sockets against the fixture-driven fake EKS Auth: the body to the
//! byte, every recorded upstream answer mapped to the agent answer recorded with it, the
//! request checks (path, method, Host, token) and their JSON errors.

use crate::support::fake_eks_auth::{fixture_names, load_fixture};
use crate::support::*;

#[tokio::test]
async fn success_body_is_exact() {
    let h = Harness::start().await;
    let reply = h.get(&token()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["content-type"], "application/json");
    let text = reply.text();
    // Five keys, in the contract's order, Expiration in UTC with a Z and no fraction.
    let keys: Vec<&str> = [
        "\"AccessKeyId\":",
        "\"SecretAccessKey\":",
        "\"Token\":",
        "\"AccountId\":",
        "\"Expiration\":",
    ]
    .to_vec();
    let positions: Vec<usize> = keys
        .iter()
        .map(|k| {
            text.find(k)
                .unwrap_or_else(|| panic!("{k} missing in {text}"))
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "order: {text}");
    let v = reply.json();
    assert_eq!(v.as_object().map(|o| o.len()), Some(5));
    assert_eq!(v["AccessKeyId"], "ASIAEXAMPLE0001");
    assert_eq!(v["AccountId"], "111122223333");
    let exp = v["Expiration"].as_str().expect("string");
    assert_eq!(exp.len(), 20, "{exp}");
    assert!(exp.ends_with('Z') && exp.as_bytes()[10] == b'T');
    assert_eq!(h.fake.calls(), 1);
    assert_eq!(
        h.fake.bad_requests(),
        0,
        "the agent's request must look like a real EKS Auth call"
    );
    assert_eq!(
        h.fake.access_key_ids(),
        vec![NODE_ACCESS_KEY_ID.to_string()]
    );
}

#[tokio::test]
async fn every_fixture_yields_its_recorded_agent_answer() {
    let names = fixture_names();
    assert!(names.len() >= 15, "fixtures: {names:?}");
    let h = Harness::start().await;
    for name in names {
        let fixture = load_fixture(&name);
        h.fake.respond_with(&name);
        let before = h.fake.calls();
        let reply = h.get(&token()).await;
        let want = &fixture["agent"];
        assert_eq!(
            u64::from(reply.status),
            want["status"].as_u64().expect("status"),
            "{name}: {}",
            reply.text()
        );
        assert_eq!(reply.headers["content-type"], "application/json", "{name}");
        if reply.status != 200 {
            let body = reply.json();
            assert_eq!(body["code"], want["code"], "{name}: {body}");
            assert_eq!(body.as_object().map(|o| o.len()), Some(2), "{name}: {body}");
            let message = body["message"].as_str().expect("message");
            if let Some(rid) = fixture["response"]["headers"]["x-amzn-requestid"].as_str() {
                if name.starts_with("error-") {
                    assert!(
                        message.contains(rid),
                        "{name}: request id missing from {message}"
                    );
                }
            }
        }
        // The SDK retries throttling and 5xx (3 attempts); a rejected token is sent once.
        let calls = h.fake.calls() - before;
        match want["fault"].as_str() {
            Some("token") => assert_eq!(calls, 1, "{name}"),
            Some("transient") if fixture["response"]["status"].as_u64() != Some(200) => {
                assert_eq!(calls, 3, "{name}")
            }
            Some("node") => assert!((1..=3).contains(&calls), "{name}: {calls}"),
            _ => assert!(calls >= 1, "{name}"),
        }
    }
}

#[tokio::test]
async fn host_check_uses_bound_ips() {
    let h = Harness::start_with(|s, _| {
        s.bind_hosts = vec!["127.0.0.1".parse().expect("ip"), "::1".parse().expect("ip")]
    })
    .await;
    let v4 = h.agent.credential_addrs[0];
    let v6 = h.agent.credential_addrs[1];
    let t = token();
    for (addr, host, want) in [
        (v4, "127.0.0.1".to_string(), 200),
        (v4, format!("127.0.0.1:{}", v4.port()), 200),
        (v4, "localhost".to_string(), 200),
        (v6, format!("[::1]:{}", v6.port()), 200),
        (v6, "[0:0:0:0:0:0:0:1]".to_string(), 200),
        (v6, "[0000::0001]:80".to_string(), 200),
        (v4, "169.254.170.23".to_string(), 403),
        (v4, "attacker.example".to_string(), 403),
        (v4, "127.0.0.1.nip.io".to_string(), 403),
        (v6, "[::2]".to_string(), 403),
    ] {
        let reply = get(
            addr,
            "/v1/credentials",
            &[("host", &host), ("authorization", &t)],
        )
        .await;
        assert_eq!(reply.status, want, "Host {host}: {}", reply.text());
        if want == 403 {
            assert_eq!(reply.json()["code"], "HostNotAllowed");
        }
    }
}

#[tokio::test]
async fn request_errors_are_json_with_one_status_each() {
    let h = Harness::start().await;
    let addr = h.addr();
    let expired = mint("default", "app", -3600);
    let garbage = "not-a-jwt";
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("GET", "/", vec![], 404, "NotFound"),
        ("GET", "/v1/credentials/extra", vec![], 404, "NotFound"),
        ("POST", "/v1/credentials", vec![], 405, "MethodNotAllowed"),
        ("PUT", "/v1/credentials", vec![], 405, "MethodNotAllowed"),
        ("GET", "/v1/credentials", vec![], 400, "MissingToken"),
        (
            "GET",
            "/v1/credentials",
            vec![("authorization", "")],
            400,
            "MissingToken",
        ),
        (
            "GET",
            "/v1/credentials",
            vec![("authorization", garbage)],
            400,
            "InvalidToken",
        ),
        (
            "GET",
            "/v1/credentials",
            vec![("authorization", &expired)],
            400,
            "ExpiredToken",
        ),
    ];
    for (method, path, headers, status, code) in cases {
        let reply = request(addr, method, path, &headers).await;
        assert_eq!(reply.status, status, "{method} {path}: {}", reply.text());
        assert_eq!(reply.json()["code"], code, "{method} {path}");
        if status == 405 {
            assert_eq!(reply.headers["allow"], "GET");
        }
    }
    assert_eq!(
        h.fake.calls(),
        0,
        "refused requests must never reach EKS Auth"
    );
}

#[tokio::test]
async fn expired_token_is_refused_without_an_exchange() {
    // One leeway (1 s) for requests and the cache. Once the token is past it, the request check
    // refuses it. Without that check the cache would no longer serve the entry, a new exchange
    // would start and the fake (which does not look at exp) would answer 200.
    let h = Harness::start_with(|s, _| s.leeway = std::time::Duration::from_secs(1)).await;
    let exp = now_secs() + 2;
    let t = mint("default", "app", 2);
    assert_eq!(h.get(&t).await.status, 200);
    assert_eq!(h.get(&t).await.status, 200, "served from the cache");
    while now_secs() <= exp + 1 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let reply = h.get(&t).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(reply.json()["code"], "ExpiredToken");
    assert_eq!(h.fake.calls(), 1, "refused without asking EKS Auth");
}

#[tokio::test]
async fn metrics_keep_the_reference_names_and_add_more() {
    let h = Harness::start().await;
    let t = token();
    assert_eq!(h.get(&t).await.status, 200);
    assert_eq!(h.get(&t).await.status, 200);
    h.fake.respond_with("error-resource-not-found");
    assert_eq!(h.get(&token()).await.status, 404);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "pod_identity_http_response{code=\"200\"}"),
        2.0,
        "{m}"
    );
    assert_eq!(metric(&m, "pod_identity_http_response{code=\"404\"}"), 1.0);
    assert_eq!(metric(&m, "pod_identity_cache_state{state=\"hit\"}"), 1.0);
    assert_eq!(metric(&m, "pod_identity_cache_state{state=\"miss\"}"), 2.0);
    assert_eq!(
        metric(
            &m,
            "pod_identity_cache_errors{code=\"ResourceNotFoundException\",type=\"NonRecoverable\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "pod_identity_eks_auth_calls_total{code=\"Success\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "pod_identity_request_duration_seconds_count{outcome=\"hit\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "pod_identity_request_duration_seconds_count{outcome=\"miss\"}"
        ),
        1.0
    );
    assert_eq!(metric(&m, "pod_identity_cache_entries"), 1.0);
    assert_eq!(metric(&m, "pod_identity_eks_auth_in_flight"), 0.0);
    assert_eq!(
        metric(&m, "pod_identity_served_credential_remaining_seconds_count"),
        2.0
    );
    // Served 6-hour credentials: nothing under 3 h left.
    assert_eq!(
        metric(
            &m,
            "pod_identity_served_credential_remaining_seconds_bucket{le=\"10800\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn probes_report_listeners() {
    let h = Harness::start().await;
    let probe = h.agent.probe_addr.expect("probe listener");
    assert_eq!(get(probe, "/healthz", &[]).await.status, 200);
    let ready = get(probe, "/readyz", &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["listeners"][0]["accepting"], true);
    assert_eq!(get(probe, "/nope", &[]).await.status, 404);
    // The probe port answers probes directly; proxies configured in the environment are not used
    // by the agent's own listener checks (they connect by socket).
}

#[tokio::test]
async fn a_connection_accepted_just_before_shutdown_is_still_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start().await;
    let t = token();
    assert_eq!(h.get(&t).await.status, 200, "cached");
    let mut s = tokio::net::TcpStream::connect(h.addr())
        .await
        .expect("connect");
    // Accepted, but its request not sent yet, when the agent stops (a handover or a SIGTERM).
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let addr = h.addr();
    let Harness { agent, fake } = h;
    let stopping = tokio::spawn(agent.shutdown());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let req = format!("GET /v1/credentials HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {t}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut answer = String::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        s.read_to_string(&mut answer),
    )
    .await
    .expect("answered, then closed");
    // Served, and then closed (read_to_string saw the end).
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    stopping.await.expect("stopped");
    drop(fake);
}

#[tokio::test]
async fn a_kept_alive_connection_s_next_request_after_shutdown_is_answered_then_closed() {
    use http_body_util::{BodyExt, Empty};
    let h = Harness::start().await;
    let (addr, t) = (h.addr(), token());
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    let connection = tokio::spawn(conn);
    let request = || {
        hyper::Request::get("/v1/credentials")
            .header("host", addr.to_string())
            .header("authorization", &t)
            .body(Empty::<bytes::Bytes>::new())
            .expect("request")
    };
    let first = sender.send_request(request()).await.expect("first");
    assert_eq!(first.status(), 200);
    assert_ne!(
        first.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    first.into_body().collect().await.expect("body");

    // The agent stops (a handover or a SIGTERM) while this client is between two requests on
    // its kept-alive connection, and the next one is on its way.
    let Harness { agent, fake } = h;
    let stopping = tokio::spawn(agent.shutdown());
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let next = sender
        .send_request(request())
        .await
        .expect("the next request on the kept-alive connection is answered, not cut off");
    assert_eq!(next.status(), 200);
    assert_eq!(
        next.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "the client is sent to a new connection (the successor's, after a handover)"
    );
    next.into_body().collect().await.expect("body");
    tokio::time::timeout(std::time::Duration::from_secs(3), connection)
        .await
        .expect("closed after the answer")
        .expect("join")
        .expect("a clean close");
    stopping.await.expect("stopped");
    drop(fake);
}
