//! The metric families, registered once per agent on its own registry.
//!
//! Contract: the reference agent's three counters keep their names and labels, so existing
//! dashboards and alerts work unchanged: `pod_identity_http_response{code}`,
//! `pod_identity_cache_state{state=miss|hit|evicted}` (here `hit` counts real cache hits, not
//! renewals) and `pod_identity_cache_errors{type=Recoverable|NonRecoverable,code}`. Everything
//! else an operator needs is added under the `pod_identity_` prefix. Label values are bounded
//! sets (outcomes, status codes, EKS Auth error codes): never a token, pod or account.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Holds a gauge one higher for as long as it lives.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: &IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Seconds; from a cache hit (tens of µs) to an EKS Auth call at its overall deadline.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Seconds of validity left in served credentials; the edges SDKs care about (5, 10, 15 min).
const REMAINING_BUCKETS: &[f64] = &[
    60.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 3600.0, 7200.0, 10800.0, 21600.0,
];

pub struct Metrics {
    registry: Registry,
    pub http_response: IntCounterVec,
    pub cache_state: IntCounterVec,
    pub cache_errors: IntCounterVec,
    pub eks_auth_duration: Histogram,
    pub eks_auth_calls: IntCounterVec,
    pub eks_auth_in_flight: IntGauge,
    pub cache_entries: IntGauge,
    /// `--max-cache-size`, so "cache near full" is one ratio in an alert, not a copied flag.
    pub cache_capacity: IntGauge,
    /// 1 when `/readyz` would pass its in-process checks; an alert needs a number, not a probe.
    pub ready: IntGauge,
    pub refreshes: IntCounterVec,
    pub served_remaining: Histogram,
    /// Panics of the refresh scheduler's loop (each followed by a restart, or by the agent
    /// reporting not ready after too many).
    pub scheduler_panics: IntCounter,
    /// EKS Auth refusals of the node's own credentials, by code: the pods keep their cached
    /// credentials, but new pods get none until the node's credentials are fixed.
    pub node_refused: IntCounterVec,
    /// Distinct tokens refused for the node's own credentials in the last five minutes (set at
    /// each scrape): one pod's misconfiguration is one token, a node's broken credentials many.
    pub node_refused_tokens: IntGauge,
    /// Requests answered with a refusal without asking EKS Auth, by reason.
    pub rejected_locally: IntCounterVec,
    /// Refusals remembered in the negative cache.
    pub negative_entries: IntGauge,
    /// Local token verifications by result: verified, refused, unverifiable (no keys could
    /// say: the token went to EKS Auth unverified).
    pub verifications: IntCounterVec,
    /// Fetches of the cluster's signing keys by result (ok, failed).
    pub key_fetches: IntCounterVec,
    /// Seconds since the verification keys held were fetched (set at each scrape).
    pub keys_age: prometheus::Gauge,
    /// Verified tokens a pod's kubelet rotated, served from the pod's cached credentials.
    pub rotated_tokens: IntCounter,
    /// Log lines dropped because stderr could not keep up (the writer's queue was full).
    pub log_lines_dropped: IntCounter,
    /// Held while `log_lines_dropped` catches up with the writer's count: two scrapes at once
    /// must not both add the same difference.
    log_lines_sync: std::sync::Mutex<()>,
    /// Calls to the Kubernetes API server by result.
    pub kube_requests: IntCounterVec,
    /// Refusals reported as Events, by the object (pod, node) and what became of each.
    pub events: IntCounterVec,
    /// The startup taint's removal, by result.
    pub startup_taint: IntCounterVec,
    /// Connections open on all listeners.
    pub open_connections: IntGauge,
    /// Handovers by role (successor, predecessor) and result (started, completed,
    /// completed_without_delta, failed, abandoned, stranger, unauthenticated, resumed).
    pub handover: IntCounterVec,
    /// Cache entries handed over, by direction (sent, received).
    pub handover_entries: IntCounterVec,
    /// How long the last handover took, by role.
    pub handover_seconds: prometheus::GaugeVec,
    /// Refreshes queued or waiting for budget: a backlog that keeps growing means
    /// `--max-service-qps` is too low for the node's pods.
    pub refresh_queue: IntGauge,
    /// Children of the labels every request uses, resolved once: `with_label_values` hashes its
    /// labels and takes a read lock on each call.
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub http_ok: IntCounter,
    durations: [(&'static str, Histogram); 6],
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        // Register `metric` and hand back a handle to it.
        fn registered<M: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            metric: M,
        ) -> Result<M, prometheus::Error> {
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        }
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let http_response = counter(
            "pod_identity_http_response",
            "Credential responses by HTTP status code.",
            &["code"],
        )?;
        let cache_state = counter(
            "pod_identity_cache_state",
            "Cache lookups (hit, miss) and entries removed (evicted).",
            &["state"],
        )?;
        let cache_errors = counter(
            "pod_identity_cache_errors",
            "Failed EKS Auth exchanges by kind (Recoverable, NonRecoverable) and error code.",
            &["type", "code"],
        )?;
        let eks_auth_calls = counter(
            "pod_identity_eks_auth_calls_total",
            "EKS Auth exchanges by result code (Success or the error code).",
            &["code"],
        )?;
        let node_refused = counter(
            "pod_identity_node_credentials_refused_total",
            "EKS Auth refusals of the node's own credentials or permissions, by code; pods keep their cached credentials.",
            &["code"],
        )?;
        let rejected_locally = counter(
            "pod_identity_rejected_locally_total",
            "Requests refused without an EKS Auth call, by reason: negative_cache, client_budget, node_budget, signature, other_node, connection_limit.",
            &["reason"],
        )?;
        let verifications = counter(
            "pod_identity_token_verifications_total",
            "Local token verifications by result: verified, refused, unverifiable (sent on to EKS Auth unverified).",
            &["result"],
        )?;
        let key_fetches = counter(
            "pod_identity_verification_key_fetches_total",
            "Fetches of the cluster's token signing keys by result (ok, failed).",
            &["result"],
        )?;
        let kube_requests = counter(
            "pod_identity_kube_api_requests_total",
            "Calls to the Kubernetes API server by result (ok, forbidden, not_found, conflict, client_error, server_error, unreachable, no_token).",
            &["result"],
        )?;
        let events = counter(
            "pod_identity_events_total",
            "Refusals reported as Kubernetes Events, by object (pod, node) and result: sent (an Event created), updated (a series' count sent), deduplicated (counted into an Event of the same pod and reason), rate_limited (the node's Event budget was spent; sent as it refills), unverified (no pod Event: the token is not verified, expired over 24 h ago or names another node, or verifying expired tokens for Events is over its budget), dropped (the queue or the table was full, or a full table gave up an ended series' last count), failed (the API server refused or did not answer).",
            &["object", "result"],
        )?;
        let startup_taint = counter(
            "pod_identity_startup_taint_total",
            "The node's startup taint (--node-startup-taint): removed, absent; forbidden, not_found, failed, conflict and retried per round along the way (every failure is retried). A re-check counts only a removal.",
            &["result"],
        )?;
        let node_refused_tokens = registered(
            &registry,
            IntGauge::new(
                "pod_identity_node_refused_tokens",
                "Distinct tokens EKS Auth refused for the node's own credentials in the last five minutes.",
            )?,
        )?;
        let keys_age = registered(
            &registry,
            prometheus::Gauge::new(
                "pod_identity_verification_keys_age_seconds",
                "Seconds since the verification keys held were fetched.",
            )?,
        )?;
        let log_lines_dropped = registered(
            &registry,
            IntCounter::new(
                "pod_identity_log_lines_dropped_total",
                "Log lines dropped because stderr could not keep up (the writer's queue was full).",
            )?,
        )?;
        let rotated_tokens = registered(
            &registry,
            IntCounter::new(
                "pod_identity_rotated_tokens_total",
                "Verified tokens a pod's kubelet rotated, answered from the pod's cached credentials with no EKS Auth call.",
            )?,
        )?;
        let handover = counter(
            "pod_identity_handover_total",
            "Handovers between an agent and its successor, by role (successor, predecessor) and result (started, completed, completed_without_delta, failed, abandoned: a peer never committed, stranger: a peer of another user was closed, unauthenticated: a peer that could not prove it read the name file was closed, resumed: the predecessor serves again after its successor failed or went).",
            &["role", "result"],
        )?;
        let handover_entries = counter(
            "pod_identity_handover_entries_total",
            "Cached entries handed over, by direction (sent, received).",
            &["direction"],
        )?;
        let handover_seconds = registered(
            &registry,
            prometheus::GaugeVec::new(
                Opts::new(
                    "pod_identity_handover_duration_seconds",
                    "How long the last handover took, by role.",
                ),
                &["role"],
            )?,
        )?;
        let refreshes = counter(
            "pod_identity_refreshes_total",
            "Refresh-ahead decisions: success, recoverable_error, irrecoverable_error, idle (not used since the last refresh, left to expire), token_expired.",
            &["result"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "pod_identity_request_duration_seconds",
                "Credential request latency by outcome (hit, stale, miss, coalesced, rotated, error).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["outcome"],
        )?;
        registry.register(Box::new(request_duration.clone()))?;
        let eks_auth_duration = Histogram::with_opts(
            HistogramOpts::new(
                "pod_identity_eks_auth_duration_seconds",
                "EKS Auth exchange latency, retries included.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(eks_auth_duration.clone()))?;
        let served_remaining = Histogram::with_opts(
            HistogramOpts::new(
                "pod_identity_served_credential_remaining_seconds",
                "Validity left in the credentials handed to pods.",
            )
            .buckets(REMAINING_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(served_remaining.clone()))?;
        let eks_auth_in_flight = registered(
            &registry,
            IntGauge::new(
                "pod_identity_eks_auth_in_flight",
                "EKS Auth exchanges under way.",
            )?,
        )?;
        let cache_entries = registered(
            &registry,
            IntGauge::new(
                "pod_identity_cache_entries",
                "Credential entries in the cache.",
            )?,
        )?;
        let cache_capacity = registered(
            &registry,
            IntGauge::new(
                "pod_identity_cache_capacity",
                "Entries the cache holds before it evicts the least recently used (--max-cache-size).",
            )?,
        )?;
        let ready = registered(
            &registry,
            IntGauge::new(
                "pod_identity_ready",
                "1 when every credential listener accepts and the refresh scheduler runs, else 0.",
            )?,
        )?;
        let scheduler_panics = registered(
            &registry,
            IntCounter::new(
                "pod_identity_scheduler_panics_total",
                "Panics of the refresh scheduler; each is logged and followed by a restart.",
            )?,
        )?;
        let negative_entries = registered(
            &registry,
            IntGauge::new(
                "pod_identity_negative_cache_entries",
                "Token refusals remembered (answered without asking EKS Auth).",
            )?,
        )?;
        let open_connections = registered(
            &registry,
            IntGauge::new(
                "pod_identity_open_connections",
                "Connections open on the agent's listeners.",
            )?,
        )?;
        let refresh_queue = registered(
            &registry,
            IntGauge::new(
                "pod_identity_refresh_queue",
                "Refreshes queued or waiting for budget (--max-service-qps).",
            )?,
        )?;
        let durations = ["hit", "stale", "miss", "coalesced", "rotated", "error"]
            .map(|outcome| (outcome, request_duration.with_label_values(&[outcome])));
        Ok(Metrics {
            cache_hits: cache_state.with_label_values(&["hit"]),
            cache_misses: cache_state.with_label_values(&["miss"]),
            http_ok: http_response.with_label_values(&["200"]),
            durations,
            registry,
            http_response,
            cache_state,
            cache_errors,
            eks_auth_duration,
            eks_auth_calls,
            eks_auth_in_flight,
            cache_entries,
            cache_capacity,
            ready,
            refreshes,
            served_remaining,
            scheduler_panics,
            refresh_queue,
            node_refused,
            node_refused_tokens,
            rejected_locally,
            negative_entries,
            open_connections,
            verifications,
            key_fetches,
            keys_age,
            rotated_tokens,
            log_lines_dropped,
            log_lines_sync: std::sync::Mutex::new(()),
            kube_requests,
            events,
            startup_taint,
            handover,
            handover_entries,
            handover_seconds,
        })
    }

    /// Bring `log_lines_dropped` up to `dropped`, the log writer's own count.
    pub fn sync_log_lines_dropped(&self, dropped: u64) {
        let _one = self
            .log_lines_sync
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.log_lines_dropped
            .inc_by(dropped.saturating_sub(self.log_lines_dropped.get()));
    }

    /// Counts one EKS Auth exchange as under way until the guard is dropped, also when the
    /// exchange's task panics or is aborted.
    pub fn eks_auth_in_flight_guard(&self) -> GaugeGuard {
        GaugeGuard::new(&self.eks_auth_in_flight)
    }

    /// The latency histogram of one request outcome (hit, stale, miss, coalesced, rotated, error).
    pub fn request_duration(&self, outcome: &str) -> &Histogram {
        let found = self.durations.iter().find(|(o, _)| *o == outcome);
        &found.unwrap_or(&self.durations[5]).1
    }

    /// Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
