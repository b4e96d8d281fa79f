//! The cluster's pods as an agent sees them: pods starting and stopping all day, kubelet rotating
//! their tokens, and each pod's SDK asking for credentials when the ones it holds near expiry.
//! One seeded workload, played against any [`Agent`]; every agent sees the same pods, tokens and
//! rotations, and its own answers decide when each pod asks next (as they would for real).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

pub const SECOND: i64 = 1000;
pub const MINUTE: i64 = 60 * SECOND;
pub const HOUR: i64 = 60 * MINUTE;
/// The projected token's lifetime (`expirationSeconds: 86400`); kubelet rewrites it at 80 %.
pub const TOKEN_LIFETIME: i64 = 24 * HOUR;
pub const TOKEN_ROTATION: i64 = TOKEN_LIFETIME * 8 / 10;
/// botocore's advisory refresh: credentials with under 15 minutes left are fetched again on the
/// pod's next AWS call, and on every call while the answer still has under 15 minutes.
pub const SDK_REFRESH_BEFORE: i64 = 15 * MINUTE;
/// How often a pod makes an AWS call, so how soon it asks again when its credentials are short.
pub const SDK_CALL_EVERY: i64 = MINUTE;
pub const SIX_HOURS: i64 = 6 * HOUR;
pub const CROSS_ACCOUNT: i64 = 59 * MINUTE;

/// The shape of the day.
#[derive(Debug, Clone)]
pub struct Params {
    pub nodes: usize,
    pub pods: usize,
    /// Hours measured, after the warm-up.
    pub hours: i64,
    /// Hours the agent runs before measuring, so that the day starts in steady state.
    pub warmup_hours: i64,
    /// Share of pod slots whose pods come and go (the rest run all day).
    pub churning: f64,
    /// Mean life of a churning pod (exponential), in hours.
    pub churn_mean_hours: f64,
    /// Share of pods whose association has a target role (59-minute credentials).
    pub cross_account: f64,
    pub seed: u64,
}

impl Params {
    pub fn end(&self) -> i64 {
        (self.warmup_hours + self.hours) * HOUR
    }

    pub fn measured(&self, t: i64) -> bool {
        t >= self.warmup_hours * HOUR && t < self.end()
    }
}

/// A pod's token: a distinct id per token kubelet writes, and its time claims (ms from the
/// agent's start; a pod that ran before the agent has a token issued before it).
#[derive(Debug, Clone, Copy)]
pub struct PodToken {
    pub id: u64,
    pub issued: i64,
    pub expires: i64,
}

/// A pod as an agent sees it.
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: u64,
    pub node: usize,
    /// The lifetime of the credentials EKS Auth issues for its association.
    pub credentials: i64,
    pub token: PodToken,
}

/// What an agent answered a pod.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// Credentials expiring at this time, and how they were found.
    Served {
        expires: i64,
        kind: Kind,
    },
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// From memory.
    Hit,
    /// From memory past the point where a fresh exchange is preferred.
    Stale,
    /// The request waited for an exchange.
    Miss,
    /// A rotated token answered from its pod's credentials.
    Rotated,
}

/// An agent under simulation: the real one, or a model.
pub trait Agent {
    /// Let the agent's time run to `t` (its own refreshes happen meanwhile).
    async fn advance_to(&mut self, t: i64);
    async fn ask(&mut self, pod: &Pod, t: i64) -> Answer;
    /// The pod stopped (the agent itself is not told; models may count what it costs).
    fn stopped(&mut self, _pod: &Pod) {}
    /// EKS Auth calls per second of the run, from its start: all of them, and those for
    /// 59-minute credentials.
    fn calls_per_second(&self) -> (Vec<u32>, Vec<u32>);
}

/// What the pods saw, over the measured hours.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub requests: u64,
    pub hits: u64,
    pub stale: u64,
    pub misses: u64,
    pub rotated: u64,
    pub errors: u64,
    /// The least remaining lifetime of any credentials served (ms).
    pub least_left: Option<i64>,
    /// Pods started during the measured hours.
    pub pods_started: u64,
    pub rotations: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Ask,
    Rotate,
    Stop,
}

/// An event in the queue: when, the order it was queued in (ties), the slot, the slot's
/// generation then (a replaced pod's events are dropped), what.
type Queued = (i64, u64, usize, u64, Event);

struct Slot {
    pod: Pod,
    /// Bumped when the slot's pod is replaced: its pending events are then stale.
    generation: u64,
    churns: bool,
}

struct World<'p> {
    params: &'p Params,
    rng: fastrand::Rng,
    slots: Vec<Slot>,
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    next_id: u64,
    seen: Seen,
}

impl World<'_> {
    fn push(&mut self, at: i64, slot: usize, event: Event) {
        if at >= self.params.end() {
            return;
        }
        self.seq += 1;
        let generation = self.slots.get(slot).map_or(0, |s| s.generation);
        self.queue
            .push(Reverse((at, self.seq, slot, generation, event)));
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn token(&mut self, issued: i64) -> PodToken {
        PodToken {
            id: self.id(),
            issued,
            expires: issued + TOKEN_LIFETIME,
        }
    }

    /// Kubelet's next rewrite of a token issued at `issued` (its sync loop adds up to a minute).
    fn rotation_of(&mut self, issued: i64) -> i64 {
        issued + TOKEN_ROTATION + self.rng.i64(0..MINUTE)
    }

    fn churn_life(&mut self) -> i64 {
        let u = self.rng.f64().max(1e-12);
        (-u.ln() * self.params.churn_mean_hours * HOUR as f64) as i64
    }

    fn credentials(&mut self) -> i64 {
        if self.rng.f64() < self.params.cross_account {
            CROSS_ACCOUNT
        } else {
            SIX_HOURS
        }
    }

    /// The pods running when the agent starts: tokens of every age, and SDKs holding
    /// credentials from before, asked for again when those near expiry.
    fn populate(&mut self) {
        for i in 0..self.params.pods {
            let churns = self.rng.f64() < self.params.churning;
            let issued = -self.rng.i64(0..TOKEN_ROTATION);
            let pod = Pod {
                id: self.id(),
                node: i % self.params.nodes,
                credentials: self.credentials(),
                token: self.token(issued),
            };
            let first_ask = self.rng.i64(0..pod.credentials - SDK_REFRESH_BEFORE);
            let rotation = self.rotation_of(issued);
            self.slots.push(Slot {
                pod,
                generation: 0,
                churns,
            });
            self.push(first_ask, i, Event::Ask);
            self.push(rotation, i, Event::Rotate);
            if churns {
                let stop = self.churn_life();
                self.push(stop, i, Event::Stop);
            }
        }
    }

    /// A new pod in `slot` at `t`, on the same node: a new token, its first request within
    /// seconds of starting.
    fn start(&mut self, slot: usize, t: i64) {
        let credentials = self.credentials();
        let token = self.token(t);
        let id = self.id();
        let first_ask = t + self.rng.i64(SECOND..10 * SECOND);
        let rotation = self.rotation_of(t);
        let stop = t + self.churn_life();
        if let Some(s) = self.slots.get_mut(slot) {
            s.generation += 1;
            s.pod = Pod {
                id,
                node: s.pod.node,
                credentials,
                token,
            };
        }
        if self.params.measured(t) {
            self.seen.pods_started += 1;
        }
        self.push(first_ask, slot, Event::Ask);
        self.push(rotation, slot, Event::Rotate);
        self.push(stop, slot, Event::Stop);
    }

    /// When the pod asks next, given what it was answered at `t`.
    fn next_ask(&mut self, answer: Answer, t: i64) -> i64 {
        match answer {
            Answer::Served { expires, .. } => {
                let advisory = expires - SDK_REFRESH_BEFORE + self.rng.i64(0..SDK_CALL_EVERY);
                advisory.max(t + SDK_CALL_EVERY)
            }
            Answer::Error => t + SDK_CALL_EVERY,
        }
    }

    fn record(&mut self, answer: Answer, t: i64) {
        if !self.params.measured(t) {
            return;
        }
        let seen = &mut self.seen;
        seen.requests += 1;
        match answer {
            Answer::Served { expires, kind } => {
                let left = expires - t;
                seen.least_left = Some(seen.least_left.map_or(left, |l| l.min(left)));
                match kind {
                    Kind::Hit => seen.hits += 1,
                    Kind::Stale => seen.stale += 1,
                    Kind::Miss => seen.misses += 1,
                    Kind::Rotated => seen.rotated += 1,
                }
            }
            Answer::Error => seen.errors += 1,
        }
    }
}

/// Play the day against `agent`.
pub async fn simulate<A: Agent>(params: &Params, agent: &mut A) -> Seen {
    let mut w = World {
        params,
        rng: fastrand::Rng::with_seed(params.seed),
        slots: Vec::with_capacity(params.pods),
        queue: BinaryHeap::new(),
        seq: 0,
        next_id: 0,
        seen: Seen::default(),
    };
    w.populate();
    while let Some(Reverse((t, _, slot, generation, event))) = w.queue.pop() {
        let Some(s) = w.slots.get(slot) else { continue };
        if s.generation != generation {
            continue;
        }
        agent.advance_to(t).await;
        match event {
            Event::Ask => {
                let pod = s.pod.clone();
                let answer = agent.ask(&pod, t).await;
                w.record(answer, t);
                let next = w.next_ask(answer, t);
                w.push(next, slot, Event::Ask);
            }
            Event::Rotate => {
                let token = w.token(t);
                let rotation = w.rotation_of(t);
                if let Some(s) = w.slots.get_mut(slot) {
                    s.pod.token = token;
                }
                if params.measured(t) {
                    w.seen.rotations += 1;
                }
                w.push(rotation, slot, Event::Rotate);
            }
            Event::Stop => {
                agent.stopped(&s.pod);
                if s.churns {
                    w.start(slot, t);
                }
            }
        }
    }
    agent.advance_to(params.end()).await;
    w.seen
}

/// Count a call in its second.
pub fn count(calls: &mut Vec<u32>, second: usize) {
    if calls.len() <= second {
        calls.resize(second + 1, 0);
    }
    calls[second] += 1;
}
