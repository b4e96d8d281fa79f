//! Local mode: `dev`, `dev token` and `emulate-eks-auth`.
//!
//! Contract: `dev` runs, in one process, the EKS Auth emulator on a free loopback port and the
//! credential server on `127.0.0.1:--port`, wired together over HTTP exactly as production wires
//! the agent to EKS Auth (same server, validation, cache, refresh and metrics code). It mints a
//! token for `default/default` into the state directory, then prints to stdout the shell lines
//! that point any AWS SDK at it, and runs until SIGINT/SIGTERM. Logs go to stderr.

use crate::cache::CacheSettings;
use crate::cli::{CredentialSource, DevArgs, EmulateArgs, EmulatorArgs, LogFormat, TokenArgs};
use crate::eks_auth::{EksAuthClient, ExchangeSettings};
use crate::emulator::associations::Associations;
use crate::emulator::issuer::{write_private, Issuer, MintRequest};
use crate::emulator::minting::Minting;
use crate::emulator::Emulator;
use crate::metrics::Metrics;
use crate::server::{listener, Server, ServerSettings};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The node credentials `dev` signs with: the emulator checks the signature's form, not its key.
const DEV_NODE_KEY_ID: &str = "AKIAPODIDENTITYDEV01";

/// `~/.cache/pod-identity-agent` (or `$XDG_CACHE_HOME/pod-identity-agent`).
pub fn default_state_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("pod-identity-agent")
}

fn state_dir(given: &Option<PathBuf>) -> PathBuf {
    given.clone().unwrap_or_else(default_state_dir)
}

/// Where `dev token` writes by default.
pub fn token_path(dir: &Path, namespace: &str, service_account: &str) -> PathBuf {
    dir.join("tokens")
        .join(format!("{namespace}_{service_account}.jwt"))
}

fn mint_to(issuer: &Issuer, req: &MintRequest, path: &Path) -> Result<(), String> {
    let token = issuer.mint(req).map_err(|e| e.to_string())?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    // No trailing newline: every SDK sends the file's bytes as they are.
    write_private(path, &token).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Build the emulator from its flags (loads or creates the issuer key).
pub async fn build_emulator(args: &EmulatorArgs) -> Result<Emulator, String> {
    let dir = state_dir(&args.state_dir);
    let issuer = Arc::new(Issuer::load_or_create(&dir).map_err(|e| e.to_string())?);
    let associations = match (&args.associations, &args.from_cluster) {
        (Some(path), _) => Associations::from_yaml_file(path)?,
        (None, Some(cluster)) => crate::emulator::import::from_cluster(cluster).await?,
        (None, None) => Associations::Default,
    };
    let minting = match args.credential_source {
        CredentialSource::Fake => Minting::Fake,
        CredentialSource::Sts => {
            let mut sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .load()
                .await;
            if sdk.region().is_none() {
                sdk = sdk
                    .into_builder()
                    .region(aws_config::Region::new("us-east-1"))
                    .build();
            }
            Minting::Sts(Box::new(sdk))
        }
    };
    Ok(Emulator::new(issuer, associations, minting))
}

/// Serve the emulator on `bound` until `stop`.
fn spawn_emulator(
    bound: listener::Bound,
    emulator: Arc<Emulator>,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(listener::serve(
        bound,
        move |req| {
            let e = emulator.clone();
            async move { e.handle(req).await }
        },
        stop,
        Duration::from_secs(2),
    ))
}

pub async fn run_token(args: TokenArgs) -> Result<(), String> {
    let dir = state_dir(&args.state_dir);
    let issuer = Issuer::load_or_create(&dir).map_err(|e| e.to_string())?;
    let mut req = MintRequest::new(&args.namespace, &args.service_account);
    req.pod = args.pod;
    req.ttl = args.ttl;
    match args.out.as_deref() {
        Some(p) if p == Path::new("-") => {
            let token = issuer.mint(&req).map_err(|e| e.to_string())?;
            let mut out = std::io::stdout();
            out.write_all(token.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| e.to_string())
        }
        given => {
            let path = given
                .map(Path::to_path_buf)
                .unwrap_or_else(|| token_path(&dir, &args.namespace, &args.service_account));
            mint_to(&issuer, &req, &path)?;
            println!(
                "export AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={}",
                path.display()
            );
            Ok(())
        }
    }
}

pub async fn run_emulate(args: EmulateArgs) -> Result<(), String> {
    crate::logging::init(&args.log, LogFormat::Text);
    let emulator = Arc::new(build_emulator(&args.emulator).await?);
    let bound = listener::bind(args.listen)
        .await
        .map_err(|e| e.to_string())?;
    let addr = bound.addr;
    let (stop, stop_rx) = watch::channel(false);
    let task = spawn_emulator(bound, emulator, stop_rx);
    println!("# EKS Auth emulator listening; point clients at it with:");
    println!("export AWS_ENDPOINT_URL_EKS_AUTH=http://{addr}");
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, state_dir = %state_dir(&args.emulator.state_dir).display(), "EKS Auth emulator ready");
    crate::signal::shutdown().await;
    let _ = stop.send(true);
    let _ = task.await;
    Ok(())
}

pub async fn run_dev(args: DevArgs) -> Result<(), String> {
    if let Some(crate::cli::DevCommand::Token(t)) = args.command {
        return run_token(t).await;
    }
    crate::logging::init(&args.log, LogFormat::Text);
    let dir = state_dir(&args.emulator.state_dir);
    let emulator = Arc::new(build_emulator(&args.emulator).await?);
    let issuer = emulator.issuer.clone();

    let emu_bound = listener::bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0))
        .await
        .map_err(|e| e.to_string())?;
    let emu_addr = emu_bound.addr;
    let (stop, stop_rx) = watch::channel(false);
    let emu_task = spawn_emulator(emu_bound, emulator, stop_rx);

    // The agent, exactly as `server` builds it, pointed at the emulator.
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            DEV_NODE_KEY_ID,
            "dev-node-secret",
            None,
            None,
            "dev",
        ))
        .load()
        .await;
    let mut exchange = ExchangeSettings::new(&args.cluster_name);
    exchange.endpoint = Some(format!("http://{emu_addr}"));
    let settings = ServerSettings {
        bind_hosts: vec![Ipv4Addr::LOCALHOST.into()],
        port: args.port,
        probe_addr: Some(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)),
        metrics_addr: Some(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)),
        cache: CacheSettings::default(),
        leeway: Duration::from_secs(60),
        shutdown_grace: Duration::from_secs(2),
    };
    let metrics = Arc::new(Metrics::new().map_err(|e| e.to_string())?);
    let agent = Server::start(
        &settings,
        Arc::new(EksAuthClient::new(&sdk, &exchange)),
        metrics,
    )
    .await
    .map_err(|e| e.to_string())?;
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

    let metrics_url = agent
        .metrics_addr
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
    let _ = std::io::stdout().flush();
    tracing::info!(agent = %agent_addr, emulator = %emu_addr, state_dir = %dir.display(), "dev mode ready");

    crate::signal::shutdown().await;
    tracing::info!("shutting down");
    agent.shutdown().await;
    let _ = stop.send(true);
    let _ = emu_task.await;
    Ok(())
}
