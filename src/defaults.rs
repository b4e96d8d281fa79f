//! Every default the agent runs with, in one place: one `DEFAULT_*` per setting.
//!
//! Contract: the command line ([`crate::cli`]) shows and parses these, and the `Default` impls
//! of the settings types (`CacheSettings`, `NegativeSettings`, `AdmissionSettings`,
//! `ConnectionLimits`, `VerifySettings`) and `ExchangeSettings::new` read them, so a library
//! caller, `server` and `dev` start from the same values; a test in `cli` holds clap's parsed
//! defaults to the `Default` impls. Where the reference agent (the EKS Pod Identity Agent) has
//! the flag, the value is the reference agent's and its test says so; the rest are ours, listed
//! in the README's flag table. Durations are whole milliseconds, shown by clap in Go's notation
//! (`5s`, `3h`). Enum defaults are the names clap parses, so this module names no `cli` type.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// --- The credential addresses (`server`, `init`) ---

/// EKS Pod Identity's IPv4 link-local address, which the EKS webhook points pods at.
pub const POD_IDENTITY_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// EKS Pod Identity's IPv6 address, which the EKS webhook points IPv6 pods at.
pub const POD_IDENTITY_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);
/// `--bind-hosts`: both credential addresses (the reference agent's).
pub const DEFAULT_BIND_HOSTS: [IpAddr; 2] =
    [IpAddr::V4(POD_IDENTITY_IPV4), IpAddr::V6(POD_IDENTITY_IPV6)];

// --- `server`: listeners ---

/// `--port`: the port of the credential listeners (the reference agent's; the webhook's URL).
pub const DEFAULT_PORT: u16 = 80;
/// `--probe-port`: /healthz and /readyz (the reference agent's; its manifests probe it).
pub const DEFAULT_PROBE_PORT: u16 = 2703;
/// `--metrics-address`: every interface (the reference agent's).
pub const DEFAULT_METRICS_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// `--metrics-port` (the reference agent's).
pub const DEFAULT_METRICS_PORT: u16 = 2705;

// --- `server`: the cache and its refreshes ---

/// `--max-credential-retention-before-renewal` (the reference agent's 3 h).
pub const DEFAULT_MAX_CREDENTIAL_RETENTION: Duration = secs(3 * 3600);
/// `--max-cache-size`: pods whose credentials are cached (the reference agent's).
pub const DEFAULT_MAX_CACHE_SIZE: u64 = 2000;
/// `--max-service-qps`: refresh-ahead exchanges per second (the reference agent's).
pub const DEFAULT_MAX_SERVICE_QPS: u32 = 3;
/// Refresh exchanges under way at once, within `--max-service-qps` (ours; no flag).
pub const DEFAULT_REFRESH_CONCURRENCY: usize = 16;
/// `--rotate-credentials`: off (the reference agent's), on only for hybrid nodes.
pub const DEFAULT_ROTATE_CREDENTIALS: bool = false;

// --- `server`: the exchange with EKS Auth ---

/// `--eks-auth-timeout`: one exchange, retries included (ours).
pub const DEFAULT_EKS_AUTH_TIMEOUT: Duration = secs(4);
/// Connecting to EKS Auth, per attempt (ours; no flag).
pub const DEFAULT_EKS_AUTH_CONNECT_TIMEOUT: Duration = secs(1);
/// One attempt of an exchange: leaves room for a retry within `--eks-auth-timeout` (no flag).
pub const DEFAULT_EKS_AUTH_ATTEMPT_TIMEOUT: Duration = secs(2);
/// Attempts of one exchange, the first included (the SDK's standard retry mode's; no flag).
pub const DEFAULT_EKS_AUTH_ATTEMPTS: u32 = 3;

// --- `server`: requests and lifecycle ---

/// `--token-leeway`: clock skew allowed on a token's exp and nbf (ours).
pub const DEFAULT_TOKEN_LEEWAY: Duration = secs(60);
/// `--shutdown-grace`: in-flight requests' time after SIGTERM, well within the kubelet's
/// default 30 s termination grace (ours).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = secs(5);
/// `--state-dir` (and `POD_IDENTITY_AGENT_STATE_DIR`): where the manifests mount the agent's
/// state (ours).
pub const DEFAULT_STATE_DIR: &str = "/run/pod-identity-agent";

// --- `server`: identity (local verification, node binding, Kubernetes) ---

/// `--token-verification`: the issuer if given, else the API server in a cluster, else off.
pub const DEFAULT_TOKEN_VERIFICATION: &str = "auto";
/// `--kube-token-file`: where Kubernetes mounts a pod's service-account token.
pub const DEFAULT_KUBE_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// `--kube-ca-file`: where Kubernetes mounts the API server's CA.
pub const DEFAULT_KUBE_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// `--client-ipv6-prefix`: each IPv6 address its own client (ours).
pub const DEFAULT_CLIENT_IPV6_PREFIX: u8 = 128;
/// `--events`: off unless asked for; the manifests ask (ours).
pub const DEFAULT_EVENTS: bool = false;

/// Local verification: the least time between key fetches that tokens cause.
pub const DEFAULT_VERIFY_FETCH_FLOOR: Duration = secs(1);
/// Local verification: an unknown `kid` fetches again only this long after the last attempt.
pub const DEFAULT_VERIFY_MIN_REFRESH_INTERVAL: Duration = secs(30);
/// Local verification: keys are fetched again this often regardless.
pub const DEFAULT_VERIFY_REFRESH_EVERY: Duration = secs(3600);
/// Local verification: one key fetch may take this long.
pub const DEFAULT_VERIFY_FETCH_TIMEOUT: Duration = secs(5);
/// Local verification: keys the issuer stopped publishing stay trusted this long (rotation).
pub const DEFAULT_VERIFY_GRACE: Duration = secs(15 * 60);
/// Local verification: how long a request waits for a fetch it needs.
pub const DEFAULT_VERIFY_WAIT_FOR_KEYS: Duration = Duration::from_millis(1500);

// --- `server`: handover ---

/// `--handover-dir` (and `POD_IDENTITY_AGENT_HANDOVER_DIR`): shared by the agents that follow
/// each other on a node (ours).
pub const DEFAULT_HANDOVER_DIR: &str = "/run/pod-identity-agent";
/// `--handover-wait`: how long a terminating agent serves on, waiting for its successor (ours).
pub const DEFAULT_HANDOVER_WAIT: Duration = secs(5);
/// `--handover-timeout`: each handover step; two agents on one node answer in milliseconds
/// (ours).
pub const DEFAULT_HANDOVER_TIMEOUT: Duration = secs(2);

// --- `server`: abuse resistance ---

/// `--negative-cache-ttl`: how long a token's refusal is remembered (ours).
pub const DEFAULT_NEGATIVE_CACHE_TTL: Duration = secs(60);
/// `--negative-cache-size`: refusals remembered at once (ours).
pub const DEFAULT_NEGATIVE_CACHE_SIZE: u64 = 10_000;
/// `--client-exchange-qps`: new exchanges per second per client, sustained (ours).
pub const DEFAULT_CLIENT_EXCHANGE_QPS: f64 = 1.0;
/// `--client-exchange-burst`: new exchanges a client may start at once (ours).
pub const DEFAULT_CLIENT_EXCHANGE_BURST: u32 = 10;
/// `--client-max-concurrent-exchanges` (ours).
pub const DEFAULT_CLIENT_MAX_CONCURRENT_EXCHANGES: u32 = 4;
/// `--exchange-qps`: new exchanges per second for the node, sustained (ours).
pub const DEFAULT_EXCHANGE_QPS: f64 = 50.0;
/// `--exchange-burst`: room for a rebooted node's pods, which all ask at once (ours).
pub const DEFAULT_EXCHANGE_BURST: u32 = 200;
/// `--max-concurrent-exchanges` (ours).
pub const DEFAULT_MAX_CONCURRENT_EXCHANGES: u32 = 64;
/// `--max-exchange-wait`: many pods starting together is normal, so requests wait (ours).
pub const DEFAULT_MAX_EXCHANGE_WAIT: Duration = secs(2);
/// Clients whose budgets are tracked at once: far more than a node's pods (ours; no flag).
pub const DEFAULT_MAX_CLIENTS: u64 = 65_536;
/// `--max-connections`: open connections on the credential listeners (ours).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 2048;
/// `--max-connections-per-client`: a client's share once the pool is three-quarters full
/// (ours).
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: u32 = 128;
/// `--header-timeout`: a slow client holds a connection without a request at most this long
/// (ours).
pub const DEFAULT_HEADER_TIMEOUT: Duration = secs(3);

// --- Logging (every command) ---

/// `--verbosity` (the reference agent's).
pub const DEFAULT_VERBOSITY: &str = "info";

// --- `init` ---

/// `--link-name`: the link that holds the credential addresses (the reference agent's name).
pub const DEFAULT_LINK_NAME: &str = "pod-id-link0";

// --- `diagnose` ---

/// `diagnose --timeout`: for the agent and for STS (ours).
pub const DEFAULT_DIAGNOSE_TIMEOUT: Duration = secs(5);

// --- `dev`, `dev token`, `dev explain-access`, `emulate-eks-auth` (the `emulator` feature) ---

/// `dev --port`: an unprivileged port on 127.0.0.1.
#[cfg(feature = "emulator")]
pub const DEFAULT_DEV_PORT: u16 = 8080;
/// `dev --cross-account-role`: an example account's role, for the chained profile.
#[cfg(feature = "emulator")]
pub const DEFAULT_CROSS_ACCOUNT_ROLE: &str = "arn:aws:iam::444455556666:role/cross-account";
/// `--credential-source`: fake credentials, no AWS account needed.
#[cfg(feature = "emulator")]
pub const DEFAULT_CREDENTIAL_SOURCE: &str = "fake";
/// `dev token --ttl`: a day.
#[cfg(feature = "emulator")]
pub const DEFAULT_TOKEN_TTL: Duration = secs(24 * 3600);
/// `dev token --audience`: Pod Identity's.
#[cfg(feature = "emulator")]
pub const DEFAULT_TOKEN_AUDIENCE: &str = crate::token::AUDIENCE;
/// `dev explain-access --session-name`.
#[cfg(feature = "emulator")]
pub const DEFAULT_EXPLAIN_SESSION_NAME: &str = "explain-access";
/// `emulate-eks-auth --listen`: loopback, next to `dev`'s port.
#[cfg(feature = "emulator")]
pub const DEFAULT_EMULATOR_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8090);
/// `--cluster-name` of the emulated cluster, and `--cluster-creator`: the emulator's.
#[cfg(feature = "emulator")]
pub use crate::emulator::{DEFAULT_CLUSTER, DEFAULT_CREATOR};

/// A default duration as clap shows and parses it, in Go's notation (`500ms`, `5s`, `3h`).
pub fn go_notation(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms != 0 && ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_back_as_themselves() {
        for d in [
            DEFAULT_MAX_CREDENTIAL_RETENTION,
            DEFAULT_EKS_AUTH_TIMEOUT,
            DEFAULT_TOKEN_LEEWAY,
            DEFAULT_SHUTDOWN_GRACE,
            DEFAULT_HANDOVER_WAIT,
            DEFAULT_HANDOVER_TIMEOUT,
            DEFAULT_NEGATIVE_CACHE_TTL,
            DEFAULT_MAX_EXCHANGE_WAIT,
            DEFAULT_HEADER_TIMEOUT,
            DEFAULT_DIAGNOSE_TIMEOUT,
            DEFAULT_TOKEN_TTL,
            DEFAULT_VERIFY_WAIT_FOR_KEYS,
            Duration::ZERO,
        ] {
            let text = go_notation(d);
            assert_eq!(crate::cli::parse_duration(&text), Ok(d), "{text}");
        }
        assert_eq!(go_notation(DEFAULT_MAX_CREDENTIAL_RETENTION), "3h");
        assert_eq!(go_notation(DEFAULT_TOKEN_LEEWAY), "60s");
        assert_eq!(go_notation(DEFAULT_VERIFY_WAIT_FOR_KEYS), "1500ms");
    }

    /// The flags' defaults are where in-cluster configuration finds the pod's credentials.
    #[test]
    fn kube_files_are_the_in_cluster_ones() {
        let k = crate::kube::KubeSettings::new("https://example".into());
        assert_eq!(k.token_file, std::path::Path::new(DEFAULT_KUBE_TOKEN_FILE));
        assert_eq!(
            k.ca_file.as_deref(),
            Some(std::path::Path::new(DEFAULT_KUBE_CA_FILE))
        );
    }
}
