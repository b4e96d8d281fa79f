//! Where the emulator's role credentials come from.
//!
//! Contract: [`Minting::Fake`] (the default) issues well-formed, unique credentials without any
//! AWS account: `ASIA` + 16 characters, a 40-character secret, a session token of realistic size
//! (~1 KB), valid 6 h, or 59 min when the association has a target role, as EKS issues them.
//! [`Minting::Sts`] makes a real `sts:AssumeRole` of the association's role with the caller's own
//! AWS credentials, adding EKS's six session tags unless the association disables them, then
//! chains to `targetRoleArn` when set, so IAM policies and ABAC conditions can be tried locally.
//! The STS endpoint follows the SDK's usual overrides (`AWS_ENDPOINT_URL_STS`).

use super::associations::{role_parts, Association};
use super::issuer::{uuid_like, VerifiedSubject};
use aws_sdk_sts::error::ProvideErrorMetadata;
use aws_sdk_sts::types::Tag;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const LIFETIME: Duration = Duration::from_secs(6 * 3600);
pub const TARGET_ROLE_LIFETIME: Duration = Duration::from_secs(59 * 60);

pub enum Minting {
    Fake,
    Sts(Box<aws_config::SdkConfig>),
}

/// Credentials and the identity they belong to.
#[derive(Debug)]
pub struct Issued {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: u64,
    pub assumed_role_arn: String,
    pub assume_role_id: String,
}

/// The context EKS Auth puts in session names and tags.
pub struct Context<'a> {
    pub cluster: &'a str,
    pub cluster_arn: &'a str,
    pub subject: &'a VerifiedSubject,
    pub association: &'a Association,
}

/// A failure as an EKS Auth error code and message.
pub type Refusal = (&'static str, String);

fn upper_alnum(n: usize) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..n)
        .map(|_| char::from(A[fastrand::usize(0..A.len())]))
        .collect()
}

/// EKS's session name: `eks-<cluster>-<pod>-<uuid>`, within STS's 64 characters and alphabet.
fn session_name(ctx: &Context<'_>) -> String {
    let raw = format!(
        "eks-{}-{}-{}",
        ctx.cluster,
        ctx.subject.pod_name,
        uuid_like()
    );
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.len() <= 64 {
        clean
    } else {
        format!("{}-{}", &clean[..27], &clean[clean.len() - 36..])
    }
}

/// The six tags EKS adds to the role session.
pub fn session_tags(ctx: &Context<'_>) -> Vec<(String, String)> {
    vec![
        ("eks-cluster-arn".into(), ctx.cluster_arn.into()),
        ("eks-cluster-name".into(), ctx.cluster.into()),
        ("kubernetes-namespace".into(), ctx.subject.namespace.clone()),
        (
            "kubernetes-service-account".into(),
            ctx.subject.service_account.clone(),
        ),
        ("kubernetes-pod-name".into(), ctx.subject.pod_name.clone()),
        ("kubernetes-pod-uid".into(), ctx.subject.pod_uid.clone()),
    ]
}

impl Minting {
    pub async fn issue(&self, ctx: &Context<'_>) -> Result<Issued, Refusal> {
        match self {
            Minting::Fake => Ok(fake(ctx)),
            Minting::Sts(sdk) => sts(sdk, ctx).await,
        }
    }
}

fn fake(ctx: &Context<'_>) -> Issued {
    let a = ctx.association;
    let role = a.target_role_arn.as_deref().unwrap_or(&a.role_arn);
    let lifetime = if a.target_role_arn.is_some() {
        TARGET_ROLE_LIFETIME
    } else {
        LIFETIME
    };
    fake_session(role, &session_name(ctx), lifetime)
}

/// Well-formed credentials for `role` (a role ARN), session `session`, lasting `lifetime`.
pub fn fake_session(role: &str, session: &str, lifetime: Duration) -> Issued {
    let (account, name) = role_parts(role).unwrap_or(("000000000000", "role"));
    let mut token_bytes = vec![0u8; 768];
    token_bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
    let role_id = format!("AROA{}", upper_alnum(17));
    Issued {
        access_key_id: format!("ASIA{}", upper_alnum(16)),
        secret_access_key: STANDARD.encode((0..30).map(|_| fastrand::u8(..)).collect::<Vec<u8>>()),
        session_token: format!("IQoJb3JpZ2luX2Vj{}", STANDARD.encode(token_bytes)),
        expiration: (SystemTime::now() + lifetime)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        assumed_role_arn: format!("arn:aws:sts::{account}:assumed-role/{name}/{session}"),
        assume_role_id: format!("{role_id}:{session}"),
    }
}

async fn sts(sdk: &aws_config::SdkConfig, ctx: &Context<'_>) -> Result<Issued, Refusal> {
    let a = ctx.association;
    let session = session_name(ctx);
    let tags: Vec<Tag> = if a.disable_session_tags {
        Vec::new()
    } else {
        session_tags(ctx)
            .into_iter()
            .filter_map(|(k, v)| Tag::builder().key(k).value(v).build().ok())
            .collect()
    };
    let first = assume(&aws_sdk_sts::Client::new(sdk), &a.role_arn, &session, &tags).await?;
    let Some(target) = &a.target_role_arn else {
        return Ok(first);
    };
    // Chain: the target role is assumed with the first role's credentials, as EKS does.
    let creds = aws_credential_types::Credentials::new(
        first.access_key_id,
        first.secret_access_key,
        Some(first.session_token),
        None,
        "pod-identity-emulator",
    );
    let chained = aws_sdk_sts::config::Builder::from(sdk)
        .credentials_provider(creds)
        .build();
    assume(
        &aws_sdk_sts::Client::from_conf(chained),
        target,
        &session,
        &tags,
    )
    .await
}

async fn assume(
    client: &aws_sdk_sts::Client,
    role: &str,
    session: &str,
    tags: &[Tag],
) -> Result<Issued, Refusal> {
    let out = client
        .assume_role()
        .role_arn(role)
        .role_session_name(session)
        .duration_seconds(3600)
        .set_tags((!tags.is_empty()).then(|| tags.to_vec()))
        .send()
        .await
        .map_err(|e| {
            let code = e.code().unwrap_or("unknown").to_owned();
            let message = e.message().unwrap_or("no message").to_owned();
            if code == "AccessDenied" {
                (
                    "AccessDeniedException",
                    format!("sts:AssumeRole of {role} was denied: {message}"),
                )
            } else {
                (
                    "InternalServerException",
                    format!("sts:AssumeRole of {role} failed ({code}): {message}"),
                )
            }
        })?;
    let c = out.credentials().ok_or_else(|| {
        (
            "InternalServerException",
            "sts:AssumeRole returned no credentials".to_owned(),
        )
    })?;
    let user = out.assumed_role_user();
    Ok(Issued {
        access_key_id: c.access_key_id().to_owned(),
        secret_access_key: c.secret_access_key().to_owned(),
        session_token: c.session_token().to_owned(),
        expiration: u64::try_from(c.expiration().secs()).unwrap_or(0),
        assumed_role_arn: user.map(|u| u.arn().to_owned()).unwrap_or_default(),
        assume_role_id: user
            .map(|u| u.assumed_role_id().to_owned())
            .unwrap_or_default(),
    })
}
