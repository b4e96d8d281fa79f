//! Local mode: `dev`, `dev token` and `emulate-eks-auth`.
//!
//! Contract: `dev` runs, in one process, the EKS Auth emulator on a free loopback port and the
//! credential server on `127.0.0.1:--port`, wired together over HTTP exactly as production wires
//! the agent to EKS Auth (same server, validation, cache, refresh and metrics code). It mints a
//! token for `default/default` into the state directory, then prints to stdout the shell lines
//! that point any AWS SDK at it, and runs until SIGINT/SIGTERM. Logs go to stderr.

use crate::agent::AgentSettings;
use crate::cli::{
    DevArgs, EmulateArgs, ExplainArgs, LogFormat, ServerArgs, TokenArgs, Verification,
};
use crate::eks_auth::EksAuthClient;
use crate::emulator::associations::STS_AUDIENCE;
use crate::emulator::issuer::write_private;
use crate::emulator::issuer::{Issuer, MintRequest, AUDIENCE};
use crate::emulator::kube_tls::KubeTls;
use crate::emulator::state::{chained_profiles, kubeconfig, mint_to, token_path, token_path_for};
use crate::emulator::{cluster, explain, Emulator};
use crate::metrics::Metrics;
use crate::server::listener::Connections;
use crate::server::Server;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The node credentials `dev` signs with: the emulator checks the signature's form, not its key.
const DEV_NODE_KEY_ID: &str = "AKIAPODIDENTITYDEV01";
/// How long the emulator's connections get to finish at shutdown.
const EMULATOR_GRACE: Duration = Duration::from_secs(2);

/// A running emulator and how to stop it.
struct RunningEmulator {
    addr: SocketAddr,
    /// The Kubernetes API (HTTPS) and its certificate.
    kube_addr: SocketAddr,
    kube_ca: String,
    stop: CancellationToken,
    connections: Connections,
    task: tokio::task::JoinHandle<()>,
    kube_task: tokio::task::JoinHandle<()>,
}

impl RunningEmulator {
    async fn start(emulator: Arc<Emulator>, at: SocketAddr) -> Result<RunningEmulator, String> {
        let bound = crate::server::bind::bind(at)
            .await
            .map_err(|e| e.to_string())?;
        let addr = bound.addr;
        let stop = CancellationToken::new();
        let connections = Connections::default();
        let kube = tokio::net::TcpListener::bind(SocketAddr::new(at.ip(), 0))
            .await
            .map_err(|e| format!("cannot bind the emulated Kubernetes API: {e}"))?;
        let kube_addr = kube.local_addr().map_err(|e| e.to_string())?;
        let tls = KubeTls::new()?;
        let kube_ca = tls.cert_pem.clone();
        let kube_task = tls.serve(emulator.clone(), kube, stop.clone());
        let task = emulator.serve(bound, stop.clone(), connections.clone());
        Ok(RunningEmulator {
            addr,
            kube_addr,
            kube_ca,
            stop,
            connections,
            task,
            kube_task,
        })
    }

    /// Write the kubeconfig whose user runs `aws eks get-token` against this emulator.
    fn write_kubeconfig(&self, dir: &Path, cluster: &str) -> Result<std::path::PathBuf, String> {
        let path = dir.join(format!("kubeconfig-{cluster}"));
        let text = kubeconfig(
            cluster,
            &format!("https://{}", self.kube_addr),
            &format!("http://{}", self.addr),
            &self.kube_ca,
        );
        write_private(&path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }

    async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.kube_task.await;
        if tokio::time::timeout(EMULATOR_GRACE, self.connections.wait())
            .await
            .is_err()
        {
            self.connections.close();
        }
        let _ = self.task.await;
    }
}

pub async fn run_token(args: TokenArgs) -> Result<(), String> {
    let dir = args.state_dir()?;
    let issuer = Issuer::load_or_create(&dir).map_err(|e| e.to_string())?;
    let mut req = MintRequest::new(&args.namespace, &args.service_account);
    req.pod = args.pod;
    req.ttl = args.ttl;
    req.audience = args.audience.clone();
    match args.out.as_deref() {
        Some(p) if p == Path::new("-") => {
            let token = issuer.mint(&req).map_err(|e| e.to_string())?;
            let mut out = std::io::stdout();
            out.write_all(token.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| e.to_string())
        }
        given => {
            let path = given.map(Path::to_path_buf).unwrap_or_else(|| {
                token_path_for(&dir, &args.namespace, &args.service_account, &args.audience)
            });
            mint_to(&issuer, &req, &path)?;
            let variable = if args.audience == AUDIENCE {
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"
            } else {
                "AWS_WEB_IDENTITY_TOKEN_FILE"
            };
            println!("export {variable}={}", path.display());
            Ok(())
        }
    }
}

/// `dev explain-access`: read the cluster's state (no emulator needs to run) and explain.
pub fn run_explain(args: ExplainArgs) -> Result<bool, String> {
    let dir = crate::emulator::state::state_dir(args.state_dir.as_deref())?;
    let path = cluster::state_file(&dir, &args.cluster_name);
    let state = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str::<cluster::Cluster>(&text)
            .map_err(|e| format!("{} is not the emulator's cluster state: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "no cluster {} in {}: start `pod-identity-agent dev` (or emulate-eks-auth) with this state dir first",
                args.cluster_name,
                dir.display()
            ))
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let aws_auth = match &args.aws_auth {
        Some(p) => crate::emulator::aws_auth::AwsAuth::load(p),
        None => Ok(Default::default()),
    };
    let (mapped, text) =
        explain::explain(&state, &aws_auth, &args.principal_arn, &args.session_name);
    print!("{text}");
    Ok(mapped)
}

pub async fn run_emulate(args: EmulateArgs) -> Result<(), String> {
    crate::logging::init(&args.log, LogFormat::Text);
    let config = args.emulator.config()?;
    let emulator = Arc::new(Emulator::build(&config).await?);
    let running = RunningEmulator::start(emulator, args.listen).await?;
    println!("# EKS Auth, STS and OIDC issuer emulator listening; point clients at it with:");
    println!("export AWS_ENDPOINT_URL_EKS_AUTH=http://{}", running.addr);
    println!("export AWS_ENDPOINT_URL_STS=http://{}", running.addr);
    println!("export AWS_ENDPOINT_URL_EKS=http://{}", running.addr);
    let kube = running.write_kubeconfig(&config.state_dir, &config.cluster.name)?;
    println!("export KUBECONFIG={}", kube.display());
    let _ = std::io::stdout().flush();
    tracing::info!(addr = %running.addr, state_dir = %config.state_dir.display(), "EKS Auth emulator ready");
    crate::signal::shutdown().await;
    running.shutdown().await;
    Ok(())
}

/// What `dev` prints for a person to paste.
struct Exports<'a> {
    args: &'a DevArgs,
    dir: &'a Path,
    emulator: SocketAddr,
    agent: SocketAddr,
    metrics: Option<SocketAddr>,
    token_file: &'a Path,
    irsa_token: &'a Path,
    irsa_role: &'a str,
    kubeconfig: &'a Path,
}

fn print_exports(e: &Exports<'_>) {
    let Exports {
        args,
        dir,
        emulator: emu_addr,
        agent: agent_addr,
        token_file,
        irsa_token,
        irsa_role,
        ..
    } = *e;
    let metrics_url = e
        .metrics
        .map(|a| format!("http://{a}/metrics"))
        .unwrap_or_default();
    println!("# pod-identity-agent dev: credentials for default/default from a local EKS Auth emulator (http://{emu_addr}).");
    println!("# Paste into a shell; environment keys and AWS_PROFILE take precedence in SDK default chains.");
    println!(
        "# Other service accounts: pod-identity-agent dev token -n NS -s SA --state-dir {}",
        dir.display()
    );
    println!("# Metrics: {metrics_url}");
    println!("export AWS_CONTAINER_CREDENTIALS_FULL_URI=http://{agent_addr}/v1/credentials");
    println!(
        "export AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={}",
        token_file.display()
    );
    if args.emulator.credential_source == crate::cli::EmulatedCredentials::Sts {
        // The emulator's STS knows only sessions it issued; real credentials must reach real STS.
        println!(
            "# --credential-source sts: Pod Identity credentials are real, so STS stays AWS's."
        );
        println!("# For IRSA or chaining against the emulator's STS (fake credentials):");
        println!("#   export AWS_ENDPOINT_URL_STS=http://{emu_addr}");
    } else {
        println!("# STS and the OIDC issuer are the emulator too (IRSA, role chaining, get-caller-identity):");
        println!("export AWS_ENDPOINT_URL_STS=http://{emu_addr}");
    }
    // SDKs refuse to sign without a region even when every endpoint is overridden; EKS's webhook
    // sets both in pods (boto3 and the AWS CLI read only the second). Keep the developer's own.
    println!("export AWS_REGION=${{AWS_REGION:-us-east-1}}");
    println!("export AWS_DEFAULT_REGION=${{AWS_DEFAULT_REGION:-$AWS_REGION}}");
    println!("# IRSA instead of Pod Identity: unset the two AWS_CONTAINER_* above, then");
    println!("#   export AWS_ROLE_ARN={irsa_role}");
    println!(
        "#   export AWS_WEB_IDENTITY_TOKEN_FILE={}",
        irsa_token.display()
    );
    // The fourth identity: who an IAM principal is in the cluster (kubectl, aws eks get-token).
    println!("# The cluster's API (kubectl auth whoami, kubectl auth can-i) and the EKS API (access entries):");
    println!("export KUBECONFIG={}", e.kubeconfig.display());
    println!("export AWS_ENDPOINT_URL_EKS=http://{emu_addr}");
    if let Some(path) = &args.aws_config {
        println!("# A cross-account chain ({}):", args.cross_account_role);
        println!(
            "#   export AWS_CONFIG_FILE={} AWS_PROFILE=pod-identity-dev-cross",
            path.display()
        );
    }
}

/// The region the emulator answers for, which dev's agent signs for.
const DEV_REGION: &str = "us-east-1";

/// The agent `dev` runs: `server`'s, from the same defaults, with only what running on this
/// machine against the emulator at `emulator` must change.
pub fn agent_settings(
    cluster_name: &str,
    emulator: SocketAddr,
    port: u16,
) -> Result<AgentSettings, String> {
    let mut args = ServerArgs::defaults(cluster_name)?;
    // This machine, not a node: the credential listener on loopback at the port asked for, the
    // probes and metrics on free loopback ports (printed), nothing on the node's addresses.
    args.bind_hosts = vec![Ipv4Addr::LOCALHOST.into()];
    args.port = port;
    args.probe_port = 0;
    args.metrics_address = Ipv4Addr::LOCALHOST.into();
    args.metrics_port = 0;
    // EKS Auth is the emulator, which answers for one region.
    args.endpoint = Some(format!("http://{emulator}"));
    args.region = Some(DEV_REGION.to_owned());
    // Nothing shared with other agents or kept across runs: several `dev`s may run at once, and
    // the state dir is the emulator's (`--state-dir`).
    args.state_dir = PathBuf::new();
    args.handover.handover_dir = PathBuf::new();
    // The emulator verifies its own tokens, as EKS Auth does; and a developer's shell inside a
    // pod (KUBERNETES_SERVICE_HOST) must not make `auto` trust that cluster's keys instead.
    args.identity.token_verification = Verification::Off;
    args.agent_settings()
}

/// The agent, as `server` runs it ([`agent_settings`]), with dev's own node credentials.
async fn start_agent(settings: &AgentSettings) -> Result<crate::server::RunningServer, String> {
    let region = settings
        .region
        .clone()
        .unwrap_or_else(|| DEV_REGION.to_owned());
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region))
        .credentials_provider(aws_credential_types::Credentials::new(
            DEV_NODE_KEY_ID,
            "dev-node-secret",
            None,
            None,
            "dev",
        ))
        .load()
        .await;
    let metrics = Arc::new(Metrics::new().map_err(|e| e.to_string())?);
    Server::start(
        &settings.server,
        Arc::new(EksAuthClient::new(&sdk, &settings.exchange)),
        metrics,
    )
    .await
    .map_err(|e| e.to_string())
}

pub async fn run_dev(args: DevArgs) -> Result<(), String> {
    match args.command {
        Some(crate::cli::DevCommand::Token(t)) => return run_token(t).await,
        Some(crate::cli::DevCommand::ExplainAccess(_)) | None => {}
    }
    crate::logging::init(&args.log, LogFormat::Text);
    let config = args.emulator.config()?;
    let dir = config.state_dir.clone();
    let emulator = Arc::new(Emulator::build(&config).await?);
    let issuer = emulator.issuer.clone();
    let emu =
        RunningEmulator::start(emulator, SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)).await?;
    let emu_addr = emu.addr;

    let cluster_name = config.cluster.name.clone();
    let agent = start_agent(&agent_settings(&cluster_name, emu_addr, args.port)?).await?;
    let agent_addr = agent
        .credential_addrs
        .first()
        .copied()
        .ok_or("no credential listener")?;

    let token_file = token_path(&dir, "default", "default");
    mint_to(
        &issuer,
        &MintRequest::new("default", "default"),
        &token_file,
    )?;
    // IRSA: the same service account's token for STS, and the role its default grant names.
    let irsa_token = token_path_for(&dir, "default", "default", STS_AUDIENCE);
    let mut irsa_req = MintRequest::new("default", "default");
    irsa_req.audience = STS_AUDIENCE.to_owned();
    mint_to(&issuer, &irsa_req, &irsa_token)?;
    let irsa_role = "arn:aws:iam::000000000000:role/default-default";
    if let Some(path) = &args.aws_config {
        std::fs::write(
            path,
            chained_profiles(irsa_role, &irsa_token, &args.cross_account_role),
        )
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }

    let kube = emu.write_kubeconfig(&dir, &cluster_name)?;
    print_exports(&Exports {
        args: &args,
        dir: &dir,
        emulator: emu_addr,
        agent: agent_addr,
        metrics: agent.metrics_addr,
        token_file: &token_file,
        irsa_token: &irsa_token,
        irsa_role,
        kubeconfig: &kube,
    });
    let _ = std::io::stdout().flush();
    tracing::info!(agent = %agent_addr, emulator = %emu_addr, state_dir = %dir.display(), "dev mode ready");

    crate::signal::shutdown().await;
    tracing::info!("shutting down");
    agent.shutdown().await;
    emu.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dev` runs the agent `server` runs: its settings are `server`'s defaults but for the
    /// overrides [`agent_settings`] names (a new default reaches both, or this fails).
    #[test]
    fn dev_runs_the_agent_server_runs() {
        let emulator = SocketAddr::from((Ipv4Addr::LOCALHOST, 8090));
        let dev = agent_settings("dev", emulator, 8080).expect("dev settings");
        let mut expected = ServerArgs::defaults("dev")
            .and_then(|a| a.agent_settings())
            .expect("server settings");
        let loopback = |port| Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        expected.server.bind_hosts = vec![Ipv4Addr::LOCALHOST.into()];
        expected.server.port = 8080;
        expected.server.probe_addr = loopback(0);
        expected.server.metrics_addr = loopback(0);
        expected.exchange.endpoint = Some("http://127.0.0.1:8090".into());
        expected.region = Some(DEV_REGION.into());
        expected.state_dir = None;
        #[cfg(target_os = "linux")]
        {
            expected.handover = None;
        }
        expected.server.verification = None;
        expected.server.kube = None;
        assert_eq!(format!("{dev:?}"), format!("{expected:?}"));
    }
}
