//! Remembered rejections: a token EKS Auth (or local verification) refused is answered from
//! memory for a while, so repeating it costs no EKS Auth call.
//!
//! Contract: [`Rejections::remember`] keeps a refusal by token hash; [`Rejections::recall`]
//! returns it, with its age, until it expires:
//! - a refusal of the token itself ([`Fault::Token`]: invalid, expired, no association, a bad
//!   request; or a signature that failed local verification) for `ttl` (`--negative-cache-ttl`,
//!   default 60 s);
//! - a refusal of the node's own credentials ([`Fault::Node`]) for at most [`NODE_FAULT_TTL`]:
//!   it heals when the node's credentials do, and until then every pod is waiting;
//! - never a transient failure (throttling, 5xx, unreachable): those are what retries are for.
//!
//! The map is bounded by its own size (`--negative-cache-size`), separate from the credential
//! cache's, least recently used first; a flood of distinct forged tokens can only push out other
//! remembered refusals, never credentials.
//!
//! Ages are read on tokio's clock (the cache's [`super::Clock::instant`]), and [`recall`] answers
//! only a refusal younger than its TTL, so a paused runtime (tests, `benches/simulate`) moves
//! them. The map's own expiry runs on real time and only frees memory.
//!
//! [`recall`]: Rejections::recall

use crate::eks_auth::{ExchangeError, Fault};
use crate::token::TokenHash;
use moka::Expiry;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Refusals of the node's credentials are remembered at most this long.
pub const NODE_FAULT_TTL: Duration = Duration::from_secs(5);

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// EKS Auth's answer.
    Upstream(ExchangeError),
    /// The token's signature, issuer or audience failed local verification.
    Unverified(String),
    /// A verified token of a pod on another node (named).
    OtherNode(String),
}

impl Refusal {
    fn fault(&self) -> Fault {
        match self {
            Refusal::Upstream(e) => e.fault(),
            Refusal::Unverified(_) | Refusal::OtherNode(_) => Fault::Token,
        }
    }
}

/// A refusal and when it was made.
#[derive(Debug)]
pub struct Remembered {
    pub refusal: Refusal,
    at: Instant,
    ttl: Duration,
}

impl Remembered {
    pub fn age(&self) -> Duration {
        self.at.elapsed()
    }

    /// How long it is remembered in all.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[derive(Debug, Clone, Copy)]
pub struct NegativeSettings {
    pub ttl: Duration,
    pub max_entries: u64,
}

impl Default for NegativeSettings {
    fn default() -> Self {
        NegativeSettings {
            ttl: crate::defaults::DEFAULT_NEGATIVE_CACHE_TTL,
            max_entries: crate::defaults::DEFAULT_NEGATIVE_CACHE_SIZE,
        }
    }
}

struct OwnTtl;

impl Expiry<TokenHash, Arc<Remembered>> for OwnTtl {
    fn expire_after_create(
        &self,
        _: &TokenHash,
        r: &Arc<Remembered>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(r.ttl)
    }
}

pub struct Rejections {
    map: moka::sync::Cache<TokenHash, Arc<Remembered>>,
    ttl: Duration,
}

impl Rejections {
    pub fn new(settings: &NegativeSettings) -> Rejections {
        Rejections {
            map: moka::sync::Cache::builder()
                // --negative-cache-size refuses 0 where parsed; this guards library callers.
                .max_capacity(settings.max_entries.max(1))
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .expire_after(OwnTtl)
                .build(),
            ttl: settings.ttl,
        }
    }

    /// Remember `refusal` for `hash` if it is the kind that is remembered; returns whether it was.
    pub fn remember(&self, hash: TokenHash, refusal: Refusal) -> bool {
        let ttl = match refusal.fault() {
            Fault::Token => self.ttl,
            Fault::Node => self.ttl.min(NODE_FAULT_TTL),
            Fault::Transient => return false,
        };
        if ttl.is_zero() {
            return false;
        }
        self.map.insert(
            hash,
            Arc::new(Remembered {
                refusal,
                at: Instant::now(),
                ttl,
            }),
        );
        true
    }

    pub fn recall(&self, hash: &TokenHash) -> Option<Arc<Remembered>> {
        self.map.get(hash).filter(|r| r.age() < r.ttl)
    }

    /// Every refusal remembered now and how long it is left to be (for a successor agent).
    pub fn export(&self) -> Vec<(TokenHash, Refusal, Duration)> {
        self.map
            .iter()
            .filter_map(|(hash, r)| {
                let left = r.ttl.checked_sub(r.age())?;
                Some((*hash, r.refusal.clone(), left))
            })
            .collect()
    }

    /// Remember `refusal` for `hash` for what is `left` of it (a predecessor's), at most as long
    /// as this agent would have.
    pub fn import(&self, hash: TokenHash, refusal: Refusal, left: Duration) {
        let ttl = match refusal.fault() {
            Fault::Token => self.ttl,
            Fault::Node => self.ttl.min(NODE_FAULT_TTL),
            Fault::Transient => return,
        }
        .min(left);
        if !ttl.is_zero() {
            self.map.insert(
                hash,
                Arc::new(Remembered {
                    refusal,
                    at: Instant::now(),
                    ttl,
                }),
            );
        }
    }

    /// Refusals remembered now (pending housekeeping applied first).
    pub fn len(&self) -> u64 {
        self.map.run_pending_tasks();
        self.map.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(status: u16, code: &str) -> Refusal {
        Refusal::Upstream(ExchangeError::Service {
            status,
            code: code.into(),
            message: "m".into(),
            request_id: None,
        })
    }

    #[test]
    fn remembers_by_fault() {
        let r = Rejections::new(&NegativeSettings::default());
        let h = |n: u8| TokenHash([n; 32]);
        assert!(r.remember(h(1), service(400, "InvalidTokenException")));
        assert!(r.remember(h(2), service(403, "UnrecognizedClientException")));
        assert!(r.remember(h(3), Refusal::Unverified("bad signature".into())));
        assert!(!r.remember(h(4), service(429, "ThrottlingException")));
        assert!(!r.remember(h(5), service(503, "ServiceUnavailableException")));
        assert!(!r.remember(
            h(6),
            Refusal::Upstream(ExchangeError::Unavailable("x".into()))
        ));
        assert_eq!(
            r.recall(&h(1)).map(|m| m.ttl()),
            Some(Duration::from_secs(60))
        );
        assert_eq!(r.recall(&h(2)).map(|m| m.ttl()), Some(NODE_FAULT_TTL));
        assert!(r.recall(&h(4)).is_none());
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn forgets_after_its_ttl_and_stays_bounded() {
        let r = Rejections::new(&NegativeSettings {
            ttl: Duration::from_millis(50),
            max_entries: 100,
        });
        assert!(r.remember(
            TokenHash([9; 32]),
            service(404, "ResourceNotFoundException")
        ));
        assert!(r.recall(&TokenHash([9; 32])).is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert!(r.recall(&TokenHash([9; 32])).is_none());
        for n in 0..1000u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&n.to_le_bytes());
            r.remember(TokenHash(k), Refusal::Unverified("forged".into()));
        }
        assert!(r.len() <= 100, "{}", r.len());
    }

    /// On a paused clock: a token refusal is answered for its TTL and not a moment past it,
    /// the node's own for at most [`NODE_FAULT_TTL`], and what a successor gets is what is left.
    #[tokio::test(start_paused = true)]
    async fn remembered_for_its_ttl_on_the_caches_clock() {
        let r = Rejections::new(&NegativeSettings::default());
        let (token, node) = (TokenHash([1; 32]), TokenHash([2; 32]));
        r.remember(token, service(400, "InvalidTokenException"));
        r.remember(node, service(403, "UnrecognizedClientException"));
        tokio::time::advance(NODE_FAULT_TTL - Duration::from_millis(1)).await;
        assert!(r.recall(&node).is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(r.recall(&node).is_none(), "the node heals within its TTL");
        tokio::time::advance(Duration::from_secs(50)).await;
        let left: Vec<_> = r.export().into_iter().map(|(_, _, left)| left).collect();
        assert_eq!(left, vec![Duration::from_secs(5)]);
        let remembered = r.recall(&token).expect("still remembered");
        assert_eq!(remembered.age(), Duration::from_secs(55));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(r.recall(&token).is_none(), "asked again after its TTL");
    }
}
