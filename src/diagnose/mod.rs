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
//!
//! The rooms: [`environment`] (1 and 3), [`token`] (2), [`agent`] (4, over the GET in [`http`]),
//! [`role`] (5), and [`report`], what was found and how it prints.

mod agent;
mod environment;
mod http;
mod report;
mod role;
mod token;

use crate::cli::DiagnoseArgs;
pub use report::{Finding, Level, Report};

/// Where the environment comes from: the process's own, or a pod's given as a list (the
/// in-process `diagnose` of `tests/it/kube_native.rs`).
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

/// Every check, in order, against `env`.
pub async fn diagnose(env: &dyn Env, args: &DiagnoseArgs) -> Report {
    let mut r = Report::default();
    let target = environment::check_uri(env, &mut r);
    let token = token::check_token(env, &mut r);
    environment::check_shadowing(env, &mut r);
    let (Some(target), Some(token)) = (target, token) else {
        r.warn(
            "agent",
            "not asked: fix the problems above first".to_string(),
        );
        return r;
    };
    let Some(creds) = agent::ask_agent(&target, &token, args.timeout, &mut r).await else {
        return r;
    };
    if args.no_sts {
        return r;
    }
    role::check_role(env, &creds, args.timeout, &mut r).await;
    r
}
