//! Who a refused token is, for an Event on its pod.
//!
//! Contract: [`Identify::pod`] names a pod only from verified claims: the identity the request
//! path verified (an exchange refusal carries it, and it is remembered for the token's repeats,
//! which the negative cache answers without it), or, for a token refused before any exchange
//! (expired), what the keys held now verify, within a budget of [`VERIFY_RATE`] a second that is
//! spent only on a token that names a key held and expired less than [`REPORTED_EXPIRY`] ago.
//! Verdicts are remembered for [`REMEMBERED_TOKENS`] tokens, each for one interval; a made-up
//! `kid` is not remembered (it cost nothing, and must not push real verdicts out). The pod must
//! be this node's if its token names a node, and its names ones Kubernetes accepts.

use super::{EventSettings, Report, REMEMBERED_TOKENS, REPORTED_EXPIRY, VERIFY_RATE};
use crate::bucket::TokenBucket;
use crate::kube::is_dns_subdomain;
use crate::token::{PodIdentity, Token, TokenHash};
use crate::verify::Verifier;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub(super) struct Identify {
    verifier: Option<Arc<Verifier>>,
    /// Verdicts by token: who the token is, if verified.
    verdicts: moka::sync::Cache<TokenHash, Option<Arc<PodIdentity>>>,
    budget: TokenBucket,
    /// `--node-name`.
    node: String,
}

impl Identify {
    pub(super) fn new(settings: &EventSettings, verifier: Option<Arc<Verifier>>) -> Identify {
        Identify {
            verifier,
            verdicts: moka::sync::Cache::builder()
                .max_capacity(REMEMBERED_TOKENS)
                .time_to_live(settings.interval)
                .build(),
            budget: TokenBucket::with_burst(f64::from(VERIFY_RATE), VERIFY_RATE),
            node: settings.node.clone(),
        }
    }

    /// The pod the refused request's token names (see the module contract), if any.
    pub(super) async fn pod(&self, r: &Report) -> Option<Arc<PodIdentity>> {
        let id = match (&r.pod, &r.token) {
            (Some(id), token) => {
                if let Some(t) = token {
                    self.verdicts.insert(t.hash(), Some(id.clone()));
                }
                id.clone()
            }
            (None, Some(token)) => self.verify(token).await?,
            (None, None) => return None,
        };
        // A token without a node claim (clusters before 1.30) cannot say where its pod runs;
        // requiring one would leave those clusters without pod Events, and such a token, verified
        // and recent, still names only its own pod.
        let here = id.node_name.as_deref().is_none_or(|n| n == self.node);
        let named = is_dns_subdomain(&id.namespace)
            && is_dns_subdomain(&id.pod_name)
            && id.pod_uid.len() <= 128;
        (here && named).then_some(id)
    }

    /// A token no request verified: verified with the keys held, on the budget, if it is recent
    /// and names a key held.
    async fn verify(&self, token: &Token) -> Option<Arc<PodIdentity>> {
        let verifier = self.verifier.as_ref()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if token.claims().exp.saturating_add(REPORTED_EXPIRY.as_secs()) < now {
            return None;
        }
        if let Some(known) = self.verdicts.get(&token.hash()) {
            return known;
        }
        if !verifier.holds_key_for(token) {
            return None;
        }
        self.budget.try_take().ok()?;
        let id = verifier.identify_held(token).await.map(Arc::new);
        self.verdicts.insert(token.hash(), id.clone());
        id
    }
}
