//! `server`'s abuse-resistance flags: what one pod may cost the node (remembered refusals,
//! exchange budgets, connection bounds), turned into the settings of admission, the negative
//! cache and the connection limits.
//!
//! Contract: every count and rate is at least 1 (refused at parse, exit 2), so the settings
//! built here never need clamping; durations are bounded the same way.

use super::parse::{duration_between, parse_rate, DAY, MINUTE, MS};
use crate::admission::AdmissionSettings;
use crate::cache::NegativeSettings;
use crate::defaults::*;
use crate::server::limits::ConnectionLimits;
use clap::Args;
use std::time::Duration;

/// What one pod may cost the node: remembered refusals, exchange budgets, connection bounds and
/// local token verification.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Abuse resistance")]
pub struct AbuseArgs {
    /// Remember EKS Auth's refusal of a token (invalid, expired, no association) this long;
    /// 0s turns remembering off. Refusals of the node's own credentials: at most 5s.
    #[arg(long, default_value = shown!(DEFAULT_NEGATIVE_CACHE_TTL),
          value_parser = duration_between(Duration::ZERO, DAY))]
    pub negative_cache_ttl: Duration,
    /// Most refusals remembered at once (separate from --max-cache-size).
    #[arg(long, default_value_t = DEFAULT_NEGATIVE_CACHE_SIZE, value_parser = clap::value_parser!(u64).range(1..))]
    pub negative_cache_size: u64,
    /// New exchanges per second one client (a verified pod; else a source address, the host's
    /// counted as one) may start, sustained. Cache hits are never limited.
    #[arg(long, default_value_t = DEFAULT_CLIENT_EXCHANGE_QPS, value_parser = parse_rate)]
    pub client_exchange_qps: f64,
    /// New exchanges one client may start at once before --client-exchange-qps applies.
    #[arg(long, default_value_t = DEFAULT_CLIENT_EXCHANGE_BURST, value_parser = clap::value_parser!(u32).range(1..))]
    pub client_exchange_burst: u32,
    /// Exchanges one client may have under way at once.
    #[arg(long, default_value_t = DEFAULT_CLIENT_MAX_CONCURRENT_EXCHANGES,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub client_max_concurrent_exchanges: u32,
    /// New exchanges per second for the whole node, sustained (refreshes are separate:
    /// --max-service-qps).
    #[arg(long, default_value_t = DEFAULT_EXCHANGE_QPS, value_parser = parse_rate)]
    pub exchange_qps: f64,
    /// New exchanges the node may start at once (a reboot's first requests).
    #[arg(long, default_value_t = DEFAULT_EXCHANGE_BURST, value_parser = clap::value_parser!(u32).range(1..))]
    pub exchange_burst: u32,
    /// New exchanges the node may have under way at once.
    #[arg(long, default_value_t = DEFAULT_MAX_CONCURRENT_EXCHANGES,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_exchanges: u32,
    /// How long a request may wait for the node's exchange budget before a 503.
    #[arg(long, default_value = shown!(DEFAULT_MAX_EXCHANGE_WAIT),
          value_parser = duration_between(Duration::ZERO, MINUTE))]
    pub max_exchange_wait: Duration,
    /// Open connections at once on the credential listeners; beyond it clients wait.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Open connections one client (a source address; the host's counted as one) may hold once
    /// the pool is three-quarters full; beyond it they are refused (429).
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_client: u32,
    /// A request's headers must arrive within this.
    #[arg(long, default_value = shown!(DEFAULT_HEADER_TIMEOUT),
          value_parser = duration_between(MS * 100, MINUTE * 10))]
    pub header_timeout: Duration,
}

impl AbuseArgs {
    pub fn admission(&self) -> AdmissionSettings {
        AdmissionSettings {
            client_qps: self.client_exchange_qps,
            client_burst: self.client_exchange_burst,
            client_concurrency: self.client_max_concurrent_exchanges as usize,
            node_qps: self.exchange_qps,
            node_burst: self.exchange_burst,
            node_concurrency: self.max_concurrent_exchanges as usize,
            node_wait: self.max_exchange_wait,
            ..AdmissionSettings::default()
        }
    }

    pub fn connections(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections as usize,
            max_per_client: self.max_connections_per_client as usize,
            header_timeout: self.header_timeout,
        }
    }

    pub fn negative(&self) -> NegativeSettings {
        NegativeSettings {
            ttl: self.negative_cache_ttl,
            max_entries: self.negative_cache_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::server_args as server;

    /// Every count and rate here means nothing at zero: refused where it is parsed (exit 2),
    /// never clamped to 1 downstream. Each flag parses at 1, so the refusal is the value's.
    #[test]
    fn zero_counts_and_rates_are_refused_where_parsed() {
        for flag in [
            "--negative-cache-size",
            "--client-exchange-qps",
            "--client-exchange-burst",
            "--client-max-concurrent-exchanges",
            "--exchange-qps",
            "--exchange-burst",
            "--max-concurrent-exchanges",
            "--max-connections",
            "--max-connections-per-client",
            "--max-cache-size",
            "--max-service-qps",
        ] {
            let one = format!("{flag}=1");
            assert!(server(&["-c", "c", &one]).is_ok(), "{one}");
            for bad in ["0", "-1", "x"] {
                let arg = format!("{flag}={bad}");
                let err = server(&["-c", "c", &arg]).expect_err(&arg);
                assert_eq!(err.exit_code(), 2, "{arg}");
                assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{arg}");
            }
        }
    }
}
