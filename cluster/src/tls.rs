//! Mutual TLS 1.3 for node-to-node links: both sides present a certificate issued by the
//! cluster CA and check the other's against it. Rejected client certificates are logged.

use anyhow::Context;
use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use std::path::Path;
use std::sync::Arc;

/// Server and client TLS configurations of the cluster links.
pub struct ClusterTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

fn read_pem(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

fn certificates(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem(path, what)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("invalid PEM in the {what} {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "the {what} {} holds no certificate",
        path.display()
    );
    Ok(certs)
}

/// Returns the common name of the first certificate in `chain`.
fn common_name(chain: &[CertificateDer<'_>]) -> anyhow::Result<String> {
    let first = chain.first().context("the certificate chain is empty")?;
    certificate_common_name(first)
}

/// Returns the common name of a peer's certificate, which the TLS handshake checked against
/// the cluster CA, or `None` if it has none.
pub(crate) fn peer_common_name(certificate: &CertificateDer<'_>) -> Option<String> {
    certificate_common_name(certificate).ok()
}

fn certificate_common_name(certificate: &CertificateDer<'_>) -> anyhow::Result<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref())
        .map_err(|e| anyhow::anyhow!("the certificate does not parse: {e}"))?;
    let name = parsed
        .subject()
        .iter_common_name()
        .next()
        .context("the certificate has no common name")?;
    let name = name
        .as_str()
        .map_err(|e| anyhow::anyhow!("the certificate's common name is not a string: {e}"))?;
    Ok(name.to_owned())
}

/// Loads the cluster CA and this node's certificate and key, and checks that the certificate
/// was made for `node_name` (its common name, as `atlas cert node NAME` writes it).
pub fn load_for(node_name: &str, ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<ClusterTls> {
    let chain = certificates(cert, "cluster certificate")?;
    let common = common_name(&chain)
        .with_context(|| format!("cannot read the cluster certificate {}", cert.display()))?;
    anyhow::ensure!(
        common == node_name,
        "node_name {node_name:?} does not match the common name {common:?} of the cluster \
         certificate {}: start the node with --node-name {common}, or create a certificate for \
         it with `atlas cert node {node_name}`",
        cert.display()
    );
    load(ca, cert, key)
}

/// Loads the cluster CA and this node's certificate and key.
fn load(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<ClusterTls> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates(ca, "cluster CA file")? {
        roots
            .add(certificate)
            .with_context(|| format!("the cluster CA file {} is not a CA", ca.display()))?;
    }
    let roots = Arc::new(roots);
    let chain = certificates(cert, "cluster certificate")?;
    let key_path = key;
    let key_pem = read_pem(key_path, "cluster key")?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("invalid PEM in the cluster key {}", key_path.display()))?
        .with_context(|| {
            format!(
                "no private key in the cluster key {}: pass the node's key file (`atlas cert \
                 node` writes NAME-key.pem next to NAME.pem)",
                key_path.display()
            )
        })?;

    let not_a_pair = |e: rustls::Error| {
        anyhow::anyhow!(
            "the cluster certificate {} and key {} do not form a valid TLS identity ({}): give \
             the key made with that certificate (`atlas cert node` writes NAME.pem and \
             NAME-key.pem)",
            cert.display(),
            key_path.display(),
            identity_problem(&e)
        )
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
            .build()
            .context("cannot build the cluster client certificate verifier")?;
    let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is not available in the crypto provider")?
        .with_client_cert_verifier(Arc::new(LoggingVerifier(verifier)))
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(not_a_pair)?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is not available in the crypto provider")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(not_a_pair)?;
    Ok(ClusterTls {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// Checks client certificates with the wrapped verifier and logs every rejection.
#[derive(Debug)]
struct LoggingVerifier(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for LoggingVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let result = self.0.verify_client_cert(end_entity, intermediates, now);
        if let Err(e) = &result {
            tracing::warn!(error = %e, "cluster peer refused: its certificate is not from the cluster CA");
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Describes why rustls rejected a certificate and a key as a TLS identity, in words rather
/// than rustls's variant names.
pub fn identity_problem(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the key's public key is not the one in the certificate".to_owned()
        }
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown) => {
            "the public key of the key cannot be derived to compare it with the certificate"
                .to_owned()
        }
        other => other.to_string(),
    }
}
