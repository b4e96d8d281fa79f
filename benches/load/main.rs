//! Load harness: the release agent on loopback, against the tests' fake EKS Auth, measured
//! against a ceiling server that answers the same body from memory with the same runtime.
//!
//! `cargo bench --bench load [-- SCENARIO...]` runs the scenarios (all by default: hit, pods,
//! herd, storm, refresh, memory, identity (burst, node-start, rotation), flood, connections,
//! audit, handover-memory, events, startup; `refresh-full`, 13 minutes, only when named) and
//! prints one table. The agent and the ceiling run
//! as separate processes (the ceiling is this binary re-executed), the load generator and the
//! fake EKS Auth here; all traffic stays on 127.0.0.1 and every loop is bounded in time.

// The tests' own fakes and helpers, shared so the bench drives what the tests check; it uses
// only part of each (the tests, which use all of it, are where dead code is found).
#[allow(dead_code)]
#[path = "../../tests/it/support/fake_eks_auth.rs"]
mod fake_eks_auth;
#[allow(dead_code)]
#[path = "../../tests/it/support/fake_kube.rs"]
mod fake_kube;
#[allow(dead_code)]
#[path = "../../tests/it/support/jwt.rs"]
mod jwt;
#[allow(dead_code)]
#[path = "../../tests/it/support/netns.rs"]
mod netns;
#[allow(dead_code)]
#[path = "../../tests/it/support/process.rs"]
mod process;

mod abuse;
mod events;
mod harness;
mod herd;
mod identity;
mod memory;
mod refresh;
mod startup;
mod storm;
mod throughput;
mod trust;

use fake_eks_auth::FakeEksAuth;
use harness::{run_ceiling, CEILING_ENV, CLUSTER};
use std::time::Duration;

fn main() {
    if let Ok(body) = std::env::var(CEILING_ENV) {
        return run_ceiling(body);
    }
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |s: &str| wanted.is_empty() || wanted.iter().any(|w| w == s);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rows = rt.block_on(async {
        let fake = FakeEksAuth::start(CLUSTER).await;
        let mut rows = Vec::new();
        if want("hit") {
            rows.extend(throughput::versus_ceiling(&fake, "1 hit path", 1, 64, 0.8).await);
        }
        if want("pods") {
            rows.extend(throughput::versus_ceiling(&fake, "2 many pods", 10_000, 64, 0.7).await);
        }
        if want("herd") {
            rows.push(herd::herd(&fake).await);
        }
        if want("storm") {
            rows.push(storm::storm(&fake).await);
        }
        if want("refresh") {
            // Scaled from 10,000 x 10 min (a 13-minute run): more refresh work (100 s at 20/s)
            // than fits before the hard point (80 s), as at full scale (500 s vs 400 s).
            rows.push(refresh::refresh(&fake, 2_000, Duration::from_secs(120)).await);
        }
        // The full scale: a 13-minute run, so only when named.
        if wanted.iter().any(|w| w == "refresh-full") {
            rows.push(refresh::refresh(&fake, 10_000, Duration::from_secs(600)).await);
        }
        if want("memory") {
            rows.extend(memory::memory(&fake).await);
        }
        if want("identity") || want("burst") {
            rows.push(identity::burst(&fake).await);
        }
        if want("identity") || want("node-start") {
            rows.push(identity::node_start(&fake).await);
        }
        if want("identity") || want("rotation") {
            rows.push(identity::rotation(&fake).await);
        }
        if want("flood") {
            rows.extend(identity::flood(&fake).await);
        }
        if want("connections") {
            rows.extend(abuse::connections(&fake).await);
        }
        if want("audit") {
            rows.push(trust::audit(&fake).await);
        }
        if want("handover-memory") {
            rows.push(trust::handover_memory(&fake).await);
        }
        if want("events") {
            rows.extend(events::events().await);
        }
        if want("startup") {
            rows.extend(startup::startup(&fake).await);
        }
        rows
    });
    println!("\n| scenario | measured | target | met |\n|---|---|---|---|");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!("| {} | {} | {} | {met} |", r.scenario, r.figures, r.target);
    }
}
