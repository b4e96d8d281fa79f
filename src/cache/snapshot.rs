//! The cache's entries leaving for a successor agent and arriving from a predecessor.
//!
//! Contract: [`CredentialCache::export`] lists every valid entry made or renewed at or after a
//! generation, with the generation to ask from next time, so a delta after a snapshot misses
//! nothing made in between; [`CredentialCache::export_iter`] makes the same list one entry at a
//! time as it is taken, so a snapshot sent in chunks holds one chunk in memory, never a copy of
//! the cache. [`CredentialCache::import`] installs entries one by one as they arrive, each
//! checked as if it had just been fetched (the token parses and is within its time, the
//! credentials are complete and unexpired), with a refresh plan that is consistent with the
//! credentials (an inconsistent one is computed afresh), and queues their refreshes. An entry
//! this cache already has with credentials lasting as long or longer is left alone; nothing is
//! installed beyond this cache's own capacity. Evictions for a token's fault after a snapshot,
//! and remembered refusals, go along too, so a successor neither revives what its predecessor
//! evicted nor asks EKS Auth again about what it was refused.

use super::{Carried, CredentialCache, Entry, Refusal};
use crate::cache::policy::Plan;
use crate::credentials::Credentials;
use crate::token::TokenHash;
use crate::token::{PodKey, Token};
use std::time::Duration;
use std::time::SystemTime;

/// An entry in transit: all it takes to serve it and keep refreshing it. It holds a token and
/// credentials: deliberately no `Debug`.
pub struct Exported {
    /// The pod's token, as it sent it.
    pub token: String,
    /// The credentials body, exactly as served.
    pub body: String,
    pub plan: Plan,
    pub valid_until: SystemTime,
    pub state: Carried,
    /// The pod, when the token was verified.
    pub pod: Option<PodKey>,
}

/// What an import made of a predecessor's entries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    pub installed: usize,
    /// Entries this cache already had as fresh or fresher.
    pub kept_ours: usize,
    /// Entries no longer usable (expired, unreadable), or beyond this cache's capacity.
    pub refused: usize,
}

impl Imported {
    pub fn add(&mut self, more: Imported) {
        self.installed += more.installed;
        self.kept_ours += more.kept_ours;
        self.refused += more.refused;
    }
}

impl CredentialCache {
    /// Every valid entry of generation `since` or later (0: all), and the generation to ask
    /// from next time.
    pub fn export(&self, since: u64) -> (Vec<Exported>, u64) {
        let (entries, next) = self.export_iter(since);
        (entries.collect(), next)
    }

    /// [`CredentialCache::export`], made one entry at a time as the caller takes them, so a
    /// snapshot sent in chunks is never all in memory at once. The map's iterator holds no lock
    /// between entries (it lists one shard's keys at a time), so a caller that stops to send a
    /// chunk holds up no request.
    pub fn export_iter(&self, since: u64) -> (impl Iterator<Item = Exported> + '_, u64) {
        // Read before listing: every entry up to it is in the map, and one installed while
        // listing has a later generation, so the next export finds it even if this one did not.
        let next = self.inner.newest_generation() + 1;
        let now = self.inner.clock.wall();
        let entries = self
            .inner
            .entries
            .iter()
            .filter(move |(_, e)| {
                e.generation >= since && now < e.valid_until && !e.is_superseded()
            })
            .filter_map(|(_, e)| {
                Some(Exported {
                    token: e.token.raw().to_owned(),
                    body: std::str::from_utf8(e.credentials().body()).ok()?.to_owned(),
                    plan: e.plan,
                    valid_until: e.valid_until,
                    state: e.carried(),
                    pod: e.pod,
                })
            });
        (entries, next)
    }

    /// Tokens evicted for their own fault at or after generation `since` (what a successor's
    /// snapshot may still hold).
    pub fn evicted_since(&self, since: u64) -> Vec<TokenHash> {
        let log = self
            .inner
            .evictions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        log.iter()
            .filter(|(at, _)| *at + 1 >= since)
            .map(|(_, h)| *h)
            .collect()
    }

    /// Drop entries a predecessor evicted after its snapshot.
    pub fn forget(&self, hashes: &[TokenHash]) {
        for h in hashes {
            self.inner.entries.invalidate(h);
        }
    }

    /// The refusals remembered now and how long each is left to be.
    pub fn refusals(&self) -> Vec<(TokenHash, Refusal, Duration)> {
        self.inner.rejections.export()
    }

    /// A predecessor's remembered refusals, each for what is left of it.
    pub fn remember(&self, refusals: impl IntoIterator<Item = (TokenHash, Refusal, Duration)>) {
        for (hash, refusal, left) in refusals {
            self.inner.rejections.import(hash, refusal, left);
        }
    }

    /// Install a predecessor's entries (see the module contract).
    pub fn import(&self, entries: impl IntoIterator<Item = Exported>) -> Imported {
        self.import_refreshing_after(entries, SystemTime::UNIX_EPOCH)
    }

    /// [`CredentialCache::import`], refreshing none before `not_before`: while a predecessor
    /// finishes its own refreshes (it stops only when it retires), the two do not both renew an
    /// overdue entry. Entries are served meanwhile; past their hard point, until their refresh.
    pub fn import_refreshing_after(
        &self,
        entries: impl IntoIterator<Item = Exported>,
        not_before: SystemTime,
    ) -> Imported {
        let inner = &self.inner;
        let now = self.inner.clock.wall();
        let mut out = Imported::default();
        let capacity = inner.entries.policy().max_capacity().unwrap_or(u64::MAX);
        for x in entries {
            let Ok(token) = Token::parse(x.token.as_bytes()) else {
                out.refused += 1;
                continue;
            };
            if token.check_time(now, inner.leeway).is_err() {
                out.refused += 1;
                continue;
            }
            let Ok(credentials) = Credentials::restore(&x.body, now) else {
                out.refused += 1;
                continue;
            };
            let hash = token.hash();
            if inner
                .entries
                .get(&hash)
                .is_some_and(|ours| ours.credentials().expiration() >= credentials.expiration())
            {
                out.kept_ours += 1;
                continue;
            }
            if inner.entries.entry_count() >= capacity {
                inner.entries.run_pending_tasks();
                if inner.entries.entry_count() >= capacity {
                    out.refused += 1;
                    continue;
                }
            }
            let expiration = credentials.expiration();
            let plan = if consistent(&x.plan, expiration) {
                x.plan
            } else {
                inner.policy.plan(now, expiration)
            };
            let valid_until = x
                .valid_until
                .min(expiration)
                .min(token.expires_at(inner.leeway));
            inner.put_refreshing_after(
                |generation| {
                    Entry::restored(
                        token,
                        credentials,
                        plan,
                        valid_until,
                        generation,
                        x.pod,
                        x.state,
                    )
                },
                not_before,
            );
            out.installed += 1;
        }
        out
    }
}

/// Whether a plan that came over the wire fits credentials expiring at `expiration`.
fn consistent(plan: &Plan, expiration: SystemTime) -> bool {
    let earliest = expiration
        .checked_sub(crate::credentials::MAX_LIFETIME)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    earliest <= plan.refresh_at
        && plan.refresh_at <= plan.hard_at
        && plan.hard_at <= plan.serve_queued_until
        && plan.serve_queued_until <= expiration
}
