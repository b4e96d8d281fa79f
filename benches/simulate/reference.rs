//! The REFERENCE AGENT'S POLICY, AS A MODEL: not its code, and not this agent. What
//! `/work/shared/reference/contract.md` says it does, computed on the same workload:
//! - credentials are cached by token, and a request is answered from them until they expire,
//!   however little is left (its issue #92); otherwise it calls EKS Auth;
//! - a janitor ticks once a minute (a tick is dropped while the last one still renews) and renews,
//!   one after another, every entry whose credentials are older than min(lifetime, 3 h)
//!   (`--max-credential-retention-before-renewal 3h`): 59-minute credentials only at expiry;
//! - renewal is not driven by demand: entries of pods that are gone, and of tokens kubelet has
//!   replaced, renew until the token expires (#171);
//! - its limiter (`--max-service-qps 3`) takes two tokens per renewal: 1.5 renewals a second;
//! - at most 2,000 entries (`--max-cache-size`), the least recently written out first.
//!
//! EKS Auth answers at once, as it does for this agent's run.

use crate::workload::{count, Agent, Answer, Kind, Pod, CROSS_ACCOUNT, HOUR, MINUTE, SECOND};
use std::collections::{HashMap, HashSet};

const RETENTION: i64 = 3 * HOUR;
const RENEWAL_EVERY: i64 = 2 * SECOND / 3;
const MAX_ENTRIES: usize = 2000;

struct Entry {
    fetched: i64,
    expires: i64,
    lifetime: i64,
    token_expires: i64,
}

#[derive(Default)]
struct Node {
    entries: HashMap<u64, Entry>,
    /// When the janitor's last run ends.
    busy_until: i64,
    /// The janitor's next tick: nodes' agents started at different times, so their minutes are
    /// spread, not in step.
    next_tick: i64,
}

#[derive(Default)]
pub struct Reference {
    nodes: Vec<Node>,
    calls: Vec<u32>,
    cross_account: Vec<u32>,
    /// Each pod's current token, to tell when one was replaced.
    current: HashMap<u64, u64>,
    /// Tokens no pod sends any more (the pod stopped, or kubelet replaced the token).
    unused: HashSet<u64>,
    /// Renewals of entries no pod would ask for again.
    pub renewed_unused: u64,
    pub evicted: u64,
    pub peak_entries: usize,
}

impl Reference {
    pub fn new(nodes: usize) -> Reference {
        Reference {
            nodes: (0..nodes)
                .map(|n| Node {
                    next_tick: MINUTE * n as i64 / nodes.max(1) as i64,
                    ..Node::default()
                })
                .collect(),
            ..Reference::default()
        }
    }

    fn call(&mut self, at: i64, lifetime: i64) {
        let second = usize::try_from(at / SECOND).unwrap_or(0);
        count(&mut self.calls, second);
        if lifetime == CROSS_ACCOUNT {
            count(&mut self.cross_account, second);
        }
    }

    /// Every janitor tick up to `t`, node by node.
    fn tick(&mut self, t: i64) {
        let mut calls = Vec::new();
        for node in &mut self.nodes {
            while node.next_tick <= t {
                let at = node.next_tick;
                node.next_tick += MINUTE;
                if node.busy_until <= at {
                    Self::janitor(node, at, &self.unused, &mut self.renewed_unused, &mut calls);
                }
            }
        }
        for (when, lifetime) in calls {
            self.call(when, lifetime);
        }
    }

    /// One janitor run on `node` at `at`: drop entries whose token expired, renew the rest
    /// that are due, one after another at the limiter's pace.
    fn janitor(
        node: &mut Node,
        at: i64,
        unused: &HashSet<u64>,
        renewed_unused: &mut u64,
        calls: &mut Vec<(i64, i64)>,
    ) {
        node.entries.retain(|_, e| e.token_expires > at);
        let mut when = at;
        let mut due: Vec<u64> = node
            .entries
            .iter()
            .filter(|(_, e)| at >= e.fetched + e.lifetime.min(RETENTION))
            .map(|(id, _)| *id)
            .collect();
        due.sort_unstable();
        for id in due {
            if let Some(e) = node.entries.get_mut(&id) {
                calls.push((when, e.lifetime));
                e.fetched = when;
                e.expires = when + e.lifetime;
                if unused.contains(&id) {
                    *renewed_unused += 1;
                }
                when += RENEWAL_EVERY;
            }
        }
        node.busy_until = when;
    }
}

impl Agent for Reference {
    async fn advance_to(&mut self, t: i64) {
        self.tick(t);
    }

    async fn ask(&mut self, pod: &Pod, t: i64) -> Answer {
        if let Some(old) = self.current.insert(pod.id, pod.token.id) {
            if old != pod.token.id {
                self.unused.insert(old);
            }
        }
        let Some(node) = self.nodes.get(pod.node) else {
            return Answer::Error;
        };
        if let Some(e) = node.entries.get(&pod.token.id) {
            if t < e.expires {
                return Answer::Served {
                    expires: e.expires,
                    kind: Kind::Hit,
                };
            }
        }
        self.call(t, pod.credentials);
        let Some(node) = self.nodes.get_mut(pod.node) else {
            return Answer::Error;
        };
        let expires = t + pod.credentials;
        node.entries.insert(
            pod.token.id,
            Entry {
                fetched: t,
                expires,
                lifetime: pod.credentials,
                token_expires: pod.token.expires,
            },
        );
        if node.entries.len() > MAX_ENTRIES {
            let oldest = node.entries.iter().min_by_key(|(_, e)| e.fetched);
            if let Some(id) = oldest.map(|(id, _)| *id) {
                node.entries.remove(&id);
                self.evicted += 1;
            }
        }
        self.peak_entries = self.peak_entries.max(node.entries.len());
        Answer::Served {
            expires,
            kind: Kind::Miss,
        }
    }

    fn stopped(&mut self, pod: &Pod) {
        self.unused.insert(pod.token.id);
        self.current.remove(&pod.id);
    }

    fn calls_per_second(&self) -> (Vec<u32>, Vec<u32>) {
        (self.calls.clone(), self.cross_account.clone())
    }
}
