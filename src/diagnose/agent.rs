//! The agent check: ask the agent exactly as an SDK does, and read its answer as an SDK would.
//!
//! Contract: a refusal is reported with its status and code in the one table's words
//! ([`crate::explain`]) and the agent's own message, clipped; a 200 must carry all four fields
//! SDKs need, with an RFC 3339 expiry at least 5 minutes away (warned otherwise). The secret
//! parts of the answer are kept for the role check, never printed.

use super::environment::Target;
use super::http::get;
use super::report::{clip, human, Report};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const CHECK: &str = "agent";

/// What the agent returned that later checks need. The secret parts stay in here.
pub(super) struct Returned {
    pub(super) access_key_id: String,
    pub(super) secret_access_key: String,
    pub(super) session_token: String,
}

pub(super) async fn ask_agent(
    target: &Target,
    token: &str,
    timeout: Duration,
    r: &mut Report,
) -> Option<Returned> {
    let where_ = format!("{}:{}", target.host, target.port);
    let (status, body) = match tokio::time::timeout(timeout, get(target, token)).await {
        Err(_) => {
            r.fail(CHECK, format!("no answer from {where_} within {}: the agent is overloaded or a network policy drops the traffic.",
                human(timeout.as_secs())));
            return None;
        }
        Ok(Err(e)) => {
            r.fail(CHECK, format!("cannot reach {where_} ({e}): the agent is not running or not ready on this node \
                (kubectl -n kube-system get pods -l app.kubernetes.io/name=pod-identity-agent -o wide)."));
            return None;
        }
        Ok(Ok(answer)) => answer,
    };
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if status != 200 {
        let code = json["code"].as_str().unwrap_or("(no code)");
        let message = json["message"].as_str().unwrap_or("");
        r.fail(
            CHECK,
            format!(
                "the agent answered {status} {}\n      the agent said: {}",
                crate::explain::explained(&clip(code, 64), status, None),
                clip(message, 400)
            ),
        );
        return None;
    }
    check_credentials(&json, r)
}

/// A 200's body: complete credentials, with time left.
fn check_credentials(json: &serde_json::Value, r: &mut Report) -> Option<Returned> {
    let field = |k: &str| json[k].as_str().unwrap_or_default().to_owned();
    let returned = Returned {
        access_key_id: field("AccessKeyId"),
        secret_access_key: field("SecretAccessKey"),
        session_token: field("Token"),
    };
    let expiration = field("Expiration");
    if returned.access_key_id.is_empty()
        || returned.secret_access_key.is_empty()
        || returned.session_token.is_empty()
        || expiration.is_empty()
    {
        r.fail(CHECK, "the agent answered 200 without complete credentials (AccessKeyId, SecretAccessKey, Token, Expiration): \
            this is not the Pod Identity agent, or a bug in it.");
        return None;
    }
    let left = aws_smithy_types::DateTime::from_str(
        &expiration,
        aws_smithy_types::date_time::Format::DateTime,
    )
    .ok()
    .map(|t| {
        t.secs()
            - SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs() as i64
    });
    let account = clip(json["AccountId"].as_str().unwrap_or("(not given)"), 32);
    let msg = format!(
        "credentials for account {account}, key {}, expiring {}",
        clip(&returned.access_key_id, 32),
        clip(&expiration, 40)
    );
    match left {
        None => r.fail(CHECK, format!("{msg}: the expiration is not an RFC 3339 time SDKs parse.")),
        Some(s) if s < 300 => r.warn(CHECK, format!("{msg}, in {s} s: SDKs treat credentials with less than 5 minutes left as expired; \
            the agent cannot refresh them (see its logs).")),
        Some(s) => r.ok(CHECK, format!("{msg} (in {})", human(s as u64))),
    }
    Some(returned)
}
