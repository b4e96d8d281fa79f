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
    pub refreshes: IntCounterVec,
    pub served_remaining: Histogram,
    /// Children of the labels every request uses, resolved once: `with_label_values` hashes its
    /// labels and takes a read lock on each call.
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub http_ok: IntCounter,
    durations: [(&'static str, Histogram); 5],
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
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
        let refreshes = counter(
            "pod_identity_refreshes_total",
            "Refresh-ahead decisions: success, recoverable_error, irrecoverable_error, idle (not used since the last refresh, left to expire), token_expired.",
            &["result"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "pod_identity_request_duration_seconds",
                "Credential request latency by outcome (hit, stale, miss, coalesced, error).",
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
        let eks_auth_in_flight = IntGauge::new(
            "pod_identity_eks_auth_in_flight",
            "EKS Auth exchanges under way.",
        )?;
        registry.register(Box::new(eks_auth_in_flight.clone()))?;
        let cache_entries = IntGauge::new(
            "pod_identity_cache_entries",
            "Credential entries in the cache.",
        )?;
        registry.register(Box::new(cache_entries.clone()))?;
        let durations = ["hit", "stale", "miss", "coalesced", "error"]
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
            refreshes,
            served_remaining,
        })
    }

    /// The latency histogram of one request outcome (hit, stale, miss, coalesced, error).
    pub fn request_duration(&self, outcome: &str) -> &Histogram {
        let found = self.durations.iter().find(|(o, _)| *o == outcome);
        &found.unwrap_or(&self.durations[4]).1
    }

    /// Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
