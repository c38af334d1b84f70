//! The brain's configuration file (TOML). Every key but the admin token has
//! a documented default; unknown keys are refused; [`Config::parse`] reports
//! every problem in the file at once.
//!
//! ```toml
//! brain_id = "brain-1"                 # default: the host name
//! data_dir = "/var/lib/corral-brain"   # the store file lives here
//! cell_lost_grace_secs = 10
//! [api]
//! listen = "127.0.0.1:7900"            # "off" disables the management API
//! [quic]
//! listen = "0.0.0.0:7901"
//! [tls]                                # defaults: /etc/corral/certs/{ca,brain-<id>,brain-<id>-key}.pem
//! ca = "/etc/corral/certs/ca.pem"
//! cert = "/etc/corral/certs/brain-brain-1.pem"
//! key = "/etc/corral/certs/brain-brain-1-key.pem"
//! [network]
//! vip_range = "10.96.0.0/16"           # optional
//! [tokens]
//! admin = "a-long-random-admin-token"
//! [[tokens.tenant]]
//! tenant = "acme"
//! token = "a-long-random-acme-token"
//! ```

use corral_proto::wire::{BrainId, Ipv4Net};
use corral_proto::TenantId;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Shortest token accepted: a bearer token is a password.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted (it travels in an HTTP header).
pub const MAX_TOKEN_LEN: usize = 4096;
/// Name of the store file inside `data_dir`.
pub const STORE_FILE: &str = "brain.redb";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    brain_id: Option<String>,
    data_dir: Option<PathBuf>,
    cell_lost_grace_secs: Option<u64>,
    #[serde(default)]
    api: RawListen,
    #[serde(default)]
    quic: RawListen,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    tokens: RawTokens,
    #[serde(default)]
    network: RawNetwork,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    admin: Option<String>,
    #[serde(default)]
    tenant: Vec<RawTenantToken>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenantToken {
    tenant: String,
    token: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    vip_range: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// This brain's id; it must match the name in its certificate.
    /// Default: the host name.
    pub brain_id: BrainId,
    /// Durable state: the store file [`STORE_FILE`]. Default: /var/lib/corral-brain.
    pub data_dir: PathBuf,
    /// TCP address of the management API; `None` ("off") disables it.
    /// Default: 127.0.0.1:7900.
    pub api_listen: Option<SocketAddr>,
    /// UDP address of the QUIC endpoint for cells. Default: 0.0.0.0:7901.
    pub quic_listen: SocketAddr,
    /// The cluster CA and this brain's certificate and key.
    pub tls: TlsFiles,
    /// Bearer tokens of the management API.
    pub tokens: Tokens,
    /// Seconds a cell may stay disconnected before its instances are
    /// rescheduled elsewhere. Default: 10.
    pub cell_lost_grace_secs: u64,
    /// The range app VIPs are allocated from. Default: none (no VIPs).
    pub vip_range: Option<Ipv4Net>,
}

/// Where the brain's TLS material is. Defaults follow `corral-brain certs`:
/// `/etc/corral/certs/ca.pem`, `/etc/corral/certs/brain-<brain_id>.pem` and
/// `/etc/corral/certs/brain-<brain_id>-key.pem`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A bearer token. Its `Debug` never shows the secret, and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("is {len} characters long; tokens need at least {MIN_TOKEN_LEN}")]
    TooShort { len: usize },
    #[error("is longer than {MAX_TOKEN_LEN} characters")]
    TooLong,
    #[error("must be visible ASCII characters without spaces")]
    BadChars,
    /// Named by position, never by value: messages must not echo secrets.
    #[error("the same token is given twice; every token must be unique")]
    Duplicate,
}

impl Token {
    /// Checks length and characters (visible ASCII: it goes in a header).
    pub fn new(value: impl Into<String>) -> Result<Self, TokenError> {
        let value = value.into();
        if value.len() < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort { len: value.len() });
        }
        if value.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::BadChars);
        }
        Ok(Self(value))
    }

    /// Compares in time independent of where the first difference is, so
    /// response times do not reveal a token's prefix.
    fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        let mut diff = mine.len() ^ presented.len();
        for (i, b) in mine.iter().enumerate() {
            diff |= usize::from(b ^ presented.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Who a request speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Sees and changes everything.
    Admin,
    /// Sees and changes only this tenant's apps and tasks.
    Tenant(TenantId),
}

/// The API's tokens: one admin token and any number of tenant tokens (a
/// tenant may have several, e.g. while rotating). No two are equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    admin: Option<Token>,
    tenants: Vec<(Token, TenantId)>,
}

impl Tokens {
    /// Builds a token set, refusing duplicate tokens.
    pub fn new(admin: Option<Token>, tenants: Vec<(Token, TenantId)>) -> Result<Self, TokenError> {
        let mut seen = BTreeSet::new();
        for t in admin.iter().chain(tenants.iter().map(|(t, _)| t)) {
            if !seen.insert(t.0.as_str()) {
                return Err(TokenError::Duplicate);
            }
        }
        Ok(Self { admin, tenants })
    }

    /// The tenants that have a token.
    pub fn tenants(&self) -> BTreeSet<TenantId> {
        self.tenants.iter().map(|(_, t)| t.clone()).collect()
    }

    /// Whom `presented` (the bearer token of a request) speaks for. Every
    /// token is compared, so timing does not reveal which one nearly matched.
    pub fn authenticate(&self, presented: &str) -> Option<Principal> {
        let p = presented.as_bytes();
        let mut found = None;
        if self.admin.as_ref().is_some_and(|a| a.matches(p)) {
            found = Some(Principal::Admin);
        }
        for (token, tenant) in &self.tenants {
            if token.matches(p) && found.is_none() {
                found = Some(Principal::Tenant(tenant.clone()));
            }
        }
        found
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} has {} problem(s):\n  - {}", .problems.len(), .problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

fn parse_addr(what: &str, v: &str, p: &mut Vec<String>) -> Option<SocketAddr> {
    match v.parse() {
        Ok(a) => Some(a),
        Err(e) => {
            p.push(format!("{what} {v:?} is not an address:port ({e})"));
            None
        }
    }
}

fn check_abs(what: &str, v: &Path, p: &mut Vec<String>) {
    if !v.is_absolute() {
        p.push(format!("{what} {} must be an absolute path", v.display()));
    }
}

fn tokens(raw: RawTokens, api_on: bool, p: &mut Vec<String>) -> Tokens {
    let admin = match raw.admin.map(Token::new) {
        None => {
            if api_on {
                p.push("tokens.admin is required while the API is enabled".into());
            }
            None
        }
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            p.push(format!("tokens.admin {e}"));
            None
        }
    };
    let mut tenants = Vec::new();
    for (i, t) in raw.tenant.into_iter().enumerate() {
        let tenant = TenantId::new(t.tenant)
            .map_err(|e| p.push(format!("tokens.tenant[{i}].tenant: {e}")))
            .ok();
        let token = Token::new(t.token)
            .map_err(|e| p.push(format!("tokens.tenant[{i}].token {e}")))
            .ok();
        if let (Some(token), Some(tenant)) = (token, tenant) {
            tenants.push((token, tenant));
        }
    }
    // Duplicates are named by position: the message must not echo a secret.
    let all: Vec<(String, &Token)> = admin
        .iter()
        .map(|t| ("tokens.admin".to_owned(), t))
        .chain(
            tenants
                .iter()
                .enumerate()
                .map(|(i, (t, _))| (format!("tokens.tenant[{i}].token"), t)),
        )
        .collect();
    for (i, (name, t)) in all.iter().enumerate() {
        if let Some((first, _)) = all[..i].iter().find(|(_, u)| u == t) {
            p.push(format!("{name} is the same token as {first}"));
        }
    }
    Tokens { admin, tenants }
}

impl Config {
    pub fn load(path: &Path, hostname: &str) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, hostname).map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Parses and validates; returns every problem found. `hostname` is the
    /// default brain id (passed in so that parsing stays pure).
    pub fn parse(text: &str, hostname: &str) -> Result<Config, Vec<String>> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let mut p = Vec::new();

        let brain_id = BrainId::new(raw.brain_id.unwrap_or_else(|| hostname.to_owned()))
            .map_err(|e| p.push(format!("brain_id: {e}")))
            .ok();
        let data_dir = raw
            .data_dir
            .unwrap_or_else(|| "/var/lib/corral-brain".into());
        check_abs("data_dir", &data_dir, &mut p);
        let api_listen = match raw.api.listen.as_deref().unwrap_or("127.0.0.1:7900") {
            "off" => None,
            v => parse_addr("api.listen", v, &mut p),
        };
        let quic_listen = parse_addr(
            "quic.listen",
            raw.quic.listen.as_deref().unwrap_or("0.0.0.0:7901"),
            &mut p,
        );
        let cell_lost_grace_secs = raw.cell_lost_grace_secs.unwrap_or(10);
        if cell_lost_grace_secs > 3600 {
            p.push(format!(
                "cell_lost_grace_secs {cell_lost_grace_secs} is more than an hour"
            ));
        }
        let vip_range = match raw.network.vip_range.as_deref().map(str::parse::<Ipv4Net>) {
            None => None,
            Some(Ok(n)) if n.prefix() > 30 => {
                p.push(format!(
                    "network.vip_range {n} is too small: use /30 or larger"
                ));
                None
            }
            Some(Ok(n)) => Some(n),
            Some(Err(e)) => {
                p.push(format!("network.vip_range: {e}"));
                None
            }
        };
        let tokens = tokens(raw.tokens, api_listen.is_some(), &mut p);

        let certs = Path::new("/etc/corral/certs");
        let stem = format!(
            "brain-{}",
            brain_id.as_ref().map(BrainId::as_str).unwrap_or("brain")
        );
        let tls = TlsFiles {
            ca: raw.tls.ca.unwrap_or_else(|| certs.join("ca.pem")),
            cert: raw
                .tls
                .cert
                .unwrap_or_else(|| certs.join(format!("{stem}.pem"))),
            key: raw
                .tls
                .key
                .unwrap_or_else(|| certs.join(format!("{stem}-key.pem"))),
        };
        check_abs("tls.ca", &tls.ca, &mut p);
        check_abs("tls.cert", &tls.cert, &mut p);
        check_abs("tls.key", &tls.key, &mut p);

        match (brain_id, quic_listen) {
            (Some(brain_id), Some(quic_listen)) if p.is_empty() => Ok(Config {
                brain_id,
                data_dir,
                api_listen,
                quic_listen,
                tls,
                tokens,
                cell_lost_grace_secs,
                vip_range,
            }),
            _ => Err(p),
        }
    }

    /// The store file.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join(STORE_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "[tokens]\nadmin = \"admin-token-0123456789\"\n";

    #[test]
    fn a_minimal_file_gets_documented_defaults() {
        let c = Config::parse(ADMIN, "node-b").unwrap();
        assert_eq!(c.brain_id.as_str(), "node-b");
        assert_eq!(c.data_dir, Path::new("/var/lib/corral-brain"));
        assert_eq!(
            c.store_path(),
            Path::new("/var/lib/corral-brain/brain.redb")
        );
        assert_eq!(c.api_listen, Some("127.0.0.1:7900".parse().unwrap()));
        assert_eq!(c.quic_listen, "0.0.0.0:7901".parse().unwrap());
        assert_eq!(c.cell_lost_grace_secs, 10);
        assert_eq!(c.vip_range, None);
        assert_eq!(c.tls.ca, Path::new("/etc/corral/certs/ca.pem"));
        assert_eq!(c.tls.cert, Path::new("/etc/corral/certs/brain-node-b.pem"));
        assert_eq!(
            c.tls.key,
            Path::new("/etc/corral/certs/brain-node-b-key.pem")
        );
        assert_eq!(
            c.tokens.authenticate("admin-token-0123456789"),
            Some(Principal::Admin)
        );
    }

    #[test]
    fn a_full_file_parses_and_tokens_map_to_principals() {
        let c = Config::parse(
            r#"
            brain_id = "brain-1"
            data_dir = "/srv/brain"
            cell_lost_grace_secs = 3
            [api]
            listen = "0.0.0.0:8000"
            [quic]
            listen = "[::]:9000"
            [tls]
            ca = "/c/ca.pem"
            cert = "/c/b.pem"
            key = "/c/b-key.pem"
            [network]
            vip_range = "10.96.0.0/16"
            [tokens]
            admin = "admin-token-0123456789"
            [[tokens.tenant]]
            tenant = "acme"
            token = "acme-token-0123456789"
            [[tokens.tenant]]
            tenant = "acme"
            token = "acme-token-rotated-01"
            [[tokens.tenant]]
            tenant = "beta"
            token = "beta-token-0123456789"
            "#,
            "host",
        )
        .unwrap();
        assert_eq!(c.brain_id.as_str(), "brain-1");
        assert_eq!(c.quic_listen, "[::]:9000".parse().unwrap());
        assert_eq!(c.vip_range.unwrap().to_string(), "10.96.0.0/16");
        assert_eq!(c.cell_lost_grace_secs, 3);
        let acme = Principal::Tenant(TenantId::new("acme").unwrap());
        assert_eq!(
            c.tokens.authenticate("acme-token-0123456789"),
            Some(acme.clone())
        );
        assert_eq!(c.tokens.authenticate("acme-token-rotated-01"), Some(acme));
        assert_eq!(
            c.tokens.authenticate("beta-token-0123456789"),
            Some(Principal::Tenant(TenantId::new("beta").unwrap()))
        );
        for wrong in ["", "beta-token-012345678", "beta-token-01234567890", "x"] {
            assert_eq!(c.tokens.authenticate(wrong), None, "{wrong:?}");
        }
    }

    #[test]
    fn the_api_can_be_off_and_then_needs_no_token() {
        let c = Config::parse("[api]\nlisten = \"off\"\n", "h").unwrap();
        assert_eq!(c.api_listen, None);
        assert_eq!(c.tokens.authenticate("anything-at-all-long"), None);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let problems = Config::parse(
            r#"
            brain_id = "bad/id"
            data_dir = "relative"
            cell_lost_grace_secs = 99999
            [api]
            listen = "nonsense"
            [quic]
            listen = "also nonsense"
            [tls]
            ca = "ca.pem"
            [network]
            vip_range = "10.0.0.1/8"
            [tokens]
            admin = "short"
            [[tokens.tenant]]
            tenant = "../evil"
            token = "tenant-token-0123456789"
            [[tokens.tenant]]
            tenant = "ok"
            token = "has spaces in the token"
            "#,
            "h",
        )
        .unwrap_err();
        assert_eq!(problems.len(), 10, "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("at least 16")));
    }

    #[test]
    fn duplicate_tokens_are_refused_without_echoing_them() {
        let problems = Config::parse(
            r#"
            [tokens]
            admin = "same-token-0123456789"
            [[tokens.tenant]]
            tenant = "acme"
            token = "same-token-0123456789"
            [[tokens.tenant]]
            tenant = "beta"
            token = "same-token-0123456789"
            "#,
            "h",
        )
        .unwrap_err();
        assert_eq!(
            problems,
            [
                "tokens.tenant[0].token is the same token as tokens.admin",
                "tokens.tenant[1].token is the same token as tokens.admin",
            ]
        );
        assert!(Tokens::new(
            Token::new("same-token-0123456789").ok(),
            vec![(
                Token::new("same-token-0123456789").unwrap(),
                TenantId::new("a").unwrap()
            )]
        )
        .is_err());
    }

    #[test]
    fn admin_token_is_required_with_the_api_on() {
        let problems = Config::parse("", "h").unwrap_err();
        assert_eq!(
            problems,
            ["tokens.admin is required while the API is enabled"]
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        for text in [
            "colour = 1\n",
            "[api]\nlisten_on = \"x\"\n",
            "[tokens]\nadmin = \"admin-token-0123456789\"\n[[tokens.tenant]]\ntenant = \"a\"\ntoken = \"tenant-token-0123456789\"\nrole = \"x\"\n",
        ] {
            let problems = Config::parse(text, "h").unwrap_err();
            assert!(problems[0].contains("unknown field"), "{problems:?}");
        }
    }

    #[test]
    fn tokens_never_show_in_debug_output() {
        let c = Config::parse(ADMIN, "h").unwrap();
        assert!(!format!("{c:?}").contains("admin-token"));
    }
}
