//! Upstream registries: requests with token authentication.
//!
//! On a `401` carrying `WWW-Authenticate: Bearer realm=..,service=..,scope=..`, the client
//! asks the realm for a token (anonymously, or with the host's configured credentials),
//! caches it until it expires, and retries once. Tokens and passwords are never logged.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use crate::config::Credentials;

/// Tokens are dropped this long before their stated expiry, to absorb clock skew.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

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
/// names: over https, or, for an upstream the operator configured as plain http, to that
/// upstream's own host (a registry that issues its own tokens). Never in clear text to a host
/// the operator did not name, nor in clear text for an https upstream.
fn may_send_credentials(upstream: &url::Url, realm: &url::Url) -> bool {
    realm.scheme() == "https"
        || (realm.scheme() == "http"
            && upstream.scheme() == "http"
            && realm.host_str() == upstream.host_str())
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
    received: &std::sync::Arc<std::sync::atomic::AtomicU64>,
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
    /// A client for `upstreams` (host -> base URL), whose requests fail when an upstream goes
    /// silent for `timeout` (see [`http_client`]).
    ///
    /// # Errors
    ///
    /// If the HTTP client cannot be built (TLS set-up).
    pub fn new(
        upstreams: BTreeMap<String, url::Url>,
        credentials: BTreeMap<String, Credentials>,
        timeout: Duration,
    ) -> Result<Self, UpstreamError> {
        let http = http_client(timeout).build()?;
        Ok(Self { http, upstreams, credentials, tokens: Mutex::default() })
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
            || self
                .upstreams
                .get(host)
                .and_then(|u| u.host_str())
                .is_some_and(|h| h == "registry-1.docker.io");
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
        let mut request = self.http.get(url.clone());
        if let Some(credentials) = credentials {
            if self.upstreams.get(host).is_some_and(|upstream| may_send_credentials(upstream, &url)) {
                request = request.basic_auth(&credentials.username, Some(&credentials.password));
            } else {
                tracing::warn!(
                    host,
                    realm = %url.origin().ascii_serialization(),
                    "token realm would get the credentials in clear text; asking it without them"
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

    #[test]
    fn credentials_go_to_a_realm_only_over_https_or_to_a_plain_http_upstream_itself() {
        let url = |s: &str| url::Url::parse(s).unwrap();
        let hub = url("https://registry-1.docker.io");
        assert!(may_send_credentials(&hub, &url("https://auth.docker.io/token")));
        assert!(!may_send_credentials(&hub, &url("http://auth.docker.io/token")), "no downgrade");
        assert!(!may_send_credentials(&hub, &url("http://registry-1.docker.io/token")), "no downgrade");
        let local = url("http://127.0.0.1:5000");
        assert!(may_send_credentials(&local, &url("http://127.0.0.1:5001/token")));
        assert!(!may_send_credentials(&local, &url("http://169.254.169.254/token")));
        assert!(!may_send_credentials(&local, &url("http://localhost:5000/token")), "another host name");
        assert!(!may_send_credentials(&local, &url("ftp://127.0.0.1/token")));
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
        let mut upstreams = BTreeMap::new();
        upstreams.insert("docker.io".to_owned(), url::Url::parse("https://registry-1.docker.io").unwrap());
        upstreams.insert("local".to_owned(), url::Url::parse("http://127.0.0.1:1").unwrap());
        let r = Registries::new(upstreams, BTreeMap::new(), Duration::from_secs(1)).unwrap();
        assert_eq!(r.upstream_name("docker.io", "alpine"), "library/alpine");
        assert_eq!(r.upstream_name("docker.io", "me/app"), "me/app");
        assert_eq!(r.upstream_name("local", "alpine"), "alpine");
    }
}
