//! The download proxy: `GET /dl/<url>` and `GET /dl/sha256:<hex>/<url>`.
//!
//! Only hosts on the allowlist (`--dl-allow`) are fetched, redirects that leave it are
//! refused, and nothing else is reachable: this is not an open proxy. An entry past its
//! freshness is revalidated with its ETag / Last-Modified.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt as _;
use reqwest::header::{IF_MODIFIED_SINCE, IF_NONE_MATCH};

use dunite_core::{ContentDigest, DigestAlgorithm};
use dunite_download::{
    DownloadRequest, FetchError, FetchRequest, Fetched, Fetcher, Lookup, ResponseMeta, Source, UrlKey,
};

use crate::app::{App, CacheOutcome};
use crate::fill::{FillState, fill_from_upstream};

/// An upstream answer that is not a body: relayed to the client with its status.
#[derive(Debug, thiserror::Error)]
#[error("upstream answered {0}")]
struct UpstreamStatus(StatusCode);

/// Whether the download proxy may reach private networks through allowlisted host names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrivateNetworks {
    /// Host names must resolve to public addresses (the default).
    Refused,
    /// Host names may resolve to loopback or private addresses.
    Allowed,
}

/// Fetches over HTTP(S) with reqwest, conditionally when given validators.
#[derive(Debug, Clone)]
pub(crate) struct HttpFetcher {
    client: reqwest::Client,
}

/// Resolves host names for the download proxy, refusing loopback, private, link-local and
/// other non-public addresses unless private networks are allowed. (A URL with a literal IP
/// never reaches the resolver: it must be on the allowlist itself, which is explicit.)
#[derive(Debug)]
struct PublicOnly {
    allow_private: bool,
}

/// Whether `ip` is an address the proxy may reach without explicit permission: a globally
/// routed unicast address. IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64,
/// 6to4) are judged by that address.
pub(crate) fn is_public(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 198 && (18..20).contains(&b)) // benchmarking
                || a >= 240) // reserved
        }
        std::net::IpAddr::V6(v6) => {
            let segments = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                let [h1, h2] = hi.to_be_bytes();
                let [l1, l2] = lo.to_be_bytes();
                std::net::IpAddr::V4(std::net::Ipv4Addr::new(h1, h2, l1, l2))
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(std::net::IpAddr::V4(v4));
            }
            // IPv4-compatible (::a.b.c.d, deprecated) and NAT64 (64:ff9b::/96).
            if segments[..6] == [0; 6] || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return !v6.is_loopback()
                    && !v6.is_unspecified()
                    && is_public(embedded(segments[6], segments[7]));
            }
            // 6to4 (2002:a.b.c.d::/48).
            if segments[0] == 0x2002 {
                return is_public(embedded(segments[1], segments[2]));
            }
            let first = segments[0];
            !(v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (first == 0x2001 && segments[1] == 0x0db8)) // documentation
        }
    }
}

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let usable: Vec<_> = addrs.into_iter().filter(|a| allow_private || is_public(a.ip())).collect();
            if usable.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address (private networks are not allowed)"
                )
                .into());
            }
            Ok(Box::new(usable.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl HttpFetcher {
    /// A client that follows redirects only within `allow` and, unless `private` allows it,
    /// reaches only public addresses through host names.
    pub(crate) fn new(
        allow: Vec<String>,
        private: PrivateNetworks,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let allow = Arc::new(allow);
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            let host = attempt.url().host_str().map(str::to_ascii_lowercase);
            if attempt.previous().len() >= 5 {
                attempt.error("too many redirects")
            } else if host.is_some_and(|h| allow.contains(&h)) {
                attempt.follow()
            } else {
                attempt.error("redirect to a host outside the download allowlist")
            }
        });
        let client = crate::upstream::http_client(timeout)
            // No proxy from the environment (HTTP_PROXY and such): a proxy would resolve the
            // host itself, past the public-only resolver below.
            .no_proxy()
            .redirect(policy)
            .dns_resolver(Arc::new(PublicOnly { allow_private: private == PrivateNetworks::Allowed }))
            .build()?;
        Ok(Self { client })
    }
}

impl HttpFetcher {
    /// `GET url`, conditional on `validators` when given.
    async fn get(
        &self,
        url: &UrlKey,
        validators: Option<&dunite_download::Validators>,
    ) -> reqwest::Result<reqwest::Response> {
        let mut get = self.client.get(url.as_str());
        if let Some(validators) = validators {
            if let Some(etag) = validators.etag() {
                get = get.header(IF_NONE_MATCH, etag);
            }
            if let Some(modified) = validators.last_modified() {
                get = get.header(IF_MODIFIED_SINCE, modified);
            }
        }
        get.send().await.map_err(crate::upstream::redact)
    }
}

/// What a download cache records of an upstream response.
fn meta_of(response: &reqwest::Response) -> ResponseMeta {
    let text = |name: header::HeaderName| {
        response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    };
    let mut meta = ResponseMeta::new();
    if let Some(v) = text(header::CONTENT_TYPE) {
        meta = meta.with_content_type(v);
    }
    if let Some(v) = text(header::ETAG) {
        meta = meta.with_etag(v);
    }
    if let Some(v) = text(header::LAST_MODIFIED) {
        meta = meta.with_last_modified(v);
    }
    if let Some(n) = response.content_length() {
        meta = meta.with_content_length(n);
    }
    meta
}

#[async_trait]
impl Fetcher for HttpFetcher {
    async fn fetch(&self, request: FetchRequest) -> Result<Fetched, FetchError> {
        let response = self.get(request.url(), request.validators()).await?;
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Fetched::not_modified());
        }
        if !status.is_success() {
            return Err(Box::new(UpstreamStatus(status)));
        }
        let meta = meta_of(&response);
        let stream = response.bytes_stream().map_err(|e| std::io::Error::other(crate::upstream::redact(e)));
        Ok(Fetched::body(tokio_util::io::StreamReader::new(stream), meta))
    }
}

/// Hands a fill's spool to the download cache as if it were the upstream's answer, so the
/// cache verifies and stores it the one way it stores anything.
#[derive(Debug, Clone)]
struct SpoolFetcher {
    spool: std::path::PathBuf,
    meta: ResponseMeta,
}

#[async_trait]
impl Fetcher for SpoolFetcher {
    async fn fetch(&self, _: FetchRequest) -> Result<Fetched, FetchError> {
        let file = tokio::fs::File::open(&self.spool).await?;
        Ok(Fetched::body(file, self.meta.clone()))
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, [("content-type", "text/plain")], format!("{message}\n")).into_response()
}

/// What `GET /dl/<rest>?<query>` asks for: a URL (with the query), its host as the allowlist
/// sees it, and an optional sha256 pin.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) url: UrlKey,
    /// Lower-case; the host the fetch connects to (the same parser reads both).
    pub(crate) host: String,
    pub(crate) pin: Option<ContentDigest>,
}

impl Target {
    /// Parse the path after `/dl/` and the query, both as sent (not percent-decoded). The message of an
    /// error is what the client is told (with a 400).
    pub(crate) fn parse(rest: &str, query: Option<&str>) -> Result<Self, String> {
        let (pin, target) = match rest.strip_prefix("sha256:").and_then(|r| r.split_once('/')) {
            Some((hex, url)) => {
                let digest =
                    hex::decode(hex).ok().and_then(|b| ContentDigest::from_bytes(DigestAlgorithm::Sha256, b));
                let Some(digest) = digest else {
                    return Err("the sha256 pin must be 64 hex characters".to_owned());
                };
                (Some(digest), url)
            }
            None => (None, rest),
        };
        let target = match query {
            Some(q) => format!("{target}?{q}"),
            None => target.to_owned(),
        };
        let url = UrlKey::parse(&target).map_err(|e| format!("not a download URL: {e}"))?;
        let parsed = url::Url::parse(url.as_str()).map_err(|e| format!("not a download URL: {e}"))?;
        // Credentials in the URL would be stored in the cache key, shown in logs, and the
        // entry they unlocked served to every client: refused.
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("credentials in a download URL are not accepted".to_owned());
        }
        let Some(host) = parsed.host_str().map(str::to_ascii_lowercase) else {
            return Err("a download URL needs a host".to_owned());
        };
        Ok(Self { url, host, pin })
    }
}

/// `GET /dl/<url>` or `GET /dl/sha256:<hex>/<url>`.
pub(crate) async fn download(State(app): State<Arc<App>>, uri: Uri, RawQuery(query): RawQuery) -> Response {
    // The path as sent, not percent-decoded: `%2F`, `%3F` or `%23` in the target URL belong
    // to it (`group%2Fproject` is one segment), so they are handed on as they came.
    let rest = uri.path().strip_prefix("/dl/").unwrap_or_default();
    let target = match Target::parse(rest, query.as_deref()) {
        Ok(target) => target,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, &message),
    };
    if !app.config.dl_allow.contains(&target.host) {
        return refuse(StatusCode::FORBIDDEN, "host is not on the download allowlist");
    }
    let Target { url, pin, .. } = target;
    let mut request = DownloadRequest::new(url);
    if let Some(pin) = pin {
        request = request.with_sha256(pin);
    }
    // One metadata read: a fresh hit is served at once, a miss streams from the upstream.
    let fresh = match app.downloads.lookup(&request).await {
        Ok(Lookup::Fresh(download)) => Some(*download),
        Ok(Lookup::Missing) => return stream_miss(&app, request).await,
        Ok(_) => None,
        Err(error) => {
            app.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, &crate::error_chain(&error));
        }
    };
    // Cached but stale or pinned differently: the cache revalidates or refetches.
    let fetched = match fresh {
        Some(download) => Ok(download),
        None => app.downloads.get_or_fetch(&request, &app.fetcher).await,
    };
    let download = match fetched {
        Ok(download) => download,
        Err(error) => {
            let upstream = match &error {
                dunite_download::Error::Fetch { source, .. } => source.downcast_ref::<UpstreamStatus>(),
                _ => None,
            };
            let status = upstream.map(|s| {
                if s.0 == StatusCode::NOT_FOUND { StatusCode::NOT_FOUND } else { StatusCode::BAD_GATEWAY }
            });
            let status = status.unwrap_or(match &error {
                dunite_download::Error::Cache(dunite_core::Error::DigestMismatch { .. }) => {
                    StatusCode::BAD_GATEWAY
                }
                dunite_download::Error::Cache(dunite_core::Error::TooLarge { .. }) => {
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                dunite_download::Error::Cache(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_GATEWAY,
            });
            if status.is_server_error() {
                app.metrics.errors.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(%error, "download failed");
            return refuse(status, &error.to_string());
        }
    };
    let outcome = match download.source() {
        Source::Hit => CacheOutcome::Hit,
        _ => CacheOutcome::Miss,
    };
    let counter =
        if outcome == CacheOutcome::Hit { &app.metrics.download_hits } else { &app.metrics.download_misses };
    counter.fetch_add(1, Ordering::Relaxed);
    let info = download.info().clone();
    let file = download.into_file().into_std().await;
    let mut response = Response::new(crate::body::file_body(file, 0, info.size(), &app.metrics.bytes_served));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size()));
    let put = |headers: &mut axum::http::HeaderMap, name: header::HeaderName, value: Option<&str>| {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(name, value);
        }
    };
    put(headers, header::CONTENT_TYPE, info.content_type().or(Some("application/octet-stream")));
    put(headers, header::ETAG, info.etag());
    put(headers, header::LAST_MODIFIED, info.last_modified());
    put(headers, header::HeaderName::from_static("x-content-sha256"), Some(&info.sha256().hex()));
    response.extensions_mut().insert(outcome);
    response
}

/// A download with no cached entry: one upstream transfer per URL (and pin), streamed to every
/// client as it arrives, stored (and verified against the pin) when complete. A failure ends
/// every client's stream with an error; nothing is cached.
async fn stream_miss(app: &Arc<App>, request: DownloadRequest) -> Response {
    app.metrics.download_misses.fetch_add(1, Ordering::Relaxed);
    let key = format!("{}|{}", request.sha256().map(ContentDigest::hex).unwrap_or_default(), request.url());
    let fill_app = Arc::clone(app);
    let joined = app.dl_fills.join(&key, &app.spool_dir, move |spool, state| async move {
        let app = fill_app;
        let answer = app.fetcher.get(request.url(), None).await;
        let downloads = app.downloads.clone();
        let upstream_bytes = Arc::clone(&app.metrics.upstream_bytes);
        let limit = downloads.entries().entries().max_bytes();
        fill_from_upstream(answer, (spool, state, limit), upstream_bytes, |response| {
            let meta = meta_of(response);
            let content_type = meta.content_type().map(Arc::from);
            let store = |spool, _written| async move {
                let fetcher = SpoolFetcher { spool, meta };
                downloads.get_or_fetch(&request, &fetcher).await.map(drop).map_err(|e| crate::error_chain(&e))
            };
            (content_type, store)
        })
        .await;
    });
    let mut subscription = match joined {
        Ok(subscription) => subscription,
        Err(e) => {
            app.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
        }
    };
    let (total, content_type) = match subscription.started().await {
        FillState::Failed { status: Some(404), .. } => {
            return refuse(StatusCode::NOT_FOUND, "upstream answered 404");
        }
        FillState::Failed { message, .. } => return refuse(StatusCode::BAD_GATEWAY, &message),
        FillState::Streaming { total, content_type, .. } => (total, content_type),
        FillState::Done { written } => (Some(written), None),
        FillState::Connecting => (None, None),
    };
    let stream = crate::metrics::metered(subscription.into_stream(), &app.metrics.bytes_served);
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    if let Some(total) = total {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    }
    let content_type = content_type.as_deref().and_then(|v| HeaderValue::from_str(v).ok());
    headers.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    response.extensions_mut().insert(CacheOutcome::Miss);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "2002:c0a8:0101::1",
            "2002:7f00:1::",
            "fec0::1",
            "2001:db8::1",
            "198.18.0.1",
            "192.0.0.8",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in
            ["93.184.216.34", "1.1.1.1", "2606:4700::1111", "64:ff9b::5db8:d822", "2002:5db8:d822::1"]
        {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn targets_carry_the_query_and_pin_and_refuse_credentials() {
        let hex = "ab".repeat(32);
        let target =
            Target::parse(&format!("sha256:{hex}/https://Files.Example/a/../f"), Some("v=1")).unwrap();
        assert_eq!(target.url.as_str(), "https://files.example/f?v=1");
        assert_eq!(target.host, "files.example");
        assert_eq!(target.pin.map(|p| p.hex()), Some(hex));
        for refused in ["http://user:secret@h.example/f", "http://user@h.example/f", "http://:pw@h.example/f"]
        {
            let message = Target::parse(refused, None).unwrap_err();
            assert!(message.contains("credentials"), "{refused}: {message}");
            assert!(!message.contains("secret"), "the message repeats the password: {message}");
        }
        assert!(Target::parse("sha256:abc/https://h.example/f", None).unwrap_err().contains("pin"));
        assert!(Target::parse("file:///etc/passwd", None).is_err());
    }
}
