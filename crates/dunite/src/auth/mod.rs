//! Client authentication and access per area.
//!
//! Clients authenticate with HTTP Basic (users of an htpasswd file, `--htpasswd`; or a token's
//! name and the token as the password) or `Authorization: Bearer <token>` (a static token,
//! `--client-token-file`). A request without acceptable credentials for its area is answered
//! `401` with `WWW-Authenticate: Basic realm="dunite"`, as registries answer, so `docker
//! login`, `skopeo --creds`, containerd and podman authenticate with their usual settings; an
//! authenticated client without a grant for the area gets `403`. Grants (`--access
//! AREA=WHO`) are per [`Area`]: `pull` (`/v2/`), `download` (`/dl/`), `metrics`, `admin`.
//!
//! bcrypt is slow on purpose: a verified password is remembered (by a digest of the pair, for
//! `VERIFIED_FOR`) and verifications run on blocking threads, at most
//! `CONCURRENT_VERIFICATIONS` at once, so a flood of wrong passwords queues behind itself
//! and cannot starve the runtime.
//!
//! With `--pass-through-auth`, `/v2/` is not checked here: the client's Basic credentials are
//! handed on (`UpstreamLogin`) and the mirror asks the upstream whether they may pull the
//! repository (`oci::passthrough`).

mod access;
mod htpasswd;
mod tokens;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::Digest as _;

pub(crate) use access::Rule;
pub use access::{Area, Grants, Who};
use htpasswd::Htpasswd;
use tokens::Tokens;

use crate::peer::Peer;

/// How long a verified password is accepted without running bcrypt again.
pub(crate) const VERIFIED_FOR: Duration = Duration::from_secs(300);
/// The most bcrypt verifications running at once.
pub(crate) const CONCURRENT_VERIFICATIONS: usize = 2;
/// How long a password check may wait for a turn before the request is answered `429`: a
/// flood of checks is turned away instead of queueing without bound.
pub(crate) const VERIFY_WAIT: Duration = Duration::from_secs(2);
/// The most verified passwords remembered.
const MAX_VERIFIED: usize = 4096;

/// The challenge every `401` carries.
const CHALLENGE: &str = r#"Basic realm="dunite", charset="UTF-8""#;

/// A user or token file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not an entry.
    #[error("{path}, line {line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong (never the secret).
        message: String,
    },
}

impl AuthFileError {
    fn line(path: &Path, line: usize, message: &str) -> Self {
        Self::Line { path: path.to_owned(), line, message: message.to_owned() }
    }
}

/// The `name:secret` entries of a user or token file, with their line numbers (from 1);
/// `#` comments and blank lines are skipped.
///
/// # Errors
///
/// [`AuthFileError`] if the file cannot be read, or a line is not `name:secret` with a name.
fn entries(path: &Path) -> Result<Vec<(usize, String, String)>, AuthFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| AuthFileError::Read { path: path.to_owned(), source })?;
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((name, secret)) if !name.is_empty() => {
                entries.push((number + 1, name.to_owned(), secret.to_owned()));
            }
            _ => return Err(AuthFileError::line(path, number + 1, "not `name:secret` with a name")),
        }
    }
    Ok(entries)
}

/// The client's own upstream credentials, for `--pass-through-auth`: what it sent as Basic
/// auth, handed to the `/v2/` handlers in the request's extensions.
#[derive(Clone)]
pub(crate) struct UpstreamLogin(pub(crate) Option<(String, String)>);

impl std::fmt::Debug for UpstreamLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("UpstreamLogin").field(&self.0.as_ref().map(|(user, _)| user)).finish()
    }
}

/// What a request presents in `Authorization`.
enum Presented {
    None,
    Basic {
        user: String,
        password: String,
    },
    Bearer(String),
    /// Something unreadable: refused like wrong credentials.
    Malformed,
}

impl Presented {
    fn of(headers: &HeaderMap) -> Self {
        let Some(value) = headers.get(header::AUTHORIZATION) else { return Self::None };
        let Ok(value) = value.to_str() else { return Self::Malformed };
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok());
            match decoded.as_deref().and_then(|pair| pair.split_once(':')) {
                Some((user, password)) => {
                    Self::Basic { user: user.to_owned(), password: password.to_owned() }
                }
                None => Self::Malformed,
            }
        } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
            Self::Bearer(rest.to_owned())
        } else {
            Self::Malformed
        }
    }
}

/// The users and tokens as last read; replaced whole by [`ClientAuth::reload`].
#[derive(Debug, Default)]
struct Known {
    users: Arc<Htpasswd>,
    tokens: Tokens,
    /// Counts reloads: a verification remembered under another generation is not trusted.
    generation: u64,
}

impl Known {
    fn load(config: &AuthConfig, generation: u64) -> Result<Self, AuthFileError> {
        let users = config.htpasswd.as_deref().map(Htpasswd::load).transpose()?.unwrap_or_default();
        let tokens = config.token_file.as_deref().map(Tokens::load).transpose()?.unwrap_or_default();
        Ok(Self { users: Arc::new(users), tokens, generation })
    }
}

/// Client authentication: the users and tokens, the grants, and what was verified lately.
#[derive(Debug)]
pub(crate) struct ClientAuth {
    config: AuthConfig,
    known: std::sync::RwLock<Arc<Known>>,
    /// Whether a user or token file is configured: without one, credentials are not checked.
    enabled: bool,
    /// `/v2/` is authorised by the upstream.
    pass_through: bool,
    rules: HashMap<Area, Rule>,
    /// Verified passwords: digest of the pair -> (user, until, generation of `known`).
    verified: Mutex<HashMap<[u8; 32], (String, Instant, u64)>>,
    verifying: Arc<tokio::sync::Semaphore>,
}

/// How client authentication is configured (the `Config` fields it reads).
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// `--htpasswd`.
    pub htpasswd: Option<PathBuf>,
    /// `--client-token-file`.
    pub token_file: Option<PathBuf>,
    /// `--access`.
    pub grants: Grants,
    /// `--pass-through-auth`.
    pub pass_through: bool,
}

impl AuthConfig {
    /// Whether clients authenticate to dunite itself: a user file or a token file. (Without
    /// one, credentials a client sends are not checked, and every area keeps its anonymous
    /// default; `--pass-through-auth` alone authorises pulls only.)
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.htpasswd.is_some() || self.token_file.is_some()
    }

    /// Whether anything authenticates clients: dunite's own users or tokens, or the upstream.
    #[must_use]
    pub fn any(&self) -> bool {
        self.enabled() || self.pass_through
    }

    /// Whether a client without credentials may pull whatever the mirror holds: `/v2/` is
    /// anonymous and not authorised by the upstream.
    #[must_use]
    pub fn anonymous_pulls(&self) -> bool {
        !self.pass_through && self.grants.is_anonymous(Area::Pull, self.enabled())
    }
}

impl ClientAuth {
    /// Read the user and token files of `config`.
    ///
    /// # Errors
    ///
    /// [`AuthFileError`] if a file cannot be read or has a bad entry.
    pub(crate) fn load(config: &AuthConfig) -> Result<Self, AuthFileError> {
        let known = Known::load(config, 0)?;
        let enabled = config.enabled();
        let rules = Area::ALL.into_iter().map(|area| (area, config.grants.resolve(area, enabled))).collect();
        if config.htpasswd.is_some() || config.token_file.is_some() {
            tracing::info!(
                users = known.users.len(),
                tokens = known.tokens.len(),
                "client authentication on"
            );
        }
        Ok(Self {
            config: config.clone(),
            known: std::sync::RwLock::new(Arc::new(known)),
            enabled,
            pass_through: config.pass_through,
            rules,
            verified: Mutex::default(),
            verifying: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_VERIFICATIONS)),
        })
    }

    /// Whether a user or token file is configured (what [`reload`](Self::reload) re-reads).
    pub(crate) fn has_files(&self) -> bool {
        self.config.htpasswd.is_some() || self.config.token_file.is_some()
    }

    /// Read the user and token files again and use them from now on; every remembered
    /// verification is forgotten (a removed user or changed password stops working at once).
    /// On an error nothing changes. Blocking (file reads): call it off the runtime's threads.
    ///
    /// # Errors
    ///
    /// [`AuthFileError`] if a file cannot be read or has a bad entry.
    pub(crate) fn reload(&self) -> Result<(usize, usize), AuthFileError> {
        // Read before the lock is taken: requests never wait on the file system.
        let fresh = Known::load(&self.config, 0)?;
        let counts = (fresh.users.len(), fresh.tokens.len());
        let mut known = self.known.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *known = Arc::new(Known { generation: known.generation + 1, ..fresh });
        self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        Ok(counts)
    }

    fn known(&self) -> Arc<Known> {
        Arc::clone(&self.known.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Who presented `presented`: `Ok(None)` for no credentials (or when no user or token file
    /// is configured: then nothing is checked), `Err` for wrong ones or no turn to check.
    async fn identify(&self, presented: Presented) -> Result<Option<String>, Failure> {
        if !self.enabled {
            return Ok(None);
        }
        let known = self.known();
        match presented {
            Presented::None => Ok(None),
            Presented::Malformed => Err(Failure::Wrong),
            Presented::Bearer(token) => {
                known.tokens.name(&token).map(|name| Some(name.to_owned())).ok_or(Failure::Wrong)
            }
            Presented::Basic { user, password } => {
                // A token's name and the token, for clients that only speak Basic.
                if known.tokens.name(&password) == Some(user.as_str()) {
                    return Ok(Some(user));
                }
                self.verify_password(&known, user, password).await.map(Some)
            }
        }
    }

    /// Check `password` against the user file, remembering a success for `VERIFIED_FOR`.
    async fn verify_password(
        &self,
        known: &Known,
        user: String,
        password: String,
    ) -> Result<String, Failure> {
        let key = pair_digest(&user, &password);
        let now = Instant::now();
        {
            let verified = self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((name, until, generation)) = verified.get(&key)
                && *until > now
                && *generation == known.generation
            {
                return Ok(name.clone());
            }
        }
        let turn = tokio::time::timeout(VERIFY_WAIT, Arc::clone(&self.verifying).acquire_owned()).await;
        let Ok(Ok(permit)) = turn else { return Err(Failure::Busy) };
        let users = Arc::clone(&known.users);
        let checked = user.clone();
        // The permit goes with the check: a client that hangs up does not free its turn
        // while its bcrypt still runs.
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            users.verify(&checked, &password)
        })
        .await
        .unwrap_or(false);
        // Users reloaded meanwhile: what was checked may be gone.
        if !ok || self.known().generation != known.generation {
            return Err(Failure::Wrong);
        }
        let mut verified = self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        verified.retain(|_, (_, until, generation)| *until > now && *generation == known.generation);
        if verified.len() >= MAX_VERIFIED
            && let Some(oldest) = verified.iter().min_by_key(|(_, (_, until, _))| *until).map(|(k, _)| *k)
        {
            verified.remove(&oldest);
        }
        verified.insert(key, (user.clone(), now + VERIFIED_FOR, known.generation));
        Ok(user)
    }

    /// Let `request` into `area`, or answer it `401`/`403`.
    async fn admit(&self, area: Area, peer: Peer, mut request: Request, next: Next) -> Response {
        let presented = Presented::of(request.headers());
        if area == Area::Pull && self.pass_through {
            let login = match presented {
                Presented::Basic { user, password } => Some((user, password)),
                Presented::None => None,
                Presented::Bearer(_) | Presented::Malformed => return refuse(area, Refusal::Unauthenticated),
            };
            request.extensions_mut().insert(UpstreamLogin(login));
            return next.run(request).await;
        }
        let name = match self.identify(presented).await {
            Ok(name) => name,
            Err(Failure::Wrong) => {
                tracing::info!(%area, "wrong client credentials");
                return refuse(area, Refusal::Unauthenticated);
            }
            Err(Failure::Busy) => {
                tracing::warn!(%area, "too many password checks waiting; answered 429");
                return refuse(area, Refusal::Busy);
            }
        };
        let rule = &self.rules[&area];
        if rule.permits(name.as_deref(), peer.is_loopback() && is_direct_and_local(request.headers())) {
            return next.run(request).await;
        }
        match (&name, rule) {
            (None, Rule::Grants(_)) if self.enabled => refuse(area, Refusal::Unauthenticated),
            _ => refuse(area, Refusal::Denied),
        }
    }
}

/// Whether a request from a loopback address really comes from this host, for the
/// loopback-only admin area: not relayed by a reverse proxy on this host (which adds
/// `Forwarded` or `X-Forwarded-For`, and would otherwise make every client loopback), and
/// addressed to a loopback name (a browser tricked by DNS rebinding sends its page's host).
fn is_direct_and_local(headers: &HeaderMap) -> bool {
    let relayed =
        ["forwarded", "x-forwarded-for", "x-real-ip"].iter().any(|name| headers.contains_key(*name));
    let local_host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).is_none_or(|host| {
        let name = match host.rsplit_once(':') {
            Some((name, port)) if !name.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        matches!(name.to_ascii_lowercase().as_str(), "localhost" | "127.0.0.1" | "[::1]")
    });
    !relayed && local_host
}

/// The SHA-256 of a user and password pair: what remembered answers about credentials are
/// keyed by (verified passwords here, the upstream's pass-through answers), so no password is
/// kept in memory longer than a request.
pub(crate) fn pair_digest(user: &str, password: &str) -> [u8; 32] {
    let mut hasher = sha2::Sha256::new();
    hasher.update(user.as_bytes());
    hasher.update([0]);
    hasher.update(password.as_bytes());
    hasher.finalize().into()
}

/// Why credentials were not accepted.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// Wrong or unreadable.
    Wrong,
    /// Not checked: too many checks waiting (see [`VERIFY_WAIT`]).
    Busy,
}

/// Why a request was not let in.
enum Refusal {
    /// No credentials, or wrong ones: `401` with the challenge.
    Unauthenticated,
    /// Credentials (or an address) without a grant for the area: `403`.
    Denied,
    /// Password checks are saturated: `429` with `Retry-After`.
    Busy,
}

/// The answer to a refused request: for `/v2/`, the distribution spec's error body.
fn refuse(area: Area, refusal: Refusal) -> Response {
    let (status, code, message) = match refusal {
        Refusal::Unauthenticated => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "authentication required"),
        Refusal::Denied => (StatusCode::FORBIDDEN, "DENIED", "requested access to the resource is denied"),
        Refusal::Busy => {
            (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", "too many logins at once; retry shortly")
        }
    };
    let mut response = if area == Area::Pull {
        let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] }).to_string();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
        response
    } else {
        (status, format!("{message}\n")).into_response()
    };
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(CHALLENGE));
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        response.headers_mut().insert(header::RETRY_AFTER, crate::limits::RETRY_AFTER_SECS.into());
    }
    response
}

/// The unauthenticated answer for `area`, for handlers that refuse after their own check
/// (the pass-through authorisation).
pub(crate) fn unauthorized(area: Area) -> Response {
    refuse(area, Refusal::Unauthenticated)
}

/// Middleware guarding one area (`axum::middleware::from_fn_with_state`).
pub(crate) async fn guard(
    State((auth, area)): State<(Arc<ClientAuth>, Area)>,
    peer: Peer,
    request: Request,
    next: Next,
) -> Response {
    auth.admit(area, peer, request, next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Basic {value}")).unwrap());
        headers
    }

    #[tokio::test]
    async fn users_and_tokens_are_identified_and_a_verification_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, "alice:$2y$05$REhSfycUQ4.X1f6OChDt/.axc..E8YRgOBBfTduMfGo6/4.6Di.VW\n")
            .unwrap();
        let token_file = dir.path().join("tokens");
        std::fs::write(&token_file, "ci:0123456789abcdef-ci\n").unwrap();
        let config = AuthConfig {
            htpasswd: Some(htpasswd.clone()),
            token_file: Some(token_file),
            ..AuthConfig::default()
        };
        let auth = ClientAuth::load(&config).unwrap();
        let who = |headers: HeaderMap| auth.identify(Presented::of(&headers));
        assert_eq!(who(basic("alice", "secret-pass")).await, Ok(Some("alice".to_owned())));
        assert_eq!(who(basic("alice", "wrong")).await, Err(Failure::Wrong));
        assert_eq!(who(basic("ci", "0123456789abcdef-ci")).await, Ok(Some("ci".to_owned())));
        let mut bearer = HeaderMap::new();
        bearer.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer 0123456789abcdef-ci"));
        assert_eq!(who(bearer).await, Ok(Some("ci".to_owned())));
        assert_eq!(who(HeaderMap::new()).await, Ok(None));
        let mut garbage = HeaderMap::new();
        garbage.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(who(garbage).await, Err(Failure::Wrong));
        // Remembered: with the users gone (but no reload), the verified pair still passes, and
        // only it.
        let same_generation = Known { users: Arc::default(), tokens: Tokens::default(), generation: 0 };
        *auth.known.write().unwrap() = Arc::new(same_generation);
        assert_eq!(who(basic("alice", "secret-pass")).await, Ok(Some("alice".to_owned())));
        assert_eq!(who(basic("alice", "secret-pass2")).await, Err(Failure::Wrong));
        // A reload reads the files again and forgets what was verified: alice removed, bob added.
        std::fs::write(
            &htpasswd,
            format!("bob:{}\n", "$2y$05$REhSfycUQ4.X1f6OChDt/.axc..E8YRgOBBfTduMfGo6/4.6Di.VW"),
        )
        .unwrap();
        assert_eq!(auth.reload().unwrap(), (1, 1));
        assert_eq!(who(basic("alice", "secret-pass")).await, Err(Failure::Wrong));
        assert_eq!(who(basic("bob", "secret-pass")).await, Ok(Some("bob".to_owned())));
        // A bad file changes nothing.
        std::fs::write(&htpasswd, "bob:plain\n").unwrap();
        assert!(auth.reload().is_err());
        assert_eq!(who(basic("bob", "secret-pass")).await, Ok(Some("bob".to_owned())));
    }

    fn with_users(dir: &Path, entries: &str) -> ClientAuth {
        let htpasswd = dir.join("htpasswd");
        std::fs::write(&htpasswd, entries).unwrap();
        ClientAuth::load(&AuthConfig { htpasswd: Some(htpasswd), ..AuthConfig::default() }).unwrap()
    }

    #[tokio::test]
    async fn without_user_or_token_files_credentials_are_not_checked() {
        let auth = ClientAuth::load(&AuthConfig::default()).unwrap();
        assert_eq!(auth.identify(Presented::of(&basic("x", "y"))).await, Ok(None));
        assert_eq!(auth.verifying.available_permits(), CONCURRENT_VERIFICATIONS, "no bcrypt ran");
        let pass_through = AuthConfig { pass_through: true, ..AuthConfig::default() };
        assert!(!pass_through.enabled() && pass_through.any());
        let rules = ClientAuth::load(&pass_through).unwrap().rules;
        assert!(rules[&Area::Download].permits(None, false), "pass-through alone leaves downloads open");
    }

    #[tokio::test]
    async fn a_check_keeps_its_turn_until_bcrypt_is_done_even_if_the_client_hangs_up() {
        let dir = tempfile::tempdir().unwrap();
        let hash = bcrypt::hash("right", 12).unwrap();
        let auth = with_users(dir.path(), &format!("alice:{hash}\n"));
        let check = auth.identify(Presented::of(&basic("alice", "wrong")));
        // Dropped after its first steps: the check has its turn, and bcrypt runs on.
        assert!(tokio::time::timeout(Duration::from_millis(20), check).await.is_err());
        assert_eq!(auth.verifying.available_permits(), CONCURRENT_VERIFICATIONS - 1);
        let auth = &auth;
        poll_until(async || auth.verifying.available_permits() == CONCURRENT_VERIFICATIONS).await;
    }

    /// Poll `done` every few milliseconds for up to 30 s (this crate has no test kit).
    async fn poll_until(mut done: impl AsyncFnMut() -> bool) {
        let give_up = Instant::now() + Duration::from_secs(30);
        while !done().await {
            assert!(Instant::now() < give_up, "not done within 30 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn checks_that_cannot_get_a_turn_are_turned_away() {
        let dir = tempfile::tempdir().unwrap();
        let auth =
            with_users(dir.path(), "alice:$2y$05$REhSfycUQ4.X1f6OChDt/.axc..E8YRgOBBfTduMfGo6/4.6Di.VW\n");
        let _held = Arc::clone(&auth.verifying).acquire_many_owned(CONCURRENT_VERIFICATIONS as u32).await;
        let started = tokio::time::Instant::now();
        assert_eq!(auth.identify(Presented::of(&basic("alice", "secret-pass"))).await, Err(Failure::Busy));
        assert_eq!(started.elapsed(), VERIFY_WAIT);
    }

    #[tokio::test]
    async fn a_user_removed_while_their_check_waited_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let alice = "alice:$2y$05$REhSfycUQ4.X1f6OChDt/.axc..E8YRgOBBfTduMfGo6/4.6Di.VW\n";
        let auth = with_users(dir.path(), alice);
        let held = Arc::clone(&auth.verifying).acquire_many_owned(CONCURRENT_VERIFICATIONS as u32).await;
        let check = auth.identify(Presented::of(&basic("alice", "secret-pass")));
        tokio::pin!(check);
        // One step: the check has read the users and waits for a turn.
        assert!(tokio::time::timeout(Duration::ZERO, &mut check).await.is_err());
        std::fs::write(dir.path().join("htpasswd"), "").unwrap();
        auth.reload().unwrap();
        drop(held);
        assert_eq!(check.await, Err(Failure::Wrong));
    }
}
