//! Whose fault a failed exchange is, decided once: the error EKS Auth's answer becomes, and the
//! table of every EKS Auth error code the agent knows.
//!
//! Contract: [`ExchangeError`] keeps the upstream status, code, message and request id.
//! [`ExchangeError::fault`] decides whose fault it is ([`Fault`]): a known code follows
//! [`KNOWN_CODES`] (its status, fault and hint, in one row), anything else its HTTP status.
//! That one decision drives what happens to cached credentials
//! ([`ExchangeError::recoverable`]), what a pod is told ([`ExchangeError::message_for_pod`]),
//! the bounded metric label ([`ExchangeError::metric_code`]) and the advice
//! ([`hint_of`]) the agent and `diagnose` give.

use crate::codes::ErrorCode;
use crate::credentials::InvalidCredentials;

/// A failed exchange, classified once, here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// EKS Auth answered with an error of its own.
    #[error("EKS Auth refused the exchange with {code} (HTTP {status}): {message}")]
    Service {
        status: u16,
        code: String,
        message: String,
        request_id: Option<String>,
    },
    /// EKS Auth could not be reached, or did not answer in time.
    #[error("EKS Auth is unreachable: {0}")]
    Unavailable(String),
    /// EKS Auth answered, but not with usable credentials.
    #[error("EKS Auth returned an unusable answer: {0}")]
    BadResponse(String),
}

/// Whose fault a failed exchange is: that decides what happens to the pod's cached credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The pod's token or its association is wrong (invalid, expired, no association, a bad
    /// request): retrying cannot help, cached credentials for the token are evicted, and the
    /// rejection is remembered.
    Token,
    /// The node's own credentials or permissions were refused (`AccessDeniedException`, any
    /// 401/403): not the pod's doing, so the pod's valid cached credentials keep being served.
    Node,
    /// EKS Auth is throttling, failing, unreachable or garbled: it may pass by itself.
    Transient,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Token => "token",
            Fault::Node => "node",
            Fault::Transient => "transient",
        }
    }
}

impl ExchangeError {
    /// Whose fault this is; see [`Fault`]. Known codes follow [`KNOWN_CODES`]; otherwise the
    /// status decides: 401/403 are about the request's signature (the node), 429 and 5xx are
    /// transient, and any other 4xx is about the token. `AccessDeniedException` is the node's
    /// only when it names the node's permission (`eks-auth:AssumeRoleForPodIdentity`); otherwise
    /// it is the association's role refusing (its trust policy), which is the pod's association.
    pub fn fault(&self) -> Fault {
        match self {
            ExchangeError::Service { code, message, .. }
                if code == "AccessDeniedException" && !names_node_permission(message) =>
            {
                Fault::Token
            }
            ExchangeError::Service { status, code, .. } => match known(code) {
                // EKS Auth answers an expired *pod* token with 400; the same code with 403 is
                // AWS's answer to expired *node* session credentials.
                Some(k) if !(*status == 401 || *status == 403) => k.fault,
                _ => match *status {
                    401 | 403 => Fault::Node,
                    429 | 500.. => Fault::Transient,
                    400..=499 => Fault::Token,
                    _ => Fault::Transient,
                },
            },
            ExchangeError::Unavailable(_) | ExchangeError::BadResponse(_) => Fault::Transient,
        }
    }

    /// Whether cached credentials for the token survive this failure: everything but a
    /// [`Fault::Token`], and even then an `AccessDeniedException`, whose wording is all that
    /// tells the association's role from the node's permission: a node refused in words the
    /// agent does not recognise must not lose every pod's credentials at their next refresh.
    /// (The metrics' `Recoverable`/`NonRecoverable` label.)
    pub fn recoverable(&self) -> bool {
        self.fault() != Fault::Token || self.is_access_denied()
    }

    fn is_access_denied(&self) -> bool {
        matches!(self, ExchangeError::Service { code, .. } if code == "AccessDeniedException")
    }

    /// Whether EKS Auth's own message may be shown to the pod: not when it may name the node's
    /// role, account or instance (a node fault, or any `AccessDeniedException`, since its
    /// wording is not a reliable sign of whose it is).
    pub fn message_for_pod(&self) -> bool {
        self.fault() != Fault::Node && !self.is_access_denied()
    }

    /// The error code as a metric label: a code of [`KNOWN_CODES`] or the agent's own, else
    /// `Other`. Codes come from whatever answered at `--endpoint`; labels must stay a bounded set.
    pub fn metric_code(&self) -> &'static str {
        match self {
            ExchangeError::Service { code, .. } => known(code).map_or(
                if code == "UnknownError" {
                    "UnknownError"
                } else {
                    "Other"
                },
                |k| k.code,
            ),
            ExchangeError::Unavailable(_) => ErrorCode::EksAuthUnavailable.as_str(),
            ExchangeError::BadResponse(_) => ErrorCode::EksAuthInvalidResponse.as_str(),
        }
    }

    /// The error code as error bodies name it.
    pub fn code(&self) -> &str {
        match self {
            ExchangeError::Service { code, .. } => code,
            ExchangeError::Unavailable(_) => ErrorCode::EksAuthUnavailable.as_str(),
            ExchangeError::BadResponse(_) => ErrorCode::EksAuthInvalidResponse.as_str(),
        }
    }
}

impl From<InvalidCredentials> for ExchangeError {
    fn from(e: InvalidCredentials) -> Self {
        ExchangeError::BadResponse(e.to_string())
    }
}

/// What the agent knows of one EKS Auth error code.
struct KnownCode {
    code: &'static str,
    /// The HTTP status EKS Auth answers it with.
    status: u16,
    fault: Fault,
    /// What a person should do about it; the start of the agent's error message.
    hint: &'static str,
}

/// Every error code EKS Auth documents for `AssumeRoleForPodIdentity`, and the common AWS
/// codes for a request whose signature or credentials are refused (all the node's fault).
const KNOWN_CODES: &[KnownCode] = &[
    KnownCode {
        code: "AccessDeniedException",
        status: 400,
        fault: Fault::Node,
        hint: "the node role needs eks-auth:AssumeRoleForPodIdentity",
    },
    KnownCode {
        code: "ExpiredTokenException",
        status: 400,
        fault: Fault::Token,
        hint: "the pod's service-account token has expired",
    },
    KnownCode {
        code: "InvalidParameterException",
        status: 400,
        fault: Fault::Token,
        hint: "EKS Auth refused the request",
    },
    KnownCode {
        code: "InvalidRequestException",
        status: 400,
        fault: Fault::Token,
        hint: "EKS Auth refused the request",
    },
    KnownCode {
        code: "InvalidTokenException",
        status: 400,
        fault: Fault::Token,
        hint: "EKS Auth rejected the service-account token (signature, audience or issuer)",
    },
    KnownCode {
        code: "ResourceNotFoundException",
        status: 404,
        fault: Fault::Token,
        hint: "no Pod Identity association for this service account, \
            or no such cluster (check --cluster-name)",
    },
    KnownCode {
        code: "UnrecognizedClientException",
        status: 403,
        fault: Fault::Node,
        hint: "EKS Auth does not recognise the node's access key (check the node's credentials)",
    },
    KnownCode {
        code: "InvalidSignatureException",
        status: 403,
        fault: Fault::Node,
        hint: "EKS Auth refused the node's signature (check the node's secret key and clock)",
    },
    KnownCode {
        code: "ThrottlingException",
        status: 429,
        fault: Fault::Transient,
        hint: "EKS Auth is throttling; retry later",
    },
    KnownCode {
        code: "InternalServerException",
        status: 500,
        fault: Fault::Transient,
        hint: "EKS Auth failed; retry",
    },
    KnownCode {
        code: "ServiceUnavailableException",
        status: 503,
        fault: Fault::Transient,
        hint: "EKS Auth failed; retry",
    },
];

/// Every EKS Auth error code the agent knows by name (for `diagnose`'s explanations).
pub fn known_codes() -> impl Iterator<Item = &'static str> {
    KNOWN_CODES.iter().map(|k| k.code)
}

fn known(code: &str) -> Option<&'static KnownCode> {
    KNOWN_CODES.iter().find(|k| k.code == code)
}

/// Status an error code implies when the raw response is not at hand.
pub fn status_of_code(code: &str) -> Option<u16> {
    known(code).map(|k| k.status)
}

/// Whether an `AccessDeniedException` message is about the node's own permission to call EKS
/// Auth (rather than the association's role refusing to be assumed).
fn names_node_permission(message: &str) -> bool {
    message.contains("eks-auth:AssumeRoleForPodIdentity")
}

/// An `AccessDeniedException` that is the association's role refusing to be assumed.
const ROLE_TRUST_HINT: &str = "the association's role must trust pods.eks.amazonaws.com \
    for sts:AssumeRole and sts:TagSession";

/// What a person should do about an EKS Auth error.
pub fn hint_of(e: &ExchangeError) -> &'static str {
    match e {
        ExchangeError::Service { .. } if e.is_access_denied() && e.fault() == Fault::Token => {
            ROLE_TRUST_HINT
        }
        ExchangeError::Service { code, .. } => hint_of_code(code),
        _ => "EKS Auth failed; retry",
    }
}

/// What a person should do about an EKS Auth error code.
pub fn hint_of_code(code: &str) -> &'static str {
    known(code).map_or("EKS Auth refused the request", |k| k.hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_matches_the_contract() {
        let svc = |status: u16, code: &str| ExchangeError::Service {
            status,
            code: code.into(),
            message: String::new(),
            request_id: None,
        };
        for code in [
            "ExpiredTokenException",
            "InvalidTokenException",
            "InvalidParameterException",
        ] {
            assert!(!svc(400, code).recoverable(), "{code}");
        }
        assert!(!svc(404, "ResourceNotFoundException").recoverable());
        assert!(svc(429, "ThrottlingException").recoverable());
        // The node's credentials, not the pod's token: cached credentials stay.
        let denied = |message: &str| ExchangeError::Service {
            status: 400,
            code: "AccessDeniedException".into(),
            message: message.into(),
            request_id: None,
        };
        assert_eq!(
            denied("User: arn:aws:sts::1:assumed-role/node/i-1 is not authorized to perform: eks-auth:AssumeRoleForPodIdentity on resource: x").fault(),
            Fault::Node
        );
        // The association's role refusing to be assumed: the pod's association.
        assert_eq!(
            denied("Failed to assume role arn:aws:iam::1:role/app: its trust policy does not allow pods.eks.amazonaws.com").fault(),
            Fault::Token
        );
        // Whoever's it is, an AccessDenied never costs cached credentials (review M5: a node
        // refused in other words), and its text never reaches a pod.
        for message in ["", "Access denied", "Failed to assume role: trust policy"] {
            assert!(denied(message).recoverable(), "{message:?}");
            assert!(!denied(message).message_for_pod(), "{message:?}");
        }
        assert!(svc(404, "ResourceNotFoundException").message_for_pod());
        assert_eq!(svc(403, "ExpiredTokenException").fault(), Fault::Node);
        assert_eq!(svc(403, "UnrecognizedClientException").fault(), Fault::Node);
        assert_eq!(svc(403, "SomethingNew").fault(), Fault::Node);
        assert_eq!(svc(400, "ExpiredTokenException").fault(), Fault::Token);
        assert_eq!(svc(418, "SomethingNew").fault(), Fault::Token);
        assert_eq!(svc(502, "UnknownError").fault(), Fault::Transient);
        assert!(svc(500, "InternalServerException").recoverable());
        assert!(svc(503, "ServiceUnavailableException").recoverable());
        assert!(ExchangeError::Unavailable("x".into()).recoverable());
        assert_eq!(status_of_code("ResourceNotFoundException"), Some(404));
        // Metric labels stay a bounded set whatever answers at --endpoint.
        assert_eq!(
            svc(400, "InvalidTokenException").metric_code(),
            "InvalidTokenException"
        );
        assert_eq!(svc(418, &"x".repeat(300)).metric_code(), "Other");
        assert_eq!(svc(502, "UnknownError").metric_code(), "UnknownError");
        assert_eq!(status_of_code("Nope"), None);
    }
}
