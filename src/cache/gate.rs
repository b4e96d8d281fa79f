//! The seam between the cache and whoever decides if an exchange may start: the cache defines
//! it, admission ([`crate::admission`]) implements it, so the cache knows nothing of budgets.
//!
//! Contract: the cache asks a [`Gate`] only inside the one flight a token's miss starts, never
//! for a hit or a request joining a flight: first [`Gate::identify`] (verify the token; a verified
//! token may be served its pod's cached credentials with no exchange at all), then, if an
//! exchange is needed, [`Gate::admit`] for the [`Caller`] it is charged to. Whatever admission
//! decides reaches every request waiting on that flight. A [`Ticket`] is held by the flight's
//! task for as long as the exchange runs, so a client that hangs up keeps its slot until then.

use crate::token::{PodIdentity, PodKey, Token};
use futures_util::future::BoxFuture;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Who an exchange is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The pod a verified token names.
    Pod(PodKey),
    /// The source address of the request that started the flight (an unverified token).
    Source(IpAddr),
}

/// Decides whether a request may start a new exchange.
pub trait Gate: Send + Sync + 'static {
    /// Verify `token`: `Ok(Some(pod))` verified, `Ok(None)` not verified (verification off, or
    /// the keys could not say), `Err` refused without asking EKS Auth.
    fn identify(
        self: Arc<Self>,
        token: Token,
    ) -> BoxFuture<'static, Result<Option<PodIdentity>, Denial>>;

    /// The budgets one exchange charged to `caller` needs; may wait for a shared budget, briefly.
    fn admit(self: Arc<Self>, caller: Caller) -> BoxFuture<'static, Result<Ticket, Denial>>;
}

/// What a gate wants held for as long as the exchange it admitted runs (budget slots).
pub struct Ticket(#[allow(dead_code)] Option<Box<dyn Send + Sync>>);

impl Ticket {
    /// Nothing to hold.
    pub fn free() -> Ticket {
        Ticket(None)
    }

    pub fn holding(held: impl Send + Sync + 'static) -> Ticket {
        Ticket(Some(Box::new(held)))
    }
}

/// Who is over a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The client that asked (its pod, or its source).
    Client,
    /// The node as a whole.
    Node,
}

/// Why a gate refused to start an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// Over a budget: try again after `retry_after`. Not remembered.
    Busy { scope: Scope, retry_after: Duration },
    /// The token failed local verification; remembered like EKS Auth's rejection when
    /// `remember` (no key set could explain the failure).
    Invalid { why: String, remember: bool },
    /// A verified token of a pod on another node (`--node-name`): remembered.
    OtherNode { node: String },
}

/// A gate that admits everything and verifies nothing: for callers with no budgets
/// (benchmarks, tests).
pub struct Open;

impl Gate for Open {
    fn identify(
        self: Arc<Self>,
        _: Token,
    ) -> BoxFuture<'static, Result<Option<PodIdentity>, Denial>> {
        Box::pin(async { Ok(None) })
    }

    fn admit(self: Arc<Self>, _: Caller) -> BoxFuture<'static, Result<Ticket, Denial>> {
        Box::pin(async { Ok(Ticket::free()) })
    }
}
