//! One flight: what a miss or a refresh does once it owns a token's single flight.
//!
//! Contract: [`Inner::start_or_join`] joins the flight under way for a token, or starts one in a
//! task of its own on the cache's tracker (ended by the abort token at the end of the shutdown
//! grace, its waiters then told so), unless the entry turned out servable under the flights
//! lock. A request's flight asks the gate who the token is, answers a verified rotated token
//! from its pod's entry ([`Inner::rotate`]), asks the gate's budgets, then exchanges; a
//! refresh's flight exchanges at once (refreshes have the scheduler's own budget). An exchange
//! is fetched, audited and installed, or its failure is applied by whose fault it is.

use super::policy::Plan;
use super::{CacheError, Caller, Denial, Entry, FlightResult, Found, Inner, Refusal, Ticket};
use crate::audit::{self, Trigger};
use crate::credentials::Credentials;
use crate::eks_auth::{ExchangeError, Fault, Fetched};
use crate::token::{PodIdentity, PodKey, Token};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// What starts a flight.
#[derive(Debug, Clone, Copy)]
pub(super) enum Start {
    /// A pod's request, from this source address.
    Request(IpAddr),
    /// The scheduler renewing an entry, of this pod if it was verified.
    Refresh(Option<PodKey>),
}

/// What `start_or_join` found.
pub(super) enum Join<C> {
    /// A request may be answered from the cache after all (checked under the flights lock).
    Servable(C),
    /// Wait for the flight; `started` if this caller started it.
    Waiting {
        rx: watch::Receiver<Option<FlightResult>>,
        started: bool,
    },
}

impl Inner {
    /// Join the flight under way for `token`, or start one; unless `servable` (called under the
    /// flights lock) finds that none is needed.
    pub(super) fn start_or_join<C>(
        self: &Arc<Self>,
        token: &Token,
        servable: impl FnOnce() -> Option<C>,
        start: Start,
    ) -> Join<C> {
        use super::flight::Lookup;
        match self.flights.join_or_start(&token.hash(), servable) {
            Lookup::Cached(c) => Join::Servable(c),
            Lookup::Joined(rx) => Join::Waiting { rx, started: false },
            Lookup::Started(tx, rx) => {
                let inner = self.clone();
                let token = token.clone();
                self.tasks.spawn(async move {
                    let abort = inner.abort.clone();
                    tokio::select! {
                        result = inner.fly(token, start) => tx.finish(result),
                        // Dropping `tx` unfinished tells the waiters the flight was abandoned.
                        _ = abort.cancelled() => {}
                    }
                });
                Join::Waiting { rx, started: true }
            }
        }
    }

    async fn fly(self: &Arc<Self>, token: Token, start: Start) -> FlightResult {
        let source = match start {
            Start::Refresh(pod) => {
                let entry = self.exchange(&token, pod, Trigger::Refresh).await?;
                return Ok((entry, Found::Exchanged));
            }
            Start::Request(source) => source,
        };
        let pod = match self.gate.clone().identify(token.clone()).await {
            Ok(pod) => pod,
            Err(denial) => {
                self.remember_denial(&token, &denial);
                return Err(CacheError::Denied(denial));
            }
        };
        if let Some(id) = &pod {
            if let Some(entry) = self.rotate(&token, id) {
                return Ok((entry, Found::Rotated));
            }
        }
        let caller = pod
            .as_ref()
            .map_or(Caller::Source(source), |p| Caller::Pod(p.key()));
        let ticket: Ticket = self
            .gate
            .clone()
            .admit(caller)
            .await
            .map_err(CacheError::Denied)?;
        let pod = pod.map(Arc::new);
        let entry = self
            .exchange(
                &token,
                pod.as_ref().map(|p| p.key()),
                Trigger::Request(Some(source)),
            )
            .await;
        drop(ticket);
        match entry {
            Ok(entry) => Ok((entry, Found::Exchanged)),
            // Who the token is goes with the refusal: an Event on the pod needs no second check.
            Err(CacheError::Exchange(e, _)) => Err(CacheError::Exchange(e, pod)),
            Err(e) => Err(e),
        }
    }

    fn remember_denial(&self, token: &Token, denial: &Denial) {
        let refusal = match denial {
            Denial::Invalid {
                why,
                remember: true,
            } => Refusal::Unverified(why.clone()),
            Denial::OtherNode { node } => Refusal::OtherNode(node.clone()),
            Denial::Invalid { .. } | Denial::Busy { .. } => return,
        };
        self.rejections.remember(token.hash(), refusal);
    }

    /// The pod's cached credentials for a verified `token` the pod's kubelet rotated, if the
    /// entry made for the pod's earlier token may still be served: the entry moves to `token`
    /// when `token` is the newer one; an older token of the pod (a container still reading the
    /// previous file) is answered from the entry as it is.
    fn rotate(&self, token: &Token, id: &PodIdentity) -> Option<Arc<Entry>> {
        let key = id.key();
        let hash = self.pods.get(&key)?;
        let old = self.entries.get(&hash).filter(|e| e.pod == Some(key))?;
        let now = self.clock.wall();
        old.serve_without_exchange(now)?;
        if old.token.hash() == token.hash() || token.claims().exp <= old.token.claims().exp {
            old.mark_used();
            return Some(old);
        }
        let valid_until = old
            .credentials()
            .expiration()
            .min(token.expires_at(self.leeway));
        let entry = self.put(|generation| old.rotated(token.clone(), valid_until, generation));
        // Gone from this agent, and from a successor that took a snapshot before.
        self.evict(&hash);
        let s = id.subject();
        tracing::debug!(token = %token.hash(), previous = %hash, pod = %key, namespace = %s.namespace,
            service_account = %s.service_account, "a pod's rotated token found its cached credentials");
        Some(entry)
    }

    /// One exchange: fetch and build the entry, then install it or apply the failure policy.
    async fn exchange(
        &self,
        token: &Token,
        pod: Option<PodKey>,
        trigger: Trigger,
    ) -> Result<Arc<Entry>, CacheError> {
        match self.fetch_entry(token, trigger).await {
            Ok((credentials, plan)) => {
                let valid_until = credentials.expiration().min(token.expires_at(self.leeway));
                let previous = self.entries.get(&token.hash());
                if trigger == Trigger::Refresh
                    && previous.as_ref().is_none_or(|p| p.is_superseded())
                {
                    // Rotated to the pod's newer token (or evicted) while the renewal was under
                    // way: installing it would bring the old token back and point the pod at it.
                    let entry = Entry::new(token.clone(), credentials, plan, valid_until, 0, pod);
                    return Ok(Arc::new(entry));
                }
                let entry = self.put(|generation| {
                    let e = Entry::new(
                        token.clone(),
                        credentials,
                        plan,
                        valid_until,
                        generation,
                        pod,
                    );
                    if let Some(p) = &previous {
                        e.inherit_delivery(p);
                    }
                    e
                });
                tracing::debug!(token = %token.hash(), access_key_id = entry.credentials().access_key_id(),
                    expires = %crate::credentials::format_expiration(entry.credentials().expiration()),
                    "exchanged token for credentials");
                Ok(entry)
            }
            Err(e) => {
                self.apply_failure(token, &e);
                if trigger == Trigger::Refresh && e.fault() == Fault::Node {
                    if let Some(tell) = self.node_refused.get() {
                        tell(&e);
                    }
                }
                Err(e.into())
            }
        }
    }

    /// Ask EKS Auth for credentials, and plan their refresh.
    async fn fetch_entry(
        &self,
        token: &Token,
        trigger: Trigger,
    ) -> Result<(Credentials, Plan), ExchangeError> {
        let m = &self.metrics;
        let result = {
            let _in_flight = m.eks_auth_in_flight_guard();
            let started = Instant::now();
            let result = self.source.fetch(token).await;
            m.eks_auth_duration.observe(started.elapsed().as_secs_f64());
            result
        };
        m.eks_auth_calls
            .with_label_values(&[match &result {
                Ok(_) => "Success",
                Err(e) => e.metric_code(),
            }])
            .inc();
        let Fetched {
            credentials,
            identity,
        } = match result {
            Ok(fetched) => fetched,
            Err(e) => {
                audit::exchange(token, trigger, Err(&e));
                return Err(e);
            }
        };
        audit::exchange(token, trigger, Ok((&identity, &credentials)));
        let plan = self
            .policy
            .plan(self.clock.wall(), credentials.expiration());
        Ok((credentials, plan))
    }

    /// A failed exchange. The token's fault evicts its entry (unless its credentials survive
    /// it, see [`ExchangeError::recoverable`]) and is remembered; otherwise the entry backs off
    /// (it keeps being served while valid, and is retried then), and the node's fault is
    /// remembered briefly too.
    fn apply_failure(&self, token: &Token, e: &ExchangeError) {
        let hash = token.hash();
        let fault = e.fault();
        let kind = if e.recoverable() {
            "Recoverable"
        } else {
            "NonRecoverable"
        };
        self.metrics
            .cache_errors
            .with_label_values(&[kind, e.metric_code()])
            .inc();
        let current = self.entries.get(&hash);
        match &current {
            Some(_) if !e.recoverable() => self.evict(&hash),
            Some(entry) => {
                let retry_at = entry.back_off(self.clock.wall());
                if retry_at < entry.valid_until {
                    self.scheduler.schedule(hash, entry.generation, retry_at);
                }
            }
            None => {}
        }
        self.rejections.remember(hash, Refusal::Upstream(e.clone()));
        let s = token.subject();
        if fault == Fault::Node {
            self.node_refusals.insert(hash, ());
            self.metrics
                .node_refused
                .with_label_values(&[e.metric_code()])
                .inc();
            tracing::warn!(token = %hash, namespace = %s.namespace, service_account = %s.service_account,
                code = e.code(), error = %e, kept_cached_credentials = current.is_some(),
                "EKS Auth refused the node's own credentials; pods keep their cached credentials");
        } else {
            tracing::warn!(token = %hash, namespace = %s.namespace, service_account = %s.service_account,
                code = e.code(), fault = fault.as_str(), error = %e, "EKS Auth exchange failed");
        }
    }
}
