//! Cluster PKI and mutual-TLS `quinn` configurations.
//!
//! All rustls configs are built with the `ring` provider passed explicitly,
//! so nothing depends on a process-wide default crypto provider. Only TLS 1.3
//! is offered (QUIC requires it).

mod dev;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use dev::{add_missing_dev_certs, dev_ca, generate_dev_certs, DevCa};

use crate::NetError;

/// PEM material for one identity signed by the cluster CA.
#[derive(Clone)]
pub struct TlsIdentity {
    /// The cluster CA certificate (PEM), used as the only trust root.
    pub ca_pem: Vec<u8>,
    /// This identity's certificate (PEM; may contain a chain).
    pub cert_pem: Vec<u8>,
    /// This identity's private key (PEM, PKCS#8 / PKCS#1 / SEC1).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Where a process's certificates are: the cluster CA, its own certificate and key (the
/// `[tls]` table of every role's configuration).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This process's certificate.
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
}

impl TlsPaths {
    /// Loads the identity these paths name.
    pub fn load(&self) -> Result<TlsIdentity, NetError> {
        TlsIdentity::load(&self.ca, &self.cert, &self.key)
    }
}

impl TlsIdentity {
    /// Reads and checks the CA certificate, own certificate and private key.
    /// Errors name the offending path.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, NetError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| NetError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let id = Self {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        };
        let named = |p: &Path, e: NetError| NetError::Cert(format!("{}: {e}", p.display()));
        parse_certs(&id.ca_pem, "CA certificate").map_err(|e| named(ca, e))?;
        parse_certs(&id.cert_pem, "certificate").map_err(|e| named(cert, e))?;
        parse_key(&id.key_pem).map_err(|e| named(key, e))?;
        Ok(id)
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, NetError> {
        let mut roots = RootCertStore::empty();
        for ca in parse_certs(&self.ca_pem, "CA certificate")? {
            roots
                .add(ca)
                .map_err(|e| NetError::Cert(format!("invalid CA certificate: {e}")))?;
        }
        Ok(Arc::new(roots))
    }
}

fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NetError::Cert(format!("cannot parse {what} PEM: {e}")))?;
    if certs.is_empty() {
        return Err(NetError::Cert(format!("no {what} found in PEM data")));
    }
    Ok(certs)
}

fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, NetError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| NetError::Cert(format!("cannot parse private key PEM: {e}")))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A connection that received nothing (not even an acknowledgement of a keep-alive) for
/// this long is closed: what a request to a node that died waits at most before it fails
/// (it was 10 s; after a node died, clients' requests already sent to it held a bench's
/// every slot that long, twice).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Concurrent bidirectional streams a peer may open on one connection.
const MAX_PEER_STREAMS: u32 = 4096;

/// QUIC transport parameters shared by client and server configs: 1 s
/// keep-alive, [`IDLE_TIMEOUT`], [`MAX_PEER_STREAMS`] concurrent bidi streams (no uni),
/// large windows, prompt acknowledgements.
fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    // Always fits in an IdleTimeout (limit is 2^62 ms).
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    // A node pair keeps one long-lived replication stream each way (every group's lanes),
    // plus a stream per call while it runs and one per partition a producer writes to.
    // quinn reserves state for every stream a peer may open, in each connection: 16,384
    // cost 6.5 MiB of idle memory per node.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_PEER_STREAMS));
    // Nothing opens unidirectional streams.
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    t.send_window(64 * 1024 * 1024);
    // Ask the peer to acknowledge within 1 ms rather than its default 25 ms: a sender that
    // ends a burst waits for that acknowledgement before its window opens again, and on
    // loopback or a LAN the delay was the p99 of every acknowledged publish.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.max_ack_delay(Some(Duration::from_millis(1)));
    t.ack_frequency_config(Some(acks));
    Arc::new(t)
}

/// Server config presenting `id`'s certificate and REQUIRING a client
/// certificate chaining to `id.ca_pem`. Offers the given ALPN protocols.
pub fn server_config(id: &TlsIdentity, alpns: &[&[u8]]) -> Result<quinn::ServerConfig, NetError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots()?, provider.clone())
        .build()
        .map_err(|e| NetError::Tls(format!("client certificate verifier: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(format!("server protocol versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            parse_certs(&id.cert_pem, "certificate")?,
            parse_key(&id.key_pem)?,
        )
        .map_err(|e| NetError::Tls(format!("server certificate/key: {e}")))?;
    cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    let quic = QuicServerConfig::try_from(cfg)
        .map_err(|e| NetError::Tls(format!("QUIC server config: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport_config());
    Ok(server)
}

/// Client config verifying servers against `id.ca_pem` (connect with server
/// name [`crate::NODE_SERVER_NAME`]) and presenting `id`'s certificate.
pub fn client_config(id: &TlsIdentity, alpn: &[u8]) -> Result<quinn::ClientConfig, NetError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(format!("client protocol versions: {e}")))?
        .with_root_certificates(id.roots()?)
        .with_client_auth_cert(
            parse_certs(&id.cert_pem, "certificate")?,
            parse_key(&id.key_pem)?,
        )
        .map_err(|e| NetError::Tls(format!("client certificate/key: {e}")))?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    quic_client(cfg)
}

/// Wraps a rustls client config into a quinn one with our transport config.
pub(crate) fn quic_client(cfg: rustls::ClientConfig) -> Result<quinn::ClientConfig, NetError> {
    let quic = QuicClientConfig::try_from(cfg)
        .map_err(|e| NetError::Tls(format!("QUIC client config: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport_config());
    Ok(client)
}
