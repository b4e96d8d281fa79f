//! One object and reason within an interval: what its Event counts, and what is left to send.
//!
//! Contract: a series counts every refusal of its object and reason within the interval, and
//! knows how many of them the API server has (`reported`; 0: no Event yet). It is due for a call
//! when it has counted more than that, nothing of it is under way, no call of it failed, and
//! either it has no Event yet, its interval ended (`closed`: its last count), or its count was
//! last sent at least `series_every` ago. It is finished when nothing is left to send or under
//! way.

use super::body::Described;
use super::On;
use serde_json::Value;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The object (a pod's uid; empty for the Node) and the reason.
pub(super) type Key = (String, &'static str);

pub(super) struct Series {
    pub key: Key,
    pub on: On,
    /// The Event's namespace and name, and what its name starts with (the object's name).
    pub namespace: String,
    pub name: String,
    pub base: String,
    /// The object it is about.
    pub regarding: Value,
    pub note: String,
    pub started: Instant,
    /// Refusals counted, and how many of them the API server has (0: no Event yet).
    pub count: u32,
    pub reported: u32,
    pub last_observed: SystemTime,
    pub last_sent: Option<Instant>,
    pub in_flight: bool,
    /// The interval ended (a successor may hold the key): only what it counted is still sent.
    pub closed: bool,
    /// A call failed: nothing more is sent for this series.
    pub given_up: bool,
}

impl Series {
    pub fn described(&self) -> Described<'_> {
        Described {
            on: self.on,
            name: &self.name,
            namespace: &self.namespace,
            regarding: &self.regarding,
            note: &self.note,
            count: self.count,
            last_observed: self.last_observed,
        }
    }

    /// Nothing left to send, nor under way.
    pub fn finished(&self) -> bool {
        !self.in_flight && (self.given_up || self.count <= self.reported)
    }

    /// Whether it has something to send now.
    pub fn due(&self, now: Instant, every: Duration) -> bool {
        let quiet = self.last_sent.is_none_or(|t| now >= t + every);
        !self.in_flight
            && !self.given_up
            && self.count > self.reported
            && (self.reported == 0 || self.closed || quiet)
    }
}
