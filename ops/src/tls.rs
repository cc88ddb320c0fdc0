//! The node's TLS identity: a configured certificate, or a development certificate generated
//! on first start and kept in the data directory.

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

/// Certificate chain and key, plus the SHA-256 fingerprint of the leaf certificate.
pub struct TlsIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub fingerprint: String,
    pub generated: bool,
    /// The certificate and key files, for errors.
    pub files: String,
}

/// Loads the configured certificate, or the development certificate under `data_dir/tls`,
/// generating it if absent.
pub fn load_identity(
    data_dir: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
    server_name: &str,
) -> anyhow::Result<TlsIdentity> {
    let (cert_path, key_path, generated) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_owned(), k.to_owned(), false),
        _ => {
            let dir = data_dir.join("tls");
            let cert_path = dir.join("dev-cert.pem");
            let key_path = dir.join("dev-key.pem");
            let generated = !cert_path.exists();
            if generated {
                generate_dev_cert(&dir, server_name)?;
            }
            (cert_path, key_path, generated)
        }
    };
    let cert_pem = std::fs::read(&cert_path)
        .with_context(|| format!("cannot read certificate {}", cert_path.display()))?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("invalid PEM certificate in {}", cert_path.display()))?;
    let leaf = chain
        .first()
        .with_context(|| format!("no certificate in {}", cert_path.display()))?;
    let fingerprint = hex::encode(Sha256::digest(leaf.as_ref()));
    let key_pem = std::fs::read(&key_path)
        .with_context(|| format!("cannot read private key {}", key_path.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("invalid PEM key in {}", key_path.display()))?
        .with_context(|| {
            format!(
                "no private key in {}: pass the PEM file of the certificate's private key",
                key_path.display()
            )
        })?;
    Ok(TlsIdentity {
        chain,
        key,
        fingerprint,
        generated,
        files: format!(
            "certificate {} and key {}",
            cert_path.display(),
            key_path.display()
        ),
    })
}

fn generate_dev_cert(dir: &Path, server_name: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    if !names.iter().any(|n| n == server_name) {
        names.push(server_name.to_owned());
    }
    let certified = rcgen::generate_simple_self_signed(names)
        .context("cannot generate the development certificate")?;
    let key_path = dir.join("dev-key.pem");
    write_private(&key_path, certified.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(dir.join("dev-cert.pem"), certified.cert.pem())
        .with_context(|| format!("cannot write {}", dir.join("dev-cert.pem").display()))?;
    Ok(())
}

pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Builds a TLS 1.3-only server config. The aws-lc-rs provider offers the hybrid
/// post-quantum key exchange X25519MLKEM768 first.
pub fn server_config(identity: TlsIdentity) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is not available in the crypto provider")?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| {
            anyhow::anyhow!(
                "the {} do not form a valid TLS identity ({}): give the key made with that \
                 certificate",
                identity.files,
                atlas_cluster::tls::identity_problem(&e)
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
