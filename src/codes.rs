//! The agent's own error codes: the `code` of every JSON error body the agent writes itself, with
//! the one HTTP status each is answered with.
//!
//! Contract: each code is named once, here; [`ErrorCode::as_str`] is its spelling on the wire
//! (stable: SDKs, scripts, audit lines and Events show it) and [`ErrorCode::ALL`] lists every
//! code, built from the same table as the enum so none can be left out. The error responses
//! ([`crate::error`]), the connection limits' canned refusals and the plain-words table
//! ([`crate::explain`], which `diagnose` and Events print) all read it. Codes EKS Auth answers
//! with are passed on as EKS Auth spelled them and are not here ([`crate::eks_auth`]).

use hyper::StatusCode;

/// One table: the enum, its spelling, its status and `ALL` come from the same rows.
macro_rules! codes {
    ($( $(#[doc = $doc:literal])* $code:ident = $status:ident, )*) => {
        /// An error code of the agent's own; see the module contract.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[doc = $doc])* $code, )*
        }

        impl ErrorCode {
            /// Every code, in the table's order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$code),*];

            /// The code as error bodies spell it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$code => stringify!($code),)*
                }
            }

            /// The HTTP status a response with this code carries.
            pub const fn status(self) -> StatusCode {
                match self {
                    $(ErrorCode::$code => StatusCode::$status,)*
                }
            }
        }
    };
}

codes! {
    /// The request carried no `Authorization` token.
    MissingToken = BAD_REQUEST,
    /// The token is not a well-formed service-account token, or failed local verification.
    InvalidToken = BAD_REQUEST,
    /// The token's `exp` has passed (beyond the leeway).
    ExpiredToken = BAD_REQUEST,
    /// The token's `nbf` is ahead (beyond the leeway).
    TokenNotYetValid = BAD_REQUEST,
    /// A verified token of a pod on another node.
    TokenForAnotherNode = BAD_REQUEST,
    /// The `Host` is not an address the agent serves (DNS-rebinding defence).
    HostNotAllowed = FORBIDDEN,
    /// A path other than `/v1/credentials`.
    NotFound = NOT_FOUND,
    /// A method other than `GET`.
    MethodNotAllowed = METHOD_NOT_ALLOWED,
    /// The client is over its budget of new exchanges.
    ExchangeRateExceeded = TOO_MANY_REQUESTS,
    /// The node is at its ceiling of new exchanges.
    ExchangeCapacityExceeded = SERVICE_UNAVAILABLE,
    /// The client holds too many connections while the pool is under pressure.
    TooManyConnections = TOO_MANY_REQUESTS,
    /// The connection pool is full and nothing could be closed to make room.
    ConnectionsExhausted = SERVICE_UNAVAILABLE,
    /// The agent is shutting down.
    ShuttingDown = SERVICE_UNAVAILABLE,
    /// EKS Auth could not be reached.
    EksAuthUnavailable = SERVICE_UNAVAILABLE,
    /// EKS Auth answered with something that is not credentials.
    EksAuthInvalidResponse = BAD_GATEWAY,
    /// The agent could not build its own answer.
    InternalError = INTERNAL_SERVER_ERROR,
}

impl ErrorCode {
    /// The code spelled `code`, if it is one of the agent's.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == code)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_back_and_is_an_error_status() {
        let mut seen = std::collections::HashSet::new();
        for &code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            assert!(seen.insert(code.as_str()), "{code} twice");
            let status = code.status();
            assert!(
                status.is_client_error() || status.is_server_error(),
                "{code}"
            );
        }
        assert_eq!(ErrorCode::parse("ResourceNotFoundException"), None);
        // The spelling is the wire's: a rename here is a change every client sees.
        assert_eq!(
            ErrorCode::TokenForAnotherNode.as_str(),
            "TokenForAnotherNode"
        );
    }
}
