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
    // One metadata read: a fresh hit is served at once; anything else is a fill (which
    // revalidates a stale entry, or fetches), streamed.
    match app.downloads.lookup(&request).await {
        Ok(Lookup::Fresh(download)) => serve_hit(&app, *download).await,
        Ok(_) => stream_fill(&app, &request).await,
        Err(error) => failed(&app, &error),
    }
}

/// A fresh cached download.
async fn serve_hit(app: &App, download: dunite_download::Download) -> Response {
    app.metrics.download_hits.fetch_add(1, Ordering::Relaxed);
    let info = download.info().clone();
    let file = download.into_file().into_std().await;
    let mut response = Response::new(crate::body::file_body(file, 0, info.size(), &app.metrics.bytes_served));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size()));
    put_headers(headers, info.content_type(), info.validators(), Some(info.sha256()));
    response.extensions_mut().insert(CacheOutcome::Hit);
    response
}

/// A download with no fresh entry: one fill per URL and pin (revalidating a stale entry, or
/// fetching), streamed to every client as it arrives, verified against the pin before the
/// last byte. A failure ends every client's stream with an error; nothing is cached.
async fn stream_fill(app: &Arc<App>, request: &DownloadRequest) -> Response {
    let mut joined = match app.downloads.fill(request, &app.fetcher) {
        Ok(joined) => joined,
        Err(error) => return failed(app, &error),
    };
    let started = match joined.started().await {
        Ok(started) => started,
        Err(error) => return failed(app, &dunite_download::Error::from_fill(request.url(), error)),
    };
    let head = started.head();
    let outcome = match head.source() {
        Source::Hit => CacheOutcome::Hit,
        _ => CacheOutcome::Miss,
    };
    let counter =
        if outcome == CacheOutcome::Hit { &app.metrics.download_hits } else { &app.metrics.download_misses };
    counter.fetch_add(1, Ordering::Relaxed);
    let mut response = Response::new(Body::empty());
    let headers = response.headers_mut();
    if let Some(total) = started.total() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    }
    put_headers(headers, head.content_type(), head.validators(), head.sha256());
    *response.body_mut() =
        Body::from_stream(crate::metrics::metered(joined.body(0, None), &app.metrics.bytes_served));
    response.extensions_mut().insert(outcome);
    response
}

/// The headers a download is served with.
fn put_headers(
    headers: &mut axum::http::HeaderMap,
    content_type: Option<&str>,
    validators: &dunite_download::Validators,
    sha256: Option<&ContentDigest>,
) {
    let mut put = |name: header::HeaderName, value: Option<&str>| {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(name, value);
        }
    };
    put(header::CONTENT_TYPE, content_type.or(Some("application/octet-stream")));
    put(header::ETAG, validators.etag());
    put(header::LAST_MODIFIED, validators.last_modified());
    put(header::HeaderName::from_static("x-content-sha256"), sha256.map(ContentDigest::hex).as_deref());
}

/// A download that failed, as the client sees it: the one mapping of download errors to HTTP.
fn failed(app: &App, error: &dunite_download::Error) -> Response {
    use dunite_core::Error as Core;
    use dunite_download::Error as Dl;
    let status = match error {
        Dl::Fetch { source, .. } => match source.downcast_ref::<UpstreamStatus>() {
            Some(UpstreamStatus(StatusCode::NOT_FOUND)) => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_GATEWAY,
        },
        // What the upstream sent cannot be passed on: over the cap, cut, or not the pin.
        Dl::Cache(
            Core::TooLarge { .. }
            | Core::DigestMismatch { .. }
            | Core::Truncated { .. }
            | Core::TooLong { .. }
            | Core::Source { .. },
        ) => StatusCode::BAD_GATEWAY,
        Dl::Cache(e) if e.is_pool_timeout() => StatusCode::SERVICE_UNAVAILABLE,
        Dl::Cache(_) | Dl::Metadata(_) => StatusCode::INTERNAL_SERVER_ERROR,
        Dl::UnsupportedDigest { .. } | Dl::InvalidUrl(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    if status.is_server_error() {
        app.metrics.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %crate::error_chain(error), "download failed");
    }
    refuse(status, &crate::error_chain(error))
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
