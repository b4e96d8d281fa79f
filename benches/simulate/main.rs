//! A day of a cluster in seconds: the real cache and refresh scheduler of every node on a
//! simulated clock, 10,000 pods over 24 hours, and what it costs in EKS Auth calls, beside the
//! reference agent's policy computed on the same workload.
//!
//! `cargo bench --bench simulate` (release build; the run itself takes seconds). The day, by
//! default (each overridable through `PIA_SIM_*`, see [`params`]): 50 nodes, 10,000 pods; 30 %
//! of them come and go (exponential lives, mean 4 h, a new pod taking the slot on the same node),
//! the rest run all day; a quarter with a target role (59-minute credentials), the rest 6 h;
//! kubelet rewrites each 24 h token at 80 % of its life; each pod's SDK (botocore) asks again
//! when what it holds has under 15 minutes left, and on every AWS call (one a minute) while the
//! answer still has under 15 minutes. A day of warm-up, so the measured day starts in steady
//! state for both (the reference renews a gone pod's entry until its 24 h token expires). Time is tokio's, paused: it jumps to the next timer whenever every task waits, so the
//! schedulers' own timers, bucket and backoff all run as they would, only without waiting.

mod ours;
mod reference;
mod workload;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use workload::{Agent, Params, Seen, HOUR, MINUTE};

/// A projected-token-shaped JWT with a meaningless signature (nothing here verifies it).
fn jwt(claims: &serde_json::Value) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"simulated"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(b"not-a-real-signature"),
    )
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn params() -> Params {
    Params {
        nodes: env("PIA_SIM_NODES", 50usize).max(1),
        pods: env("PIA_SIM_PODS", 10_000usize),
        hours: env("PIA_SIM_HOURS", 24i64).max(1),
        warmup_hours: env("PIA_SIM_WARMUP_HOURS", 24i64).max(0),
        churning: env("PIA_SIM_CHURNING", 0.3f64),
        churn_mean_hours: env("PIA_SIM_CHURN_MEAN_HOURS", 4.0f64),
        cross_account: env("PIA_SIM_CROSS_ACCOUNT", 0.25f64),
        seed: env("PIA_SIM_SEED", 21u64),
    }
}

/// What one agent did over the measured hours.
struct Summary {
    name: &'static str,
    seen: Seen,
    /// EKS Auth calls in each measured hour.
    hourly: Vec<u64>,
    peak_per_second: u32,
    /// Of the measured calls, those for 59-minute credentials.
    cross_account: u64,
    elapsed: std::time::Duration,
    note: String,
}

fn summarise(
    name: &'static str,
    p: &Params,
    seen: Seen,
    agent: &impl Agent,
    elapsed: std::time::Duration,
) -> Summary {
    let (per_second, cross_account) = agent.calls_per_second();
    let from = usize::try_from(p.warmup_hours * HOUR / 1000).unwrap_or(0);
    let window = from..from + usize::try_from(p.hours * 3600).unwrap_or(0);
    let measured: Vec<u32> = window
        .clone()
        .map(|s| per_second.get(s).copied().unwrap_or(0))
        .collect();
    Summary {
        name,
        seen,
        hourly: measured
            .chunks(3600)
            .map(|h| h.iter().map(|&c| u64::from(c)).sum())
            .collect(),
        peak_per_second: measured.iter().copied().max().unwrap_or(0),
        cross_account: window
            .map(|s| u64::from(cross_account.get(s).copied().unwrap_or(0)))
            .sum(),
        elapsed,
        note: String::new(),
    }
}

async fn run_ours(p: &Params, verified: bool) -> Summary {
    let started = std::time::Instant::now();
    let mut agent = ours::Ours::new(p.nodes, verified);
    let seen = workload::simulate(p, &mut agent).await;
    let name = if verified {
        "this agent, --token-issuer"
    } else {
        "this agent (defaults)"
    };
    summarise(name, p, seen, &agent, started.elapsed())
}

fn run_reference(p: &Params) -> Summary {
    let started = std::time::Instant::now();
    let mut agent = reference::Reference::new(p.nodes);
    let seen = futures_util::FutureExt::now_or_never(workload::simulate(p, &mut agent))
        .expect("the model never waits");
    let mut s = summarise(
        "reference policy (model)",
        p,
        seen,
        &agent,
        started.elapsed(),
    );
    s.note = format!(
        "renewals of tokens no pod sends any more (warm-up included): {}; peak entries on a node: {}; evicted: {}",
        agent.renewed_unused, agent.peak_entries, agent.evicted
    );
    s
}

fn minutes(ms: Option<i64>) -> String {
    ms.map_or("-".into(), |ms| {
        format!("{:.1} min", ms as f64 / MINUTE as f64)
    })
}

fn print(p: &Params, runs: &[Summary]) {
    let pods_per_node = p.pods / p.nodes;
    println!(
        "{} simulated hours (after {} h of warm-up), {} nodes x {} pods: {:.0} % churning (mean life {} h), {:.0} % 59-minute credentials, the rest 6 h; tokens rotated at 80 % of 24 h",
        p.hours, p.warmup_hours, p.nodes, pods_per_node, p.churning * 100.0, p.churn_mean_hours, p.cross_account * 100.0
    );
    if let Some(s) = runs.first() {
        println!(
            "workload: {} pod starts and {} token rotations in the measured hours",
            s.seen.pods_started, s.seen.rotations
        );
    }
    println!(
        "\n{:<28} {:>26} {:>8} {:>13} {:>9} {:>9} {:>8} {:>9} {:>7} {:>8}",
        "",
        "EKS Auth calls/h min/mean/max",
        "peak/s",
        "least left",
        "requests",
        "hit",
        "stale",
        "miss",
        "rotated",
        "errors"
    );
    for s in runs {
        let n = s.hourly.len().max(1) as u64;
        let (min, max) = (s.hourly.iter().min(), s.hourly.iter().max());
        let mean = s.hourly.iter().sum::<u64>() / n;
        println!(
            "{:<28} {:>26} {:>8} {:>13} {:>9} {:>9} {:>8} {:>9} {:>7} {:>8}",
            s.name,
            format!("{} / {} / {}", min.unwrap_or(&0), mean, max.unwrap_or(&0)),
            s.peak_per_second,
            minutes(s.seen.least_left),
            s.seen.requests,
            s.seen.hits,
            s.seen.stale,
            s.seen.misses,
            s.seen.rotated,
            s.seen.errors,
        );
    }
    for s in runs {
        let all: u64 = s.hourly.iter().sum();
        println!(
            "{}: {} of {} calls ({:.0} %) for the 59-minute credentials",
            s.name,
            s.cross_account,
            all,
            100.0 * s.cross_account as f64 / all.max(1) as f64
        );
        if !s.note.is_empty() {
            println!("{}: {}", s.name, s.note);
        }
        println!("{}: simulated in {:.1} s", s.name, s.elapsed.as_secs_f64());
    }
    let mean = |s: &Summary| s.hourly.iter().sum::<u64>() / s.hourly.len().max(1) as u64;
    if let (Some(ours), Some(reference)) = (runs.first(), runs.last()) {
        println!(
            "\nat {} nodes x {} pods, {} EKS Auth calls per hour (reference: {})",
            p.nodes,
            pods_per_node,
            mean(ours),
            mean(reference)
        );
    }
}

fn main() {
    let p = params();
    // A runtime per run: each starts its clock afresh, and nothing of one outlives it.
    let paused = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime")
    };
    let defaults = paused().block_on(run_ours(&p, false));
    let verified = paused().block_on(run_ours(&p, true));
    let reference = run_reference(&p);
    print(&p, &[defaults, verified, reference]);
}
