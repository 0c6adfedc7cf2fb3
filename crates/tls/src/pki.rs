//! A cluster's certificate authority and the serving certificates it signs.
//!
//! The layout of a PKI directory is fixed so that every tool finds what it
//! needs by name:
//!
//! | file          | what                                         | mode |
//! |---------------|----------------------------------------------|------|
//! | `ca.crt`      | the CA certificate every client trusts       | 0644 |
//! | `ca.key`      | the CA's private key (needed only to issue)  | 0600 |
//! | `NAME.crt`    | a serving certificate signed by the CA       | 0644 |
//! | `NAME.key`    | its private key                              | 0600 |
//!
//! Keys are ECDSA P-256. The CA is valid for ten years and serving
//! certificates for one; renewing a serving certificate is issuing it
//! again (the CA stays, so no client needs a new CA file).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate in a PKI directory.
pub const CA_CERT: &str = "ca.crt";
/// File name of the CA key in a PKI directory.
pub const CA_KEY: &str = "ca.key";

const CA_DAYS: i64 = 3650;
const LEAF_DAYS: i64 = 365;

/// Failures creating or using a PKI directory.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{dir} has no CA ({CA_CERT} and {CA_KEY}); run `nexus-apiserver init-pki --dir {dir}` first")]
    NoCa { dir: PathBuf },
    #[error("{path} is not a usable key: {source}")]
    BadKey { path: PathBuf, source: rcgen::Error },
    #[error(
        "certificate name {0:?} must be 1-63 characters of a-z, 0-9 and '-' (it names the files NAME.crt and NAME.key)"
    )]
    BadName(String),
    #[error("subject alternative name {0:?} is neither an IP address nor a DNS name")]
    BadSan(String),
    #[error("generating the certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What [`init_ca`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaOutcome {
    /// A new CA was made.
    Created,
    /// The directory already had one; it was kept (clients that trust it
    /// keep working).
    Kept,
}

/// Paths of a certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a CA in `dir` unless one is there already.
pub fn init_ca(dir: &Path) -> Result<CaOutcome, PkiError> {
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if cert.exists() && key.exists() {
        return Ok(CaOutcome::Kept);
    }
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io { path: dir.to_path_buf(), source })?;
    let key_pair = KeyPair::generate()?;
    let ca = ca_params(&key_pair).self_signed(&key_pair)?;
    write(&key, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write(&cert, ca.pem().as_bytes(), 0o644)?;
    Ok(CaOutcome::Created)
}

/// Issues serving certificate `name` for `sans` (DNS names and IP
/// addresses), signed by the CA in `dir`, into `dir/NAME.crt` and
/// `dir/NAME.key`. Issuing again replaces both (a renewal).
pub fn issue(dir: &Path, name: &str, sans: &[String]) -> Result<Issued, PkiError> {
    check_name(name)?;
    for san in sans {
        check_san(san)?;
    }
    let ca_key_path = dir.join(CA_KEY);
    if !ca_key_path.exists() || !dir.join(CA_CERT).exists() {
        return Err(PkiError::NoCa { dir: dir.to_path_buf() });
    }
    let ca_key_pem = read_to_string(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| PkiError::BadKey { path: ca_key_path, source })?;
    // The issuer is named by the CA's subject and identified by its key:
    // both follow from `ca.key` (see `ca_params`), so the CA certificate
    // itself need not be parsed.
    let issuer = Issuer::new(ca_params(&ca_key), ca_key);

    let mut params = CertificateParams::new(sans.to_vec())?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationName, "nexus");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(LEAF_DAYS);
    let key_pair = KeyPair::generate()?;
    let cert = params.signed_by(&key_pair, &issuer)?;

    let issued = Issued { cert: dir.join(format!("{name}.crt")), key: dir.join(format!("{name}.key")) };
    write(&issued.key, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write(&issued.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(issued)
}

/// The names a certificate for this host should carry by default: the
/// loopback names and the host's own name.
pub fn default_sans() -> Vec<String> {
    let mut sans: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if check_san(host).is_ok() && !sans.iter().any(|s| s == host) {
            sans.push(host.to_string());
        }
    }
    sans
}

/// The CA's certificate parameters. Its name carries a fingerprint of its
/// key, so two clusters' CAs never share a name (a client trusting one
/// then reports the other's certificates as of an unknown issuer), and the
/// name can be derived again from the key alone.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    let id = params.key_identifier(key);
    let fingerprint: String = id.iter().take(6).map(|b| format!("{b:02x}")).collect();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, format!("nexus cluster CA {fingerprint}"));
    params.distinguished_name.push(DnType::OrganizationName, "nexus");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(CA_DAYS);
    params
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && name != "ca";
    if ok { Ok(()) } else { Err(PkiError::BadName(name.to_string())) }
}

fn check_san(san: &str) -> Result<(), PkiError> {
    if san.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if san.len() <= 253 && san.split('.').all(label_ok) { Ok(()) } else { Err(PkiError::BadSan(san.to_string())) }
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.to_path_buf(), source })
}

/// Writes `data` to `path` with `mode`, through a temporary file so a
/// reader never sees half a key.
fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Io { path: path.to_path_buf(), source };
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(mode).open(&tmp).map_err(err)?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_ca_is_made_once_and_kept_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(init_ca(dir.path()).expect("init"), CaOutcome::Created);
        let first = std::fs::read(dir.path().join(CA_CERT)).expect("ca.crt");
        assert_eq!(init_ca(dir.path()).expect("again"), CaOutcome::Kept);
        assert_eq!(std::fs::read(dir.path().join(CA_CERT)).expect("ca.crt"), first);
        let mode = std::fs::metadata(dir.path().join(CA_KEY)).expect("ca.key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the CA key is readable by its owner only");
    }

    #[test]
    fn issuing_needs_a_ca_and_checks_its_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = issue(dir.path(), "apiserver", &["localhost".into()]).expect_err("no CA yet");
        assert!(err.to_string().contains("init-pki"), "{err}");
        init_ca(dir.path()).expect("init");
        for bad in ["../x", "", "ca", "UPPER", "-x"] {
            assert!(matches!(issue(dir.path(), bad, &[]), Err(PkiError::BadName(_))), "{bad:?}");
        }
        for bad in ["exa mple", "a..b", "x/y", "-a.b"] {
            assert!(matches!(issue(dir.path(), "x", &[bad.into()]), Err(PkiError::BadSan(_))), "{bad:?}");
        }
        let issued = issue(dir.path(), "node-1", &["10.0.0.5".into(), "node-1.example".into()]).expect("issue");
        assert!(issued.cert.exists() && issued.key.exists());
        let mode = std::fs::metadata(&issued.key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
