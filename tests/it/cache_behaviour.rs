//! The cache over real sockets: single-flight, exchanges that outlive their client, refresh
//! ahead of expiry, demand-driven expiry, static stability and eviction.
//!
//! Time is controlled through short credential lifetimes from the fake and a short
//! `--max-credential-retention-before-renewal`, never by sleeping on the hit path's account.

use crate::support;
use crate::support::fake_eks_auth::Step;
use crate::support::*;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

fn slow(fixture: &str, ms: u64) -> Step {
    Step {
        fixture: fixture.into(),
        delay: Duration::from_millis(ms),
        hang: false,
    }
}

/// Send a credential request on a raw connection, wait `after`, and close it unanswered.
async fn send_then_hang_up(h: &Harness, token: &str, after: Duration) {
    let mut stream = tokio::net::TcpStream::connect(h.addr())
        .await
        .expect("connect");
    let req = format!(
        "GET /v1/credentials HTTP/1.1\r\nHost: {}\r\nAuthorization: {token}\r\n\r\n",
        h.addr()
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    tokio::time::sleep(after).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_of_first_requests_makes_one_call() {
    let h = Harness::start().await;
    h.fake.set_default(slow("success", 300));
    let t = token();
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let addr = h.addr();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            get(addr, "/v1/credentials", &[("authorization", &t)]).await
        }));
    }
    let mut keys = std::collections::HashSet::new();
    for task in tasks {
        let reply = task.await.expect("task");
        assert_eq!(reply.status, 200, "{}", reply.text());
        keys.insert(
            reply.json()["AccessKeyId"]
                .as_str()
                .expect("key")
                .to_owned(),
        );
    }
    assert_eq!(h.fake.calls(), 1, "one EKS Auth call for one token");
    assert_eq!(keys.len(), 1);
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "pod_identity_request_duration_seconds_count{outcome=\"miss\"}"
        ),
        1.0,
        "{m}"
    );
    let coalesced = metric(
        &m,
        "pod_identity_request_duration_seconds_count{outcome=\"coalesced\"}",
    );
    let hits = metric(
        &m,
        "pod_identity_request_duration_seconds_count{outcome=\"hit\"}",
    );
    assert_eq!(coalesced + hits, 299.0);
    assert!(coalesced > 0.0);
}

#[tokio::test]
async fn errors_are_shared_by_the_flight_and_only_token_refusals_remembered() {
    let h = Harness::start().await;
    // A transient failure is shared by its flight, then forgotten: the next request asks again.
    h.fake.set_default(slow("error-service-unavailable", 200));
    let t = token();
    let statuses = herd(&h, &t, 50).await;
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    assert_eq!(
        h.fake.calls(),
        3,
        "one failure (3 SDK attempts), shared; not a herd"
    );
    h.fake.respond_with("success");
    assert_eq!(h.get(&t).await.status, 200);
    assert_eq!(h.fake.calls(), 4);

    // A refusal of the token itself is shared, then remembered: asking again costs no call.
    h.fake.set_default(slow("error-resource-not-found", 200));
    let t = token();
    let statuses = herd(&h, &t, 50).await;
    assert!(statuses.iter().all(|s| *s == 404), "{statuses:?}");
    assert_eq!(h.fake.calls(), 5, "one call for the herd");
    h.fake.respond_with("success");
    let again = h.get(&t).await;
    assert_eq!(again.status, 404, "remembered: {}", again.text());
    assert!(again.json()["message"]
        .as_str()
        .is_some_and(|m| m.contains("remembered")));
    assert_eq!(h.fake.calls(), 5, "remembered, not asked again");
}

/// `n` concurrent first requests for `t`; their statuses.
async fn herd(h: &Harness, t: &str, n: usize) -> Vec<u16> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let addr = h.addr();
        let t = t.to_owned();
        tasks.push(tokio::spawn(async move {
            get(addr, "/v1/credentials", &[("authorization", &t)])
                .await
                .status
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("task"));
    }
    statuses
}

#[tokio::test]
async fn exchange_outlives_a_client_that_hangs_up() {
    let h = Harness::start().await;
    h.fake.set_default(slow("success", 1500));
    let t = token();
    // A JS-SDK-like client: sends, waits 300 ms, gives up.
    send_then_hang_up(&h, &t, Duration::from_millis(300)).await;
    // Its retry arrives while the exchange is still going on, joins it, and gets its result.
    let started = Instant::now();
    let reply = h.get(&t).await;
    assert_eq!(reply.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "joined the running exchange"
    );
    assert_eq!(
        h.fake.calls(),
        1,
        "the abandoned exchange was not cancelled and redone"
    );
    // And once done, its result is cached.
    let started = Instant::now();
    assert_eq!(h.get(&t).await.status, 200);
    assert!(started.elapsed() < Duration::from_millis(200));
    assert_eq!(h.fake.calls(), 1);
}

#[tokio::test]
async fn abandoned_exchange_result_is_kept_for_the_retry() {
    let h = Harness::start().await;
    h.fake.set_default(slow("success", 600));
    let t = token();
    send_then_hang_up(&h, &t, Duration::from_millis(100)).await;
    // The retry comes after the exchange finished with nobody waiting: a hit.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let started = Instant::now();
    assert_eq!(h.get(&t).await.status, 200);
    assert!(started.elapsed() < Duration::from_millis(300));
    assert_eq!(h.fake.calls(), 1);
}

#[tokio::test]
async fn hung_eks_auth_is_bounded() {
    let h = Harness::start_with(|_, x| {
        x.attempt_timeout = Duration::from_millis(400);
        x.overall_timeout = Duration::from_millis(1000);
    })
    .await;
    h.fake.set_default(Step {
        fixture: "success".into(),
        delay: Duration::ZERO,
        hang: true,
    });
    let started = Instant::now();
    let reply = h.get(&token()).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["code"], "EksAuthUnavailable");
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn unreachable_eks_auth_is_503() {
    let h = Harness::start_with(|_, x| x.endpoint = Some("http://127.0.0.1:9".into())).await;
    let reply = h.get(&token()).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["code"], "EksAuthUnavailable");
}

#[tokio::test]
async fn used_entries_are_refreshed_ahead_of_time() {
    // Retention 1 s: refresh-ahead of 6-hour credentials after about a second.
    let h = Harness::start_with(|s, _| s.cache.policy.max_retention = Duration::from_secs(1)).await;
    let t = token();
    let first = h.get(&t).await.json()["AccessKeyId"].clone();
    assert_eq!(h.fake.calls(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        h.fake.calls(),
        2,
        "refreshed in the background because it was used"
    );
    let second = h.get(&t).await.json()["AccessKeyId"].clone();
    assert_ne!(first, second, "the refreshed credentials are served");
    assert_eq!(
        h.fake.calls(),
        2,
        "served from the cache, not fetched by the request"
    );
}

#[tokio::test]
async fn short_lived_credentials_refresh_at_half_life() {
    let h = Harness::start().await;
    h.fake.set_lifetime(Duration::from_secs(4));
    let t = token();
    assert_eq!(h.get(&t).await.status, 200);
    // Used, so refreshed at about 2 s (minus jitter), well before its 4 s expiry.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(h.fake.calls(), 2);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "pod_identity_refreshes_total{result=\"success\"}"),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn idle_entries_are_not_refreshed_and_expire() {
    let h = Harness::start().await;
    h.fake.set_lifetime(Duration::from_secs(3));
    let t = token();
    assert_eq!(h.get(&t).await.status, 200);
    // Refreshed once (it was used by the first request) ...
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(h.fake.calls(), 2);
    // ... but nobody used the new credentials, so they are left to expire and leave.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(h.fake.calls(), 2, "idle entries are not renewed");
    assert_eq!(h.agent.cache.len(), 0, "the expired entry left the cache");
    let m = h.metrics().await;
    assert!(
        metric(&m, "pod_identity_refreshes_total{result=\"idle\"}") >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn dormant_entry_used_again_is_refreshed_at_once() {
    let h =
        Harness::start_with(|s, _| s.cache.policy.max_retention = Duration::from_millis(500)).await;
    let t = token();
    assert_eq!(h.get(&t).await.status, 200);
    tokio::time::sleep(Duration::from_millis(700)).await; // refreshed (used)
    tokio::time::sleep(Duration::from_millis(700)).await; // skipped (idle): dormant
    assert_eq!(h.fake.calls(), 2);
    // A hit on a dormant entry past its refresh point is answered from memory and asks for a
    // refresh straight away.
    assert_eq!(h.get(&t).await.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.fake.calls(), 3);
}

#[tokio::test]
async fn static_stability_during_an_outage() {
    let h = Harness::start().await;
    // 8 s credentials: refresh point ~4 s, hard point ~5.3 s, expiry 7-8 s after the exchange
    // (EKS Auth expirations are whole seconds).
    h.fake.set_lifetime(Duration::from_secs(8));
    let t = token();
    let first = h.get(&t).await.json()["AccessKeyId"].clone();
    let fetched = Instant::now();
    // EKS Auth goes down: refreshes fail recoverably; the cached credentials keep being served,
    // past the refresh point and past the hard point, until they expire. The last request
    // starts by ~6.5 s: expiry can be as early as 7.0 s, and a loaded machine is slow.
    h.fake.respond_with("error-service-unavailable");
    while fetched.elapsed() < Duration::from_millis(6300) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let reply = h.get(&t).await;
        assert_eq!(
            reply.status,
            200,
            "at {:?}: {}",
            fetched.elapsed(),
            reply.text()
        );
        assert_eq!(reply.json()["AccessKeyId"], first);
    }
    let m = h.metrics().await;
    assert!(
        metric(
            &m,
            "pod_identity_refreshes_total{result=\"recoverable_error\"}"
        ) >= 1.0,
        "{m}"
    );
    // Requests past the hard point were answered from the cache, not refused.
    assert!(
        metric(
            &m,
            "pod_identity_request_duration_seconds_count{outcome=\"stale\"}"
        ) >= 2.0,
        "{m}"
    );
    // Backoff: not an exchange per request (13 requests; the SDK makes 3 attempts per exchange).
    assert!(h.fake.calls() <= 1 + 3 * 4, "calls: {}", h.fake.calls());
    // EKS Auth comes back: once the old credentials are gone, fresh ones.
    h.fake.respond_with("success");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reply = h.get(&t).await;
    assert_eq!(reply.status, 200);
    assert_ne!(reply.json()["AccessKeyId"], first);
}

#[tokio::test]
async fn refusals_of_the_token_evict() {
    for fixture in [
        "error-expired-token",
        "error-invalid-token",
        "error-resource-not-found",
    ] {
        let h =
            Harness::start_with(|s, _| s.cache.policy.max_retention = Duration::from_millis(300))
                .await;
        let t = token();
        assert_eq!(h.get(&t).await.status, 200);
        h.fake.respond_with(fixture);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            h.agent.cache.len(),
            0,
            "{fixture}: entry evicted by the failed refresh"
        );
        let want = load(fixture);
        let reply = h.get(&t).await;
        assert_eq!(
            u64::from(reply.status),
            want["agent"]["status"].as_u64().expect("status"),
            "{fixture}"
        );
        assert_eq!(reply.json()["code"], want["agent"]["code"], "{fixture}");
    }
}

/// A harness whose token's entry was renewed against `fixture`'s refusal: the entry must still
/// be served, with the credentials it had.
async fn refused_at_renewal(fixture: &str) -> Harness {
    let h =
        Harness::start_with(|s, _| s.cache.policy.max_retention = Duration::from_millis(300)).await;
    let t = token();
    let first = h.get(&t).await.json()["AccessKeyId"].clone();
    h.fake.respond_with(fixture);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(h.fake.calls() >= 2, "{fixture}: a renewal was refused");
    assert_eq!(h.agent.cache.len(), 1, "{fixture}: entry kept");
    let reply = h.get(&t).await;
    assert_eq!(reply.status, 200, "{fixture}: {}", reply.text());
    assert_eq!(reply.json()["AccessKeyId"], first, "{fixture}");
    h
}

#[tokio::test]
async fn refusals_of_the_node_credentials_keep_the_pods_credentials() {
    for fixture in [
        "error-access-denied",
        "error-node-key-unrecognized",
        "error-node-credentials-expired",
        "error-node-signature-invalid",
    ] {
        // The node's credentials go bad (a half-written hybrid credentials file, a role that
        // lost its permission): refreshes are refused, but that is not the pod's doing.
        let h = refused_at_renewal(fixture).await;
        let m = h.metrics().await;
        let code = load(fixture)["agent"]["code"]
            .as_str()
            .expect("code")
            .to_owned();
        assert!(
            metric(
                &m,
                &format!("pod_identity_node_credentials_refused_total{{code=\"{code}\"}}")
            ) >= 1.0,
            "{fixture}: {m}"
        );
        // A new pod gets the node's refusal, with its status and code.
        let reply = h.get(&token()).await;
        let want = load(fixture);
        assert_eq!(
            u64::from(reply.status),
            want["agent"]["status"].as_u64().expect("status"),
            "{fixture}"
        );
        assert_eq!(reply.json()["code"], want["agent"]["code"], "{fixture}");
    }
}

fn load(name: &str) -> serde_json::Value {
    support::fake_eks_auth::load_fixture(name)
}

#[tokio::test]
async fn lru_bound_evicts_least_recently_used() {
    let h = Harness::start_with(|s, _| s.cache.max_entries = 3).await;
    let tokens: Vec<String> = (0..3).map(|_| token()).collect();
    // moka records recency in housekeeping; `len()` runs it, as time passing would.
    for t in &tokens {
        assert_eq!(h.get(t).await.status, 200);
        h.agent.cache.len();
    }
    // Use the oldest again, then add a fourth: the least recently *used* (tokens[1]) goes.
    assert_eq!(h.get(&tokens[0]).await.status, 200);
    h.agent.cache.len();
    assert_eq!(h.get(&token()).await.status, 200);
    assert_eq!(h.agent.cache.len(), 3);
    let calls = h.fake.calls();
    assert_eq!(h.get(&tokens[0]).await.status, 200);
    assert_eq!(h.fake.calls(), calls, "recently used entry kept");
    assert_eq!(h.get(&tokens[1]).await.status, 200);
    assert_eq!(
        h.fake.calls(),
        calls + 1,
        "least recently used entry evicted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_burst_is_spread_within_the_budget_and_done_in_time() {
    // 15 entries created together with 6 s credentials, 5 refreshes/s: 3 s of refresh work.
    // Waiting for each refresh point (~2.7-3 s) would finish at ~5.8 s, past the hard point
    // (4 s) and nearly at expiry; starting early finishes by ~3 s without exceeding the rate.
    let h = Harness::start_with(|s, _| s.cache.refresh_qps = 5.0).await;
    h.fake.set_lifetime(Duration::from_secs(6));
    let tokens: Vec<String> = (0..15).map(|_| token()).collect();
    for t in &tokens {
        assert_eq!(h.get(t).await.status, 200);
    }
    let start = Instant::now();
    // Count from the 15 first exchanges, not from a sample taken now: the pull-ahead may
    // already have started the first refresh while the entries were being created.
    let created = tokens.len();
    let mut per_second = vec![0usize; 5];
    let mut last = created;
    for second in per_second.iter_mut() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = h.fake.calls();
        *second = now - last;
        last = now;
    }
    assert!(
        per_second.iter().all(|&n| n <= 6),
        "at most rate + 1 per second: {per_second:?}"
    );
    let done_by_4s: usize = per_second[..4].iter().sum();
    assert_eq!(
        done_by_4s,
        15,
        "all refreshed before the hard point: {per_second:?} ({:?})",
        start.elapsed()
    );
}

#[tokio::test]
async fn evicted_entries_leave_the_refresh_queue_at_once() {
    // 3 entries at most; 10 tokens exchanged. Each queued a refresh hours away; the 7 evicted
    // ones must leave the queue now, not when their deadline comes.
    let h = Harness::start_with(|s, _| s.cache.max_entries = 3).await;
    for _ in 0..10 {
        assert_eq!(h.get(&token()).await.status, 200);
        h.agent.cache.len();
    }
    let mut queued = f64::NAN;
    for _ in 0..50 {
        h.agent.cache.len();
        queued = metric(&h.metrics().await, "pod_identity_refresh_queue");
        if queued == 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(queued, 3.0, "one queued refresh per cached entry");
}

#[tokio::test]
async fn a_role_that_refuses_its_pod_is_the_pods_association_not_the_node() {
    let h = Harness::start().await;
    h.fake
        .answer_namespace("payments", "error-access-denied-trust-policy");
    let t = mint("payments", "api", 3600);
    let first = h.get(&t).await;
    assert_eq!(first.status, 400, "{}", first.text());
    assert_eq!(first.json()["code"], "AccessDeniedException");
    assert!(
        first.text().contains("must trust pods.eks.amazonaws.com"),
        "{}",
        first.text()
    );
    // Remembered for the token's full period, not the node's 5 s: no second call.
    let calls = h.fake.calls();
    let again = h.get(&t).await;
    assert!(again.text().contains("remembered"), "{}", again.text());
    assert_eq!(h.fake.calls(), calls);
    let m = h.metrics().await;
    assert_eq!(
        metric(
            &m,
            "pod_identity_node_credentials_refused_total{code=\"AccessDeniedException\"}"
        ),
        0.0,
        "not the node's: {m}"
    );
    assert_eq!(metric(&m, "pod_identity_node_refused_tokens"), 0.0, "{m}");
    // The node's own AccessDenied, for two pods' tokens: two distinct tokens, the alert's input.
    h.fake.respond_with("error-access-denied");
    for _ in 0..2 {
        assert_eq!(h.get(&token()).await.status, 400);
    }
    let m = h.metrics().await;
    assert_eq!(metric(&m, "pod_identity_node_refused_tokens"), 2.0, "{m}");
}

/// Review M5: an AccessDenied at a refresh, whatever its wording, never costs a pod the
/// credentials it holds; they are served until they expire.
#[tokio::test]
async fn an_access_denied_at_a_refresh_keeps_the_pods_credentials() {
    for fixture in [
        "error-access-denied-unworded",
        "error-access-denied-trust-policy",
    ] {
        let h = refused_at_renewal(fixture).await;
        // A new token gets the refusal, without EKS Auth's words.
        let reply = h.get(&token()).await;
        assert_eq!(reply.status, 400, "{fixture}");
        let message = reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(!message.contains("arn:aws"), "{fixture}: {message}");
    }
}

#[tokio::test]
async fn an_eviction_after_a_snapshot_reaches_the_successor() {
    let old =
        Harness::start_with(|s, _| s.cache.policy.max_retention = Duration::from_millis(300)).await;
    let t = mint("payments", "api", 3600);
    assert_eq!(old.get(&t).await.status, 200);
    assert_eq!(old.get(&t).await.status, 200, "used, so it is renewed");
    let (snapshot, next) = old.agent.cache.export(0);
    assert_eq!(snapshot.len(), 1);
    // After the snapshot, EKS Auth refuses the token at its renewal: the old agent evicts it.
    old.fake.answer_namespace("payments", "error-invalid-token");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let evicted = old.agent.cache.evicted_since(next);
    assert_eq!(evicted.len(), 1, "the eviction is remembered for the delta");
    let new = Harness::start().await;
    new.agent.cache.import(snapshot);
    new.agent.cache.forget(&evicted);
    // The successor does not revive it: the token goes to EKS Auth again.
    new.fake.answer_namespace("payments", "error-invalid-token");
    assert_eq!(new.get(&t).await.status, 400);
}
