//! Upstream registries: requests with token authentication.
//!
//! On a `401` carrying `WWW-Authenticate: Bearer realm=..,service=..,scope=..`, the client
//! asks the realm for a token (anonymously, or with the host's configured credentials),
//! caches it until it expires, and retries once. Tokens and passwords are never logged.
//!
//! An upstream chooses where the client goes next (a redirect, a token realm), so those
//! destinations are checked (`Destinations`): off loopback, private and link-local
//! addresses unless they are the upstream's own host and port, or the operator allowed it
//! (`--upstream-allow-private`). Credentials go only to a realm on the upstream's own host or
//! to an https realm the config names (`may_send_credentials`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use crate::config::{Config, Credentials};
use crate::net::{PrivateNetworks, PublicOnly, is_public};

/// Tokens are dropped this long before their stated expiry, to absorb clock skew.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

/// The most redirects followed for one request: Docker Hub and GHCR send blobs to a CDN in
/// one hop.
const MAX_REDIRECTS: usize = 5;

/// Docker Hub's registry host, as an upstream URL names it.
const DOCKER_HUB: &str = "registry-1.docker.io";

/// Docker Hub's token service: the realm its challenges name, so the default `realms` of an
/// upstream on `DOCKER_HUB`.
const DOCKER_HUB_AUTH: &str = "https://auth.docker.io";

/// The HTTP client set-up every upstream request shares: dunite's user agent, and `timeout`
/// both to connect and between two reads of an answer, so a stalled upstream fails its
/// request (and the fill every client of it joined) instead of holding it forever.
pub fn http_client(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("dunite/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(timeout)
        .read_timeout(timeout)
}

/// The most tokens kept: scopes name repositories, which clients choose.
const MAX_TOKENS: usize = 4096;

/// Cache a token until `expires`, first dropping expired ones and, at [`MAX_TOKENS`], the one
/// that expires soonest: the cache stays bounded however many repositories clients ask for.
fn remember_token(
    tokens: &mut HashMap<(String, String), (String, Instant)>,
    key: (String, String),
    token: String,
    expires: Instant,
) {
    let now = Instant::now();
    tokens.retain(|_, (_, until)| *until > now);
    if tokens.len() >= MAX_TOKENS
        && let Some(soonest) = tokens.iter().min_by_key(|(_, (_, until))| *until).map(|(k, _)| k.clone())
    {
        tokens.remove(&soonest);
    }
    tokens.insert(key, (token, expires));
}

/// Whether the configured credentials of `upstream` may go to the token `realm` its challenge
/// names: "credentials go only to a realm on the upstream's own host, or to an https realm
/// named in the config". On the upstream's own host (any port: a registry that issues its
/// own tokens), over https for an https upstream (no downgrade), over either scheme for an
/// upstream the operator configured as plain http; anywhere else only an https realm whose
/// origin is in `named` (the host's `realms`). A challenge is whatever the upstream, or
/// anyone on the path to a plain-http upstream, says: it must not be able to send the
/// credentials to a host of its choosing.
fn may_send_credentials(upstream: &url::Url, realm: &url::Url, named: &[url::Origin]) -> bool {
    let own_host = realm.host().is_some() && realm.host() == upstream.host();
    let own = own_host
        && match upstream.scheme() {
            "https" => realm.scheme() == "https",
            "http" => matches!(realm.scheme(), "http" | "https"),
            _ => false,
        };
    own || (realm.scheme() == "https" && named.contains(&realm.origin()))
}

/// The https realms besides `upstream`'s own host that `credentials` may go to: the
/// configured `realms`, or, when none are given, Docker Hub's token service for Docker Hub
/// (whose challenges name `https://auth.docker.io`) and nothing for any other upstream.
fn named_realms(upstream: &url::Url, credentials: &Credentials) -> Vec<url::Origin> {
    match &credentials.realms {
        Some(realms) => realms.iter().map(|r| r.origin().clone()).collect(),
        None if upstream.host_str() == Some(DOCKER_HUB) => {
            url::Url::parse(DOCKER_HUB_AUTH).map(|u| u.origin()).into_iter().collect()
        }
        None => Vec::new(),
    }
}

/// Where the registry client may be sent by what an upstream answers (a redirect's
/// `Location`, a challenge's realm): anywhere public, each configured upstream's own host and
/// port, and, only with `--upstream-allow-private`, any other address.
///
/// An IP literal is judged here; a host name is judged when it is resolved (`PublicOnly`,
/// which lets the configured upstreams' names resolve to any address, since the operator
/// named them). So a name of a configured upstream on another port is refused here: the
/// resolver would let it reach a private address (`localhost:6379` behind an upstream on
/// `localhost:5000`).
#[derive(Debug, Clone)]
struct Destinations {
    /// Each configured upstream's host and port (its scheme's default if the URL has none).
    own: Vec<(url::Host<String>, u16)>,
    private: PrivateNetworks,
}

impl Destinations {
    fn new<'a>(upstreams: impl IntoIterator<Item = &'a url::Url>, private: PrivateNetworks) -> Self {
        let own = upstreams
            .into_iter()
            .filter_map(|u| Some((u.host()?.to_owned(), u.port_or_known_default()?)))
            .collect();
        Self { own, private }
    }

    /// The configured upstreams' host names (not IP literals), for the resolver to trust.
    fn names(&self) -> impl Iterator<Item = String> + '_ {
        self.own.iter().filter_map(|(host, _)| match host {
            url::Host::Domain(name) => Some(name.clone()),
            url::Host::Ipv4(_) | url::Host::Ipv6(_) => None,
        })
    }

    /// Why the client may not go to `url`, or `None` if it may.
    fn refusal(&self, url: &url::Url) -> Option<&'static str> {
        if !matches!(url.scheme(), "http" | "https") {
            return Some("not http or https");
        }
        if self.private == PrivateNetworks::Allowed {
            return None;
        }
        let (Some(host), Some(port)) = (url.host(), url.port_or_known_default()) else {
            return Some("no host");
        };
        let host = host.to_owned();
        if self.own.iter().any(|(h, p)| *h == host && *p == port) {
            return None;
        }
        let private = "a non-public address other than the upstream's own host and port";
        match host {
            url::Host::Ipv4(ip) => (!is_public(ip.into())).then_some(private),
            url::Host::Ipv6(ip) => (!is_public(ip.into())).then_some(private),
            url::Host::Domain(_) => self
                .own
                .iter()
                .any(|(h, _)| *h == host)
                .then_some("another port of an upstream's host name, which may be private"),
        }
    }
}

/// The largest token endpoint answer read (Docker Hub's are a few KiB).
const MAX_TOKEN_ANSWER: usize = 256 << 10;

/// Read a response's body whole, or `None` if it is over `limit` bytes: refused from its
/// `Content-Length` before any byte is read, else as soon as the bytes pass the limit, so an
/// upstream that sends no length (or lies) costs at most `limit` and one chunk of memory.
///
/// # Errors
///
/// The body's transport error, redacted.
pub(crate) async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Option<bytes::Bytes>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Ok(None);
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(redact)? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

/// A client for the configured upstream registries.
#[derive(Debug)]
pub struct Registries {
    http: reqwest::Client,
    upstreams: BTreeMap<String, url::Url>,
    credentials: BTreeMap<String, Credentials>,
    /// Per host with credentials, the https realms beyond its own host they may go to.
    realms: BTreeMap<String, Vec<url::Origin>>,
    destinations: Destinations,
    tokens: Mutex<HashMap<(String, String), (String, Instant)>>,
}

/// Why an upstream request failed before an answer could be relayed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No upstream is configured for the registry host.
    #[error("no upstream configured for registry {0:?}")]
    UnknownRegistry(String),
    /// The request or the token exchange failed (its URL redacted: no query, no credentials).
    #[error("upstream request failed: {0}")]
    Http(#[source] reqwest::Error),
    /// The token endpoint's answer was unusable.
    #[error("upstream token exchange failed: {0}")]
    Token(String),
    /// The token endpoint refused the credentials (`401` or `403`).
    #[error("the upstream token endpoint refused the credentials ({0})")]
    TokenRefused(StatusCode),
    /// The upstream named a destination the client may not go to (see `Destinations`).
    #[error("upstream named a destination the mirror refuses: {0}")]
    Refused(String),
}

impl UpstreamError {
    /// Whether the upstream did not answer in time.
    pub(crate) fn is_timeout(&self) -> bool {
        matches!(self, Self::Http(e) if e.is_timeout())
    }
}

impl From<reqwest::Error> for UpstreamError {
    fn from(error: reqwest::Error) -> Self {
        Self::Http(redact(error))
    }
}

/// `error` with its URL as [`UrlKey::redacted`](dunite_download::UrlKey::redacted) shows it:
/// no query, no credentials (or no URL at all, if it cannot be read as one). Upstreams
/// redirect blobs to pre-signed URLs (a signature in the query) and download URLs may carry
/// tokens: neither may reach a log line or a client's error message. Every reqwest error that
/// can be shown goes through here.
/// An upstream's body as a fill reads it: its URL redacted from errors, its bytes counted
/// into `received` (`dunite_upstream_bytes_total`). One for registries and download hosts.
pub(crate) fn body(
    response: reqwest::Response,
    received: &crate::metrics::ByteMeter,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send + 'static + use<> {
    use futures_util::TryStreamExt as _;
    crate::metrics::metered(response.bytes_stream().map_err(redact), received)
}

pub(crate) fn redact(mut error: reqwest::Error) -> reqwest::Error {
    let redacted = error
        .url()
        .and_then(|url| dunite_download::UrlKey::parse(url.as_str()).ok())
        .and_then(|key| url::Url::parse(&key.redacted()).ok());
    match (error.url_mut(), redacted) {
        (Some(url), Some(redacted)) => *url = redacted,
        (Some(_), None) => return error.without_url(),
        (None, _) => {}
    }
    error
}

#[derive(Deserialize)]
struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl Registries {
    /// A client for `config`'s upstreams (host -> base URL) with its credentials, whose
    /// requests fail when an upstream goes silent for `upstream_timeout` (see
    /// [`http_client`]). It follows up to 5 redirects, each to a destination `Destinations`
    /// accepts (`upstream_allow_private` lifts the address check).
    ///
    /// # Errors
    ///
    /// If the HTTP client cannot be built (TLS set-up).
    pub fn new(config: &Config) -> Result<Self, UpstreamError> {
        let private = PrivateNetworks::allowed_if(config.upstream_allow_private);
        let destinations = Destinations::new(config.upstreams.values(), private);
        let checked = Arc::new(destinations.clone());
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error("too many redirects");
            }
            match checked.refusal(attempt.url()) {
                Some(why) => attempt.error(format!("redirect refused: {why}")),
                None => attempt.follow(),
            }
        });
        let http = http_client(config.upstream_timeout)
            // No proxy from the environment (HTTPS_PROXY and such): a proxy would resolve the
            // host itself, past the resolver's check.
            .no_proxy()
            .redirect(policy)
            .dns_resolver(Arc::new(PublicOnly::new(private).trusting(destinations.names())))
            .build()?;
        let realms = config
            .credentials
            .iter()
            .filter_map(|(host, c)| Some((host.clone(), named_realms(config.upstreams.get(host)?, c))))
            .collect();
        Ok(Self {
            http,
            upstreams: config.upstreams.clone(),
            credentials: config.credentials.clone(),
            realms,
            destinations,
            tokens: Mutex::default(),
        })
    }

    /// Whether `host` has an upstream.
    #[must_use]
    pub fn knows(&self, host: &str) -> bool {
        self.upstreams.contains_key(host)
    }

    /// The repository name as `host` expects it: Docker Hub keeps single-component names
    /// under `library/`.
    #[must_use]
    pub fn upstream_name(&self, host: &str, name: &str) -> String {
        let hub = host == "docker.io"
            || self.upstreams.get(host).and_then(|u| u.host_str()).is_some_and(|h| h == DOCKER_HUB);
        if hub && !name.contains('/') { format!("library/{name}") } else { name.to_owned() }
    }

    /// Send `method` to `<upstream of host>/v2/<path>` with `accept`, authenticating for
    /// pulls of `name` when challenged.
    ///
    /// # Errors
    ///
    /// [`UpstreamError`] if the registry is unknown or the request fails outright; HTTP error
    /// statuses are returned as responses.
    pub async fn send(
        &self,
        host: &str,
        name: &str,
        method: Method,
        path: &str,
        accept: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let base = self.upstreams.get(host).ok_or_else(|| UpstreamError::UnknownRegistry(host.to_owned()))?;
        let url = base.join(&format!("/v2/{path}")).map_err(|e| UpstreamError::Token(e.to_string()))?;
        let scope = format!("repository:{name}:pull");
        let key = (host.to_owned(), scope.clone());
        let build = |token: Option<&str>| {
            let mut request = self.http.request(method.clone(), url.clone());
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept.clone());
            }
            if let Some(token) = token {
                request = request.header(AUTHORIZATION, format!("Bearer {token}"));
            }
            request
        };
        let cached = self.cached_token(&key);
        let response = build(cached.as_deref()).send().await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let Some(challenge) = bearer_challenge(response.headers()) else { return Ok(response) };
        let token = self.fetch_token(host, &challenge, &scope, self.credentials.get(host)).await?;
        let answer = build(Some(&token.0)).send().await?;
        let mut tokens = self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        remember_token(&mut tokens, key, token.0, Instant::now() + token.1);
        Ok(answer)
    }

    fn cached_token(&self, key: &(String, String)) -> Option<String> {
        let mut tokens = self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match tokens.get(key) {
            Some((token, expires)) if *expires > Instant::now() => Some(token.clone()),
            Some(_) => {
                tokens.remove(key);
                None
            }
            None => None,
        }
    }

    /// Whether `login` (a client's own upstream credentials, or none) may pull `name` from
    /// `host`'s upstream: the upstream is asked for the repository's tag list (one tag), as
    /// the client would ask, answering a token challenge with `login`. A success is yes; a
    /// refusal (`401`, `403`, `404`, or a token endpoint refusing `login`) is no.
    ///
    /// # Errors
    ///
    /// [`UpstreamError`] if the upstream cannot be asked (unreachable, or an answer that is
    /// neither a success nor a refusal): access is then not granted.
    pub async fn may_pull(
        &self,
        host: &str,
        name: &str,
        login: Option<&Credentials>,
    ) -> Result<bool, UpstreamError> {
        let base = self.upstreams.get(host).ok_or_else(|| UpstreamError::UnknownRegistry(host.to_owned()))?;
        let url = base
            .join(&format!("/v2/{name}/tags/list?n=1"))
            .map_err(|e| UpstreamError::Token(e.to_string()))?;
        let answer = self.http.get(url.clone()).send().await?;
        let answer = match (answer.status(), bearer_challenge(answer.headers())) {
            (StatusCode::UNAUTHORIZED, Some(challenge)) => {
                let scope = format!("repository:{name}:pull");
                let token = match self.fetch_token(host, &challenge, &scope, login).await {
                    Ok((token, _)) => token,
                    Err(UpstreamError::TokenRefused(_)) => return Ok(false),
                    Err(error) => return Err(error),
                };
                self.http.get(url).bearer_auth(token).send().await?
            }
            (StatusCode::UNAUTHORIZED, None) => match login {
                // The upstream's own URL: the client gave these credentials for it.
                Some(login) => {
                    self.http.get(url).basic_auth(&login.username, Some(&login.password)).send().await?
                }
                None => answer,
            },
            _ => answer,
        };
        match answer.status() {
            status if status.is_success() => Ok(true),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => Ok(false),
            status => Err(UpstreamError::Token(format!("the upstream answered {status} to an access check"))),
        }
    }

    async fn fetch_token(
        &self,
        host: &str,
        challenge: &BTreeMap<String, String>,
        scope: &str,
        credentials: Option<&Credentials>,
    ) -> Result<(String, Duration), UpstreamError> {
        let realm =
            challenge.get("realm").ok_or_else(|| UpstreamError::Token("challenge without realm".into()))?;
        let mut url = url::Url::parse(realm).map_err(|e| UpstreamError::Token(format!("bad realm: {e}")))?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = challenge.get("service") {
                query.append_pair("service", service);
            }
            query.append_pair("scope", challenge.get("scope").map_or(scope, String::as_str));
        }
        let realm_origin = url.origin().ascii_serialization();
        if let Some(why) = self.destinations.refusal(&url) {
            return Err(UpstreamError::Refused(format!("token realm {realm_origin}: {why}")));
        }
        let mut request = self.http.get(url.clone());
        if let Some(credentials) = credentials {
            let named = self.realms.get(host).map_or(&[][..], Vec::as_slice);
            if self.upstreams.get(host).is_some_and(|upstream| may_send_credentials(upstream, &url, named)) {
                request = request.basic_auth(&credentials.username, Some(&credentials.password));
            } else {
                tracing::warn!(
                    host,
                    realm = %realm_origin,
                    "token realm is neither on the upstream's own host nor in its `realms`; \
                     asking it without the credentials"
                );
            }
        }
        let response = request.send().await?;
        if matches!(response.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Err(UpstreamError::TokenRefused(response.status()));
        }
        if !response.status().is_success() {
            return Err(UpstreamError::Token(format!("token endpoint answered {}", response.status())));
        }
        let body = read_limited(response, MAX_TOKEN_ANSWER)
            .await?
            .ok_or_else(|| UpstreamError::Token(format!("token answer over {MAX_TOKEN_ANSWER} bytes")))?;
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| UpstreamError::Token(format!("bad token answer: {e}")))?;
        let token =
            answer.token.or(answer.access_token).ok_or_else(|| UpstreamError::Token("no token".into()))?;
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(60)).saturating_sub(EXPIRY_MARGIN);
        tracing::debug!(host, scope, lifetime_s = lifetime.as_secs(), "obtained upstream token");
        Ok((token, lifetime))
    }
}

/// The parameters of a `WWW-Authenticate: Bearer k="v",...` challenge.
pub(crate) fn bearer_challenge(headers: &HeaderMap) -> Option<BTreeMap<String, String>> {
    let value = headers.get(WWW_AUTHENTICATE)?.to_str().ok()?;
    let rest = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
    let mut params = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let value: String = if chars.peek() == Some(&'"') {
            chars.next();
            let mut v = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => v.extend(chars.next()),
                    c => v.push(c),
                }
            }
            v
        } else {
            chars.by_ref().take_while(|c| *c != ',').collect()
        };
        params.insert(key.trim().to_ascii_lowercase(), value);
    }
    Some(params)
}

/// A request that timed out, as the upstream clients report one: to a loopback listener that
/// accepts and never answers, with a 50 ms read timeout.
#[cfg(test)]
pub(crate) async fn timed_out() -> reqwest::Error {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let url = format!("http://{}/", listener.local_addr().expect("bound"));
    let silent = tokio::spawn(async move {
        let _held = listener.accept().await;
        std::future::pending::<()>().await;
    });
    let client = http_client(Duration::from_millis(50)).build().expect("a client");
    let error = client.get(url).send().await.expect_err("nothing answers");
    silent.abort();
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_bearer_challenge() {
        let mut headers = HeaderMap::new();
        headers.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
            ),
        );
        let c = bearer_challenge(&headers).unwrap();
        assert_eq!(c["realm"], "https://auth.example/token");
        assert_eq!(c["service"], "registry.example");
        assert_eq!(c["scope"], "repository:a/b:pull");
        headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=x"));
        assert!(bearer_challenge(&headers).is_none());
    }

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn credentials_go_only_to_the_upstreams_own_host_or_to_an_https_realm_the_config_names() {
        let auth = [url("https://auth.docker.io").origin()];
        let hub = url("https://registry-1.docker.io");
        assert!(may_send_credentials(&hub, &url("https://auth.docker.io/token"), &auth));
        assert!(!may_send_credentials(&hub, &url("https://auth.docker.io/token"), &[]), "not named");
        assert!(!may_send_credentials(&hub, &url("http://auth.docker.io/token"), &auth), "no downgrade");
        assert!(!may_send_credentials(&hub, &url("https://auth.docker.io:8443/token"), &auth), "origin");
        assert!(may_send_credentials(&hub, &url("https://registry-1.docker.io/token"), &[]), "own host");
        assert!(!may_send_credentials(&hub, &url("http://registry-1.docker.io/token"), &[]), "no downgrade");
        let local = url("http://127.0.0.1:5000");
        assert!(may_send_credentials(&local, &url("http://127.0.0.1:5001/token"), &[]));
        assert!(may_send_credentials(&local, &url("https://127.0.0.1/token"), &[]));
        assert!(!may_send_credentials(&local, &url("http://169.254.169.254/token"), &[]));
        assert!(!may_send_credentials(&local, &url("http://localhost:5000/token"), &[]), "another host name");
        assert!(!may_send_credentials(&local, &url("ftp://127.0.0.1/token"), &[]));
        assert!(!may_send_credentials(&local, &url("http://auth.docker.io/token"), &auth), "https only");
        assert!(may_send_credentials(&local, &url("https://auth.docker.io/token"), &auth));
    }

    #[test]
    fn credentials_never_go_to_an_https_realm_on_another_host_the_config_does_not_name() {
        let local = url("http://127.0.0.1:5000");
        assert!(!may_send_credentials(&local, &url("https://evil.example/token"), &[]));
        let ghcr = url("https://ghcr.io");
        assert!(!may_send_credentials(&ghcr, &url("https://auth.attacker.example/token"), &[]));
    }

    #[test]
    fn docker_hub_credentials_go_to_its_token_service_by_default_and_no_one_elses() {
        let credentials = |realms: Option<&str>| Credentials {
            username: "u".into(),
            password: "p".into(),
            realms: realms.map(|r| vec![r.parse().unwrap()]),
        };
        let auth = url("https://auth.docker.io").origin();
        assert_eq!(named_realms(&url("https://registry-1.docker.io"), &credentials(None)), [auth]);
        assert!(named_realms(&url("https://ghcr.io"), &credentials(None)).is_empty());
        let other = url("https://auth.example").origin();
        let named =
            named_realms(&url("https://registry-1.docker.io"), &credentials(Some("https://auth.example")));
        assert_eq!(named, [other], "configured realms replace the default");
    }

    #[test]
    fn upstreams_send_the_client_only_to_public_addresses_or_to_themselves() {
        let upstreams = [url("http://127.0.0.1:5000"), url("http://localhost:5001"), url("https://ghcr.io")];
        let strict = Destinations::new(&upstreams, PrivateNetworks::Refused);
        for fine in [
            "http://127.0.0.1:5000/v2/x",
            "http://localhost:5001/token",
            "https://ghcr.io/token",
            "https://pkg-containers.githubusercontent.com/blob",
            "https://93.184.216.34/blob",
        ] {
            assert_eq!(strict.refusal(&url(fine)), None, "{fine}");
        }
        for refused in [
            "http://127.0.0.1:5001/",
            "http://127.0.0.2:5000/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:5000/",
            "http://10.0.0.1/",
            "http://localhost:6379/",
            "http://ghcr.io/token",
            "ftp://93.184.216.34/",
        ] {
            assert!(strict.refusal(&url(refused)).is_some(), "{refused}");
        }
        assert_eq!(strict.names().collect::<Vec<_>>(), ["localhost", "ghcr.io"]);
        let open = Destinations::new(&upstreams, PrivateNetworks::Allowed);
        assert_eq!(open.refusal(&url("http://169.254.169.254/")), None);
        assert!(open.refusal(&url("ftp://127.0.0.1/")).is_some());
    }

    #[test]
    fn the_token_cache_stays_bounded_and_drops_expired_tokens() {
        let mut tokens = HashMap::new();
        let later = Instant::now() + Duration::from_secs(300);
        for i in 0..MAX_TOKENS + 100 {
            let key = ("h".to_owned(), format!("repository:n{i}:pull"));
            remember_token(&mut tokens, key, format!("t{i}"), later + Duration::from_millis(i as u64));
        }
        assert_eq!(tokens.len(), MAX_TOKENS);
        // The ones dropped were those expiring soonest: the first ones in.
        assert!(!tokens.contains_key(&("h".to_owned(), "repository:n0:pull".to_owned())));
        assert!(tokens.contains_key(&("h".to_owned(), format!("repository:n{}:pull", MAX_TOKENS + 99))));
        let past = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        for (_, until) in tokens.values_mut() {
            *until = past;
        }
        remember_token(&mut tokens, ("h".to_owned(), "x".to_owned()), "t".to_owned(), later);
        assert_eq!(tokens.len(), 1, "expired tokens are dropped on insert");
    }

    #[test]
    fn docker_hub_names_get_library() {
        let mut config = Config::new(std::path::PathBuf::new());
        config.upstreams.insert("docker.io".to_owned(), url("https://registry-1.docker.io"));
        config.upstreams.insert("local".to_owned(), url("http://127.0.0.1:1"));
        let r = Registries::new(&config).unwrap();
        assert_eq!(r.upstream_name("docker.io", "alpine"), "library/alpine");
        assert_eq!(r.upstream_name("docker.io", "me/app"), "me/app");
        assert_eq!(r.upstream_name("local", "alpine"), "alpine");
    }
}
