//! When the verifier fetches the cluster's keys, and how it keeps them across restarts.
//!
//! Contract (the timing rules of [`super`]'s contract, in one place): [`Verifier::start`] runs
//! the periodic fetch (at once without keys, retrying from [`RETRY_FIRST`] doubling up to the
//! refresh interval; else when the keys are `refresh_every` old, on the monotonic clock).
//! `fetch_for` serves a token naming a key not held: it shares a fetch that started late
//! enough, or starts one at most every `fetch_floor` (or, after a fetch that already missed the
//! key, every `min_refresh_interval`), waits at most `wait_for_keys`, and leaves the fetch
//! running. Every fetch holds one lock, is bounded by `fetch_timeout`, keeps the keys held when
//! it fails, and writes a set that changed to the state file (mode 0600) off the runtime's
//! workers. Fetches run on the tracker of the server using the verifier, so its shutdown waits
//! for them and its `stop` ends the periodic one.

use super::keys::{KeySet, Stored};
use super::{KeysState, Verifier, VerifySettings};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Stored key sets larger than this are not read.
const MAX_STORED: u64 = 1024 * 1024;
/// Retries of the first fetch when no keys are held, doubling up to the refresh interval.
const RETRY_FIRST: Duration = Duration::from_secs(5);

/// Token-caused fetches: when the last one was tried.
#[derive(Default)]
pub(super) struct FetchLog {
    last_attempt: Option<Instant>,
}

impl Verifier {
    pub(super) fn read_state(settings: &VerifySettings, describe: &str) -> Option<Stored> {
        let path = settings.state_file.as_ref()?;
        match read_private(path) {
            Ok(Some(bytes)) => match serde_json::from_slice::<Stored>(&bytes) {
                Ok(s) if s.source == describe => Some(s),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e,
                        "ignoring an unreadable key file");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "ignoring the key file");
                None
            }
        }
    }

    /// Start the periodic fetch on `tasks` until `stop` (at once when no keys are held, else
    /// when they are due); fetches caused by tokens run there too from now on. A server that
    /// serves again on this verifier, after the one that started it retired, starts it again
    /// with its own.
    pub fn start(self: &Arc<Self>, tasks: &TaskTracker, stop: &CancellationToken) {
        *self.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks.clone();
        let me = self.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut retry = RETRY_FIRST;
            loop {
                // On the monotonic clock: a wall clock stepped back does not postpone it.
                let due = me.keys().map_or(Duration::ZERO, |k| {
                    me.settings.refresh_every.saturating_sub(k.age())
                });
                tokio::select! {
                    _ = tokio::time::sleep(due) => {}
                    _ = stop.cancelled() => return,
                }
                let ok = tokio::select! {
                    ok = me.fetch_now() => ok,
                    _ = stop.cancelled() => return,
                };
                if !ok && me.keys().is_none() {
                    // No keys at all: try again soon, backing off to the refresh interval.
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = stop.cancelled() => return,
                    }
                    retry = (retry * 2).min(me.settings.refresh_every);
                }
            }
        });
    }

    /// Where fetches run now: the serving server's tracker.
    fn tasks(&self) -> TaskTracker {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fetch now, under the fetch lock; whether it succeeded.
    async fn fetch_now(&self) -> bool {
        let mut log = self.fetching.lock().await;
        log.last_attempt = Some(Instant::now());
        self.fetch_locked().await
    }

    async fn fetch_locked(&self) -> bool {
        let (started, fetched) = (SystemTime::now(), Instant::now());
        // The source's own retries included: the fetch lock is held meanwhile.
        let timeout = self.settings.fetch_timeout;
        let result = tokio::time::timeout(timeout, self.source.fetch(timeout))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        let before = self.keys();
        let result = result.and_then(|f| {
            KeySet::after_fetch(
                f.issuer,
                &f.jwks,
                fetched,
                started,
                before.as_deref(),
                self.settings.grace,
            )
        });
        let ok = result.is_ok();
        if let Some((_, fetches)) = &self.counted {
            fetches
                .with_label_values(&[if ok { "ok" } else { "failed" }])
                .inc();
        }
        match result {
            Ok(set) => {
                // Fetches a flood of made-up `kid`s provokes find the same keys: said and kept
                // only when something changed.
                if before.as_deref().is_some_and(|b| b.same_keys(&set)) {
                    tracing::debug!(source = %self.describe,
                        "fetched the cluster's token signing keys: unchanged");
                } else {
                    tracing::info!(source = %self.describe, issuer = %set.issuer,
                        keys = set.len(started), "fetched the cluster's token signing keys");
                    self.persist(&set);
                }
                let set = Arc::new(set);
                match self.keys.write() {
                    Ok(mut k) => *k = Some(set),
                    Err(p) => *p.into_inner() = Some(set),
                }
                self.state.store(KeysState::Loaded as u8, Ordering::Relaxed);
            }
            Err(why) => {
                tracing::warn!(source = %self.describe, error = %why, have_keys = before.is_some(),
                    "cannot fetch the cluster's token signing keys");
                if before.is_none() {
                    self.state
                        .store(KeysState::Unavailable as u8, Ordering::Relaxed);
                }
            }
        }
        ok
    }

    fn persist(&self, set: &KeySet) {
        let Some(path) = self.settings.state_file.clone() else {
            return;
        };
        let Ok(bytes) = serde_json::to_vec(&set.to_stored(&self.describe, SystemTime::now()))
        else {
            return;
        };
        // A small file, but a blocking write all the same: off the runtime's workers.
        self.tasks().spawn_blocking(move || {
            if let Err(e) = write_private(&path, &bytes) {
                tracing::warn!(file = %path.display(), error = %e,
                    "cannot keep the token signing keys");
            }
        });
    }

    /// Make sure a fetch that started at or after `need` has been tried, for a token naming a
    /// key not held: one just done is shared; otherwise one starts, at most one per
    /// `fetch_floor` (waiting for the floor: requests arriving meanwhile share the fetch). With
    /// `again_after`, a fetch is made only if the last attempt is that old (an issuer that
    /// published late). Waits at most `wait_for_keys`; the fetch goes on regardless.
    pub(super) async fn fetch_for(
        self: &Arc<Self>,
        need: SystemTime,
        again_after: Option<Duration>,
    ) {
        let me = self.clone();
        let fetch = self.tasks().spawn(async move {
            let mut log = me.fetching.lock().await;
            if me
                .keys()
                .is_some_and(|k| k.fetch_started(SystemTime::now()) >= need)
            {
                return;
            }
            let since = log.last_attempt.map(|t| t.elapsed());
            match (again_after, since) {
                (Some(gap), Some(since)) if since < gap => return,
                (None, Some(since)) => {
                    tokio::time::sleep(me.settings.fetch_floor.saturating_sub(since)).await;
                }
                _ => {}
            }
            log.last_attempt = Some(Instant::now());
            me.fetch_locked().await;
        });
        let _ = tokio::time::timeout(self.settings.wait_for_keys, fetch).await;
    }
}

#[cfg(target_os = "linux")]
fn read_private(path: &std::path::Path) -> Result<Option<Vec<u8>>, String> {
    crate::files::read_private(path, MAX_STORED)
}

#[cfg(target_os = "linux")]
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::files::write_private(path, bytes)
}

#[cfg(not(target_os = "linux"))]
fn read_private(_: &std::path::Path) -> Result<Option<Vec<u8>>, String> {
    Ok(None)
}

#[cfg(not(target_os = "linux"))]
fn write_private(_: &std::path::Path, _: &[u8]) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{claims, Issuer, Key};
    use super::super::{KeysState, Verdict, VerifySettings};
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    fn settings() -> VerifySettings {
        VerifySettings {
            fetch_floor: Duration::from_millis(200),
            ..VerifySettings::default()
        }
    }

    /// Wait up to five seconds for `f`.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn an_unknown_kid_costs_one_fetch_then_made_up_ones_share_the_next() {
        let (old, new) = (Key::new("k1"), Key::new("k2"));
        let issuer = Issuer::start(vec![old.jwk(), new.jwk()]).await;
        let held = Some((vec![old.jwk()], vec![], Duration::from_secs(60)));
        let v = issuer.verifier(settings(), held);
        // A key rotated in since the last fetch: one fetch, then trusted.
        let verdict = v.verify(&new.sign(&claims(&issuer.url))).await;
        assert!(matches!(verdict, Verdict::Verified(_)), "{verdict:?}");
        assert_eq!(issuer.fetches(), 1);
        // Ten tokens at once naming a key the cluster does not publish: one fetch after the
        // floor, shared, and each refused without being remembered (a late issuer heals).
        let made_up = Key::new("k3");
        let tokens: Vec<_> = (0..10)
            .map(|_| made_up.sign(&claims(&issuer.url)))
            .collect();
        let verdicts = futures_util::future::join_all(tokens.iter().map(|t| v.verify(t))).await;
        for verdict in &verdicts {
            assert!(
                matches!(
                    verdict,
                    Verdict::Refused {
                        remember: false,
                        ..
                    }
                ),
                "{verdict:?}"
            );
        }
        assert_eq!(issuer.fetches(), 2);
    }

    #[tokio::test]
    async fn a_key_the_cluster_stopped_publishing_is_never_trusted() {
        let (dropped, current) = (Key::new("k1"), Key::new("k2"));
        let issuer = Issuer::start(vec![current.jwk()]).await;
        let held = Some((
            vec![current.jwk()],
            vec![dropped.jwk()],
            Duration::from_secs(60),
        ));
        let v = issuer.verifier(settings(), held);
        let verdict = v.verify(&dropped.sign(&claims(&issuer.url))).await;
        assert!(matches!(verdict, Verdict::Unverifiable(_)), "{verdict:?}");
        assert!(v
            .identify_held(&dropped.sign(&claims(&issuer.url)))
            .await
            .is_none());
        let verdict = v.verify(&current.sign(&claims(&issuer.url))).await;
        assert!(matches!(verdict, Verdict::Verified(_)), "{verdict:?}");
        assert_eq!(issuer.fetches(), 0, "a retiring key is known: no fetch");
    }

    #[tokio::test]
    async fn without_usable_keys_a_token_goes_on_unverified() {
        let key = Key::new("k1");
        let issuer = Issuer::start(vec![]).await;
        let v = issuer.verifier(settings(), None);
        assert_eq!(v.state(), KeysState::Pending);
        let verdict = v.verify(&key.sign(&claims(&issuer.url))).await;
        assert!(matches!(verdict, Verdict::Unverifiable(_)), "{verdict:?}");
        assert_eq!(v.state(), KeysState::Unavailable);
        assert_eq!(issuer.fetches(), 1);
    }

    /// A server that serves again on the same verifier starts its periodic fetch anew, on its
    /// own tracker: the retired server's stop ended the first.
    #[tokio::test]
    async fn the_periodic_fetch_stops_with_its_server_and_starts_again_with_the_next() {
        let key = Key::new("k1");
        let issuer = Issuer::start(vec![key.jwk()]).await;
        let v = issuer.verifier(
            VerifySettings {
                refresh_every: Duration::from_millis(100),
                ..settings()
            },
            None,
        );
        let (first, stop) = (TaskTracker::new(), CancellationToken::new());
        v.start(&first, &stop);
        eventually("a first fetch", || issuer.fetches() >= 2).await;
        assert_eq!(v.state(), KeysState::Loaded);
        stop.cancel();
        first.close();
        tokio::time::timeout(Duration::from_secs(5), first.wait())
            .await
            .expect("the fetch loop ends with its server");
        let stopped_at = issuer.fetches();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(issuer.fetches(), stopped_at, "no fetch while retired");
        let (second, stop) = (TaskTracker::new(), CancellationToken::new());
        v.start(&second, &stop);
        eventually("fetches again", || issuer.fetches() >= stopped_at + 2).await;
        stop.cancel();
        second.close();
        tokio::time::timeout(Duration::from_secs(5), second.wait())
            .await
            .expect("ends");
    }
}
