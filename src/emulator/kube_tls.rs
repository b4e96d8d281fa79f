//! The emulated Kubernetes API's HTTPS listener.
//!
//! Contract: kubectl (client-go) runs a kubeconfig's exec plugin and sends its bearer token only
//! over TLS (kubernetes/kubectl#744: nothing is sent to a plain-http server), so the Kubernetes
//! API is also served over HTTPS: [`KubeTls::new`] makes a self-signed ECDSA P-256 certificate
//! for `localhost`, `127.0.0.1` and `::1` (made anew at each start: the kubeconfig that
//! carries it as `certificate-authority-data` is rewritten at each start too).
//! [`KubeTls::serve`] accepts on a listener until `stop`, completes each TLS handshake within 10
//! seconds, and answers every request with the emulator's router; connections are aborted when
//! it stops. HTTP/1.1 only.

use super::Emulator;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct KubeTls {
    /// The certificate, PEM: the kubeconfig's certificate authority.
    pub cert_pem: String,
    acceptor: TlsAcceptor,
}

impl KubeTls {
    pub fn new() -> Result<KubeTls, String> {
        let err = |e: rcgen::Error| format!("cannot make the API server's certificate: {e}");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).map_err(err)?;
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
        }
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            "pod-identity-agent emulated API server",
        );
        let key = rcgen::KeyPair::generate().map_err(err)?;
        let cert = params.self_signed(&key).map_err(err)?;
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(cert.der().to_vec())], private)
            .map_err(|e| format!("cannot use the API server's certificate: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(KubeTls {
            cert_pem: cert.pem(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Serve `emulator` over TLS on `listener` until `stop`.
    pub fn serve(
        self,
        emulator: Arc<Emulator>,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => break,
                    a = listener.accept() => a,
                    Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                };
                let Ok((stream, _)) = accepted else { continue };
                let (acceptor, emu) = (self.acceptor.clone(), emulator.clone());
                connections.spawn(async move {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let emu = emu.clone();
                        async move { Ok::<_, std::convert::Infallible>(emu.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
            connections.abort_all();
        })
    }
}
