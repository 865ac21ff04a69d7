//! How downloads are fetched: an HTTP client that stays on the allowlist and off private
//! networks.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::http::{StatusCode, header};
use futures_util::TryStreamExt as _;
use reqwest::header::{IF_MODIFIED_SINCE, IF_NONE_MATCH};

use crate::limits::{Busy, FillPermit};
use dunite_download::{FetchError, FetchRequest, Fetched, Fetcher, ResponseMeta, UrlKey};

/// An upstream answer that is not a body: relayed to the client with its status.
#[derive(Debug, thiserror::Error)]
#[error("upstream answered {0}")]
pub(super) struct UpstreamStatus(pub(super) StatusCode);

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
    /// Body bytes received, for `dunite_upstream_bytes_total`.
    upstream_bytes: Arc<std::sync::atomic::AtomicU64>,
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
        upstream_bytes: Arc<std::sync::atomic::AtomicU64>,
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
        Ok(Self { client, upstream_bytes })
    }
}

impl HttpFetcher {
    /// `GET url`, conditional on `validators` when given.
    pub(super) async fn get(
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
pub(super) fn meta_of(response: &reqwest::Response) -> ResponseMeta {
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
        self.fetch_holding(request, None).await
    }
}

/// The fetcher of one request's fill: [`HttpFetcher`], with the permit the request took
/// under the fill limits. It is used only if the fill is this request's own (a request that
/// joins a running fill never fetches), and then held until the body's last byte.
#[derive(Debug, Clone)]
pub(crate) struct LimitedFetch {
    inner: HttpFetcher,
    permit: Arc<std::sync::Mutex<Option<Result<FillPermit, Busy>>>>,
}

impl LimitedFetch {
    pub(crate) fn new(inner: &HttpFetcher, permit: Result<FillPermit, Busy>) -> Self {
        Self { inner: inner.clone(), permit: Arc::new(std::sync::Mutex::new(Some(permit))) }
    }
}

#[async_trait]
impl Fetcher for LimitedFetch {
    async fn fetch(&self, request: FetchRequest) -> Result<Fetched, FetchError> {
        let permit = self.permit.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let permit = permit.transpose().map_err(Box::new)?;
        self.inner.fetch_holding(request, permit).await
    }
}

impl HttpFetcher {
    /// Fetch `request`, holding `permit` (if any) until the body ends.
    async fn fetch_holding(
        &self,
        request: FetchRequest,
        permit: Option<FillPermit>,
    ) -> Result<Fetched, FetchError> {
        let response = self.get(request.url(), request.validators()).await?;
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Fetched::not_modified());
        }
        if !status.is_success() {
            return Err(Box::new(UpstreamStatus(status)));
        }
        let meta = meta_of(&response);
        let stream = crate::upstream::body(response, &self.upstream_bytes).map_err(std::io::Error::other);
        let reader = match permit {
            Some(permit) => {
                Box::pin(tokio_util::io::StreamReader::new(crate::limits::holding(stream, permit)))
                    as std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>
            }
            None => Box::pin(tokio_util::io::StreamReader::new(stream)),
        };
        Ok(Fetched::body(reader, meta))
    }
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
}
