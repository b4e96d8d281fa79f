//! The one place that talks to EKS Auth.
//!
//! Contract: [`CredentialSource::fetch`] exchanges a pod's token for role credentials with
//! `POST /clusters/{cluster}/assume-role-for-pod-identity` (rest-json, SigV4 as `eks-auth`,
//! body `{"token": …}`), signed with the node's own credentials. It returns validated
//! [`Credentials`] or an [`ExchangeError`] that keeps what the caller must know: the upstream HTTP
//! status, error code (`x-amzn-errortype`), message and request id, and whether the failure is
//! worth retrying ([`ExchangeError::recoverable`]). It knows nothing of the cache or of HTTP
//! clients waiting on it.
//!
//! Bounds, so that a hung EKS Auth never holds a pod's SDK longer than it will wait: connect
//! timeout 1 s, each attempt 2 s, three attempts with the SDK's standard retry (throttling and
//! 5xx, exponential backoff with jitter), and an overall deadline of 4 s, all configurable in
//! [`ExchangeSettings`].

use crate::codes::ErrorCode;
use crate::credentials::{Credentials, InvalidCredentials, Unvalidated};
use crate::token::Token;
use aws_sdk_eksauth::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_eksauth::operation::RequestId;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

pub type FetchFuture =
    Pin<Box<dyn Future<Output = Result<Fetched, ExchangeError>> + Send + 'static>>;

/// A successful exchange: the credentials the cache keeps, and who EKS Auth says they are for,
/// which only the audit line reads. The identity is not kept with the entry: ~200 bytes an
/// entry would cost 2 MB at 10,000 pods for a line written once.
#[derive(Debug)]
pub struct Fetched {
    pub credentials: Credentials,
    pub identity: Identity,
}

/// The parts of EKS Auth's answer that say which role and association a token was mapped to.
/// Not secret: all of it is in CloudTrail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// `assumedRoleUser.arn`: `arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION`.
    pub assumed_role_arn: String,
    /// `podIdentityAssociation.associationId`.
    pub association_id: String,
    /// `podIdentityAssociation.associationArn`.
    pub association_arn: String,
    /// EKS Auth's `x-amzn-requestid`, to find the call in CloudTrail.
    pub request_id: String,
}

impl From<Credentials> for Fetched {
    /// Credentials with nothing known about whom they are for (test doubles).
    fn from(credentials: Credentials) -> Self {
        Fetched {
            credentials,
            identity: Identity::default(),
        }
    }
}

/// Anything that can turn a token into credentials: EKS Auth in production, fakes in unit tests.
pub trait CredentialSource: Send + Sync + 'static {
    /// The returned future owns what it needs, so it can run detached from the request that
    /// started it.
    fn fetch(&self, token: &Token) -> FetchFuture;
}

/// Timeouts and retries of the exchange.
#[derive(Debug, Clone)]
pub struct ExchangeSettings {
    pub cluster_name: String,
    /// `--endpoint`; `AWS_ENDPOINT_URL_EKS_AUTH` is honoured by the SDK when this is unset.
    pub endpoint: Option<String>,
    pub connect_timeout: Duration,
    pub attempt_timeout: Duration,
    pub overall_timeout: Duration,
    pub max_attempts: u32,
}

impl ExchangeSettings {
    pub fn new(cluster_name: impl Into<String>) -> Self {
        use crate::defaults::*;
        ExchangeSettings {
            cluster_name: cluster_name.into(),
            endpoint: None,
            connect_timeout: DEFAULT_EKS_AUTH_CONNECT_TIMEOUT,
            attempt_timeout: DEFAULT_EKS_AUTH_ATTEMPT_TIMEOUT,
            overall_timeout: DEFAULT_EKS_AUTH_TIMEOUT,
            max_attempts: DEFAULT_EKS_AUTH_ATTEMPTS,
        }
    }
}

/// [`CredentialSource`] backed by `aws-sdk-eksauth`.
#[derive(Clone)]
pub struct EksAuthClient {
    client: aws_sdk_eksauth::Client,
    cluster_name: String,
}

impl EksAuthClient {
    /// `sdk` carries the node's credentials and region (from `aws-config`'s default chain in
    /// production).
    pub fn new(sdk: &aws_config::SdkConfig, settings: &ExchangeSettings) -> Self {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(settings.connect_timeout)
            .operation_attempt_timeout(settings.attempt_timeout)
            .operation_timeout(settings.overall_timeout)
            .build();
        let retry = aws_config::retry::RetryConfig::standard()
            // No flag sets it: a library caller's 0 still makes one attempt.
            .with_max_attempts(settings.max_attempts.max(1))
            .with_initial_backoff(Duration::from_millis(50));
        let mut config = aws_sdk_eksauth::config::Builder::from(sdk)
            .timeout_config(timeouts)
            .retry_config(retry);
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        EksAuthClient {
            client: aws_sdk_eksauth::Client::from_conf(config.build()),
            cluster_name: settings.cluster_name.clone(),
        }
    }
}

impl CredentialSource for EksAuthClient {
    fn fetch(&self, token: &Token) -> FetchFuture {
        let call = self
            .client
            .assume_role_for_pod_identity()
            .cluster_name(&self.cluster_name)
            .token(token.raw());
        Box::pin(async move {
            let out = call.send().await.map_err(classify)?;
            let creds = out
                .credentials()
                .ok_or_else(|| ExchangeError::BadResponse("no credentials in the answer".into()))?;
            let exp = creds.expiration();
            let expiration = if exp.secs() > 0 {
                UNIX_EPOCH + Duration::from_secs(exp.secs() as u64)
            } else {
                UNIX_EPOCH
            };
            let arn = out.assumed_role_user().map(|u| u.arn()).unwrap_or_default();
            let credentials = Credentials::validate(
                Unvalidated {
                    access_key_id: creds.access_key_id(),
                    secret_access_key: creds.secret_access_key(),
                    session_token: creds.session_token(),
                    expiration,
                    assumed_role_arn: arn,
                },
                SystemTime::now(),
            )?;
            let association = out.pod_identity_association();
            Ok(Fetched {
                credentials,
                identity: Identity {
                    assumed_role_arn: arn.to_owned(),
                    association_id: association
                        .map(|a| a.association_id().to_owned())
                        .unwrap_or_default(),
                    association_arn: association
                        .map(|a| a.association_arn().to_owned())
                        .unwrap_or_default(),
                    request_id: out.request_id().unwrap_or_default().to_owned(),
                },
            })
        })
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
        hint: "no Pod Identity association for this service account, or no such cluster (check --cluster-name)",
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

/// What a person should do about an EKS Auth error.
pub fn hint_of(e: &ExchangeError) -> &'static str {
    match e {
        ExchangeError::Service { code, .. } if code == "AccessDeniedException" && e.fault() == Fault::Token => {
            "the association's role must trust pods.eks.amazonaws.com for sts:AssumeRole and sts:TagSession"
        }
        ExchangeError::Service { code, .. } => hint_of_code(code),
        _ => "EKS Auth failed; retry",
    }
}

/// What a person should do about an EKS Auth error code.
pub fn hint_of_code(code: &str) -> &'static str {
    known(code).map_or("EKS Auth refused the request", |k| k.hint)
}

fn classify<E, R>(err: SdkError<E, R>) -> ExchangeError
where
    E: ProvideErrorMetadata + RequestId + std::error::Error,
    R: RawStatus,
{
    match err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status();
            // Only an error status is passed on to a pod: a 1xx, 2xx or 3xx (or anything past 5xx)
            // without usable credentials is an unusable answer, whatever its body says.
            let error_status = (400..600).contains(&status).then_some(status);
            let e = ctx.err();
            match (e.code(), error_status) {
                (Some(code), _) => ExchangeError::Service {
                    status: error_status.or_else(|| status_of_code(code)).unwrap_or(502),
                    code: code.to_owned(),
                    message: e.message().unwrap_or("no message").to_owned(),
                    request_id: e.request_id().map(str::to_owned),
                },
                (None, Some(status)) => ExchangeError::Service {
                    status,
                    code: "UnknownError".to_owned(),
                    message: format!("HTTP {status} without an error code"),
                    request_id: e.request_id().map(str::to_owned),
                },
                (None, None) => ExchangeError::BadResponse(format!(
                    "HTTP {status} with a body that is not an EKS Auth answer"
                )),
            }
        }
        SdkError::TimeoutError(_) => {
            ExchangeError::Unavailable("no answer before the deadline".into())
        }
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            ExchangeError::Unavailable("connection timed out".into())
        }
        SdkError::DispatchFailure(d) if d.is_io() => {
            ExchangeError::Unavailable("connection failed".into())
        }
        SdkError::DispatchFailure(_) => {
            ExchangeError::Unavailable("the request could not be sent".into())
        }
        SdkError::ResponseError(r) => ExchangeError::BadResponse(format!(
            "HTTP {} with an unreadable answer",
            r.raw().status()
        )),
        SdkError::ConstructionFailure(_) => ExchangeError::Unavailable(
            "the request could not be built (check region and credentials)".into(),
        ),
        _ => ExchangeError::Unavailable("unexpected SDK failure".into()),
    }
}

/// The HTTP status of an SDK raw response, behind a trait so `classify` stays generic.
trait RawStatus {
    fn status(&self) -> u16;
}

impl RawStatus for aws_smithy_runtime_api::http::Response {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
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
