//! Development certificate authority: generates a CA and node / client
//! certificates signed by it, on disk or in memory.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use super::TlsIdentity;
use crate::{NetError, NodeId, NODE_SERVER_NAME};

const CA_COMMON_NAME: &str = "Ferry Dev CA";

/// An in-memory certificate authority that issues node and client identities.
pub struct DevCa {
    cert: Certificate,
    key: KeyPair,
    ca_pem: Vec<u8>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> NetError + '_ {
    move |e| NetError::Cert(format!("{what}: {e}"))
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Creates a fresh in-memory CA (for tests and [`generate_dev_certs`]).
pub fn dev_ca() -> Result<DevCa, NetError> {
    let key = KeyPair::generate().map_err(cert_err("generating CA key"))?;
    let cert = ca_params()
        .self_signed(&key)
        .map_err(cert_err("self-signing CA certificate"))?;
    let ca_pem = cert.pem().into_bytes();
    Ok(DevCa { cert, key, ca_pem })
}

impl DevCa {
    /// Re-opens a CA written by [`generate_dev_certs`] (`ca.pem`, `ca.key`) so
    /// more identities can be issued. Errors name the path.
    pub fn load(ca_cert: &Path, ca_key: &Path) -> Result<Self, NetError> {
        let ca_pem = std::fs::read(ca_cert).map_err(|source| NetError::Io {
            path: ca_cert.to_path_buf(),
            source,
        })?;
        let key_pem = std::fs::read_to_string(ca_key).map_err(|source| NetError::Io {
            path: ca_key.to_path_buf(),
            source,
        })?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| NetError::Cert(format!("{}: {e}", ca_key.display())))?;
        // Same subject and key as the stored CA, so issued certs chain to it.
        let cert = ca_params()
            .self_signed(&key)
            .map_err(cert_err("rebuilding CA issuer"))?;
        Ok(DevCa { cert, key, ca_pem })
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> Vec<u8> {
        self.ca_pem.clone()
    }

    /// The CA private key (PEM). Keep it secret.
    pub fn ca_key_pem(&self) -> Vec<u8> {
        self.key.serialize_pem().into_bytes()
    }

    /// Issues a node identity: SANs [`NODE_SERVER_NAME`], `node-<id>.ferry-node` (which
    /// peers check against the node id it claims), `localhost`,
    /// `127.0.0.1`, `::1`; usable as server and client certificate.
    pub fn issue_node(&self, id: NodeId) -> Result<TlsIdentity, NetError> {
        let mut params = CertificateParams::new(vec![
            NODE_SERVER_NAME.to_string(),
            crate::node_identity_name(id),
            "localhost".to_string(),
        ])
        .map_err(cert_err("node certificate names"))?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("ferry node {id}"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(params, &format!("node {id}"))
    }

    /// Issues a client identity (client authentication only). `name` may
    /// contain ASCII letters, digits, `-`, `_` and `.` (not leading).
    pub fn issue_client(&self, name: &str) -> Result<TlsIdentity, NetError> {
        check_client_name(name)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("ferry client {name}"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, &format!("client {name}"))
    }

    fn issue(&self, mut params: CertificateParams, who: &str) -> Result<TlsIdentity, NetError> {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()
            .map_err(|e| NetError::Cert(format!("generating key for {who}: {e}")))?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|e| NetError::Cert(format!("signing certificate for {who}: {e}")))?;
        Ok(TlsIdentity {
            ca_pem: self.ca_pem.clone(),
            cert_pem: cert.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
        })
    }
}

fn check_client_name(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(NetError::Cert(format!(
            "invalid client name {name:?}: use ASCII letters, digits, '-', '_' or '.' (not leading)"
        )))
    }
}

/// Writes `ca.pem`, `ca.key`, `node-<id>.pem`, `node-<id>.key` for each node
/// id and `client-<name>.pem` / `client-<name>.key` for each client name into
/// `out` (creating it). Refuses to overwrite: if any target file exists
/// (e.g. `ca.pem`), nothing is written and the error names that file.
/// Key files are created with mode 0600 on Unix.
pub fn generate_dev_certs(
    out: &Path,
    node_ids: &[NodeId],
    client_names: &[&str],
) -> Result<(), NetError> {
    for name in client_names {
        check_client_name(name)?;
    }
    let ca = dev_ca()?;
    let mut files: Vec<(PathBuf, Vec<u8>, bool)> = vec![
        (out.join("ca.pem"), ca.ca_pem(), false),
        (out.join("ca.key"), ca.ca_key_pem(), true),
    ];
    for &id in node_ids {
        let ident = ca.issue_node(id)?;
        files.push((out.join(format!("node-{id}.pem")), ident.cert_pem, false));
        files.push((out.join(format!("node-{id}.key")), ident.key_pem, true));
    }
    for name in client_names {
        let ident = ca.issue_client(name)?;
        files.push((
            out.join(format!("client-{name}.pem")),
            ident.cert_pem,
            false,
        ));
        files.push((out.join(format!("client-{name}.key")), ident.key_pem, true));
    }
    std::fs::create_dir_all(out).map_err(|source| NetError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    for (path, _, _) in &files {
        if path.exists() {
            return Err(NetError::Io {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "refusing to overwrite existing file",
                ),
            });
        }
    }
    for (path, data, secret) in &files {
        write_new(path, data, *secret).map_err(|source| NetError::Io {
            path: path.clone(),
            source,
        })?;
    }
    tracing::info!(dir = %out.display(), nodes = node_ids.len(), clients = client_names.len(), "wrote dev certificates");
    Ok(())
}

/// Issues, with the CA already in `out` (`ca.pem`, `ca.key`), the node and client
/// certificates of `node_ids` and `client_names` that `out` lacks, and answers their file
/// names; existing files are left alone. A folder without a CA gets everything
/// ([`generate_dev_certs`]).
pub fn add_missing_dev_certs(
    out: &Path,
    node_ids: &[NodeId],
    client_names: &[&str],
) -> Result<Vec<String>, NetError> {
    if !out.join("ca.pem").exists() {
        generate_dev_certs(out, node_ids, client_names)?;
        return Ok(vec!["ca.pem".into()]);
    }
    let ca = DevCa::load(&out.join("ca.pem"), &out.join("ca.key"))?;
    let mut written = Vec::new();
    let mut write = |stem: String, ident: TlsIdentity| -> Result<(), NetError> {
        for (file, data, secret) in [
            (format!("{stem}.pem"), ident.cert_pem, false),
            (format!("{stem}.key"), ident.key_pem, true),
        ] {
            let path = out.join(&file);
            write_new(&path, &data, secret).map_err(|source| NetError::Io { path, source })?;
            written.push(file);
        }
        Ok(())
    };
    for &id in node_ids {
        let stem = format!("node-{id}");
        if !out.join(format!("{stem}.pem")).exists() {
            write(stem, ca.issue_node(id)?)?;
        }
    }
    for name in client_names {
        let stem = format!("client-{name}");
        if !out.join(format!("{stem}.pem")).exists() {
            write(stem, ca.issue_client(name)?)?;
        }
    }
    Ok(written)
}

fn write_new(path: &Path, data: &[u8], secret: bool) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_certificates_are_added_with_the_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        generate_dev_certs(dir.path(), &[1, 2], &["ctl"]).unwrap();
        let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let ctl_before = std::fs::read(dir.path().join("client-ctl.pem")).unwrap();
        let written = add_missing_dev_certs(dir.path(), &[1, 2, 3], &["ctl", "sidecar"]).unwrap();
        assert_eq!(
            written,
            [
                "node-3.pem",
                "node-3.key",
                "client-sidecar.pem",
                "client-sidecar.key"
            ]
        );
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        assert_eq!(
            std::fs::read(dir.path().join("client-ctl.pem")).unwrap(),
            ctl_before
        );
        TlsIdentity::load(
            &dir.path().join("ca.pem"),
            &dir.path().join("client-sidecar.pem"),
            &dir.path().join("client-sidecar.key"),
        )
        .unwrap();
        assert!(
            add_missing_dev_certs(dir.path(), &[1, 2, 3], &["ctl", "sidecar"])
                .unwrap()
                .is_empty()
        );
    }
}
