//! Log setup: JSON lines (default) or text, on stderr, so stdout stays free for output meant
//! for shells (the `dev` command's exports).
//!
//! Contract: the agent's own events follow `-v`; dependencies are held at `warn` (or `info`
//! when `-v` is debug or trace) because the SDK's HTTP stack logs request and response bodies
//! at its trace level, and those bodies carry tokens and credentials. No verbosity can make a
//! secret reach a log line.

use crate::cli::{LogArgs, LogFormat, Verbosity};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;

/// Per-target levels only: `Targets` needs no regex engine (EnvFilter's cost ~1 MB of binary).
/// The audit trail ([`crate::audit`]) is at `info` whatever `v` says, unless `audit` is off:
/// turning debugging down must not turn accountability off.
pub fn filter(v: Verbosity, audit: bool) -> Targets {
    let (own, deps) = match v {
        Verbosity::Trace => (LevelFilter::TRACE, LevelFilter::INFO),
        Verbosity::Debug => (LevelFilter::DEBUG, LevelFilter::INFO),
        Verbosity::Info => (LevelFilter::INFO, LevelFilter::WARN),
        Verbosity::Warn => (LevelFilter::WARN, LevelFilter::WARN),
        Verbosity::Error => (LevelFilter::ERROR, LevelFilter::ERROR),
    };
    let audit = if audit {
        LevelFilter::INFO.max(own)
    } else {
        LevelFilter::OFF
    };
    Targets::new()
        .with_default(deps)
        .with_target("pod_identity_agent", own)
        .with_target(crate::audit::TARGET, audit)
}

/// Install the global subscriber; a second call (tests) is a no-op.
pub fn init(args: &LogArgs, default_format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter(args.verbosity, !args.no_audit_log));
    let _ = match args.log_format.unwrap_or(default_format) {
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Text => registry.with(fmt.with_ansi(false)).try_init(),
    };
}
