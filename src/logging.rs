//! Log setup: JSON lines (default) or text, on stderr, so stdout stays free for output meant
//! for shells (the `dev` command's exports).
//!
//! Contract: the agent's own events follow `-v`; dependencies are held at `warn` (or `info`
//! when `-v` is debug or trace) because the SDK's HTTP stack logs request and response bodies
//! at its trace level, and those bodies carry tokens and credentials. No verbosity can make a
//! secret reach a log line.

use crate::cli::{LogArgs, LogFormat, Verbosity};
use tracing_subscriber::EnvFilter;

pub fn filter(v: Verbosity) -> EnvFilter {
    let (own, deps) = match v {
        Verbosity::Trace => ("trace", "info"),
        Verbosity::Debug => ("debug", "info"),
        Verbosity::Info => ("info", "warn"),
        Verbosity::Warn => ("warn", "warn"),
        Verbosity::Error => ("error", "error"),
    };
    EnvFilter::new(format!("{deps},pod_identity_agent={own}"))
}

/// Install the global subscriber; a second call (tests) is a no-op.
pub fn init(args: &LogArgs, default_format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(args.verbosity))
        .with_writer(std::io::stderr);
    let _ = match args.log_format.unwrap_or(default_format) {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}
