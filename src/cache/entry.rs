//! One token's credentials, the schedule that keeps them fresh, and the rule that says whether a
//! request may be answered from them without an exchange.
//!
//! Contract of [`Entry::serve_without_exchange`] (the points are [`policy`](super::policy)'s):
//! never at or past `valid_until`; always before the hard point; past it while EKS Auth is
//! backing off (static stability, until `valid_until`), or while a queued refresh is on its way
//! (until the plan's `serve_queued_until`). Demand is one of three states ([`Demand`]): the
//! scheduler renews only entries a request used since they were fetched. An entry made from a
//! verified token knows its pod ([`PodKey`]); when the pod's token rotates, the entry moves to
//! the new token ([`Entry::rotated`]) and the old one is marked superseded.

use super::policy::Plan;
use crate::credentials::Credentials;
use crate::token::{PodKey, Token};
use crate::util::{from_millis, millis};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::SystemTime;

/// How a request was answered; a label of the latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// From memory.
    Hit,
    /// From memory, past the hard point: EKS Auth is failing (static stability) or a queued
    /// refresh has not run yet (more refreshes due than the rate allows).
    Stale,
    /// This request started the exchange.
    Miss,
    /// This request joined an exchange already under way.
    Coalesced,
    /// A verified token the pod's kubelet rotated, answered from the pod's cached credentials.
    Rotated,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Stale => "stale",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Rotated => "rotated",
        }
    }
}

/// Whether anyone wants this entry renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Demand {
    /// Fetched, and no request served from it yet.
    Unused = 0,
    /// A request was served from it: the scheduler renews it at its refresh point.
    Used = 1,
    /// Its refresh point came and nobody had used it, so it was not renewed and its refresh is
    /// not queued. The next request asks for a refresh at once.
    Dormant = 2,
}

impl Demand {
    fn from_u8(v: u8) -> Demand {
        match v {
            1 => Demand::Used,
            2 => Demand::Dormant,
            _ => Demand::Unused,
        }
    }
}

/// What an entry knows beyond its credentials and plan, carried along in a handover.
#[derive(Debug, Clone, Copy)]
pub struct Carried {
    pub demand: Demand,
    pub failures: u32,
    pub retry_after: SystemTime,
}

impl Demand {
    pub fn from_wire(v: u8) -> Demand {
        Demand::from_u8(v)
    }
}

/// One token's credentials and the schedule that keeps them fresh.
pub struct Entry {
    /// Kept for refresh: the exchange needs the raw token, not its hash.
    pub(super) token: Token,
    credentials: Credentials,
    pub(super) plan: Plan,
    /// Nothing served from this entry outlives the credentials or the token.
    pub(super) valid_until: SystemTime,
    /// Which of its token's entries this is: refresh work queued for an entry that has since
    /// been replaced is recognised by it and dropped.
    pub(super) generation: u64,
    /// The pod, when the token was verified: its next token finds these credentials.
    pub(super) pod: Option<PodKey>,
    /// Moved to the pod's newer token: its removal is not an eviction, and it is not renewed.
    superseded: AtomicBool,
    /// The address its credentials last went to (folded to 64 bits; 0: none yet), so that only
    /// a delivery to a new address is looked up for the audit trail.
    delivered_to: AtomicU64,
    /// The first address they went to (the exchange's, whose audit line names it), kept across
    /// renewals: coming back to it is not a new delivery.
    origin: AtomicU64,
    demand: AtomicU8,
    /// Consecutive recoverable failures of exchanges for this token, for backoff.
    failures: AtomicU32,
    /// No new exchange for this token before this time (ms since the epoch): backoff.
    retry_after_ms: AtomicU64,
}

/// What [`Entry::record_delivery`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The address the entry last went to, or the one it was first delivered to.
    Same,
    /// No address yet.
    First,
    /// Another address than the last.
    Changed,
}

impl Entry {
    pub(super) fn new(
        token: Token,
        credentials: Credentials,
        plan: Plan,
        valid_until: SystemTime,
        generation: u64,
        pod: Option<PodKey>,
    ) -> Entry {
        Entry {
            token,
            credentials,
            plan,
            valid_until,
            generation,
            pod,
            superseded: AtomicBool::new(false),
            delivered_to: AtomicU64::new(0),
            origin: AtomicU64::new(0),
            demand: AtomicU8::new(Demand::Unused as u8),
            failures: AtomicU32::new(0),
            retry_after_ms: AtomicU64::new(0),
        }
    }

    /// An entry a predecessor agent handed over, with its schedule and backoff state as they were.
    pub(super) fn restored(
        token: Token,
        credentials: Credentials,
        plan: Plan,
        valid_until: SystemTime,
        generation: u64,
        pod: Option<PodKey>,
        state: Carried,
    ) -> Entry {
        let e = Entry::new(token, credentials, plan, valid_until, generation, pod);
        e.demand.store(state.demand as u8, Ordering::Relaxed);
        e.failures.store(state.failures, Ordering::Relaxed);
        e.retry_after_ms
            .store(millis(state.retry_after), Ordering::Relaxed);
        e
    }

    /// This entry's credentials, plan and state, on the pod's newer `token`; this one is marked
    /// superseded. Used for the request that brought the token, so its demand counts.
    pub(super) fn rotated(&self, token: Token, valid_until: SystemTime, generation: u64) -> Entry {
        self.superseded.store(true, Ordering::Relaxed);
        let e = Entry::restored(
            token,
            self.credentials.clone(),
            self.plan,
            valid_until,
            generation,
            self.pod,
            self.carried(),
        );
        e.mark_used();
        e
    }

    /// Record a delivery to `to`: whether the entry last went there, elsewhere, or nowhere yet
    /// (a new entry, or one handed over, whose first address was audited by whoever made it).
    pub fn record_delivery(&self, to: std::net::IpAddr) -> Delivery {
        let folded = match to.to_canonical() {
            std::net::IpAddr::V4(v4) => u64::from(u32::from(v4)) | 1 << 63,
            std::net::IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                ((bits >> 64) as u64 ^ bits as u64) | 1
            }
        };
        // Read first: on a busy entry the address rarely changes.
        if self.delivered_to.load(Ordering::Relaxed) == folded {
            return Delivery::Same;
        }
        match self.delivered_to.swap(folded, Ordering::Relaxed) {
            0 => {
                let _ =
                    self.origin
                        .compare_exchange(0, folded, Ordering::Relaxed, Ordering::Relaxed);
                Delivery::First
            }
            before if before == folded => Delivery::Same,
            _ if self.origin.load(Ordering::Relaxed) == folded => Delivery::Same,
            _ => Delivery::Changed,
        }
    }

    /// Take over where `previous`, this token's entry before a renewal, was delivered: a renewal
    /// is not a new delivery.
    pub(super) fn inherit_delivery(&self, previous: &Entry) {
        for (mine, theirs) in [
            (&self.delivered_to, &previous.delivered_to),
            (&self.origin, &previous.origin),
        ] {
            let _ = mine.compare_exchange(
                0,
                theirs.load(Ordering::Relaxed),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    pub(super) fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Relaxed)
    }

    /// The state that travels with the entry in a handover.
    pub(super) fn carried(&self) -> Carried {
        Carried {
            demand: self.demand(),
            failures: self.failures.load(Ordering::Relaxed),
            retry_after: from_millis(self.retry_after_ms.load(Ordering::Relaxed)),
        }
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    pub fn demand(&self) -> Demand {
        Demand::from_u8(self.demand.load(Ordering::Relaxed))
    }

    /// Record a request served from this entry; returns what the demand was before.
    pub(super) fn mark_used(&self) -> Demand {
        // Read first: the state changes once per refresh period but is read on every hit; a
        // plain store would bounce the cache line between cores on a busy entry.
        let before = self.demand();
        if before != Demand::Used {
            return Demand::from_u8(self.demand.swap(Demand::Used as u8, Ordering::Relaxed));
        }
        before
    }

    /// At the refresh point: `true` if a request used the entry (renew it); otherwise it becomes
    /// dormant and `false`.
    pub(super) fn claim_for_refresh(&self) -> bool {
        match self.demand.compare_exchange(
            Demand::Unused as u8,
            Demand::Dormant as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => false,
            Err(now) => Demand::from_u8(now) == Demand::Used,
        }
    }

    fn in_backoff(&self, now: SystemTime) -> bool {
        millis(now) < self.retry_after_ms.load(Ordering::Relaxed)
    }

    /// When the scheduler should next try to renew this entry, unless it is dormant.
    pub(super) fn next_refresh(&self) -> Option<SystemTime> {
        if self.demand() == Demand::Dormant {
            return None;
        }
        let retry = from_millis(self.retry_after_ms.load(Ordering::Relaxed));
        Some(self.plan.refresh_at.max(retry))
    }

    /// After a recoverable failure: back off, and return when to try again.
    pub(super) fn back_off(&self, now: SystemTime) -> SystemTime {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let retry_at = now + super::policy::backoff(failures);
        self.retry_after_ms
            .store(millis(retry_at), Ordering::Relaxed);
        retry_at
    }

    /// Whether a request at `now` is answered from this entry without an exchange.
    pub(super) fn serve_without_exchange(&self, now: SystemTime) -> Option<Outcome> {
        if now >= self.valid_until {
            return None;
        }
        if now < self.plan.hard_at {
            return Some(Outcome::Hit);
        }
        let backing_off = self.in_backoff(now);
        let refresh_queued = self.demand() != Demand::Dormant && now < self.plan.serve_queued_until;
        (backing_off || refresh_queued).then_some(Outcome::Stale)
    }
}
