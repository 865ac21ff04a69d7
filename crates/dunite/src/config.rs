//! Configuration: flags, `DUNITE_*` environment variables and an optional TOML file.
//!
//! Precedence: a flag wins over its environment variable (clap reads both), which wins over
//! the config file, which wins over the default. Every value is checked at start-up and an
//! error names the setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::tls::TlsFiles;

/// The `dunite` command line.
#[derive(Debug, Parser)]
#[command(
    name = "dunite",
    version,
    about = "A byte-capped pull-through OCI registry mirror and download proxy"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Serve the registry mirror and the download proxy.
    Serve(ServeArgs),
}

/// `dunite serve` flags. Each can also be set with the `DUNITE_*` variable shown, or in the
/// TOML file given with `--config` (same names, with `-` as `_`).
#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "DUNITE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:5080].
    #[arg(long, env = "DUNITE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for cached payloads and the embedded database [default: ./dunite-data].
    #[arg(long, env = "DUNITE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Metadata database URL: `postgres://user:pass@host/db` for several instances sharing one
    /// database and one DATA_DIR [default: SQLite at `DATA_DIR/metadata.db`].
    #[arg(long, env = "DUNITE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Byte cap of the OCI blob cache, e.g. 20GiB, 500MB [default: 10GiB].
    #[arg(long, env = "DUNITE_OCI_MAX_BYTES")]
    pub oci_max_bytes: Option<String>,
    /// Byte cap of the download cache [default: 10GiB].
    #[arg(long, env = "DUNITE_DL_MAX_BYTES")]
    pub dl_max_bytes: Option<String>,
    /// Upstream registry as `HOST=URL`, e.g. `docker.io=https://registry-1.docker.io` (repeatable).
    #[arg(long = "upstream", env = "DUNITE_UPSTREAMS", value_delimiter = ',')]
    pub upstreams: Vec<String>,
    /// Registry host used when a request carries no `?ns=` [default: docker.io].
    #[arg(long, env = "DUNITE_DEFAULT_REGISTRY")]
    pub default_registry: Option<String>,
    /// How long a tag is served from cache before it is revalidated upstream, e.g. 5m [default: 5m].
    #[arg(long, env = "DUNITE_TAG_TTL")]
    pub tag_ttl: Option<String>,
    /// Byte cap of the tag records (about 150 bytes each; the least recently used are
    /// dropped and resolved upstream again when next asked for) [default: 4MiB].
    #[arg(long, env = "DUNITE_TAG_MAX_BYTES")]
    pub tag_max_bytes: Option<String>,
    /// Host the download proxy may fetch from (repeatable); none by default.
    #[arg(long = "dl-allow", env = "DUNITE_DL_ALLOW", value_delimiter = ',')]
    pub dl_allow: Vec<String>,
    /// Let allowlisted host names resolve to loopback, private or link-local addresses
    /// (refused by default; an IP literal on the allowlist is always explicit).
    #[arg(long, env = "DUNITE_DL_ALLOW_PRIVATE_NETWORKS")]
    pub dl_allow_private_networks: bool,
    /// How long a download is served before it is revalidated upstream, e.g. 1h [default: 1h].
    #[arg(long, env = "DUNITE_DL_FRESHNESS")]
    pub dl_freshness: Option<String>,
    /// How long in-flight responses may finish after a shutdown signal, e.g. 30s [default: 30s].
    #[arg(long, env = "DUNITE_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// How long an upstream (registry, token endpoint or download host) may take to accept a
    /// connection or stay silent mid-answer before the request fails, e.g. 30s [default: 60s].
    #[arg(long, env = "DUNITE_UPSTREAM_TIMEOUT")]
    pub upstream_timeout: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs --tls-key. Re-read on
    /// SIGHUP.
    #[arg(long, env = "DUNITE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, RSA or EC). Re-read on SIGHUP.
    #[arg(long, env = "DUNITE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

/// The config file: the same settings as the flags, plus credentials.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    oci_max_bytes: Option<String>,
    dl_max_bytes: Option<String>,
    #[serde(default)]
    upstreams: BTreeMap<String, String>,
    default_registry: Option<String>,
    tag_ttl: Option<String>,
    tag_max_bytes: Option<String>,
    #[serde(default)]
    dl_allow: Vec<String>,
    #[serde(default)]
    dl_allow_private_networks: bool,
    dl_freshness: Option<String>,
    shutdown_grace: Option<String>,
    upstream_timeout: Option<String>,
    /// `host -> { username, password }` for upstream token authentication.
    #[serde(default)]
    credentials: BTreeMap<String, Credentials>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

/// Credentials for one upstream registry.
#[derive(Clone, Deserialize)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A bad setting, named.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting `{setting}`: {message}")]
pub struct ConfigError {
    /// The setting's name (flag name).
    pub setting: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn bad(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError { setting, message: message.into() }
}

/// The resolved configuration of `dunite serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Database URL, if not the embedded default.
    pub database_url: Option<String>,
    /// Cap of the OCI blob cache.
    pub oci_max_bytes: u64,
    /// Cap of the download cache.
    pub dl_max_bytes: u64,
    /// Upstream registries: host -> base URL.
    pub upstreams: BTreeMap<String, url::Url>,
    /// Registry host for requests without `?ns=`.
    pub default_registry: String,
    /// Tag revalidation age.
    pub tag_ttl: Duration,
    /// Cap of the tag records.
    pub tag_max_bytes: u64,
    /// Hosts the download proxy may fetch from.
    pub dl_allow: Vec<String>,
    /// Whether allowlisted host names may resolve to non-public addresses.
    pub dl_allow_private_networks: bool,
    /// Download revalidation age.
    pub dl_freshness: Duration,
    /// Upstream credentials by host.
    pub credentials: BTreeMap<String, Credentials>,
    /// Grace period for in-flight responses at shutdown.
    pub shutdown_grace: Duration,
    /// How long an upstream may stay silent (to connect, or mid-answer).
    pub upstream_timeout: Duration,
    /// The certificate and key to serve HTTPS with; plain HTTP without. Only the paths:
    /// [`ServerTls::load`](crate::tls::ServerTls::load) reads them.
    pub tls: Option<TlsFiles>,
}

impl Config {
    /// Defaults for everything, with `data_dir` and upstreams to fill in (for tests and
    /// embedding).
    #[must_use]
    pub fn new(data_dir: PathBuf) -> Self {
        let mut upstreams = BTreeMap::new();
        if let Ok(hub) = url::Url::parse("https://registry-1.docker.io") {
            upstreams.insert("docker.io".to_owned(), hub);
        }
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5080)),
            data_dir,
            database_url: None,
            oci_max_bytes: 10 << 30,
            dl_max_bytes: 10 << 30,
            upstreams,
            default_registry: "docker.io".to_owned(),
            tag_ttl: Duration::from_secs(300),
            tag_max_bytes: 4 << 20,
            dl_allow: Vec::new(),
            dl_allow_private_networks: false,
            dl_freshness: Duration::from_secs(3600),
            credentials: BTreeMap::new(),
            shutdown_grace: Duration::from_secs(30),
            upstream_timeout: Duration::from_secs(60),
            tls: None,
        }
    }

    /// Resolve flags (and their environment variables) over the config file over defaults.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first bad setting.
    pub fn resolve(args: ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| bad("config", format!("{}: {e}", path.display())))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| bad("config", format!("{}: {e}", path.display())))?
            }
            None => FileConfig::default(),
        };
        let mut config =
            Self::new(args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("dunite-data")));
        if let Some(listen) = args.listen.or(file.listen) {
            config.listen = listen;
        }
        config.database_url = args.database_url.or(file.database_url);
        if let Some(size) = args.oci_max_bytes.or(file.oci_max_bytes) {
            config.oci_max_bytes = parse_size(&size).map_err(|m| bad("oci-max-bytes", m))?;
        }
        if let Some(size) = args.dl_max_bytes.or(file.dl_max_bytes) {
            config.dl_max_bytes = parse_size(&size).map_err(|m| bad("dl-max-bytes", m))?;
        }
        let mut upstreams = file.upstreams;
        for spec in args.upstreams {
            let (host, url) =
                spec.split_once('=').ok_or_else(|| bad("upstream", format!("{spec:?} is not HOST=URL")))?;
            upstreams.insert(host.to_owned(), url.to_owned());
        }
        for (host, url) in upstreams {
            let parsed = url::Url::parse(&url).map_err(|e| bad("upstream", format!("{host}={url}: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(bad("upstream", format!("{host}={url}: only http and https upstreams")));
            }
            config.upstreams.insert(host, parsed);
        }
        if let Some(host) = args.default_registry.or(file.default_registry) {
            config.default_registry = host;
        }
        if !config.upstreams.contains_key(&config.default_registry) {
            return Err(bad("default-registry", format!("{:?} has no --upstream", config.default_registry)));
        }
        if let Some(ttl) = args.tag_ttl.or(file.tag_ttl) {
            config.tag_ttl = parse_duration(&ttl).map_err(|m| bad("tag-ttl", m))?;
        }
        if let Some(size) = args.tag_max_bytes.or(file.tag_max_bytes) {
            config.tag_max_bytes = parse_size(&size).map_err(|m| bad("tag-max-bytes", m))?;
        }
        if let Some(age) = args.dl_freshness.or(file.dl_freshness) {
            config.dl_freshness = parse_duration(&age).map_err(|m| bad("dl-freshness", m))?;
        }
        if let Some(grace) = args.shutdown_grace.or(file.shutdown_grace) {
            config.shutdown_grace = parse_duration(&grace).map_err(|m| bad("shutdown-grace", m))?;
        }
        if let Some(timeout) = args.upstream_timeout.or(file.upstream_timeout) {
            config.upstream_timeout = parse_duration(&timeout).map_err(|m| bad("upstream-timeout", m))?;
            if config.upstream_timeout.is_zero() {
                return Err(bad("upstream-timeout", "must be positive"));
            }
        }
        config.dl_allow = if args.dl_allow.is_empty() { file.dl_allow } else { args.dl_allow };
        config.dl_allow.iter_mut().for_each(|h| *h = h.to_ascii_lowercase());
        config.dl_allow_private_networks = args.dl_allow_private_networks || file.dl_allow_private_networks;
        config.credentials = file.credentials;
        config.tls = match (args.tls_cert.or(file.tls_cert), args.tls_key.or(file.tls_key)) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => return Err(bad("tls-key", "--tls-cert needs --tls-key (both or neither)")),
            (None, Some(_)) => return Err(bad("tls-cert", "--tls-key needs --tls-cert (both or neither)")),
        };
        for (setting, cap) in [
            ("oci-max-bytes", config.oci_max_bytes),
            ("dl-max-bytes", config.dl_max_bytes),
            ("tag-max-bytes", config.tag_max_bytes),
        ] {
            if cap == 0 {
                return Err(bad(setting, "a cap must be positive"));
            }
        }
        Ok(config)
    }
}

/// Parse a human size: `1024`, `500MB`, `20GiB`, `1.5G` (decimal units are powers of 1000,
/// binary units powers of 1024; a bare `K`/`M`/`G`/`T` is binary).
///
/// # Errors
///
/// A message saying what is wrong.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("{text:?} is not a size like 20GiB"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    let bytes = number * factor as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > i64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// Parse a duration: `30s`, `5m`, `2h`, `1d`, `250ms`, or bare seconds.
///
/// # Errors
///
/// A message saying what is wrong.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 5m"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        other => return Err(format!("unknown duration unit {other:?} in {text:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn bad_settings_are_named() {
        let args = ServeArgs { oci_max_bytes: Some("twenty".into()), ..ServeArgs::default() };
        assert_eq!(Config::resolve(args).unwrap_err().setting, "oci-max-bytes");
        let args = ServeArgs { upstreams: vec!["nonsense".into()], ..ServeArgs::default() };
        assert_eq!(Config::resolve(args).unwrap_err().setting, "upstream");
        let args = ServeArgs { default_registry: Some("nowhere.example".into()), ..ServeArgs::default() };
        assert_eq!(Config::resolve(args).unwrap_err().setting, "default-registry");
    }

    #[test]
    fn tls_takes_both_files_or_neither() {
        let args = ServeArgs { tls_cert: Some("c.pem".into()), ..ServeArgs::default() };
        let error = Config::resolve(args).unwrap_err();
        assert_eq!(error.setting, "tls-key");
        assert!(error.to_string().contains("both or neither"), "{error}");
        let args = ServeArgs { tls_key: Some("k.pem".into()), ..ServeArgs::default() };
        assert_eq!(Config::resolve(args).unwrap_err().setting, "tls-cert");
        assert_eq!(Config::resolve(ServeArgs::default()).unwrap().tls, None);

        // From the file, with a flag over its file value.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dunite.toml");
        std::fs::write(&path, "tls_cert = \"file-c.pem\"\ntls_key = \"file-k.pem\"\n").unwrap();
        let args =
            ServeArgs { config: Some(path.clone()), tls_key: Some("k.pem".into()), ..ServeArgs::default() };
        let files = Config::resolve(args).unwrap().tls.unwrap();
        assert_eq!(files, TlsFiles { cert: "file-c.pem".into(), key: "k.pem".into() });
        std::fs::write(&path, "tls_key = \"file-k.pem\"\n").unwrap();
        let args = ServeArgs { config: Some(path), ..ServeArgs::default() };
        assert_eq!(Config::resolve(args).unwrap_err().setting, "tls-cert");
    }

    #[test]
    fn credentials_never_print_their_secret() {
        let c = Credentials { username: "u".into(), password: "hunter2".into() };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
