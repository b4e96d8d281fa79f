//! Log setup: JSON lines (default) or text, on stderr, so stdout stays free for output meant
//! for shells (the `dev` command's exports).
//!
//! Contract: the agent's own events follow `-v`; dependencies are held at `warn` (or `info`
//! when `-v` is debug or trace) because the SDK's HTTP stack logs request and response bodies
//! at its trace level, and those bodies carry tokens and credentials. No verbosity can make a
//! secret reach a log line. Lines are handed to a writer thread through a bounded queue of
//! [`QUEUED_LINES`]: a runtime worker never blocks on stderr (a container runtime that reads the
//! log pipe slowly), and when the queue is full the line is dropped and counted
//! ([`dropped_lines`], `pod_identity_log_lines_dropped_total`). [`finish`] flushes the queue at
//! exit.

use crate::cli::{LogArgs, LogFormat, Verbosity};
use std::sync::{Mutex, OnceLock};
use tracing::level_filters::LevelFilter;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::Targets;

/// Lines waiting for stderr at most; beyond, lines are dropped (and counted), not waited for.
pub const QUEUED_LINES: usize = 16 * 1024;

/// The writer's drop count and its flush guard, once logging is set up.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();
static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

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
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let counter = writer.error_counter();
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let registry = tracing_subscriber::registry().with(filter(args.verbosity, !args.no_audit_log));
    let installed = match args.log_format.unwrap_or(default_format) {
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
    if installed.is_ok() {
        let _ = DROPPED.set(counter);
        *GUARD.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
    }
}

/// Lines dropped because the writer could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Write out what is queued; lines logged after this are lost. Call once, at exit.
pub fn finish() {
    drop(GUARD.lock().unwrap_or_else(|p| p.into_inner()).take());
}
