//! The study's public-key infrastructure: a certificate authority per study, a server certificate,
//! one client certificate per site, admin (study-lead) certificates, and a revocation list.
//!
//! Identity lives in the certificate subject: `CN` = site id (or admin name, or server name),
//! `OU` = role (`site`, `admin`, `server`), `O` = `fedhcc study <study id>`. The server reads it
//! from the verified peer certificate; no request field can claim an identity.
//!
//! Files in a certificate directory (private keys are written owner-read-only, 0600):
//!
//! ```text
//! ca.pem ca.key.pem            study CA
//! server.pem server.key.pem    server (SANs: server name, localhost, 127.0.0.1, ::1)
//! site-<id>.pem site-<id>.key.pem
//! admin-<name>.pem admin-<name>.key.pem
//! crl.pem                      revocation list signed by the CA (always present, maybe empty)
//! registry.json                every certificate issued: kind, name, serial, expiry, revocation
//! ```
//!
//! Size: issuing, loading and verifying certificates and the revocation list share the identity
//! rules (CN, SAN, key usages, validity). Issuer and verifier are kept in one file so they cannot
//! drift apart.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use time::{Duration, OffsetDateTime};

/// Errors from certificate tooling and TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

/// What a certificate entitles its holder to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Site,
    Admin,
    Server,
}

impl Role {
    fn as_ou(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Admin => "admin",
            Role::Server => "server",
        }
    }
}

/// The identity read from a verified certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub name: String,
    pub role: Role,
    pub study: String,
    pub not_after_unix: i64,
}

/// One issued certificate, as recorded in `registry.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IssuedCert {
    pub role: Role,
    pub name: String,
    pub serial_hex: String,
    pub not_after: String,
    pub revoked_at: Option<String>,
}

/// `registry.json`: the study id and every certificate issued under the CA.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Registry {
    pub study: String,
    pub server_name: String,
    pub crl_number: u64,
    pub issued: Vec<IssuedCert>,
}

/// Checks a site or admin name: 1–64 characters of `a-z 0-9 _ -`, starting with a letter or digit.
///
/// # Errors
/// The name and the rule it breaks.
pub fn validate_name(kind: &str, name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(PkiError::Invalid(format!(
            "{kind} name '{name}' is not allowed: use 1 to 64 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
        )))
    }
}

/// Paths of the files in a certificate directory.
#[derive(Clone, Debug)]
pub struct CertDir {
    pub dir: PathBuf,
}

impl CertDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key.pem")
    }
    pub fn server(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key.pem")
    }
    pub fn site(&self, site: &str) -> PathBuf {
        self.dir.join(format!("site-{site}.pem"))
    }
    pub fn site_key(&self, site: &str) -> PathBuf {
        self.dir.join(format!("site-{site}.key.pem"))
    }
    pub fn admin(&self, name: &str) -> PathBuf {
        self.dir.join(format!("admin-{name}.pem"))
    }
    pub fn admin_key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("admin-{name}.key.pem"))
    }
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }
    pub fn registry(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    /// Reads `registry.json`.
    ///
    /// # Errors
    /// Missing or unreadable registry (the directory was not made by `certs init`).
    pub fn load_registry(&self) -> Result<Registry, PkiError> {
        let path = self.registry();
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text)
            .map_err(|e| PkiError::Invalid(format!("{}: not a fedhcc certificate registry: {e}", path.display())))
    }

    fn save_registry(&self, reg: &Registry) -> Result<(), PkiError> {
        let text = serde_json::to_string_pretty(reg).map_err(|e| PkiError::Invalid(e.to_string()))?;
        write_atomic(&self.registry(), text.as_bytes(), false)
    }
}

/// Writes a file atomically (temp file in the same directory, fsync, rename); `secret` makes it 0600.
///
/// # Errors
/// Any I/O failure, naming the path.
pub fn write_atomic(path: &Path, bytes: &[u8], secret: bool) -> Result<(), PkiError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp =
        dir.join(format!(".{}.tmp{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("file"), std::process::id()));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// Validity of a certificate to be issued.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From one hour ago (clock skew between hospitals) for `days` days.
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self { not_before: now - Duration::hours(1), not_after: now + Duration::days(i64::from(days)) }
    }
}

fn random_serial() -> SerialNumber {
    // 16 random bytes from the OS RNG through a fresh key's randomness would be overkill; a
    // SHA-256 of time, pid and a counter is unique within a CA, which is what serials need.
    use sha2::{Digest, Sha256};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(OffsetDateTime::now_utc().unix_timestamp_nanos().to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let mut bytes: [u8; 16] = h.finalize()[..16].try_into().unwrap_or([1; 16]);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn subject(study: &str, role: Role, name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, role.as_ou());
    dn.push(DnType::OrganizationName, format!("fedhcc study {study}"));
    dn
}

fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Creates a study CA, a server certificate, one certificate per site and optionally an admin
/// certificate in `dir` (created if missing). Refuses to overwrite an existing CA.
///
/// # Errors
/// An existing CA, an invalid name, or an I/O failure.
pub fn init(
    dir: &Path,
    study: &str,
    server_name: &str,
    sites: &[String],
    admin: Option<&str>,
    days: u32,
) -> Result<Registry, PkiError> {
    validate_name("study", study)?;
    for s in sites {
        validate_name("site", s)?;
    }
    if let Some(a) = admin {
        validate_name("admin", a)?;
    }
    let cd = CertDir::new(dir);
    if cd.ca().exists() || cd.registry().exists() {
        return Err(PkiError::Invalid(format!(
            "{} already holds a study CA; refusing to overwrite it (use `fedhcc certs issue` to add a site)",
            dir.display()
        )));
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("fedhcc study CA {study}"));
        dn.push(DnType::OrganizationName, format!("fedhcc study {study}"));
        dn
    };
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let v = Validity::days(days.saturating_add(365));
    ca_params.not_before = v.not_before;
    ca_params.not_after = v.not_after;
    ca_params.serial_number = Some(random_serial());
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write_atomic(&cd.ca_key(), ca_key.serialize_pem().as_bytes(), true)?;
    write_atomic(&cd.ca(), ca_cert.pem().as_bytes(), false)?;

    let mut reg =
        Registry { study: study.to_string(), server_name: server_name.to_string(), crl_number: 0, issued: vec![] };
    let issuer = Issuer::new(ca_params, ca_key);
    let validity = Validity::days(days);
    issue_into(&cd, &issuer, &mut reg, Role::Server, server_name, validity)?;
    for s in sites {
        issue_into(&cd, &issuer, &mut reg, Role::Site, s, validity)?;
    }
    if let Some(a) = admin {
        issue_into(&cd, &issuer, &mut reg, Role::Admin, a, validity)?;
    }
    write_crl(&cd, &issuer, &mut reg)?;
    cd.save_registry(&reg)?;
    Ok(reg)
}

fn load_issuer(cd: &CertDir) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key_pem = fs::read_to_string(cd.ca_key()).map_err(io_err(&cd.ca_key()))?;
    let cert_pem = fs::read_to_string(cd.ca()).map_err(io_err(&cd.ca()))?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| PkiError::Invalid(format!("{}: not a private key: {e}", cd.ca_key().display())))?;
    Issuer::from_ca_cert_pem(&cert_pem, key)
        .map_err(|e| PkiError::Invalid(format!("{}: not a CA certificate: {e}", cd.ca().display())))
}

/// Issues a certificate for a new site (or admin) without touching the others.
/// A name that already holds a valid (unrevoked) certificate is refused.
///
/// # Errors
/// No CA in `dir`, an invalid or already-issued name, or an I/O failure.
pub fn issue(dir: &Path, role: Role, name: &str, validity: Validity) -> Result<IssuedCert, PkiError> {
    let cd = CertDir::new(dir);
    let mut reg = cd.load_registry()?;
    if role == Role::Server {
        // A new certificate for the study's server (after the old one was revoked), same name.
        if name != reg.server_name {
            return Err(PkiError::Invalid(format!(
                "this study's server is '{}'; a server certificate is issued for that name only",
                reg.server_name
            )));
        }
    } else {
        validate_name(role.as_ou(), name)?;
    }
    check_not_issued(&reg, role, name)?;
    let issuer = load_issuer(&cd)?;
    let cert = issue_into(&cd, &issuer, &mut reg, role, name, validity)?;
    cd.save_registry(&reg)?;
    Ok(cert)
}

fn issue_into(
    cd: &CertDir,
    issuer: &Issuer<'_, KeyPair>,
    reg: &mut Registry,
    role: Role,
    name: &str,
    validity: Validity,
) -> Result<IssuedCert, PkiError> {
    let key = KeyPair::generate()?;
    let (p, serial) = leaf_params(reg, role, name, validity)?;
    let (cert_path, key_path) = match role {
        Role::Server => (cd.server(), cd.server_key()),
        Role::Site => (cd.site(name), cd.site_key(name)),
        Role::Admin => (cd.admin(name), cd.admin_key(name)),
    };
    let cert = p.signed_by(&key, issuer)?;
    write_atomic(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), false)?;
    Ok(record(reg, role, name, &serial, validity))
}

/// The parameters of a server, site or admin certificate of this study, and its serial.
fn leaf_params(
    reg: &Registry,
    role: Role,
    name: &str,
    validity: Validity,
) -> Result<(CertificateParams, SerialNumber), PkiError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = subject(&reg.study, role, name);
    p.not_before = validity.not_before;
    p.not_after = validity.not_after;
    let serial = random_serial();
    p.serial_number = Some(serial.clone());
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::Sha256;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    match role {
        Role::Server => {
            p.subject_alt_names = vec![
                SanType::DnsName(name.try_into()?),
                SanType::DnsName("localhost".try_into()?),
                SanType::IpAddress([127, 0, 0, 1].into()),
                SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
            ];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        Role::Site | Role::Admin => p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
    }
    Ok((p, serial))
}

/// Adds an issued certificate to the registry.
fn record(reg: &mut Registry, role: Role, name: &str, serial: &SerialNumber, validity: Validity) -> IssuedCert {
    let rec = IssuedCert {
        role,
        name: name.to_string(),
        serial_hex: hex::encode(serial.to_bytes()),
        not_after: fmt_time(validity.not_after),
        revoked_at: None,
    };
    reg.issued.push(rec.clone());
    rec
}

/// Refuses a second valid certificate for one name and role.
fn check_not_issued(reg: &Registry, role: Role, name: &str) -> Result<(), PkiError> {
    if reg.issued.iter().any(|c| c.role == role && c.name == name && c.revoked_at.is_none()) {
        return Err(PkiError::Invalid(format!(
            "{} '{name}' already has a valid certificate; revoke it first (`fedhcc certs revoke`) to replace it",
            role.as_ou()
        )));
    }
    Ok(())
}

/// The files `fedhcc certs request` writes for `name` in `out`: the private key, the request.
pub fn request_paths(out: &Path, name: &str) -> (PathBuf, PathBuf) {
    (out.join(format!("{name}.key.pem")), out.join(format!("{name}.csr.pem")))
}

/// `fedhcc certs request`, at the site (or on the study lead's own machine for an admin): makes
/// the private key there (owner-only) and a certificate signing request naming `role` and `name`.
/// The key never leaves `out`; only the request goes to the study lead. Refuses to overwrite a key.
///
/// # Errors
/// An invalid name, a server role (the server's certificate comes from `certs init`), a key already
/// in `out`, or an I/O failure.
pub fn request(out: &Path, role: Role, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    if role == Role::Server {
        return Err(PkiError::Invalid(
            "`certs request` makes a site's or an admin's key; the server's certificate comes from `certs init` \
             (or, after a revocation, `certs issue --server NAME`)"
                .into(),
        ));
    }
    validate_name(role.as_ou(), name)?;
    let (key_path, csr_path) = request_paths(out, name);
    if key_path.exists() {
        return Err(PkiError::Invalid(format!(
            "{} already exists; refusing to overwrite a private key (move it away to make a new one)",
            key_path.display()
        )));
    }
    fs::create_dir_all(out).map_err(io_err(out))?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name.push(DnType::OrganizationalUnitName, role.as_ou());
    let csr = p.serialize_request(&key)?;
    write_atomic(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_atomic(&csr_path, csr.pem()?.as_bytes(), false)?;
    Ok((key_path, csr_path))
}

/// `fedhcc certs sign`, at the study lead: the study CA in `dir` issues a certificate for a
/// signing request (its signature checked, so the requester holds the key), for the name and role
/// the request names, under the same naming rule and registry as `certs issue`. Returns the record
/// and the certificate (PEM) to send back to the requester; no private key is made or seen here.
///
/// # Errors
/// A request that cannot be parsed or whose signature is wrong, a missing or invalid name or role,
/// a name that already holds a valid certificate, no CA in `dir`, or an I/O failure.
pub fn sign(dir: &Path, csr_pem: &str, validity: Validity) -> Result<(IssuedCert, String), PkiError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        PkiError::Invalid(format!("not a certificate signing request made by `fedhcc certs request`: {e}"))
    })?;
    let text = |ty: DnType| match csr.params.distinguished_name.get(&ty) {
        Some(rcgen::DnValue::Utf8String(s)) => Some(s.clone()),
        Some(rcgen::DnValue::PrintableString(s)) => Some(s.as_str().to_string()),
        _ => None,
    };
    let name = text(DnType::CommonName).ok_or_else(|| PkiError::Invalid("the request names no site (CN)".into()))?;
    let role = match text(DnType::OrganizationalUnitName).as_deref() {
        Some("site") => Role::Site,
        Some("admin") => Role::Admin,
        other => {
            return Err(PkiError::Invalid(format!(
                "the request asks for role {other:?}; only a site or an admin certificate is signed"
            )));
        }
    };
    validate_name(role.as_ou(), &name)?;
    let cd = CertDir::new(dir);
    let mut reg = cd.load_registry()?;
    check_not_issued(&reg, role, &name)?;
    let issuer = load_issuer(&cd)?;
    let (p, serial) = leaf_params(&reg, role, &name, validity)?;
    let cert = p.signed_by(&csr.public_key, &issuer)?;
    let rec = record(&mut reg, role, &name, &serial, validity);
    cd.save_registry(&reg)?;
    Ok((rec, cert.pem()))
}

/// Revokes every valid certificate of `name` with `role` and rewrites `crl.pem`. The server reads the
/// list again when it changes, so the next connection with that certificate is refused.
///
/// # Errors
/// No such certificate, no CA in `dir`, or an I/O failure.
pub fn revoke(dir: &Path, role: Role, name: &str) -> Result<usize, PkiError> {
    let cd = CertDir::new(dir);
    let mut reg = cd.load_registry()?;
    let now = fmt_time(OffsetDateTime::now_utc());
    let mut n = 0;
    for c in reg.issued.iter_mut().filter(|c| c.role == role && c.name == name && c.revoked_at.is_none()) {
        c.revoked_at = Some(now.clone());
        n += 1;
    }
    if n == 0 {
        return Err(PkiError::Invalid(format!(
            "no valid certificate for {} '{name}' in {}",
            role.as_ou(),
            cd.registry().display()
        )));
    }
    let issuer = load_issuer(&cd)?;
    write_crl(&cd, &issuer, &mut reg)?;
    cd.save_registry(&reg)?;
    Ok(n)
}

fn write_crl(cd: &CertDir, issuer: &Issuer<'_, KeyPair>, reg: &mut Registry) -> Result<(), PkiError> {
    reg.crl_number += 1;
    let now = OffsetDateTime::now_utc();
    let revoked_certs = reg
        .issued
        .iter()
        .filter(|c| c.revoked_at.is_some())
        .map(|c| {
            let bytes = hex::decode(&c.serial_hex)
                .map_err(|_| PkiError::Invalid(format!("registry serial '{}' is not hex", c.serial_hex)))?;
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, PkiError>>()?;
    let params = CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update: now + Duration::days(3650),
        crl_number: SerialNumber::from(reg.crl_number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(issuer)?;
    write_atomic(&cd.crl(), crl.pem()?.as_bytes(), false)
}

// ---------------------------------------------------------------------------------------------
// Reading PEM and building rustls configurations.

/// Reads every certificate in a PEM file.
///
/// # Errors
/// Unreadable file, or no certificate in it.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let certs = CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>().map_err(pem_err(path))?;
    if certs.is_empty() {
        return Err(PkiError::Invalid(format!("{}: no PEM certificate found", path.display())));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file.
///
/// # Errors
/// Unreadable file, or no private key in it.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            PkiError::Invalid(format!("{}: no PEM private key found", path.display()))
        }
        e => pem_err(path)(e),
    })
}

/// Reads every CRL in a PEM file.
///
/// # Errors
/// Unreadable file or bad PEM.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, PkiError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    CertificateRevocationListDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>().map_err(pem_err(path))
}

/// A PEM file that does not parse, named.
fn pem_err(path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> PkiError + '_ {
    move |e| PkiError::Invalid(format!("{}: not a valid PEM file ({e})", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Files a server needs for TLS.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub crl: PathBuf,
}

/// Files a client (site or admin) needs for TLS.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The study's revocation list (`crl.pem`, sent with `ca.pem`): a server certificate it lists
    /// is refused. Optional: without it the server is checked against the CA only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

/// A certificate in use that expires within this many days is announced with a warning at start.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// Checks the validity dates of the first certificate in `path` (`what` names it in messages,
/// e.g. "the server certificate") at `now`.
///
/// Returns a warning for a certificate that expires within [`EXPIRY_WARNING_DAYS`] days.
///
/// # Errors
/// An unreadable certificate, one that has expired, or one that is not valid yet: TLS would refuse
/// it at every connection, so the program stops at start with a message saying what to do.
pub fn check_certificate_dates(path: &Path, what: &str, now: OffsetDateTime) -> Result<Option<String>, PkiError> {
    let certs = load_certs(path)?;
    let (_, x) = x509_parser::parse_x509_certificate(certs[0].as_ref())
        .map_err(|e| PkiError::Invalid(format!("{}: {what} does not parse: {e}", path.display())))?;
    let not_before = x.validity().not_before.timestamp();
    let not_after = x.validity().not_after.timestamp();
    let at = |t: i64| OffsetDateTime::from_unix_timestamp(t).map(fmt_time).unwrap_or_else(|_| format!("unix time {t}"));
    let now_s = now.unix_timestamp();
    if now_s > not_after {
        return Err(PkiError::Invalid(format!(
            "{}: {what} expired on {}; ask the study lead for a new one (`fedhcc certs issue`) and put it in place",
            path.display(),
            at(not_after)
        )));
    }
    if now_s < not_before {
        return Err(PkiError::Invalid(format!(
            "{}: {what} is not valid before {}; check this computer's clock",
            path.display(),
            at(not_before)
        )));
    }
    let days_left = (not_after - now_s) / 86_400;
    Ok((days_left < EXPIRY_WARNING_DAYS).then(|| {
        format!(
            "{}: {what} expires on {} (in {days_left} days); ask the study lead for a new one before then",
            path.display(),
            at(not_after)
        )
    }))
}

/// Checks the dates of a certificate in use and of the CA that issued it, logging a warning for one
/// that expires soon.
fn check_in_use(cert: &Path, what: &str, ca: &Path) -> Result<(), PkiError> {
    let now = OffsetDateTime::now_utc();
    for (path, what) in [(cert, what), (ca, "the study CA certificate")] {
        if let Some(w) = check_certificate_dates(path, what, now)? {
            tracing::warn!("{w}");
        }
    }
    Ok(())
}

/// A rustls client configuration for a site or the study lead: TLS 1.3 only, the server's
/// certificate checked against the study CA, this side's certificate presented, ALPN h2. An expired
/// (or not yet valid) certificate of ours or of the CA is refused here, with what to do; one that
/// expires within [`EXPIRY_WARNING_DAYS`] days is logged as a warning.
///
/// # Errors
/// Unreadable, invalid or expired files.
pub fn client_config(files: &ClientTlsFiles) -> Result<rustls::ClientConfig, PkiError> {
    check_in_use(&files.cert, "this side's certificate", &files.ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&files.ca)? {
        roots.add(c).map_err(|e| PkiError::Tls(format!("{}: {e}", files.ca.display())))?;
    }
    let crls = match &files.crl {
        Some(path) => load_crls(path)?,
        None => Vec::new(),
    };
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .build()
        .map_err(|e| PkiError::Tls(format!("server verifier: {e}")))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| PkiError::Tls(format!("{}: {e}", files.cert.display())))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A rustls server configuration: TLS 1.3 only, a client certificate from the study CA required,
/// the revocation list checked (expired certificates fail the standard validity check), ALPN h2.
/// The server's own certificate and the CA are checked as in [`client_config`].
///
/// # Errors
/// Unreadable, invalid or expired files.
pub fn server_config(files: &ServerTlsFiles) -> Result<rustls::ServerConfig, PkiError> {
    check_in_use(&files.cert, "the server certificate", &files.ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&files.ca)? {
        roots.add(c).map_err(|e| PkiError::Tls(format!("{}: {e}", files.ca.display())))?;
    }
    let crls = load_crls(&files.crl)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .build()
        .map_err(|e| PkiError::Tls(format!("client verifier: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| PkiError::Tls(format!("{}: {e}", files.cert.display())))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Reads the identity of a peer from its (already verified) leaf certificate.
///
/// # Errors
/// A certificate without the fedhcc subject fields.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<PeerIdentity, PkiError> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| PkiError::Invalid(format!("peer certificate does not parse: {e}")))?;
    let subject = x.subject();
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let name = first(&mut subject.iter_common_name())
        .ok_or_else(|| PkiError::Invalid("peer certificate has no common name".into()))?;
    let ou = first(&mut subject.iter_organizational_unit())
        .ok_or_else(|| PkiError::Invalid("peer certificate has no role (OU)".into()))?;
    let org = first(&mut subject.iter_organization()).unwrap_or_default();
    let role = match ou.as_str() {
        "site" => Role::Site,
        "admin" => Role::Admin,
        "server" => Role::Server,
        other => return Err(PkiError::Invalid(format!("peer certificate has unknown role '{other}'"))),
    };
    let study = org.strip_prefix("fedhcc study ").unwrap_or_default().to_string();
    Ok(PeerIdentity { name, role, study, not_after_unix: x.validity().not_after.timestamp() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_files_that_hold_nothing_usable_are_named_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), "hcc", "srv", &["a".into()], None, 30).unwrap();
        let cd = CertDir::new(tmp.path());
        // The real files load: certificates, the key, the (empty) CRL.
        assert_eq!(load_certs(&cd.site("a")).unwrap().len(), 1);
        load_key(&cd.site_key("a")).unwrap();
        load_crls(&cd.crl()).unwrap();
        // A certificate where the key should be, a key where the certificate should be, broken PEM.
        let e = load_key(&cd.site("a")).unwrap_err().to_string();
        assert!(e.contains("no PEM private key found") && e.contains("site-a.pem"), "{e}");
        let e = load_certs(&cd.site_key("a")).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate found"), "{e}");
        let broken = tmp.path().join("broken.pem");
        fs::write(&broken, "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n").unwrap();
        let e = load_certs(&broken).unwrap_err().to_string();
        assert!(e.contains("broken.pem") && e.contains("not a valid PEM file"), "{e}");
    }

    #[test]
    fn init_writes_ca_server_sites_admin_and_private_keys_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = init(tmp.path(), "hcc", "fedhcc-server", &["center_a".into(), "center_b".into()], Some("lead"), 30)
            .unwrap();
        assert_eq!(reg.issued.len(), 4);
        let cd = CertDir::new(tmp.path());
        for p in [cd.ca(), cd.server(), cd.site("center_a"), cd.site("center_b"), cd.admin("lead"), cd.crl()] {
            assert!(p.exists(), "{}", p.display());
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for p in [cd.ca_key(), cd.server_key(), cd.site_key("center_a"), cd.admin_key("lead")] {
                assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600, "{}", p.display());
            }
        }
        let id = peer_identity(&load_certs(&cd.site("center_b")).unwrap()[0]).unwrap();
        assert_eq!((id.name.as_str(), id.role, id.study.as_str()), ("center_b", Role::Site, "hcc"));
        let id = peer_identity(&load_certs(&cd.admin("lead")).unwrap()[0]).unwrap();
        assert_eq!(id.role, Role::Admin);
        server_config(&ServerTlsFiles { ca: cd.ca(), cert: cd.server(), key: cd.server_key(), crl: cd.crl() }).unwrap();
    }

    #[test]
    fn certificates_in_use_are_refused_when_expired_or_not_yet_valid_and_flagged_near_expiry() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), "s", "srv", &["a".into()], None, 30).unwrap();
        let cd = CertDir::new(tmp.path());
        let now = OffsetDateTime::now_utc();
        assert_eq!(check_certificate_dates(&cd.site("a"), "the site certificate", now).unwrap(), None);
        let w = check_certificate_dates(&cd.site("a"), "the site certificate", now + Duration::days(20))
            .unwrap()
            .expect("a warning 10 days before expiry");
        let days = w.contains("in 9 days") || w.contains("in 10 days");
        assert!(w.contains("site-a.pem") && w.contains("expires on") && days, "{w}");
        let e = check_certificate_dates(&cd.site("a"), "the site certificate", now + Duration::days(31)).unwrap_err();
        assert!(e.to_string().contains("expired on") && e.to_string().contains("fedhcc certs issue"), "{e}");
        let e = check_certificate_dates(&cd.site("a"), "the site certificate", now - Duration::days(1)).unwrap_err();
        assert!(e.to_string().contains("not valid before"), "{e}");
        // In use: an expired certificate stops the client at start, and TLS 1.2 is not offered.
        let v = Validity { not_before: now - Duration::days(3), not_after: now - Duration::days(1) };
        issue(tmp.path(), Role::Site, "late", v).unwrap();
        let late = ClientTlsFiles { ca: cd.ca(), cert: cd.site("late"), key: cd.site_key("late"), crl: None };
        assert!(client_config(&late).unwrap_err().to_string().contains("expired on"));
        let ok = ClientTlsFiles { ca: cd.ca(), cert: cd.site("a"), key: cd.site_key("a"), crl: None };
        let cfg = client_config(&ok).unwrap();
        assert_eq!(cfg.alpn_protocols, vec![b"h2".to_vec()]);
    }

    /// Runs a TLS handshake between two in-memory connections.
    fn handshake(c: &mut rustls::ClientConnection, s: &mut rustls::ServerConnection) -> Result<(), rustls::Error> {
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                c.read_tls(&mut buf.as_slice()).unwrap();
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General("the handshake made no progress".into()))
    }

    #[test]
    fn client_and_server_speak_tls_1_3_only() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), "s", "srv", &["a".into()], None, 30).unwrap();
        let cd = CertDir::new(tmp.path());
        let site = ClientTlsFiles { ca: cd.ca(), cert: cd.site("a"), key: cd.site_key("a"), crl: None };
        let server = ServerTlsFiles { ca: cd.ca(), cert: cd.server(), key: cd.server_key(), crl: cd.crl() };
        let name = rustls::pki_types::ServerName::try_from("srv").unwrap();
        let ours = Arc::new(client_config(&site).unwrap());
        let theirs = Arc::new(server_config(&server).unwrap());
        let mut c = rustls::ClientConnection::new(Arc::clone(&ours), name.clone()).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::clone(&theirs)).unwrap();
        handshake(&mut c, &mut s).unwrap();
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(c.alpn_protocol(), Some(&b"h2"[..]));

        // A TLS 1.2-only server is refused by our client, a TLS 1.2-only client by our server.
        let tls12 = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(load_certs(&cd.server()).unwrap(), load_key(&cd.server_key()).unwrap())
            .unwrap();
        let mut c = rustls::ClientConnection::new(Arc::clone(&ours), name.clone()).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(tls12)).unwrap();
        assert!(handshake(&mut c, &mut s).is_err(), "no TLS 1.2 from the client");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(load_certs(&cd.ca()).unwrap().remove(0)).unwrap();
        let tls12 = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(load_certs(&cd.site("a")).unwrap(), load_key(&cd.site_key("a")).unwrap())
            .unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(tls12), name).unwrap();
        let mut s = rustls::ServerConnection::new(theirs).unwrap();
        assert!(handshake(&mut c, &mut s).is_err(), "no TLS 1.2 at the server");
    }

    #[test]
    fn refuses_to_overwrite_a_ca_and_bad_names() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), "s", "srv", &["a".into()], None, 1).unwrap();
        let err = init(tmp.path(), "s", "srv", &["a".into()], None, 1).unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        let err = issue(tmp.path(), Role::Site, "Bad Name", Validity::days(1)).unwrap_err();
        assert!(err.to_string().contains("not allowed"), "{err}");
        let err = issue(tmp.path(), Role::Site, "a", Validity::days(1)).unwrap_err();
        assert!(err.to_string().contains("already has a valid certificate"), "{err}");
    }

    #[test]
    fn issue_adds_a_site_and_revoke_lists_its_serial() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), "s", "srv", &["a".into()], None, 1).unwrap();
        let ca_before = fs::read(CertDir::new(tmp.path()).ca()).unwrap();
        let site_a_before = fs::read(CertDir::new(tmp.path()).site("a")).unwrap();
        let c = issue(tmp.path(), Role::Site, "c", Validity::days(5)).unwrap();
        let cd = CertDir::new(tmp.path());
        assert_eq!(fs::read(cd.ca()).unwrap(), ca_before);
        assert_eq!(fs::read(cd.site("a")).unwrap(), site_a_before);
        assert_eq!(revoke(tmp.path(), Role::Site, "c").unwrap(), 1);
        let crl = load_crls(&cd.crl()).unwrap();
        let (_, parsed) = x509_parser::parse_x509_crl(crl[0].as_ref()).unwrap();
        let serials: Vec<String> = parsed.iter_revoked_certificates().map(|r| hex::encode(r.raw_serial())).collect();
        assert_eq!(serials, vec![c.serial_hex.clone()]);
        assert!(revoke(tmp.path(), Role::Site, "c").is_err());
        // After revocation the site may be issued again.
        issue(tmp.path(), Role::Site, "c", Validity::days(5)).unwrap();
    }
}
