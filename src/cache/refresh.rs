//! The cache as the refresh scheduler sees it ([`scheduler::Refresher`]): whether queued work is
//! still worth an exchange, starting it through the token's one flight, and what to queue again
//! after a restart of the scheduler.

use super::exchange::{Join, Start};
use super::{flight, scheduler, Inner};
use crate::token::TokenHash;
use futures_util::future::BoxFuture;
use std::sync::{Arc, Weak};
use std::time::SystemTime;

/// Weak, so the scheduler never keeps the cache alive.
pub(super) struct Refresh(pub(super) Weak<Inner>);

impl Refresh {
    fn inner(&self) -> Option<Arc<Inner>> {
        self.0.upgrade()
    }
}

impl scheduler::Refresher for Refresh {
    type Key = TokenHash;

    fn due(&self, hash: &TokenHash, generation: u64) -> bool {
        let Some(inner) = self.inner() else {
            return false;
        };
        let Some(entry) = inner.current(hash, generation) else {
            return false;
        };
        let refreshes = &inner.metrics.refreshes;
        if entry
            .token
            .check_time(inner.clock.wall(), inner.leeway)
            .is_err()
        {
            refreshes.with_label_values(&["token_expired"]).inc();
            return false;
        }
        if !entry.claim_for_refresh() {
            refreshes.with_label_values(&["idle"]).inc();
            return false;
        }
        true
    }

    fn refresh(&self, hash: TokenHash, generation: u64) -> Option<BoxFuture<'static, ()>> {
        let inner = self.inner()?;
        // A request may have replaced the entry while the scheduler waited for budget.
        let entry = inner.current(&hash, generation)?;
        Some(Box::pin(async move {
            let start = Start::Refresh(entry.pod);
            let result = match inner.start_or_join(&entry.token, || None::<()>, start) {
                Join::Servable(()) => return,
                Join::Waiting { rx, .. } => flight::wait(rx).await,
            };
            let label = match result {
                Some(Ok(_)) => "success",
                Some(Err(super::CacheError::Exchange(e, _))) if !e.recoverable() => {
                    "irrecoverable_error"
                }
                Some(Err(_)) | None => "recoverable_error",
            };
            inner.metrics.refreshes.with_label_values(&[label]).inc();
        }))
    }

    fn pending(&self) -> Vec<(TokenHash, u64, SystemTime)> {
        let Some(inner) = self.inner() else {
            return Vec::new();
        };
        inner
            .entries
            .iter()
            .filter_map(|(hash, e)| Some((*hash, e.generation, e.next_refresh()?)))
            .collect()
    }

    fn panicked(&self) {
        if let Some(inner) = self.inner() {
            inner.metrics.scheduler_panics.inc();
        }
    }

    fn queued(&self, len: usize) {
        if let Some(inner) = self.inner() {
            inner.metrics.refresh_queue.set(len as i64);
        }
    }
}
