//! Server verification for the client: a CA file, or a pinned SHA-256 fingerprint of the
//! server's certificate (for the node's self-generated development certificate).

use crate::ClientError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;

/// How the client decides to trust the server.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// Verify the chain against the CA certificates in this PEM file.
    CaFile(PathBuf),
    /// Accept exactly the certificate whose DER encoding has this SHA-256 digest.
    Fingerprint([u8; 32]),
}

impl ServerTrust {
    /// Parses a fingerprint written as 64 hex digits, with or without `:` separators.
    pub fn fingerprint(text: &str) -> Result<Self, ClientError> {
        let hex: String = text.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&hex)
            .map_err(|_| ClientError::Config(format!("fingerprint {text:?} is not hex")))?;
        let pin: [u8; 32] = bytes.try_into().map_err(|_| {
            ClientError::Config(format!("fingerprint {text:?} is not 32 bytes of SHA-256"))
        })?;
        Ok(Self::Fingerprint(pin))
    }
}

/// SHA-256 fingerprint of a DER certificate, as lowercase hex.
pub fn fingerprint_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

pub(crate) fn client_config(trust: &ServerTrust) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(format!("TLS setup failed: {e}")))?;
    let config = match trust {
        ServerTrust::CaFile(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                ClientError::Config(format!("cannot read CA file {}: {e}", path.display()))
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    ClientError::Config(format!("invalid PEM in {}: {e}", path.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    ClientError::Config(format!(
                        "invalid CA certificate in {}: {e}",
                        path.display()
                    ))
                })?;
            }
            if roots.is_empty() {
                return Err(ClientError::Config(format!(
                    "CA file {} contains no PEM certificate; pass the cluster CA's certificate \
                     (ca.pem of `atlas cert ca`)",
                    path.display()
                )));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        ServerTrust::Fingerprint(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                pin: *pin,
                provider,
            }))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// Accepts one certificate by digest; still checks the handshake signature with its key.
#[derive(Debug)]
struct PinnedCert {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if digest == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate fingerprint {} does not match the pinned one",
                hex::encode(digest)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
