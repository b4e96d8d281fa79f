//! What the integration tests share: the fake EKS Auth, an agent on loopback wired to it,
//! token minting and a small HTTP client.

pub mod alone;
pub mod audit_schema;
pub mod fake_eks_api;
pub mod fake_eks_auth;
pub mod fake_kube;
pub mod jwt;
pub mod manifest;
pub mod netns;
pub mod node;
pub mod pod;
pub mod process;
pub mod python;
pub mod recording_proxy;

use bytes::Bytes;
use fake_eks_auth::FakeEksAuth;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use pod_identity_agent::admission::AdmissionSettings;
use pod_identity_agent::cache::CacheSettings;
use pod_identity_agent::eks_auth::{EksAuthClient, ExchangeSettings};
use pod_identity_agent::metrics::Metrics;
use pod_identity_agent::server::limits::ConnectionLimits;
use pod_identity_agent::server::{RunningServer, Server, ServerSettings};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const CLUSTER: &str = "my-cluster";

/// A loopback port nothing listens on now (bound and released), for agents that must be started
/// on a known port and for "nothing answers here"; never the same one twice in this process.
///
/// Taken below the kernel's ephemeral range (32768 and up by default), which every `:0` bind and
/// every outgoing connection, of every test in this binary and of anything else on the machine,
/// draws from: a port handed out from there can be taken by one of them before the agent binds
/// it. Each process starts at its own point of the range, by its process id.
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 32_768 - FIRST;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + start.wrapping_add(n) % COUNT).expect("a port");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range");
}

pub use alone::alone;
pub use jwt::namespace_of;
pub use process::NODE_ACCESS_KEY_ID;

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Held by the tests that flood this process with requests, or time a pod beside a flood: one
/// at a time in the whole binary, as when each feature was a binary of its own, so no flood
/// skews another's figures. A tokio mutex: held across awaits, and never poisoned by a failure.
pub static FLOODS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A projected-token-shaped JWT (unsigned: the agent does not verify, the fake does not care).
/// Each call yields a distinct token.
pub fn mint(namespace: &str, sa: &str, ttl_secs: i64) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let now = now_secs() as i64;
    jwt::encode_unsigned(
        &json!({"alg": "RS256", "kid": "test-key"}),
        &json!({
            "aud": ["pods.eks.amazonaws.com"], "exp": now + ttl_secs, "iat": now, "nbf": now,
            "iss": "https://oidc.eks.us-west-2.amazonaws.com/id/EXAMPLE",
            "sub": format!("system:serviceaccount:{namespace}:{sa}"), "jti": format!("jti-{n}-{now}"),
            "kubernetes.io": {"namespace": namespace, "pod": {"name": format!("pod-{n}"), "uid": format!("uid-{n}")},
                              "serviceaccount": {"name": sa, "uid": "sa-uid"}}
        }),
    )
}

pub fn token() -> String {
    mint("default", "app", 86400)
}

pub fn settings() -> ServerSettings {
    ServerSettings {
        bind_hosts: vec!["127.0.0.1".parse().expect("ip")],
        port: 0,
        probe_addr: Some("127.0.0.1:0".parse().expect("addr")),
        metrics_addr: Some("127.0.0.1:0".parse().expect("addr")),
        cache: CacheSettings {
            refresh_qps: 50.0,
            ..CacheSettings::default()
        },
        leeway: Duration::from_secs(60),
        shutdown_grace: Duration::from_secs(2),
        // Tests of other behaviour make many first exchanges from one address; the abuse tests
        // set real budgets.
        admission: AdmissionSettings::unlimited(),
        verification: None,
        node_name: None,
        client_ipv6_prefix: 128,
        connections: ConnectionLimits {
            max_connections: 20_000,
            max_per_client: 20_000,
            ..ConnectionLimits::default()
        },
        events: None,
        kube: None,
    }
}

/// SDK config with static node credentials and a region: nothing reaches IMDS.
pub async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-west-2"))
        .credentials_provider(aws_credential_types::Credentials::new(
            NODE_ACCESS_KEY_ID,
            "node-secret",
            None,
            None,
            "test",
        ))
        .load()
        .await
}

pub struct Harness {
    pub fake: FakeEksAuth,
    pub agent: RunningServer,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(|_, _| {}).await
    }

    pub async fn start_with(
        tweak: impl FnOnce(&mut ServerSettings, &mut ExchangeSettings),
    ) -> Harness {
        let fake = FakeEksAuth::start(CLUSTER).await;
        let mut s = settings();
        let mut x = ExchangeSettings::new(CLUSTER);
        x.endpoint = Some(fake.endpoint());
        tweak(&mut s, &mut x);
        let source = Arc::new(EksAuthClient::new(&sdk_config().await, &x));
        let agent = Server::start(&s, source, Arc::new(Metrics::new().expect("metrics")))
            .await
            .expect("agent starts");
        Harness { fake, agent }
    }

    pub fn addr(&self) -> SocketAddr {
        self.agent.credential_addrs[0]
    }

    pub async fn get(&self, token: &str) -> Reply {
        get(self.addr(), "/v1/credentials", &[("authorization", token)]).await
    }

    pub async fn metrics(&self) -> String {
        let addr = self.agent.metrics_addr.expect("metrics listener");
        get(addr, "/metrics", &[]).await.text()
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One GET on a fresh connection, with `Host` set to the address unless given.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    request(addr, "GET", path, headers).await
}

pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    request_result(addr, method, path, headers)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"))
}

/// One GET on a fresh connection; an error if the connection fails or is closed unanswered.
pub async fn get_result(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    request_result(addr, "GET", path, headers).await
}

pub async fn request_result(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    request_from(None, addr, method, path, headers).await
}

/// One GET from source address `from` (any 127.x.y.z is local: one address per simulated pod).
pub async fn get_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    request_from(Some(from), addr, "GET", path, headers)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {addr} from {from}: {e}"))
}

/// A TCP connection to `addr`, from `from` if given.
pub async fn connect_from(
    from: Option<std::net::IpAddr>,
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let Some(from) = from else {
        return tokio::net::TcpStream::connect(addr).await;
    };
    let socket = if from.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

pub async fn request_from(
    from: Option<std::net::IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let stream = connect_from(from, addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", addr.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("response: {e}"))?;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// A metric's value from the exposition text, by its full sample name with labels.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `pod_identity_token_verifications_total` for `result`, from the exposition text.
pub fn verifications(text: &str, result: &str) -> f64 {
    metric(
        text,
        &format!("pod_identity_token_verifications_total{{result=\"{result}\"}}"),
    )
}

/// An emulator (EKS Auth and OIDC issuer) on loopback, in this process, with its state dir.
pub struct Emulated {
    pub emu: Arc<pod_identity_agent::emulator::Emulator>,
    pub addr: SocketAddr,
    pub stop: tokio_util::sync::CancellationToken,
    /// The issuer's keys live here until the emulator is dropped.
    _dir: tempfile::TempDir,
}

pub async fn emulator() -> Emulated {
    use pod_identity_agent::emulator::{
        associations::Associations, issuer::Issuer, minting::Minting, Emulator,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let issuer = Arc::new(Issuer::load_or_create(dir.path()).expect("issuer"));
    let emu = Arc::new(Emulator::new(issuer, Associations::Default, Minting::Fake));
    let bound = pod_identity_agent::server::bind::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = bound.addr;
    let stop = tokio_util::sync::CancellationToken::new();
    emu.clone().serve(
        bound,
        stop.clone(),
        pod_identity_agent::server::listener::Connections::default(),
    );
    Emulated {
        emu,
        addr,
        stop,
        _dir: dir,
    }
}

/// Local verification against the emulator's issuer at `emu_addr` (its discovery document).
pub fn verify_with_issuer(
    emu_addr: SocketAddr,
) -> pod_identity_agent::verify::VerificationSettings {
    use pod_identity_agent::verify::{KeysFrom, VerificationSettings, VerifySettings};
    VerificationSettings {
        keys: KeysFrom::Issuer {
            issuer: pod_identity_agent::emulator::issuer::Issuer::ISSUER.to_owned(),
            discovery_url: format!("http://{emu_addr}/.well-known/openid-configuration"),
        },
        verify: VerifySettings::default(),
    }
}

/// The (fake) API server at `url`, with a token file of its own: plain http, a 2 s timeout.
pub fn kube_settings(
    url: &str,
    token_file: &std::path::Path,
) -> pod_identity_agent::kube::KubeSettings {
    let mut kube = pod_identity_agent::kube::KubeSettings::new(url.to_owned());
    kube.token_file = token_file.to_owned();
    kube.ca_file = None;
    kube.timeout = Duration::from_secs(2);
    kube
}

/// Local verification against a (fake) API server at `url` ([`kube_settings`]), set on `s`; the
/// verification settings, to adjust.
pub fn verify_with_api_server<'a>(
    s: &'a mut ServerSettings,
    url: &str,
    token_file: &std::path::Path,
) -> &'a mut pod_identity_agent::verify::VerificationSettings {
    use pod_identity_agent::verify::{KeysFrom, VerificationSettings, VerifySettings};
    s.kube = Some(kube_settings(url, token_file));
    s.verification.insert(VerificationSettings {
        keys: KeysFrom::ApiServer,
        verify: VerifySettings::default(),
    })
}
