//! What the agent sends the API server for an Event: its name, the new Event, and the merge
//! patch of its series.
//!
//! Contract: [`event_name`] is `<object>.<16 hex digits>`, a DNS subdomain of at most 253
//! characters unique per series (Kubernetes names Events of one object alike). [`create_body`]
//! is an `events.k8s.io/v1` Event that `k8s-openapi`'s type reads with no unknown field, with a
//! `series` once it counts more than one refusal; [`patch_body`] holds only the `series`.
//! [`note`] is the one table's words ([`crate::explain`]) for the code on the Event's side, cut
//! at a character boundary to at most [`MAX_NOTE`] bytes, the API server's limit.

use super::{On, CONTROLLER};
use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::SystemTime;

/// The API server refuses an Event whose note is longer than 1 KiB (bytes, not characters).
pub const MAX_NOTE: usize = 1024;
/// The Event's `action`.
const ACTION: &str = "AssumeRoleForPodIdentity";

/// What an Event says, about what, as the worker keeps it for its series.
pub struct Described<'a> {
    pub on: On,
    pub name: &'a str,
    pub namespace: &'a str,
    pub regarding: &'a Value,
    pub note: &'a str,
    pub count: u32,
    pub last_observed: SystemTime,
}

/// The Event's note: the table's words for the code, on the Event's side.
pub fn note(code: &str, status: u16, on: On) -> String {
    cut(
        crate::explain::explained(code, status, Some(on.side())),
        MAX_NOTE,
    )
}

/// `s` in at most `max` bytes: cut at a character boundary, with `…` where it was cut.
fn cut(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    const MORE: &str = "…";
    let mut at = max.saturating_sub(MORE.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    format!("{}{MORE}", &s[..at])
}

/// `<object>.<16 hex digits>` for the series of `key` (object uid or empty, and reason) about
/// `base`, first seen at `first`.
pub fn event_name(base: &str, key: &(String, &'static str), first: SystemTime) -> String {
    let mut h = Sha256::new();
    for part in [key.0.as_bytes(), key.1.as_bytes(), base.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(crate::util::millis(first).to_be_bytes());
    h.update(fastrand::u64(..).to_be_bytes());
    let digest = h.finalize();
    let suffix: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let base: String = base.chars().take(253 - 17).collect();
    format!("{}.{suffix}", base.trim_end_matches(['-', '.']))
}

fn micro_time(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// A new Event of the series, with its count so far if it has more than one.
pub fn create_body(e: &Described<'_>, node: &str) -> Bytes {
    let mut event = json!({
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": e.name, "namespace": e.namespace},
        "eventTime": micro_time(SystemTime::now()),
        "reportingController": CONTROLLER,
        // This node, as the kubelet reports its own Events.
        "reportingInstance": node.chars().take(128).collect::<String>(),
        "action": ACTION,
        "reason": e.on.reason(),
        "regarding": e.regarding,
        "note": e.note,
        "type": "Warning",
    });
    if e.count > 1 {
        event["series"] = series(e);
    }
    Bytes::from(serde_json::to_vec(&event).unwrap_or_default())
}

fn series(e: &Described<'_>) -> Value {
    json!({"count": e.count, "lastObservedTime": micro_time(e.last_observed)})
}

/// The merge patch that sends the series' count.
pub fn patch_body(e: &Described<'_>) -> Bytes {
    Bytes::from(serde_json::to_vec(&json!({"series": series(e)})).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::is_dns_subdomain;

    #[test]
    fn event_names_are_unique_dns_subdomains() {
        let key = ("uid-1".to_owned(), "PodIdentityNoAssociation");
        let now = SystemTime::now();
        let a = event_name("api-7d9c.v2", &key, now);
        let b = event_name("api-7d9c.v2", &key, now);
        assert_ne!(a, b);
        assert!(a.starts_with("api-7d9c.v2.") && is_dns_subdomain(&a), "{a}");
        let long = event_name(&"x".repeat(253), &key, now);
        assert!(long.len() <= 253 && is_dns_subdomain(&long), "{long}");
    }

    /// The API server counts the note's bytes: multibyte text is cut within 1 KiB, on a
    /// character boundary, and short text is left alone.
    #[test]
    fn notes_fit_the_api_servers_limit_in_bytes() {
        for unit in ["é", "€", "𝄞", "a"] {
            let long = unit.repeat(2000);
            let cut = cut(long.clone(), MAX_NOTE);
            assert!(cut.len() <= MAX_NOTE, "{unit}: {} bytes", cut.len());
            assert!(cut.len() > MAX_NOTE - 8, "{unit}: {} bytes", cut.len());
            assert!(cut.ends_with('…') && long.starts_with(cut.trim_end_matches('…')));
        }
        assert_eq!(cut("short".into(), MAX_NOTE), "short");
        assert_eq!(cut("x".repeat(MAX_NOTE), MAX_NOTE).len(), MAX_NOTE);
        for (code, _) in super::super::POD_REASONS {
            assert!(note(code, 400, On::Pod("r")).len() <= MAX_NOTE);
        }
    }
}
