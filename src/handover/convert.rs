//! The cache's values as the wire carries them, and back. Times travel as milliseconds since
//! the epoch; token hashes and pod keys as hex; a value that does not read back is dropped (the
//! entry is then made again by an exchange), never trusted half-read.

use super::wire::{WireEntry, WireRefusal};
use crate::cache::policy::Plan;
use crate::cache::{Carried, Demand, Exported, Refusal};
use crate::eks_auth::ExchangeError;
use crate::token::{PodKey, TokenHash};
use crate::util::{from_millis as time, millis};
use std::time::Duration;

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

pub fn hash_to_wire(h: &TokenHash) -> String {
    hex(&h.0)
}

pub fn hash_from_wire(s: &str) -> Option<TokenHash> {
    unhex(s).map(TokenHash)
}

pub fn entry_to_wire(x: Exported) -> WireEntry {
    WireEntry {
        token: x.token,
        body: x.body,
        refresh_at_ms: millis(x.plan.refresh_at),
        hard_at_ms: millis(x.plan.hard_at),
        serve_queued_until_ms: millis(x.plan.serve_queued_until),
        valid_until_ms: millis(x.valid_until),
        demand: x.state.demand as u8,
        failures: x.state.failures,
        retry_after_ms: millis(x.state.retry_after),
        pod: x.pod.map(|k| hex(&k.0)),
    }
}

pub fn entry_from_wire(w: WireEntry) -> Exported {
    Exported {
        pod: w.pod.as_deref().and_then(unhex).map(PodKey),
        token: w.token,
        body: w.body,
        plan: Plan {
            refresh_at: time(w.refresh_at_ms),
            hard_at: time(w.hard_at_ms),
            serve_queued_until: time(w.serve_queued_until_ms),
        },
        valid_until: time(w.valid_until_ms),
        state: Carried {
            demand: Demand::from_wire(w.demand),
            failures: w.failures,
            retry_after: time(w.retry_after_ms),
        },
    }
}

pub fn refusal_to_wire(hash: &TokenHash, refusal: &Refusal, left: Duration) -> WireRefusal {
    let left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
    let (kind, status, code, message, request_id) = match refusal {
        Refusal::Upstream(ExchangeError::Service {
            status,
            code,
            message,
            request_id,
        }) => (
            "upstream",
            *status,
            code.clone(),
            message.clone(),
            request_id.clone(),
        ),
        Refusal::Upstream(other) => (
            "upstream",
            0,
            other.code().to_owned(),
            other.to_string(),
            None,
        ),
        Refusal::Unverified(why) => ("unverified", 0, String::new(), why.clone(), None),
        Refusal::OtherNode(node) => ("other_node", 0, String::new(), node.clone(), None),
    };
    WireRefusal {
        token: hash_to_wire(hash),
        kind: kind.to_owned(),
        status,
        code,
        message,
        request_id,
        left_ms,
    }
}

pub fn refusal_from_wire(w: WireRefusal) -> Option<(TokenHash, Refusal, Duration)> {
    let hash = hash_from_wire(&w.token)?;
    let refusal = match w.kind.as_str() {
        // Only EKS Auth's refusals with a status are carried over; anything else is asked again.
        "upstream" if (400..600).contains(&w.status) => Refusal::Upstream(ExchangeError::Service {
            status: w.status,
            code: w.code,
            message: w.message,
            request_id: w.request_id,
        }),
        "unverified" => Refusal::Unverified(w.message),
        "other_node" => Refusal::OtherNode(w.message),
        _ => return None,
    };
    Some((hash, refusal, Duration::from_millis(w.left_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_refusals_round_trip_and_garbage_is_dropped() {
        let h = TokenHash([0xab; 32]);
        assert_eq!(hash_from_wire(&hash_to_wire(&h)), Some(h));
        for bad in ["", "zz", &"g".repeat(64), "é".repeat(32).as_str()] {
            assert_eq!(hash_from_wire(bad), None, "{bad}");
        }
        let r = Refusal::Upstream(ExchangeError::Service {
            status: 404,
            code: "ResourceNotFoundException".into(),
            message: "none".into(),
            request_id: Some("r".into()),
        });
        let back = refusal_from_wire(refusal_to_wire(&h, &r, Duration::from_secs(30)))
            .expect("reads back");
        assert_eq!((back.0, back.1, back.2), (h, r, Duration::from_secs(30)));
        let mut odd = refusal_to_wire(&h, &Refusal::Unverified("x".into()), Duration::ZERO);
        odd.kind = "something-new".into();
        assert!(refusal_from_wire(odd).is_none());
    }
}
