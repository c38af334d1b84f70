//! The cluster CA and the certificates it issues to cells and brains.
//!
//! A certificate directory holds:
//!
//! ```text
//! ca.pem                 the cluster CA certificate (give it to every node)
//! ca-key.pem             its private key, mode 0600 (keep it off the nodes)
//! cell-<id>.pem          a cell's certificate, and its key (0600):
//! cell-<id>-key.pem
//! brain-<name>.pem       a brain's certificate, and its key (0600):
//! brain-<name>-key.pem
//! ```
//!
//! Keys are ECDSA P-256. The CA may sign only end-entity certificates (path
//! length 0). A leaf names its identity in a URI SAN (see
//! [`identity`](crate::identity)) and, for people reading it with openssl,
//! in its common name. Cell certificates are for TLS clients only; brain
//! certificates for servers and clients (a brain will talk to its peers).

use corral_link::identity::{identity_of, IdentityError, PeerIdentity, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub use corral_link::identity::{leaf_paths, CA_CERT_FILE};
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Default lifetime of the CA, in days.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default lifetime of a cell or brain certificate, in days.
pub const DEFAULT_LEAF_DAYS: u32 = 365;

/// Certificates start this long before they are issued, so that a node whose
/// clock is a little behind does not refuse a fresh one.
const BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path} already exists; pass --force to replace it")]
    Exists { path: PathBuf },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {action}: {source}")]
    Rcgen {
        action: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path} is not the cluster CA: {reason}")]
    NotCa { path: PathBuf, reason: String },
    #[error("invalid validity: {reason}")]
    Validity { reason: String },
    #[error("the issued certificate does not carry the identity asked for: {0}")]
    Identity(#[from] IdentityError),
}

/// When a certificate is valid. Time is an input, so tests can issue
/// certificates that expired long ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From (a little before) `now` for `days` days.
    pub fn days_from(now: SystemTime, days: u32) -> Self {
        Self {
            not_before: now.checked_sub(BACKDATE).unwrap_or(now),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }

    fn apply(&self, params: &mut CertificateParams) -> Result<(), CertError> {
        if self.not_after <= self.not_before {
            return Err(CertError::Validity {
                reason: "not_after must be later than not_before".into(),
            });
        }
        params.not_before = self.not_before.into();
        params.not_after = self.not_after.into();
        Ok(())
    }
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct Pems {
    pub cert: String,
    pub key: String,
}

/// The cluster CA, able to issue certificates.
pub struct Ca {
    pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn rcgen_err(action: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertError {
    let action = action.into();
    move |source| CertError::Rcgen { action, source }
}

impl Ca {
    /// A new CA with a fresh key.
    pub fn generate(validity: Validity) -> Result<(Self, Pems), CertError> {
        let key = KeyPair::generate().map_err(rcgen_err("generate the CA key"))?;
        let mut params = CertificateParams::default();
        // Each CA gets its own name. Verifiers find the issuer by name: with
        // every cluster's CA named alike, a certificate from another cluster
        // would fail as "bad signature" instead of "unknown issuer".
        let fingerprint: String = params
            .key_identifier(&key)
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "corral");
        dn.push(
            DnType::CommonName,
            format!("corral cluster CA {fingerprint}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity.apply(&mut params)?;
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("self-sign the CA certificate"))?;
        let pems = Pems {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        let ca = Self {
            pem: pems.cert.clone(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        };
        Ok((ca, pems))
    }

    /// The CA from its PEM certificate and key; `path` names the certificate
    /// in errors.
    pub fn from_pem(cert_pem: &str, key_pem: &str, path: &Path) -> Result<Self, CertError> {
        let not_ca = |reason: String| CertError::NotCa {
            path: path.to_owned(),
            reason,
        };
        let key = KeyPair::from_pem(key_pem).map_err(|e| not_ca(format!("its key: {e}")))?;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| not_ca(format!("not a PEM certificate: {e}")))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| not_ca(format!("cannot parse it: {e}")))?;
        if !x509.is_ca() {
            return Err(not_ca("it is not a CA certificate".into()));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(not_ca(format!(
                "its key does not match the certificate (is {CA_KEY_FILE} from another CA?)"
            )));
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| not_ca(format!("cannot use it to sign: {e}")))?;
        Ok(Self {
            pem: cert_pem.to_owned(),
            der: der.into_owned(),
            issuer,
        })
    }

    /// Reads `ca.pem` and `ca-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let cert = read(&cert_path)?;
        let key = read(&dir.join(CA_KEY_FILE))?;
        Self::from_pem(&cert, &key, &cert_path)
    }

    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// A certificate and fresh key for `who`.
    pub fn issue(&self, who: &PeerIdentity, validity: Validity) -> Result<Pems, CertError> {
        let key = KeyPair::generate().map_err(rcgen_err(format!("generate a key for {who}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "corral");
        dn.push(DnType::CommonName, who.to_string());
        params.distinguished_name = dn;
        let uri = who
            .uri()
            .try_into()
            .map_err(rcgen_err(format!("encode the URI of {who}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match who.role() {
            Role::Cell => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Role::Brain => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.use_authority_key_identifier_extension = true;
        validity.apply(&mut params)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err(format!("sign the certificate of {who}")))?;
        // What we wrote must read back as what was asked for.
        let read_back = identity_of(cert.der())?;
        if &read_back != who {
            return Err(CertError::Identity(IdentityError::Unexpected {
                expected: who.clone(),
                found: read_back,
            }));
        }
        Ok(Pems {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

/// `certs init`: a new CA in `dir` (created, 0700, if missing). Returns the
/// files written.
pub fn init(dir: &Path, validity: Validity, force: bool) -> Result<Vec<PathBuf>, CertError> {
    let (_, pems) = Ca::generate(validity)?;
    let files = [
        (dir.join(CA_CERT_FILE), pems.cert, 0o644),
        (dir.join(CA_KEY_FILE), pems.key, 0o600),
    ];
    write_all(dir, &files, force)
}

/// `certs issue`: a certificate and key for `who`, signed by the CA in `dir`.
pub fn issue(
    dir: &Path,
    who: &PeerIdentity,
    validity: Validity,
    force: bool,
) -> Result<Vec<PathBuf>, CertError> {
    let (cert_path, key_path) = leaf_paths(dir, who);
    // Checked before the CA key is even read: a refusal changes nothing.
    if !force {
        refuse_existing([&cert_path, &key_path])?;
    }
    let ca = Ca::load(dir)?;
    let pems = ca.issue(who, validity)?;
    let files = [(cert_path, pems.cert, 0o644), (key_path, pems.key, 0o600)];
    write_all(dir, &files, force)
}

fn refuse_existing<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) -> Result<(), CertError> {
    for path in paths {
        if fs::symlink_metadata(path).is_ok() {
            return Err(CertError::Exists { path: path.clone() });
        }
    }
    Ok(())
}

/// Writes every file or, when one exists and `force` is off, none. Each file
/// appears whole (written aside, then linked or renamed into place) with its
/// mode set from the start, so a key is never readable by others, not even
/// for a moment.
fn write_all(
    dir: &Path,
    files: &[(PathBuf, String, u32)],
    force: bool,
) -> Result<Vec<PathBuf>, CertError> {
    if !force {
        refuse_existing(files.iter().map(|(p, _, _)| p))?;
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::Io {
            action: "create directory",
            path: dir.to_owned(),
            source,
        })?;
    let mut written = Vec::new();
    for (path, contents, mode) in files {
        write_one(path, contents, *mode, force)?;
        written.push(path.clone());
    }
    Ok(written)
}

fn write_one(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), CertError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| CertError::Io {
            action,
            path,
            source,
        }
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(contents.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io("write", &tmp))?;
        if force {
            fs::rename(&tmp, path).map_err(io("replace", path))
        } else {
            // A hard link fails if the target exists: no check-then-write race.
            fs::hard_link(&tmp, path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    CertError::Exists {
                        path: path.to_owned(),
                    }
                } else {
                    io("create", path)(source)
                }
            })
        }
    })();
    // Gone already after a rename; only a leftover to tidy otherwise.
    let _ = fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::CellId;
    use std::os::unix::fs::PermissionsExt;

    fn cell(id: &str) -> PeerIdentity {
        PeerIdentity::Cell(CellId::new(id).unwrap())
    }

    #[test]
    fn init_then_issue_writes_the_documented_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        let now = SystemTime::now();
        let written = init(&dir, Validity::days_from(now, 10), false).unwrap();
        assert_eq!(written, [dir.join("ca.pem"), dir.join("ca-key.pem")]);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
        assert_eq!(mode(&dir), 0o700);

        let who = cell("c1");
        let written = issue(&dir, &who, Validity::days_from(now, 1), false).unwrap();
        assert_eq!(
            written,
            [dir.join("cell-c1.pem"), dir.join("cell-c1-key.pem")]
        );
        assert_eq!(mode(&dir.join("cell-c1-key.pem")), 0o600);
        let der =
            CertificateDer::from_pem_slice(&fs::read(dir.join("cell-c1.pem")).unwrap()).unwrap();
        assert_eq!(identity_of(&der).unwrap(), who);
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 4);
    }

    #[test]
    fn existing_files_are_kept_unless_forced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let v = Validity::days_from(SystemTime::now(), 1);
        init(dir, v, false).unwrap();
        let ca_before = fs::read(dir.join("ca.pem")).unwrap();
        let err = init(dir, v, false).unwrap_err();
        assert!(matches!(err, CertError::Exists { .. }), "{err}");
        assert!(err
            .to_string()
            .ends_with("ca.pem already exists; pass --force to replace it"));
        assert_eq!(fs::read(dir.join("ca.pem")).unwrap(), ca_before);

        issue(dir, &cell("c1"), v, false).unwrap();
        let leaf_before = fs::read(dir.join("cell-c1.pem")).unwrap();
        assert!(matches!(
            issue(dir, &cell("c1"), v, false),
            Err(CertError::Exists { .. })
        ));
        assert_eq!(fs::read(dir.join("cell-c1.pem")).unwrap(), leaf_before);
        issue(dir, &cell("c1"), v, true).unwrap();
        assert_ne!(fs::read(dir.join("cell-c1.pem")).unwrap(), leaf_before);
        init(dir, v, true).unwrap();
        assert_ne!(fs::read(dir.join("ca.pem")).unwrap(), ca_before);
    }

    #[test]
    fn issue_needs_a_matching_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let v = Validity::days_from(SystemTime::now(), 1);
        let err = issue(tmp.path(), &cell("c1"), v, false).unwrap_err();
        assert!(err.to_string().starts_with("cannot read "), "{err}");

        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        init(&a, v, false).unwrap();
        init(&b, v, false).unwrap();
        fs::copy(b.join(CA_KEY_FILE), a.join(CA_KEY_FILE)).unwrap();
        let err = issue(&a, &cell("c1"), v, false).unwrap_err();
        assert!(
            err.to_string()
                .contains("its key does not match the certificate"),
            "{err}"
        );
        assert!(!a.join("cell-c1.pem").exists());
    }

    #[test]
    fn empty_validity_is_refused() {
        let now = SystemTime::now();
        let v = Validity {
            not_before: now,
            not_after: now,
        };
        assert!(matches!(Ca::generate(v), Err(CertError::Validity { .. })));
    }
}
