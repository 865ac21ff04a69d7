//! The label values of the request and upstream series: each a small closed set, so a
//! series' cardinality is bounded whatever clients send (never a raw path or a host).

use axum::http::StatusCode;

use super::CacheOutcome;

/// What a request asked for, by the first segments of its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Route {
    /// `/v2/<name>/blobs/<digest>`.
    Blob,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest,
    /// `/dl/...`.
    Download,
    /// `/metrics`.
    Metrics,
    /// Anything else (`/v2/`, `/healthz`, other endpoints, unknown paths).
    /// `GET /v2/<name>/tags/list` and `/v2/<name>/referrers/<digest>`.
    Listing,
    Other,
}

impl Route {
    /// The route of a request for `path`.
    pub(crate) fn of(path: &str) -> Self {
        if path == "/metrics" {
            return Self::Metrics;
        }
        if path.starts_with("/dl/") {
            return Self::Download;
        }
        // `/v2/<name>/<kind>/<reference>`, where `<name>` has slashes of its own: the kind is
        // the second segment from the end, as the mirror's dispatcher reads it.
        let Some(rest) = path.strip_prefix("/v2/") else { return Self::Other };
        match rest.rsplit('/').nth(1) {
            Some("blobs") => Self::Blob,
            Some("manifests") => Self::Manifest,
            Some("tags" | "referrers") => Self::Listing,
            _ => Self::Other,
        }
    }

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Blob => "blob",
            Self::Manifest => "manifest",
            Self::Listing => "listing",
            Self::Download => "download",
            Self::Metrics => "metrics",
            Self::Other => "other",
        }
    }
}

/// How a request ended: its cache outcome if it has one, else its status class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Outcome {
    /// Served from the cache.
    Hit,
    /// Served from the upstream (and cached).
    Miss,
    /// Served stale from the cache while the upstream was down.
    Stale,
    /// Answered with a server error (5xx).
    Error,
    /// Answered `429`: a fill limit was reached.
    Refused,
    /// Answered with another client error (4xx: not found, unauthorised, bad request).
    ClientError,
    /// Any other answer without a cache outcome (`/v2/`, `/metrics`, `/healthz`, a `304`).
    Other,
}

impl Outcome {
    /// The outcome of a request answered `status`, with the cache outcome its handler
    /// recorded (if any). A server error wins over a cache outcome.
    pub(crate) fn of(status: StatusCode, cache: Option<CacheOutcome>) -> Self {
        if status.is_server_error() {
            return Self::Error;
        }
        match cache {
            Some(CacheOutcome::Hit) => Self::Hit,
            Some(CacheOutcome::Miss) => Self::Miss,
            Some(CacheOutcome::Stale) => Self::Stale,
            None if status == StatusCode::TOO_MANY_REQUESTS => Self::Refused,
            None if status.is_client_error() => Self::ClientError,
            None => Self::Other,
        }
    }

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Stale => "stale",
            Self::Error => "error",
            Self::Refused => "refused",
            Self::ClientError => "client_error",
            Self::Other => "other",
        }
    }
}

/// An upstream answer's class: `2xx` ... `5xx`, `429` on its own (an upstream rate limit is
/// what says dunite's cache is too small for its clients' pulls), `error` for no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum StatusClass {
    /// 1xx or 2xx.
    Success,
    /// 3xx (a redirect reqwest did not follow, a `304 Not Modified`).
    Redirection,
    /// 4xx but 429.
    ClientError,
    /// 429 Too Many Requests.
    TooManyRequests,
    /// 5xx.
    ServerError,
    /// No answer: connection refused, timed out, refused redirect, failed token exchange.
    Error,
}

impl StatusClass {
    /// Every class, for series that start at zero.
    pub(crate) const ALL: [Self; 6] = [
        Self::Success,
        Self::Redirection,
        Self::ClientError,
        Self::TooManyRequests,
        Self::ServerError,
        Self::Error,
    ];

    /// The class of an answer with `status`, or [`Error`](Self::Error) for no answer.
    pub(crate) fn of(status: Option<StatusCode>) -> Self {
        match status {
            None => Self::Error,
            Some(StatusCode::TOO_MANY_REQUESTS) => Self::TooManyRequests,
            Some(s) if s.is_server_error() => Self::ServerError,
            Some(s) if s.is_client_error() => Self::ClientError,
            Some(s) if s.is_redirection() => Self::Redirection,
            Some(_) => Self::Success,
        }
    }

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Success => "2xx",
            Self::Redirection => "3xx",
            Self::ClientError => "4xx",
            Self::TooManyRequests => "429",
            Self::ServerError => "5xx",
            Self::Error => "error",
        }
    }
}

/// Where the bytes of a response came from, for the byte-hit ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ByteSource {
    /// The cache: a hit, a stale serve, a revalidated download.
    Cache,
    /// The upstream, through a fill (the request that started it and every one that joined).
    Upstream,
}

impl ByteSource {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Upstream => "upstream",
        }
    }
}

impl From<CacheOutcome> for ByteSource {
    fn from(outcome: CacheOutcome) -> Self {
        match outcome {
            CacheOutcome::Hit | CacheOutcome::Stale => Self::Cache,
            CacheOutcome::Miss => Self::Upstream,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_come_from_the_path_shape_never_the_path() {
        assert_eq!(Route::of("/v2/library/alpine/blobs/sha256:abc"), Route::Blob);
        assert_eq!(Route::of("/v2/a/b/c/manifests/latest"), Route::Manifest);
        assert_eq!(Route::of("/v2/blobs/manifests/blobs"), Route::Manifest);
        assert_eq!(Route::of("/v2/a/tags/list"), Route::Listing);
        assert_eq!(Route::of("/v2/a/b/referrers/sha256:abc"), Route::Listing);
        assert_eq!(Route::of("/v2/"), Route::Other);
        assert_eq!(Route::of("/dl/https://example.com/f"), Route::Download);
        assert_eq!(Route::of("/metrics"), Route::Metrics);
        assert_eq!(Route::of("/healthz"), Route::Other);
        assert_eq!(Route::of("/blobs/x"), Route::Other);
    }

    #[test]
    fn outcomes_prefer_a_server_error_then_the_cache_outcome() {
        let of = Outcome::of;
        assert_eq!(of(StatusCode::OK, Some(CacheOutcome::Hit)), Outcome::Hit);
        assert_eq!(of(StatusCode::PARTIAL_CONTENT, Some(CacheOutcome::Miss)), Outcome::Miss);
        assert_eq!(of(StatusCode::OK, Some(CacheOutcome::Stale)), Outcome::Stale);
        assert_eq!(of(StatusCode::BAD_GATEWAY, Some(CacheOutcome::Miss)), Outcome::Error);
        assert_eq!(of(StatusCode::TOO_MANY_REQUESTS, None), Outcome::Refused);
        assert_eq!(of(StatusCode::NOT_FOUND, None), Outcome::ClientError);
        assert_eq!(of(StatusCode::OK, None), Outcome::Other);
    }

    #[test]
    fn a_429_is_a_class_of_its_own() {
        let of = |code: u16| StatusClass::of(Some(StatusCode::from_u16(code).unwrap())).as_str();
        assert_eq!(
            [of(200), of(206), of(304), of(404), of(429), of(503)],
            ["2xx", "2xx", "3xx", "4xx", "429", "5xx"]
        );
        assert_eq!(StatusClass::of(None).as_str(), "error");
    }
}
