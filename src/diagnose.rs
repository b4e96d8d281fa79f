//! `pod-identity-agent diagnose`: "why does my pod get no credentials?", answered from inside
//! the pod (or any shell with the same environment) by checking what a person would otherwise
//! check by hand.
//!
//! Contract: it reads only the process environment, the token file it names, the agent at the
//! URI it names and (unless `--no-sts`) STS `GetCallerIdentity` with the credentials the agent
//! returned. It prints one line per check, `ok`, `warn` or `FAIL`, each failure followed by what
//! it means in plain words, and exits 0 when nothing failed (warnings allowed), 1 otherwise. It
//! never prints the token, a secret key or a session token; the token is named by its short hash.
//!
//! The checks, in the order an SDK's container provider depends on them:
//! 1. `AWS_CONTAINER_CREDENTIALS_FULL_URI`: set, `http`, to an address SDKs accept over plain
//!    HTTP (loopback, `169.254.170.23`, `fd00:ec2::23`; or `169.254.170.2`, ECS's).
//! 2. `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` (or `AWS_CONTAINER_AUTHORIZATION_TOKEN`): readable,
//!    no trailing newline (SDKs send the file as it is and a newline breaks the header), a JWT
//!    for the audience `pods.eks.amazonaws.com`, within its time; its namespace, service account
//!    and pod.
//! 3. What would be used before the container provider: environment keys, `AWS_PROFILE`, IRSA's
//!    `AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE`, a shared credentials file.
//! 4. The agent's answer, exactly as an SDK asks: the account, key id and expiry; or its error
//!    code explained.
//! 5. The role the credentials belong to, from STS.

use crate::cli::DiagnoseArgs;
use crate::token::Token;
use crate::token::AUDIENCE;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the report, and for a failure what it means.
#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub check: &'static str,
    pub message: String,
}

/// Everything the checks found, in order.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn ok(&mut self, check: &'static str, message: impl Into<String>) {
        self.push(Level::Ok, check, message);
    }
    fn warn(&mut self, check: &'static str, message: impl Into<String>) {
        self.push(Level::Warn, check, message);
    }
    fn fail(&mut self, check: &'static str, message: impl Into<String>) {
        self.push(Level::Fail, check, message);
    }
    fn push(&mut self, level: Level, check: &'static str, message: impl Into<String>) {
        self.findings.push(Finding {
            level,
            check,
            message: message.into(),
        });
    }

    pub fn failed(&self) -> bool {
        self.findings.iter().any(|f| f.level == Level::Fail)
    }

    /// The report as printed: one line per finding, then a one-line verdict.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let tag = match f.level {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            let _ = writeln!(out, "{tag}  {:<12} {}", f.check, f.message);
        }
        let problems = self
            .findings
            .iter()
            .filter(|f| f.level == Level::Fail)
            .count();
        let warnings = self
            .findings
            .iter()
            .filter(|f| f.level == Level::Warn)
            .count();
        let _ = match problems {
            0 => writeln!(
                out,
                "\nThis environment gets Pod Identity credentials ({warnings} warning(s))."
            ),
            n => writeln!(out, "\n{n} problem(s), {warnings} warning(s)."),
        };
        out
    }
}

/// Where the environment comes from: the process's own, or a map (tests).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// The command: run every check, print the report, exit 1 on a problem.
pub async fn run(args: DiagnoseArgs) -> std::process::ExitCode {
    let report = diagnose(&ProcessEnv, &args).await;
    print!("{}", report.render());
    if report.failed() {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}

pub async fn diagnose(env: &dyn Env, args: &DiagnoseArgs) -> Report {
    let mut r = Report::default();
    let target = check_uri(env, &mut r);
    let token = check_token(env, &mut r);
    check_shadowing(env, &mut r);
    let (Some(target), Some(token)) = (target, token) else {
        r.warn(
            "agent",
            "not asked: fix the problems above first".to_string(),
        );
        return r;
    };
    let Some(creds) = ask_agent(&target, &token, args.timeout, &mut r).await else {
        return r;
    };
    if args.no_sts {
        return r;
    }
    check_role(env, &creds, args.timeout, &mut r).await;
    r
}

/// The agent's address and path, from `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
pub struct Target {
    host: String,
    port: u16,
    path_and_query: String,
}

fn check_uri(env: &dyn Env, r: &mut Report) -> Option<Target> {
    const CHECK: &str = "environment";
    let Some(uri) = env.var("AWS_CONTAINER_CREDENTIALS_FULL_URI") else {
        if let Some(rel) = env.var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
            r.fail(CHECK, format!("AWS_CONTAINER_CREDENTIALS_FULL_URI is not set, but AWS_CONTAINER_CREDENTIALS_RELATIVE_URI={rel} is: \
                that is ECS's task-role endpoint, not Pod Identity."));
            return None;
        }
        r.fail(CHECK, "AWS_CONTAINER_CREDENTIALS_FULL_URI is not set. EKS sets it (with the token file) in pods whose service account \
            has a Pod Identity association when the pod is created: check the association (aws eks list-pod-identity-associations), \
            then recreate the pod; the eks-pod-identity-webhook must be running.");
        return None;
    };
    let parsed = match uri.parse::<hyper::Uri>() {
        Ok(u) => u,
        Err(e) => {
            r.fail(
                CHECK,
                format!("AWS_CONTAINER_CREDENTIALS_FULL_URI={uri} is not a URI: {e}"),
            );
            return None;
        }
    };
    if parsed.scheme_str() != Some("http") {
        r.fail(CHECK, format!("AWS_CONTAINER_CREDENTIALS_FULL_URI={uri}: the agent speaks plain http (it is a link-local address on the node)."));
        return None;
    }
    let host = parsed
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let allowed = match host.parse::<IpAddr>() {
        Ok(ip) => {
            ip.is_loopback()
                || ip == IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23))
                || ip == IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2))
                || ip == IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23))
        }
        Err(_) => host == "localhost",
    };
    if !allowed {
        r.fail(CHECK, format!("AWS_CONTAINER_CREDENTIALS_FULL_URI={uri}: SDKs refuse plain http to {host}; only loopback, \
            169.254.170.23, fd00:ec2::23 and 169.254.170.2 are accepted."));
        return None;
    }
    r.ok(CHECK, format!("AWS_CONTAINER_CREDENTIALS_FULL_URI={uri}"));
    Some(Target {
        host,
        port: parsed.port_u16().unwrap_or(80),
        path_and_query: parsed
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into()),
    })
}

fn check_token(env: &dyn Env, r: &mut Report) -> Option<String> {
    const CHECK: &str = "token";
    let (raw, source) = match env.var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
        Some(path) => match std::fs::read(&path) {
            Ok(bytes) => (bytes, path),
            Err(e) => {
                let why = match e.kind() {
                    std::io::ErrorKind::NotFound => "it does not exist: the projected token volume (eks-pod-identity-token) is not mounted in this container",
                    std::io::ErrorKind::PermissionDenied => "permission denied: the container's user cannot read the projected token (set the pod's fsGroup, or runAsUser to the file's owner)",
                    _ => "it cannot be read",
                };
                r.fail(
                    CHECK,
                    format!("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={path}: {why} ({e})."),
                );
                return None;
            }
        },
        None => match env.var("AWS_CONTAINER_AUTHORIZATION_TOKEN") {
            Some(t) => (t.into_bytes(), "AWS_CONTAINER_AUTHORIZATION_TOKEN".into()),
            None => {
                r.fail(CHECK, "neither AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE nor AWS_CONTAINER_AUTHORIZATION_TOKEN is set: \
                    the agent needs the pod's service-account token; EKS sets the file with the URI.");
                return None;
            }
        },
    };
    if raw.ends_with(b"\n") || raw.ends_with(b"\r") {
        r.fail(CHECK, format!("{source} ends with a newline: SDKs send the file as it is, and a newline in the Authorization header \
            is refused. The kubelet never writes one; whoever wrote this file did."));
        return None;
    }
    let Ok(text) = String::from_utf8(raw) else {
        r.fail(CHECK, format!("{source} is not text: it is not a JWT."));
        return None;
    };
    let token = match Token::parse(text.as_bytes()) {
        Ok(t) => t,
        Err(e) => {
            r.fail(
                CHECK,
                format!("{source} is not a service-account token the agent accepts: {e}."),
            );
            return None;
        }
    };
    let audiences = token.audiences();
    let s = token.subject();
    let who = format!(
        "namespace {}, service account {}{}",
        or_unknown(&s.namespace),
        or_unknown(&s.service_account),
        if s.pod.is_empty() {
            String::new()
        } else {
            format!(", pod {}", s.pod)
        }
    );
    if !audiences.iter().any(|a| a == AUDIENCE) {
        r.fail(CHECK, format!("{source} ({who}) is for the audience {audiences:?}, not {AUDIENCE}: \
            {}", if audiences.iter().any(|a| a == "sts.amazonaws.com") {
                "that is an IRSA token (AWS_WEB_IDENTITY_TOKEN_FILE's); Pod Identity uses the eks-pod-identity-token volume."
            } else {
                "mount the eks-pod-identity-token projected volume (audience pods.eks.amazonaws.com)."
            }));
        return None;
    }
    let now = SystemTime::now();
    let now_s = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let exp = token.claims().exp;
    if exp <= now_s {
        r.fail(CHECK, format!("{source} ({who}) expired {} ago: the kubelet renews projected tokens well before they expire, \
            so this file is a copy or the kubelet cannot reach the API server.", human(now_s - exp)));
        return None;
    }
    if let Some(nbf) = token.claims().nbf.filter(|&n| n > now_s + 60) {
        r.fail(CHECK, format!("{source} ({who}) is not valid for another {}: this machine's clock or the issuer's is wrong.",
            human(nbf - now_s)));
        return None;
    }
    r.ok(
        CHECK,
        format!(
            "{source}: {who}; expires in {}; token {}",
            human(exp - now_s),
            token.hash()
        ),
    );
    Some(text)
}

fn check_shadowing(env: &dyn Env, r: &mut Report) {
    const CHECK: &str = "precedence";
    let mut shadowed = false;
    if env.var("AWS_ACCESS_KEY_ID").is_some() {
        shadowed = true;
        r.warn(CHECK, "AWS_ACCESS_KEY_ID is set: every SDK uses environment keys before container credentials, so Pod Identity is not used.");
    }
    if let Some(profile) = env.var("AWS_PROFILE") {
        shadowed = true;
        r.warn(CHECK, format!("AWS_PROFILE={profile} is set: SDKs use that profile from the shared config and credentials files \
            instead of container credentials (and fail if it does not exist)."));
    }
    if env.var("AWS_ROLE_ARN").is_some() && env.var("AWS_WEB_IDENTITY_TOKEN_FILE").is_some() {
        shadowed = true;
        r.warn(CHECK, "AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE are set: that is IRSA, which SDKs try before container credentials; \
            remove the eks.amazonaws.com/role-arn annotation from the service account to use Pod Identity.");
    }
    let shared = env
        .var("AWS_SHARED_CREDENTIALS_FILE")
        .or_else(|| env.var("HOME").map(|h| format!("{h}/.aws/credentials")));
    if let Some(path) = shared.filter(|p| {
        std::fs::read_to_string(p)
            .map(|t| t.contains("[default]"))
            .unwrap_or(false)
    }) {
        shadowed = true;
        r.warn(
            CHECK,
            format!("{path} has a [default] profile: SDKs use it before container credentials."),
        );
    }
    if !shadowed {
        r.ok(
            CHECK,
            "nothing in the environment comes before container credentials",
        );
    }
}

/// What the agent returned that later checks need. The secret parts stay in here.
struct Returned {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
}

async fn ask_agent(
    target: &Target,
    token: &str,
    timeout: Duration,
    r: &mut Report,
) -> Option<Returned> {
    const CHECK: &str = "agent";
    let where_ = format!("{}:{}", target.host, target.port);
    let answer = tokio::time::timeout(timeout, get(target, token)).await;
    let (status, body) = match answer {
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

/// One GET with the token, on a fresh connection, as an SDK's container provider sends it.
async fn get(target: &Target, token: &str) -> Result<(u16, Bytes), String> {
    let addr: SocketAddr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let host = match addr.ip() {
        IpAddr::V6(ip) => format!("[{ip}]:{}", target.port),
        IpAddr::V4(ip) => format!("{ip}:{}", target.port),
    };
    let req = hyper::Request::get(target.path_and_query.as_str())
        .header(hyper::header::HOST, host)
        .header(hyper::header::AUTHORIZATION, token)
        .header(
            hyper::header::USER_AGENT,
            concat!("pod-identity-agent-diagnose/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|_| "the token is not a valid header value".to_string())?;
    let res = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    // An answer is a few hundred bytes; whatever answers at that address gets no more room.
    let body = http_body_util::Limited::new(res.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("the answer is not a credentials answer: {e}"))?
        .to_bytes();
    Ok((status, body))
}

async fn check_role(env: &dyn Env, creds: &Returned, timeout: Duration, r: &mut Report) {
    const CHECK: &str = "role";
    let region = env
        .var("AWS_REGION")
        .or_else(|| env.var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| "us-east-1".into());
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region))
        .credentials_provider(aws_credential_types::Credentials::new(
            creds.access_key_id.clone(),
            creds.secret_access_key.clone(),
            Some(creds.session_token.clone()),
            None,
            "pod-identity-agent-diagnose",
        ));
    if let Some(endpoint) = env.var("AWS_ENDPOINT_URL_STS") {
        // The signed GetCallerIdentity is a bearer proof of the role (Vault-style IAM auth
        // accepts it): over plain http anyone on the path could replay it.
        if crate::https::check_url(&endpoint).is_err() {
            r.warn(CHECK, format!("AWS_ENDPOINT_URL_STS is {}: not https (nor a loopback address), so the signed request, a proof of the role, would travel in the clear; not asked (--no-sts skips this check).", clip(&endpoint, 120)));
            return;
        }
        loader = loader.endpoint_url(endpoint);
    }
    let client = aws_sdk_sts::Client::new(&loader.load().await);
    match tokio::time::timeout(timeout, client.get_caller_identity().send()).await {
        Ok(Ok(out)) => {
            let arn = out.arn().unwrap_or_default();
            let role = arn
                .split_once(":assumed-role/")
                .and_then(|(_, rest)| rest.split('/').next())
                .unwrap_or(arn);
            r.ok(CHECK, format!("{role} ({arn})"));
        }
        Ok(Err(e)) => {
            use aws_sdk_sts::error::ProvideErrorMetadata;
            let detail = e
                .code()
                .map(|c| format!("{c}: {}", e.message().unwrap_or_default()))
                .unwrap_or_else(|| "no answer".into());
            r.warn(CHECK, format!("STS GetCallerIdentity failed ({}); the credentials may still work for the services \
                the pod reaches (--no-sts skips this check).", clip(&detail, 300)));
        }
        Err(_) => r.warn(
            CHECK,
            "STS did not answer in time; the pod may have no route to STS (--no-sts skips this check).",
        ),
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "(unknown)"
    } else {
        s
    }
}

/// Answers larger than this are not read.
const MAX_ANSWER: usize = 64 * 1024;

/// `s` at most `max` characters, control characters (terminal escapes among them) replaced:
/// what the agent or STS said is printed to a person's terminal.
fn clip(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

/// `3725` → `1h 2m`.
fn human(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn what_others_said_cannot_drive_the_terminal() {
        let shown = super::clip("ok\u{1b}]0;owned\u{7}\u{1b}[2J done", 100);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.starts_with("ok") && shown.ends_with("done"));
        assert_eq!(super::clip(&"x".repeat(500), 10).chars().count(), 11);
    }

    use super::*;
    use crate::codes::ErrorCode;
    use crate::explain::explain;

    /// Every code the agent answers with, from its own tables: each gets its own explanation.
    #[test]
    fn every_error_code_the_agent_can_give_is_explained() {
        let unknown = explain("SomethingNew", 400, None);
        let own = ErrorCode::ALL
            .iter()
            .map(|c| (c.as_str(), c.status().as_u16()));
        let eks_auth = crate::eks_auth::known_codes()
            .chain(["UnknownError"])
            .map(|c| (c, 400));
        for (code, status) in own.chain(eks_auth) {
            assert_ne!(
                explain(code, status, None),
                unknown,
                "{code} is not explained"
            );
        }
        // The same code is the pod's problem at 400 and the node's at 403.
        assert_ne!(
            explain("ExpiredTokenException", 400, None),
            explain("ExpiredTokenException", 403, None)
        );
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human(59), "59 s");
        assert_eq!(human(600), "10 min");
        assert_eq!(human(3 * 3600 + 120), "3h 2m");
    }
}
