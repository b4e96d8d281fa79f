//! The one place that talks to EKS Auth.
//!
//! Contract: [`CredentialSource::fetch`] exchanges a pod's token for role credentials with
//! `POST /clusters/{cluster}/assume-role-for-pod-identity` (rest-json, SigV4 as `eks-auth`,
//! body `{"token": …}`), signed with the node's own credentials. It returns validated
//! [`Credentials`] or an [`ExchangeError`] that keeps what the caller must know: the upstream HTTP
//! status, error code (`x-amzn-errortype`), message and request id, and whether the failure is
//! worth retrying ([`ExchangeError::recoverable`]; whose fault a failure is, and the table of
//! EKS Auth's codes, are [`fault`]'s). It knows nothing of the cache or of HTTP clients waiting
//! on it.
//!
//! Bounds, so that a hung EKS Auth never holds a pod's SDK longer than it will wait: connect
//! timeout 1 s, each attempt 2 s, three attempts with the SDK's standard retry (throttling and
//! 5xx, exponential backoff with jitter), and an overall deadline of 4 s, all configurable in
//! [`ExchangeSettings`].

use crate::credentials::{Credentials, Unvalidated};
use crate::token::Token;
use aws_sdk_eksauth::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_eksauth::operation::RequestId;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod fault;

pub use fault::{hint_of, hint_of_code, known_codes, status_of_code, ExchangeError, Fault};

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
