//! Every way a request can fail, each mapped to exactly one HTTP status and a JSON body
//! `{"code": …, "message": …}` whose message tells a person what to do. [`Error::coded`] is the
//! one place that picks the code: one of the agent's own ([`ErrorCode`], with its status) or EKS
//! Auth's, passed on with EKS Auth's status.
//!
//! Contract: nothing here ever contains a token, secret key or session token: variants carry only
//! codes, counts and upstream messages. EKS Auth errors keep their upstream status (400, 403, 404,
//! 429, 500, 503) and code and name the upstream request id, also when the refusal was remembered
//! (the message says so); an unreachable EKS Auth is 503, an unusable EKS Auth answer 502. Refusals
//! made without asking EKS Auth: a token that fails local verification is 400 `InvalidToken`, a
//! verified token of a pod on another node 400 `TokenForAnotherNode`; a client over its exchange
//! budget is 429 `ExchangeRateExceeded`, the node at its ceiling 503 `ExchangeCapacityExceeded`,
//! both with [`Error::retry_after`] for the `Retry-After` header. No SDK needs the body, but Go and
//! Java surface it.

use crate::cache::{Refusal, Remembered};
use crate::codes::ErrorCode;
use crate::eks_auth::{ExchangeError, Fault};
use crate::token::TokenError;
use bytes::Bytes;
use serde::Serialize;
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("Host {0:?} is not an address this agent serves; call it by the IP address in AWS_CONTAINER_CREDENTIALS_FULL_URI")]
    HostNotAllowed(String),
    #[error("no route for {0}; credentials are served at /v1/credentials")]
    NotFound(String),
    #[error("method {0} is not allowed; use GET")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Exchange(#[from] ExchangeError),
    /// EKS Auth refused this token `age_s` ago; it is not asked again for `ttl_s` in all.
    #[error("{error} (remembered)")]
    Remembered {
        error: ExchangeError,
        age_s: u64,
        ttl_s: u64,
    },
    #[error("{0}; this token is refused without asking EKS Auth")]
    Unverified(String),
    #[error("the token belongs to a pod on node {0:?}, not this agent's node; a token is redeemed only on its pod's node")]
    OtherNode(String),
    #[error("too many new credential exchanges from this client; cached credentials are never limited, retry after {} s", .0.as_secs().max(1))]
    ClientOverBudget(Duration),
    #[error("the node is at its limit of new credential exchanges; retry after {} s", .0.as_secs().max(1))]
    NodeOverBudget(Duration),
    #[error("the agent is shutting down; retry")]
    ShuttingDown,
}

/// Upstream messages are cut to this many characters before a pod sees them.
const MAX_UPSTREAM_MESSAGE: usize = 512;

fn cut(message: &str) -> std::borrow::Cow<'_, str> {
    match message.char_indices().nth(MAX_UPSTREAM_MESSAGE) {
        Some((at, _)) => format!("{}…", &message[..at]).into(),
        None => message.into(),
    }
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    message: &'a str,
}

/// The code an error carries on the wire: the agent's own, or EKS Auth's passed on with its
/// status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code<'a> {
    Own(ErrorCode),
    EksAuth { status: u16, code: &'a str },
}

impl Error {
    /// A refusal remembered from an earlier request, as this request is answered.
    pub fn remembered(r: &Remembered) -> Error {
        let (age_s, ttl_s) = (r.age().as_secs(), r.ttl().as_secs());
        match &r.refusal {
            Refusal::Upstream(error) => Error::Remembered {
                error: error.clone(),
                age_s,
                ttl_s,
            },
            Refusal::Unverified(why) => Error::Unverified(format!(
                "{why} [remembered: refused {age_s} s ago, for up to {ttl_s} s]"
            )),
            Refusal::OtherNode(node) => Error::OtherNode(node.clone()),
        }
    }

    /// Which code and status this error is answered with: the one place that decides it.
    pub fn coded(&self) -> Code<'_> {
        let own = match self {
            Error::Token(TokenError::Missing) => ErrorCode::MissingToken,
            Error::Token(TokenError::Expired(_)) => ErrorCode::ExpiredToken,
            Error::Token(TokenError::NotYetValid(_)) => ErrorCode::TokenNotYetValid,
            Error::Token(_) => ErrorCode::InvalidToken,
            Error::HostNotAllowed(_) => ErrorCode::HostNotAllowed,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::MethodNotAllowed(_) => ErrorCode::MethodNotAllowed,
            Error::Exchange(e) | Error::Remembered { error: e, .. } => match e {
                ExchangeError::Service { status, code, .. } => {
                    return Code::EksAuth {
                        status: *status,
                        code,
                    }
                }
                ExchangeError::Unavailable(_) => ErrorCode::EksAuthUnavailable,
                ExchangeError::BadResponse(_) => ErrorCode::EksAuthInvalidResponse,
            },
            Error::Unverified(_) => ErrorCode::InvalidToken,
            Error::OtherNode(_) => ErrorCode::TokenForAnotherNode,
            Error::ClientOverBudget(_) => ErrorCode::ExchangeRateExceeded,
            Error::NodeOverBudget(_) => ErrorCode::ExchangeCapacityExceeded,
            Error::ShuttingDown => ErrorCode::ShuttingDown,
        };
        Code::Own(own)
    }

    pub fn status(&self) -> u16 {
        match self.coded() {
            Code::Own(code) => code.status().as_u16(),
            Code::EksAuth { status, .. } => status,
        }
    }

    pub fn code(&self) -> &str {
        match self.coded() {
            Code::Own(code) => code.as_str(),
            Code::EksAuth { code, .. } => code,
        }
    }

    /// How long the client should wait before retrying, for `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::ClientOverBudget(d) | Error::NodeOverBudget(d) => {
                Some((*d).max(Duration::from_secs(1)))
            }
            _ => None,
        }
    }

    /// The message: for upstream errors, what EKS Auth said plus what to do about it.
    pub fn message(&self) -> String {
        match self {
            Error::Remembered {
                error,
                age_s,
                ttl_s,
            } => format!(
                "{} [remembered: EKS Auth refused this token {age_s} s ago; it is not asked again for up to {ttl_s} s]",
                Error::Exchange(error.clone()).message()
            ),
            Error::Exchange(
                e @ ExchangeError::Service {
                    code,
                    message,
                    request_id,
                    ..
                },
            ) => {
                let hint = crate::eks_auth::hint_of(e);
                let rid = request_id.as_deref().unwrap_or("none");
                if e.fault() == Fault::Node {
                    // EKS Auth's message names the node's role, account and instance, which a
                    // pod should not learn from a token it sends (IMDS hides them from pods).
                    format!("{hint}. EKS Auth refused the node's own credentials with {code}; the agent's log has its message (request id {rid})")
                } else if !e.message_for_pod() {
                    format!("{hint}. EKS Auth said {code}; the agent's log has its message (request id {rid})")
                } else {
                    format!("{hint}. EKS Auth said {code}: {} (request id {rid})", cut(message))
                }
            }
            Error::Exchange(e @ ExchangeError::Unavailable(_)) => format!("{e}; retry shortly"),
            other => other.to_string(),
        }
    }

    pub fn body(&self) -> Bytes {
        let message = self.message();
        serde_json::to_vec(&Body {
            code: self.code(),
            message: &message,
        })
        .map(Bytes::from)
        .unwrap_or_else(|_| {
            Bytes::from(format!(
                r#"{{"code":"{}","message":"error body could not be built"}}"#,
                ErrorCode::InternalError
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_one_status_and_a_json_body() {
        let cases: Vec<(Error, u16, &str)> = vec![
            (TokenError::Missing.into(), 400, "MissingToken"),
            (TokenError::Expired(5).into(), 400, "ExpiredToken"),
            (TokenError::Malformed("x").into(), 400, "InvalidToken"),
            (
                Error::HostNotAllowed("evil.example".into()),
                403,
                "HostNotAllowed",
            ),
            (Error::NotFound("/x".into()), 404, "NotFound"),
            (
                Error::MethodNotAllowed("POST".into()),
                405,
                "MethodNotAllowed",
            ),
            (
                ExchangeError::Unavailable("t".into()).into(),
                503,
                "EksAuthUnavailable",
            ),
            (
                ExchangeError::BadResponse("b".into()).into(),
                502,
                "EksAuthInvalidResponse",
            ),
            (Error::ShuttingDown, 503, "ShuttingDown"),
            (
                Error::ClientOverBudget(Duration::from_millis(300)),
                429,
                "ExchangeRateExceeded",
            ),
            (
                Error::NodeOverBudget(Duration::from_secs(2)),
                503,
                "ExchangeCapacityExceeded",
            ),
            (Error::Unverified("bad".into()), 400, "InvalidToken"),
            (
                Error::OtherNode("ip-10-0-0-1".into()),
                400,
                "TokenForAnotherNode",
            ),
            (
                Error::Remembered {
                    error: ExchangeError::Service {
                        status: 404,
                        code: "ResourceNotFoundException".into(),
                        message: "m".into(),
                        request_id: Some("r-2".into()),
                    },
                    age_s: 3,
                    ttl_s: 60,
                },
                404,
                "ResourceNotFoundException",
            ),
            (
                ExchangeError::Service {
                    status: 404,
                    code: "ResourceNotFoundException".into(),
                    message: "m".into(),
                    request_id: Some("r-1".into()),
                }
                .into(),
                404,
                "ResourceNotFoundException",
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status(), status);
            let v: serde_json::Value = serde_json::from_slice(&err.body()).expect("json");
            assert_eq!(v["code"], code);
            assert!(!v["message"].as_str().unwrap_or("").is_empty());
            assert_eq!(v.as_object().map(|o| o.len()), Some(2));
        }
    }

    #[test]
    fn a_node_refusal_tells_a_pod_nothing_of_the_node() {
        let message = "User: arn:aws:sts::111122223333:assumed-role/eks-node-role/i-0123456789abcdef0 is not authorized to perform: eks-auth:AssumeRoleForPodIdentity";
        let e: Error = ExchangeError::Service {
            status: 400,
            code: "AccessDeniedException".into(),
            message: message.into(),
            request_id: Some("r-9".into()),
        }
        .into();
        let shown = e.message();
        for secret in ["111122223333", "eks-node-role", "i-0123456789abcdef0"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.contains("r-9") && shown.contains("AccessDeniedException"),
            "{shown}"
        );
        // A pod's own refusal keeps EKS Auth's words, cut to a bound.
        let long: Error = ExchangeError::Service {
            status: 404,
            code: "ResourceNotFoundException".into(),
            message: "x".repeat(10_000),
            request_id: None,
        }
        .into();
        assert!(long.message().len() < 1000, "{}", long.message().len());
    }

    #[test]
    fn upstream_message_names_request_id() {
        let e: Error = ExchangeError::Service {
            status: 429,
            code: "ThrottlingException".into(),
            message: "slow".into(),
            request_id: Some("abc-123".into()),
        }
        .into();
        assert!(e.message().contains("abc-123") && e.message().contains("ThrottlingException"));
    }
}
