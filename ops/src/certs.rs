//! `atlas cert`: a cluster CA and node certificates for operators. Node certificates carry the
//! node name as their subject common name and as a DNS name, and are valid for both TLS server
//! and client authentication, so the same file serves client connections and node-to-node
//! mutual TLS.

use anyhow::Context;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Validity of a CA certificate, in whole calendar years from the start of the current year.
const CA_YEARS: i32 = 10;
/// Validity of a node certificate, in whole calendar years from the start of the current year.
const NODE_YEARS: i32 = 2;

/// Writes `ca.pem` and `ca-key.pem` into `dir`; refuses to overwrite existing files.
pub fn create_ca(dir: &Path, name: &str) -> anyhow::Result<()> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    refuse_overwrite(&[&cert_path, &key_path])?;
    let key = rcgen::KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_YEARS);
    let cert = params
        .self_signed(&key)
        .context("cannot sign the CA certificate")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::tls::write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem())
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    Ok(())
}

/// Writes `NAME.pem` (the node certificate followed by the CA certificate) and `NAME-key.pem`
/// into `out`, signed by the CA in `ca_dir`. `hosts` are extra DNS names or IP addresses.
pub fn create_node(ca_dir: &Path, out: &Path, name: &str, hosts: &[String]) -> anyhow::Result<()> {
    valid_node_name(name)?;
    let (cert_path, key_path) = (
        out.join(format!("{name}.pem")),
        out.join(format!("{name}-key.pem")),
    );
    refuse_overwrite(&[&cert_path, &key_path])?;
    let ca_pem = read(&ca_dir.join("ca.pem"))?;
    let ca_key = rcgen::KeyPair::from_pem(&read(&ca_dir.join("ca-key.pem"))?)
        .with_context(|| format!("invalid CA key in {}", ca_dir.join("ca-key.pem").display()))?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).with_context(|| {
        format!(
            "invalid CA certificate in {}",
            ca_dir.join("ca.pem").display()
        )
    })?;

    let mut names = vec![name.to_owned()];
    names.extend(hosts.iter().cloned());
    let key = rcgen::KeyPair::generate().context("cannot generate the node key")?;
    let mut params = rcgen::CertificateParams::new(names)
        .with_context(|| format!("invalid host name among {hosts:?}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    set_validity(&mut params, NODE_YEARS);
    let cert = params
        .signed_by(&key, &issuer)
        .context("cannot sign the node certificate")?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::tls::write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, format!("{}{ca_pem}", cert.pem()))
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    Ok(())
}

fn valid_node_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    anyhow::ensure!(
        ok,
        "invalid node name {name:?}: use 1 to 63 characters of a-z, 0-9 and '-', not starting with '-'"
    );
    Ok(())
}

fn refuse_overwrite(paths: &[&Path]) -> anyhow::Result<()> {
    for path in paths {
        anyhow::ensure!(
            !path.exists(),
            "{} already exists; move it away or choose another directory",
            path.display()
        );
    }
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Sets validity from 1 January of the current year for `years` calendar years.
fn set_validity(params: &mut rcgen::CertificateParams, years: i32) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Average Gregorian year length; exact enough to pick the current calendar year.
    let year = 1970 + (secs / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}
