//! The one task that turns reported refusals into Events: one series per object and reason per
//! interval ([`super::series`]), the node's budget of calls, and who a pod is
//! ([`super::identify`]).
//!
//! Contract: every series has a generation of its own, and every call's result names the
//! generation it was made for, so an answer that comes after its series' interval ended (a new
//! series now holds the key) is applied to the series it was for, never to its successor. A
//! series whose interval ended is closed: it stays only until what it counted is sent (its
//! Event, if the budget held it back, or its last count), and is then forgotten; its Event gone
//! (404) ends it. Whatever the budget holds back is sent, oldest series first, when a call
//! finishes or the budget refills (a timer, not the next refusal). At most `max_series` series,
//! closed ones included: when full, a closed series whose Event exists loses its last count
//! (counted `dropped`) to make room for a new one; failing that the new refusal is dropped.

use super::body;
use super::identify::Identify;
use super::series::{Key, Series};
use super::{count, EventSettings, On, Report, IN_FLIGHT, NODE_REASON};
use crate::bucket::TokenBucket;
use crate::kube::{KubeClient, KubeError};
use crate::verify::Verifier;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// An Event whose `series` is patched is found at this path under its namespace.
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Create,
    Patch,
}

/// A call's result, for the series (by generation) it was made for.
struct Answer {
    generation: u64,
    on: On,
    call: Call,
    sent: u32,
    result: Result<(), KubeError>,
}

pub(super) struct Worker {
    settings: EventSettings,
    client: Arc<KubeClient>,
    /// Who a refused token is.
    identify: Identify,
    budget: TokenBucket,
    /// Every series by generation, closed ones included.
    series: HashMap<u64, Series>,
    /// The open series of each key.
    open: HashMap<Key, u64>,
    generations: u64,
    calls: JoinSet<Answer>,
    /// When the budget has a call again, while something waits for one.
    wake: Option<Instant>,
    counted: Option<prometheus::IntCounterVec>,
}

impl Worker {
    pub(super) fn new(
        settings: &EventSettings,
        client: Arc<KubeClient>,
        verifier: Option<Arc<Verifier>>,
        counted: Option<prometheus::IntCounterVec>,
    ) -> Worker {
        Worker {
            settings: settings.clone(),
            client,
            identify: Identify::new(settings, verifier),
            budget: TokenBucket::with_burst(settings.rate, settings.burst),
            series: HashMap::new(),
            open: HashMap::new(),
            generations: 0,
            calls: JoinSet::new(),
            wake: None,
            counted,
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Report>, stop: CancellationToken) {
        let mut tick =
            tokio::time::interval(self.settings.series_every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.wake;
            tokio::select! {
                _ = stop.cancelled() => return,
                report = rx.recv() => match report {
                    Some(r) => self.report(r).await,
                    None => return,
                },
                Some(joined) = self.calls.join_next() => {
                    // A call cannot panic (no unwrap on its path); one that did leaves its series
                    // marked under way until the agent stops, which costs that series only.
                    if let Ok(answer) = joined {
                        self.done(answer);
                    }
                    self.drain();
                }
                _ = sleep_until(wake), if wake.is_some() => {
                    self.wake = None;
                    self.drain();
                }
                _ = tick.tick() => self.tick(),
            }
        }
    }

    fn count(&self, on: On, result: &str) {
        count(&self.counted, on, result);
    }

    async fn report(&mut self, r: Report) {
        let (key, namespace, base, regarding) = match r.on {
            On::Node => (
                (String::new(), NODE_REASON),
                "default".to_owned(),
                self.settings.node.clone(),
                json!({"apiVersion": "v1", "kind": "Node", "name": self.settings.node,
                       "uid": self.settings.node}),
            ),
            On::Pod(reason) => {
                let Some(id) = self.identify.pod(&r).await else {
                    self.count(r.on, "unverified");
                    return;
                };
                (
                    (id.pod_uid.clone(), reason),
                    id.namespace.clone(),
                    id.pod_name.clone(),
                    json!({"apiVersion": "v1", "kind": "Pod", "namespace": id.namespace,
                           "name": id.pod_name, "uid": id.pod_uid}),
                )
            }
        };
        let now = Instant::now();
        if let Some(&generation) = self.open.get(&key) {
            if let Some(s) = self.series.get_mut(&generation) {
                if now < s.started + self.settings.interval {
                    s.count = s.count.saturating_add(1);
                    s.last_observed = SystemTime::now();
                    if s.reported == 0 && !s.in_flight && !s.given_up {
                        self.create_or_hold(generation);
                    } else {
                        self.count(r.on, "deduplicated");
                    }
                    return;
                }
            }
            // The interval is over: what it counted goes out with the series' last call.
            self.close(generation);
            self.drain();
        }
        if self.series.len() >= self.settings.max_series && !self.make_room() {
            self.count(r.on, "dropped");
            return;
        }
        self.generations += 1;
        let generation = self.generations;
        let first = SystemTime::now();
        self.series.insert(
            generation,
            Series {
                on: r.on,
                name: body::event_name(&base, &key, first),
                key: key.clone(),
                base,
                namespace,
                regarding,
                note: body::note(&r.code, r.status, r.on),
                started: now,
                count: 1,
                reported: 0,
                last_observed: first,
                last_sent: None,
                in_flight: false,
                closed: false,
                given_up: false,
            },
        );
        self.open.insert(key, generation);
        self.create_or_hold(generation);
    }

    /// Create the series' Event now if the budget allows; else it waits in its series.
    fn create_or_hold(&mut self, generation: u64) {
        if self.may_call() {
            self.call(generation, Call::Create);
        } else if let Some(s) = self.series.get(&generation) {
            self.count(s.on, "rate_limited");
        }
    }

    /// Whether a call may start now (one is taken from the budget); if the budget is what
    /// stops it, the worker wakes when it refills.
    fn may_call(&mut self) -> bool {
        if self.calls.len() >= IN_FLIGHT {
            // A call finishing drains what waits.
            return false;
        }
        match self.budget.try_take() {
            Ok(()) => true,
            Err(wait) => {
                let at = Instant::now() + wait;
                self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
                false
            }
        }
    }

    /// Start `call` for the series (its budget already taken).
    fn call(&mut self, generation: u64, call: Call) {
        let Some(s) = self.series.get_mut(&generation) else {
            return;
        };
        s.in_flight = true;
        s.last_sent = Some(Instant::now());
        let (sent, on) = (s.count, s.on);
        let collection = format!("{EVENTS}/{}/events", s.namespace);
        let (path, body) = match call {
            Call::Create => (
                collection,
                body::create_body(&s.described(), &self.settings.node),
            ),
            Call::Patch => (
                format!("{collection}/{}", s.name),
                body::patch_body(&s.described()),
            ),
        };
        let client = self.client.clone();
        self.calls.spawn(async move {
            let result = match call {
                Call::Create => client.post(&path, body).await,
                Call::Patch => {
                    client
                        .patch(&path, "application/merge-patch+json", body)
                        .await
                }
            };
            Answer {
                generation,
                on,
                call,
                sent,
                result: result.map(|_| ()),
            }
        });
    }

    fn done(&mut self, a: Answer) {
        let label = match (&a.result, a.call) {
            (Ok(()), Call::Create) => "sent",
            (Ok(()), Call::Patch) => "updated",
            (Err(_), _) => "failed",
        };
        self.count(a.on, label);
        let Some(s) = self.series.get_mut(&a.generation) else {
            return;
        };
        s.in_flight = false;
        match a.result {
            Ok(()) => s.reported = s.reported.max(a.sent),
            Err(KubeError::Status(404)) if a.call == Call::Patch && !s.closed => {
                // The Event is gone (its TTL, or deleted): the series is created again under a
                // new name, with its count so far.
                s.reported = 0;
                s.name = body::event_name(&s.base, &s.key, SystemTime::now());
            }
            Err(e) => {
                // Closed and gone: its last count is not worth a new Event.
                s.given_up = true;
                tracing::debug!(reason = s.key.1, error = %e, "an Event could not be sent");
            }
        }
        if s.closed && s.finished() {
            self.series.remove(&a.generation);
        }
    }

    /// Send what is due, oldest series first, while the budget allows.
    fn drain(&mut self) {
        let (now, every) = (Instant::now(), self.settings.series_every);
        let mut due: Vec<(Instant, u64)> = self
            .series
            .iter()
            .filter(|(_, s)| s.due(now, every))
            .map(|(g, s)| (s.started, *g))
            .collect();
        due.sort_unstable();
        for (_, generation) in due {
            if !self.may_call() {
                return;
            }
            let create = self
                .series
                .get(&generation)
                .is_some_and(|s| s.reported == 0);
            self.call(generation, if create { Call::Create } else { Call::Patch });
        }
    }

    /// End the series' interval: forgotten now if nothing is left to send, else once it is.
    fn close(&mut self, generation: u64) {
        let Some(s) = self.series.get_mut(&generation) else {
            return;
        };
        s.closed = true;
        if self.open.get(&s.key) == Some(&generation) {
            self.open.remove(&s.key);
        }
        if s.finished() {
            self.series.remove(&generation);
        }
    }

    /// Close the series whose interval is over, and send what is due.
    fn tick(&mut self) {
        let now = Instant::now();
        let interval = self.settings.interval;
        let over: Vec<u64> = self
            .series
            .iter()
            .filter(|(_, s)| !s.closed && now >= s.started + interval)
            .map(|(g, _)| *g)
            .collect();
        for generation in over {
            self.close(generation);
        }
        self.drain();
    }

    /// With the table full: give up the last count of the oldest closed series whose Event
    /// exists, for a new series. Whether there is room now.
    fn make_room(&mut self) -> bool {
        self.tick();
        if self.series.len() < self.settings.max_series {
            return true;
        }
        let oldest = self
            .series
            .iter()
            .filter(|(_, s)| s.closed && !s.in_flight && s.reported > 0)
            .min_by_key(|(_, s)| s.started)
            .map(|(g, s)| (*g, s.on));
        match oldest {
            Some((generation, on)) => {
                self.series.remove(&generation);
                self.count(on, "dropped");
                true
            }
            None => false,
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
