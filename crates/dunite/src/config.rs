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

use crate::auth::{Area, AuthConfig, Grants};
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
#[allow(clippy::large_enum_variant, reason = "parsed once at start-up; boxing buys nothing")]
pub enum Command {
    /// Serve the registry mirror and the download proxy.
    Serve(ServeArgs),
    /// Ask a running server about its caches, and steer them (`/admin/`).
    Admin(crate::cli::AdminArgs),
    /// Check a stopped server's data directory: rows, totals, files and digests agree
    /// (exit status 1 if not); `--repair` fixes what it can.
    Check(crate::cli::CheckArgs),
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
    /// How long a tag (or tag list, referrers list, blob size from a `HEAD`) is served from
    /// cache before it is asked upstream again, e.g. 5m [default: 5m].
    #[arg(long, env = "DUNITE_TAG_TTL")]
    pub tag_ttl: Option<String>,
    /// Byte cap of the tag records (about 150 bytes each) and of the tag lists and referrers
    /// kept beside them (each at most an eighth of it); the least recently used are dropped
    /// and asked upstream again when next asked for [default: 4MiB].
    #[arg(long, env = "DUNITE_TAG_MAX_BYTES")]
    pub tag_max_bytes: Option<String>,
    /// Host the download proxy may fetch from, as `HOST` (its scheme's default port: 80 for
    /// http, 443 for https) or `HOST:PORT` (that port only; IPv6 as `[::1]:8080`); repeatable,
    /// none by default.
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
    /// With a PostgreSQL database shared by several instances: how long an instance's blob
    /// fill lease lives without a heartbeat (sent every third of it) before another instance
    /// takes the fill over, e.g. 10s [default: 15s].
    #[arg(long, env = "DUNITE_FILL_LEASE_TIMEOUT")]
    pub fill_lease_timeout: Option<String>,
    /// Client users: an htpasswd file of bcrypt entries (`htpasswd -B`), for HTTP Basic auth.
    #[arg(long, env = "DUNITE_HTPASSWD")]
    pub htpasswd: Option<PathBuf>,
    /// Client tokens: a file of `name:token` lines, for `Authorization: Bearer <token>` (or
    /// Basic with the name and the token).
    #[arg(long, env = "DUNITE_CLIENT_TOKEN_FILE")]
    pub client_token_file: Option<PathBuf>,
    /// Grant an area (`pull`, `download`, `metrics`, `admin`) to a user or token name, `*` (any
    /// authenticated client) or `anonymous`, as `AREA=WHO` (repeatable). An area not named
    /// keeps its default: with client auth, any authenticated client (`admin`: nobody);
    /// without, anyone (`admin`: loopback clients).
    #[arg(long = "access", env = "DUNITE_ACCESS", value_delimiter = ',')]
    pub access: Vec<String>,
    /// Authorise pulls by the upstream: a client's own Basic credentials (or none) are checked
    /// against the upstream for each repository before anything cached is served.
    #[arg(long, env = "DUNITE_PASS_THROUGH_AUTH")]
    pub pass_through_auth: bool,
    /// How long an upstream's pass-through answer is remembered per client credential and
    /// repository, e.g. 1m [default: 1m].
    #[arg(long, env = "DUNITE_PASS_THROUGH_TTL")]
    pub pass_through_ttl: Option<String>,
    /// Start even though upstream credentials are configured and anonymous clients may pull
    /// what they unlock.
    #[arg(long, env = "DUNITE_ALLOW_ANONYMOUS_PRIVATE")]
    pub allow_anonymous_private: bool,
    /// Most upstream fills running at once; past it, `429` [default: 1024].
    #[arg(long, env = "DUNITE_MAX_FILLS")]
    pub max_fills: Option<usize>,
    /// Most upstream fills one client address may run at once; past it, `429` [default: 64].
    #[arg(long, env = "DUNITE_MAX_FILLS_PER_CLIENT")]
    pub max_fills_per_client: Option<usize>,
    /// Let upstream registries redirect to, and name token realms on, loopback, private or
    /// link-local addresses other than their own host and port (refused by default).
    #[arg(long, env = "DUNITE_UPSTREAM_ALLOW_PRIVATE")]
    pub upstream_allow_private: bool,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs --tls-key. Re-read on
    /// SIGHUP.
    #[arg(long, env = "DUNITE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, RSA or EC). Re-read on SIGHUP.
    #[arg(long, env = "DUNITE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// How long past its last upstream answer a tag (or tag list, or referrers list) may still
    /// be served while the upstream is unreachable, failing (5xx) or rate limiting (429),
    /// e.g. 12h; older, the upstream's error is relayed [default: 24h].
    #[arg(long, env = "DUNITE_TAG_MAX_STALE")]
    pub tag_max_stale: Option<String>,
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
    fill_lease_timeout: Option<String>,
    #[serde(default)]
    upstream_allow_private: bool,
    /// `host -> { username, password, realms }` for upstream token authentication.
    #[serde(default)]
    credentials: BTreeMap<String, Credentials>,
    htpasswd: Option<PathBuf>,
    client_token_file: Option<PathBuf>,
    /// `area -> [who, ...]`.
    #[serde(default)]
    access: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pass_through_auth: bool,
    pass_through_ttl: Option<String>,
    #[serde(default)]
    allow_anonymous_private: bool,
    max_fills: Option<usize>,
    max_fills_per_client: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tag_max_stale: Option<String>,
}

/// Credentials for one upstream registry (`[credentials.HOST]` in the config file).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
    /// The https token realms, besides the upstream's own host, that may receive these
    /// credentials (`realms = ["https://auth.docker.io"]`). `None` (not given): the built-in
    /// default, which is `https://auth.docker.io` for Docker Hub's `registry-1.docker.io`
    /// and nothing for any other upstream (see `upstream::Registries`).
    #[serde(default)]
    pub realms: Option<Vec<Realm>>,
}

/// A token realm's origin (`https://host[:port]`), as `realms` names it: https only, no
/// path, query or credentials, so it names a server and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Realm(url::Origin);

impl Realm {
    /// The realm's origin, to compare with a challenge's realm URL's.
    #[must_use]
    pub fn origin(&self) -> &url::Origin {
        &self.0
    }
}

impl std::str::FromStr for Realm {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let wrong =
            |why: &str| format!("realm {text:?} is not an https origin like https://auth.docker.io: {why}");
        let url = url::Url::parse(text).map_err(|e| wrong(&e.to_string()))?;
        if url.scheme() != "https" {
            return Err(wrong("not https"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(wrong("credentials in it"));
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(wrong("a path, query or fragment"));
        }
        Ok(Self(url.origin()))
    }
}

impl TryFrom<String> for Realm {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("realms", &self.realms)
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
    /// Hosts (and ports) the download proxy may fetch from.
    pub dl_allow: crate::net::AllowList,
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
    /// How long a fill lease lives without a heartbeat (shared databases only).
    pub fill_lease_timeout: Duration,
    /// Client authentication and grants.
    pub auth: AuthConfig,
    /// How long a pass-through answer is remembered.
    pub pass_through_ttl: Duration,
    /// Most upstream fills at once.
    pub max_fills: usize,
    /// Most upstream fills at once per client address.
    pub max_fills_per_client: usize,
    /// Whether upstream registries may send the mirror (redirects, token realms) to
    /// non-public addresses other than their own host and port.
    pub upstream_allow_private: bool,
    /// The certificate and key to serve HTTPS with; plain HTTP without. Only the paths:
    /// [`ServerTls::load`](crate::tls::ServerTls::load) reads them.
    pub tls: Option<TlsFiles>,
    /// The oldest a tag record may be and still stand in for an upstream that does not answer.
    pub tag_max_stale: Duration,
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
            dl_allow: crate::net::AllowList::default(),
            dl_allow_private_networks: false,
            dl_freshness: Duration::from_secs(3600),
            credentials: BTreeMap::new(),
            shutdown_grace: Duration::from_secs(30),
            upstream_timeout: Duration::from_secs(60),
            fill_lease_timeout: dunite_core::DEFAULT_LEASE_TIMEOUT,
            auth: AuthConfig::default(),
            pass_through_ttl: Duration::from_secs(60),
            max_fills: 1024,
            max_fills_per_client: 64,
            upstream_allow_private: false,
            tls: None,
            tag_max_stale: Duration::from_secs(24 * 3600),
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
        if let Some(timeout) = args.fill_lease_timeout.or(file.fill_lease_timeout) {
            config.fill_lease_timeout = parse_duration(&timeout).map_err(|m| bad("fill-lease-timeout", m))?;
            if config.fill_lease_timeout < Duration::from_millis(300) {
                return Err(bad("fill-lease-timeout", "must be at least 300ms"));
            }
        }
        let dl_allow = if args.dl_allow.is_empty() { file.dl_allow } else { args.dl_allow };
        config.dl_allow = crate::net::AllowList::parse(&dl_allow).map_err(|m| bad("dl-allow", m))?;
        config.upstream_allow_private = args.upstream_allow_private || file.upstream_allow_private;
        config.dl_allow_private_networks = args.dl_allow_private_networks || file.dl_allow_private_networks;
        config.credentials = file.credentials;
        config.auth.htpasswd = args.htpasswd.or(file.htpasswd);
        config.auth.token_file = args.client_token_file.or(file.client_token_file);
        config.auth.pass_through = args.pass_through_auth || file.pass_through_auth;
        let file_grants = file
            .access
            .into_iter()
            .flat_map(|(area, who)| who.into_iter().map(move |w| format!("{area}={w}")));
        // Flags (or DUNITE_ACCESS) replace the file's grants of the areas they name, and only
        // those: adding a metrics grant on the command line keeps the file's pull grants.
        let mut flagged = Grants::default();
        for grant in &args.access {
            flagged.add(grant).map_err(|m| bad("access", m))?;
        }
        for grant in file_grants {
            config.auth.grants.add(&grant).map_err(|m| bad("access", m))?;
        }
        config.auth.grants.replace_with(flagged);
        if config.auth.pass_through && config.auth.grants.names(Area::Pull) {
            return Err(bad("access", "with --pass-through-auth the upstream decides who may pull"));
        }
        // Under pass-through a client's Basic credentials for the mirror go to the upstream:
        // mirror passwords would be sent to Docker Hub and the like.
        if config.auth.pass_through && config.auth.htpasswd.is_some() {
            return Err(bad(
                "pass-through-auth",
                "cannot be combined with --htpasswd: the Basic credentials clients send the mirror \
                 would go to the upstream (use --client-token-file for the other areas)",
            ));
        }
        if let Some(ttl) = args.pass_through_ttl.or(file.pass_through_ttl) {
            config.pass_through_ttl = parse_duration(&ttl).map_err(|m| bad("pass-through-ttl", m))?;
        }
        if let Some(n) = args.max_fills.or(file.max_fills) {
            config.max_fills = n;
        }
        if let Some(n) = args.max_fills_per_client.or(file.max_fills_per_client) {
            config.max_fills_per_client = n;
        }
        if config.max_fills == 0 || config.max_fills_per_client == 0 {
            return Err(bad("max-fills", "fill limits must be positive"));
        }
        let allow_anonymous_private = args.allow_anonymous_private || file.allow_anonymous_private;
        if !config.credentials.is_empty() && config.auth.anonymous_pulls() && !allow_anonymous_private {
            return Err(bad(
                "allow-anonymous-private",
                "upstream credentials are configured but anyone may pull through them: set up client \
                 authentication (--htpasswd, --client-token-file or --pass-through-auth), or say \
                 --allow-anonymous-private",
            ));
        }
        config.tls = match (args.tls_cert.or(file.tls_cert), args.tls_key.or(file.tls_key)) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => return Err(bad("tls-key", "--tls-cert needs --tls-key (both or neither)")),
            (None, Some(_)) => return Err(bad("tls-cert", "--tls-key needs --tls-cert (both or neither)")),
        };
        if let Some(age) = args.tag_max_stale.or(file.tag_max_stale) {
            config.tag_max_stale = parse_duration(&age).map_err(|m| bad("tag-max-stale", m))?;
        }
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

impl Config {
    /// What the operator should hear at start-up about exposure: listening beyond loopback
    /// without client authentication, where anyone who reaches the port pulls, downloads and
    /// reads the metrics.
    #[must_use]
    pub fn exposure_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.listen.ip().is_loopback() {
            return warnings;
        }
        if !self.auth.any() {
            warnings.push(format!(
                "listening on {} without client authentication: anyone who reaches it may use it \
                 (see --htpasswd, --client-token-file, --pass-through-auth)",
                self.listen
            ));
        } else if self.tls.is_none() {
            warnings.push(format!(
                "listening on {} with client authentication but without TLS: credentials cross the \
                 network in clear text (see --tls-cert)",
                self.listen
            ));
        }
        warnings
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
        let args = ServeArgs { dl_allow: vec!["files.example:ssh".into()], ..ServeArgs::default() };
        let error = Config::resolve(args).unwrap_err();
        assert_eq!(error.setting, "dl-allow");
        assert!(error.to_string().contains("files.example:ssh"), "{error}");
    }

    #[test]
    fn the_fill_lease_timeout_defaults_to_15s_and_refuses_a_tiny_one() {
        let resolve = |timeout: Option<&str>| {
            Config::resolve(ServeArgs {
                fill_lease_timeout: timeout.map(str::to_owned),
                ..ServeArgs::default()
            })
        };
        assert_eq!(resolve(None).unwrap().fill_lease_timeout, Duration::from_secs(15));
        assert_eq!(resolve(Some("2s")).unwrap().fill_lease_timeout, Duration::from_secs(2));
        assert_eq!(resolve(Some("100ms")).unwrap_err().setting, "fill-lease-timeout");
        assert_eq!(resolve(Some("soon")).unwrap_err().setting, "fill-lease-timeout");
    }

    #[test]
    fn upstream_allow_private_comes_from_the_flag_or_the_file() {
        assert!(!Config::resolve(ServeArgs::default()).unwrap().upstream_allow_private);
        let args = ServeArgs { upstream_allow_private: true, ..ServeArgs::default() };
        assert!(Config::resolve(args).unwrap().upstream_allow_private);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "upstream_allow_private = true\ndl_allow = [\"[::1]:8080\"]\n").unwrap();
        let args = ServeArgs { config: Some(file.path().to_owned()), ..ServeArgs::default() };
        let config = Config::resolve(args).unwrap();
        assert!(config.upstream_allow_private);
        assert!(config.dl_allow.permits(&url::Url::parse("http://[::1]:8080/f").unwrap()));
    }

    #[test]
    fn realms_are_https_origins() {
        let realm: Realm = "https://Auth.Docker.io".parse().unwrap();
        assert_eq!(realm.origin(), &url::Url::parse("https://auth.docker.io/token").unwrap().origin());
        for bad in
            ["http://auth.docker.io", "https://auth.docker.io/token", "https://u:p@auth.example", "auth"]
        {
            assert!(bad.parse::<Realm>().is_err(), "{bad}");
        }
        let file: FileConfig = toml::from_str(
            "[credentials.\"docker.io\"]\nusername = \"u\"\npassword = \"p\"\nrealms = [\"https://auth.docker.io\"]\n",
        )
        .unwrap();
        assert_eq!(file.credentials["docker.io"].realms.as_deref(), Some(&[realm][..]));
        let error = toml::from_str::<FileConfig>(
            "[credentials.h]\nusername = \"u\"\npassword = \"p\"\nrealms = [\"http://auth.example\"]\n",
        )
        .unwrap_err();
        assert!(error.to_string().contains("not https"), "{error}");
    }

    fn with_credentials(extra: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            format!("{extra}\n[credentials.\"docker.io\"]\nusername = \"u\"\npassword = \"p\"\n"),
        )
        .unwrap();
        file
    }

    #[test]
    fn upstream_credentials_without_client_auth_refuse_to_start() {
        let file = with_credentials("");
        let args = ServeArgs { config: Some(file.path().to_owned()), ..ServeArgs::default() };
        assert_eq!(Config::resolve(args).unwrap_err().setting, "allow-anonymous-private");
        let args = ServeArgs {
            config: Some(file.path().to_owned()),
            allow_anonymous_private: true,
            ..ServeArgs::default()
        };
        assert!(Config::resolve(args).is_ok());
        for auth in [
            ServeArgs { htpasswd: Some("users".into()), ..ServeArgs::default() },
            ServeArgs { pass_through_auth: true, ..ServeArgs::default() },
        ] {
            let args = ServeArgs { config: Some(file.path().to_owned()), ..auth };
            assert!(Config::resolve(args).is_ok());
        }
        let both =
            ServeArgs { htpasswd: Some("users".into()), pass_through_auth: true, ..ServeArgs::default() };
        assert_eq!(Config::resolve(both).unwrap_err().setting, "pass-through-auth");
        // Client auth, but pulls granted to anonymous: as open as none.
        let args = ServeArgs {
            config: Some(file.path().to_owned()),
            htpasswd: Some("users".into()),
            access: vec!["pull=anonymous".into()],
            ..ServeArgs::default()
        };
        assert_eq!(Config::resolve(args).unwrap_err().setting, "allow-anonymous-private");
        let file =
            with_credentials("allow_anonymous_private = true\n[access]\nmetrics = [\"prom\", \"anonymous\"]");
        let config =
            Config::resolve(ServeArgs { config: Some(file.path().to_owned()), ..ServeArgs::default() })
                .unwrap();
        assert!(config.auth.grants.is_anonymous(Area::Metrics, true));
        // A flag replaces the file's grants of its area only.
        let args = ServeArgs {
            config: Some(file.path().to_owned()),
            access: vec!["pull=ci".into()],
            ..ServeArgs::default()
        };
        let grants = Config::resolve(args).unwrap().auth.grants;
        assert!(grants.is_anonymous(Area::Metrics, true), "the file's metrics grant stays");
        assert!(!grants.is_anonymous(Area::Pull, true) && grants.names(Area::Pull));
    }

    #[test]
    fn listening_beyond_loopback_without_client_auth_is_warned_of() {
        let mut config = Config::new("d".into());
        assert!(config.exposure_warnings().is_empty());
        config.listen = "0.0.0.0:5080".parse().unwrap();
        assert_eq!(config.exposure_warnings().len(), 1);
        config.auth.token_file = Some("tokens".into());
        let warnings = config.exposure_warnings();
        assert!(warnings.len() == 1 && warnings[0].contains("clear text"), "{warnings:?}");
        config.tls = Some(TlsFiles { cert: "c".into(), key: "k".into() });
        assert!(config.exposure_warnings().is_empty());
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
    fn tag_max_stale_comes_from_the_flag_or_the_file() {
        assert_eq!(Config::resolve(ServeArgs::default()).unwrap().tag_max_stale, Duration::from_secs(86_400));
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "tag_max_stale = \"2h\"\n").unwrap();
        let args = ServeArgs { config: Some(file.path().to_owned()), ..ServeArgs::default() };
        assert_eq!(Config::resolve(args).unwrap().tag_max_stale, Duration::from_secs(7200));
        let args = ServeArgs {
            config: Some(file.path().to_owned()),
            tag_max_stale: Some("30m".into()),
            ..ServeArgs::default()
        };
        assert_eq!(Config::resolve(args).unwrap().tag_max_stale, Duration::from_secs(1800));
        let args = ServeArgs { tag_max_stale: Some("a while".into()), ..ServeArgs::default() };
        assert_eq!(Config::resolve(args).unwrap_err().setting, "tag-max-stale");
    }

    #[test]
    fn credentials_never_print_their_secret() {
        let c = Credentials { username: "u".into(), password: "hunter2".into(), realms: None };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
