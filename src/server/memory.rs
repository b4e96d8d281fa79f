//! Giving freed memory back to the node.
//!
//! Contract: on glibc, every [`INTERVAL`] the allocator is asked to return free pages to the
//! kernel (`malloc_trim`). A burst of work (a node restart's cold storm, a scrape, thousands of
//! connections) frees memory that glibc otherwise keeps resident in its per-thread arenas, and
//! the kubelet accounts resident memory against the DaemonSet's limit. Elsewhere: nothing.

use std::time::Duration;

pub const INTERVAL: Duration = Duration::from_secs(10);

/// Run until the task is dropped.
pub async fn run() {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        trim();
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim has no preconditions; it only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
