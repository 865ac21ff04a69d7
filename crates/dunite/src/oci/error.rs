//! Every way a `/v2/` request fails, and its one mapping to a status and the spec's JSON
//! error body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use dunite_core::FillError;
use dunite_oci::{Digest, DigestError};

use crate::limits::Busy;
use crate::spec::{ReferenceError, SpecError};
use crate::upstream::UpstreamError;

/// Why a `/v2/` request failed. Answered with the spec's JSON error body
/// (`{"errors":[{"code",..}]}`): a client's mistake is a 4xx, a missing blob or manifest a
/// 404 with its spec code, a local failure a 500, a busy metadata pool a 503 (retry), an
/// upstream's rate limit a 429 (back off), any other upstream fault a 502, an upstream
/// timeout a 504.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Error {
    /// A method other than `GET` or `HEAD`.
    #[error("this mirror only serves pulls")]
    NotAPull,
    /// A path that is no pull endpoint.
    #[error("unknown endpoint")]
    UnknownEndpoint,
    /// A repository name outside the spec's grammar.
    #[error("invalid repository name")]
    NameInvalid,
    /// A blob digest that does not parse.
    #[error("invalid digest: {0}")]
    DigestInvalid(#[source] DigestError),
    /// A manifest reference that is neither a tag nor a digest.
    #[error(transparent)]
    InvalidReference(#[from] ReferenceError),
    /// No upstream is configured for the registry asked for.
    #[error("no upstream for registry {0:?}")]
    UnknownRegistry(String),
    /// The upstream has no such blob.
    #[error("blob unknown to registry")]
    BlobUnknown,
    /// The upstream has no such manifest.
    #[error("manifest unknown")]
    ManifestUnknown,
    /// The upstream has no such repository (its tag list is a 404).
    #[error("repository name not known to registry")]
    NameUnknown,
    /// The upstream answered the referrers API with a 404: it does not support it (or has no
    /// such repository); the client falls back to the `sha256-<hex>` tag.
    #[error("the upstream does not serve referrers for this repository")]
    ReferrersUnsupported,
    /// A listing's `n` that is no number.
    #[error("invalid page size {0:?}")]
    PaginationNumberInvalid(String),
    /// A listing's query over the length the mirror passes on.
    #[error("query over {max} bytes", max = super::listings::MAX_QUERY_BYTES)]
    QueryTooLong,
    /// The upstream's listing is over the size the mirror reads.
    #[error("listing over {} bytes; ask for pages (n)", dunite_oci::MAX_LISTING_BYTES)]
    ListingTooLarge,
    /// The upstream refused access (401 or 403).
    #[error("upstream refused access")]
    Unauthorized,
    /// The upstream request failed before an answer.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The upstream answered with a status the mirror does not relay as such (`429` aside,
    /// relayed so the client backs off).
    #[error("upstream answered {0}")]
    UpstreamStatus(StatusCode),
    /// The upstream's manifest is over the size the mirror reads.
    #[error("manifest too large")]
    ManifestTooLarge,
    /// The manifest fetched by digest hashes to another digest.
    #[error("upstream manifest digest {got} is not {asked}")]
    ManifestMismatch {
        /// The digest asked for.
        asked: Digest,
        /// The digest of what came.
        got: Digest,
    },
    /// The upstream announced a digest its manifest does not hash to.
    #[error("upstream announced {announced} for a manifest hashing to {computed}")]
    AnnouncedMismatch {
        /// The `Docker-Content-Digest` it sent.
        announced: String,
        /// The digest of what came.
        computed: Digest,
    },
    /// An upstream fill failed (a blob's before its first byte).
    #[error("the upstream fill failed")]
    Fill(#[source] FillError),
    /// A cache failed locally (or its metadata pool was busy).
    #[error(transparent)]
    Cache(#[from] dunite_oci::Error),
    /// Pass-through authorisation: the upstream does not let anonymous clients pull this
    /// repository; answered `401` with the challenge, so the client logs in.
    #[error("authentication required")]
    LoginRequired,
    /// Pass-through authorisation: the upstream refuses this client's credentials for the
    /// repository.
    #[error("requested access to the resource is denied")]
    Denied,
}

/// Why a stale answer was served instead of the upstream's ([`Error::stale_reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StaleReason {
    /// The upstream answered `429 Too Many Requests`.
    RateLimited,
    /// The upstream was unreachable, timed out, or answered a 5xx or something unusable.
    Failed,
}

impl Error {
    /// What a failed manifest fill is answered with: the upstream's refusal as the manifest
    /// asked for unknown (404), or access refused (401, 403), or its status; a manifest over
    /// the limit, or hashing to another digest than the one `asked` for (by digest; `None` for
    /// a tag: then the one announced), as such; anything else as [`Error::Fill`].
    pub(crate) fn from_manifest_fill(error: FillError, asked: Option<&Digest>) -> Self {
        let invalid = match &error {
            FillError::Refused { status: 404 } => return Self::ManifestUnknown,
            FillError::Refused { status: 401 | 403 } => return Self::Unauthorized,
            FillError::Refused { status } => {
                return StatusCode::from_u16(*status).map_or(Self::Fill(error), Self::UpstreamStatus);
            }
            FillError::Invalid(invalid) => invalid,
            _ => return Self::Fill(error),
        };
        match &**invalid {
            dunite_core::Error::TooLarge { .. } => Self::ManifestTooLarge,
            dunite_core::Error::DigestMismatch { expected, actual } => match (actual.parse(), asked) {
                (Ok(got), Some(asked)) => Self::ManifestMismatch { asked: asked.clone(), got },
                (Ok(computed), None) => Self::AnnouncedMismatch { announced: expected.clone(), computed },
                (Err(_), _) => Self::Fill(error),
            },
            _ => Self::Fill(error),
        }
    }

    /// The HTTP status this error is answered with.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::NotAPull => StatusCode::METHOD_NOT_ALLOWED,
            Self::NameInvalid
            | Self::DigestInvalid(_)
            | Self::InvalidReference(_)
            | Self::PaginationNumberInvalid(_)
            | Self::QueryTooLong => StatusCode::BAD_REQUEST,
            Self::UnknownEndpoint
            | Self::UnknownRegistry(_)
            | Self::BlobUnknown
            | Self::ManifestUnknown
            | Self::NameUnknown
            | Self::ReferrersUnsupported => StatusCode::NOT_FOUND,
            Self::UpstreamStatus(StatusCode::TOO_MANY_REQUESTS)
            | Self::Fill(FillError::Refused { status: 429 }) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthorized | Self::LoginRequired => StatusCode::UNAUTHORIZED,
            Self::Denied => StatusCode::FORBIDDEN,
            Self::Fill(FillError::Other(source)) if source.downcast_ref::<Busy>().is_some() => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Upstream(UpstreamError::Http(e)) if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            Self::Fill(FillError::TimedOut { .. }) => StatusCode::GATEWAY_TIMEOUT,
            Self::Fill(FillError::Local(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Fill(FillError::Other(source))
                if source.downcast_ref::<UpstreamError>().is_some_and(UpstreamError::is_timeout) =>
            {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::Upstream(_)
            | Self::UpstreamStatus(_)
            | Self::ManifestTooLarge
            | Self::ListingTooLarge
            | Self::ManifestMismatch { .. }
            | Self::AnnouncedMismatch { .. }
            | Self::Fill(_) => StatusCode::BAD_GATEWAY,
            Self::Cache(e) if e.is_pool_timeout() => StatusCode::SERVICE_UNAVAILABLE,
            Self::Cache(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Why a stale tag or listing may stand in for the upstream's answer, if it may: the
    /// upstream rate limits (`429`, Docker Hub's limit), or failed (unreachable, timed out, a
    /// 5xx or another answer the mirror cannot use). Not for an answer (a 404, a refusal of
    /// access) nor for a failure of the mirror's own (its disk, its fill limits).
    pub(crate) fn stale_reason(&self) -> Option<StaleReason> {
        match (self, self.status()) {
            (
                Self::UpstreamStatus(StatusCode::TOO_MANY_REQUESTS)
                | Self::Fill(FillError::Refused { status: 429 }),
                _,
            ) => Some(StaleReason::RateLimited),
            (_, StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT) => Some(StaleReason::Failed),
            _ => None,
        }
    }

    /// Whether the mirror's own fill limits refused the request (`--max-fills`).
    pub(crate) fn is_fill_limit(&self) -> bool {
        matches!(self, Self::Fill(FillError::Other(source)) if source.downcast_ref::<Busy>().is_some())
    }

    /// The spec's error code.
    fn code(&self) -> &'static str {
        match self {
            Self::NotAPull | Self::UnknownEndpoint => "UNSUPPORTED",
            Self::NameInvalid => "NAME_INVALID",
            Self::DigestInvalid(_) => "DIGEST_INVALID",
            Self::InvalidReference(error) => error.code(),
            Self::UnknownRegistry(_) => "NAME_UNKNOWN",
            Self::BlobUnknown => "BLOB_UNKNOWN",
            Self::ManifestUnknown => "MANIFEST_UNKNOWN",
            Self::NameUnknown => "NAME_UNKNOWN",
            Self::ReferrersUnsupported | Self::QueryTooLong => "UNSUPPORTED",
            Self::PaginationNumberInvalid(_) => "PAGINATION_NUMBER_INVALID",
            Self::UpstreamStatus(StatusCode::TOO_MANY_REQUESTS)
            | Self::Fill(FillError::Refused { status: 429 }) => "TOOMANYREQUESTS",
            Self::Unauthorized | Self::LoginRequired => "UNAUTHORIZED",
            Self::Denied => "DENIED",
            Self::Fill(FillError::Other(source)) if source.downcast_ref::<Busy>().is_some() => {
                "TOOMANYREQUESTS"
            }
            Self::ManifestTooLarge => "MANIFEST_INVALID",
            _ => "UNKNOWN",
        }
    }
}

/// The mirror's own fill limits refused an upstream request (a 429 to retry).
impl From<Busy> for Error {
    fn from(busy: Busy) -> Self {
        Self::Fill(FillError::other(busy))
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if matches!(self, Self::LoginRequired) {
            return crate::auth::unauthorized(crate::auth::Area::Pull);
        }
        let status = self.status();
        let message = crate::error_chain(&self);
        match status {
            StatusCode::INTERNAL_SERVER_ERROR => tracing::error!(error = %message, "local failure"),
            // A busy pool is no outage and no fault of ours to log as one: the client is
            // asked to come back.
            StatusCode::SERVICE_UNAVAILABLE => {
                tracing::warn!(error = %message, "metadata database busy; answered 503");
            }
            _ => {}
        }
        let mut response = SpecError::new(status, self.code(), message).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, crate::limits::RETRY_AFTER_SECS.into());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn cache(error: dunite_core::Error) -> Error {
        Error::Cache(dunite_oci::Error::Cache(error))
    }

    /// A busy pool reaches a client as a 503 to retry, not a 500: `BlobCache::open` does not
    /// take it for an outage, so it would otherwise fail hits outright.
    #[test]
    fn a_busy_pool_is_a_503_and_an_outage_is_not() {
        let busy = dunite_core::Error::Database {
            op: "acquire a connection",
            source: Arc::new(sqlx::Error::PoolTimedOut),
        };
        assert_eq!(cache(busy).status(), StatusCode::SERVICE_UNAVAILABLE);
        let refused = dunite_core::Error::Database {
            op: "look up an entry",
            source: Arc::new(sqlx::Error::RowNotFound),
        };
        assert_eq!(cache(refused).status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn local_failures_are_500_and_upstream_faults_502() {
        let io = dunite_oci::Error::Read {
            what: "manifest",
            digest: Digest::sha256_of(b"m"),
            source: Arc::new(std::io::Error::other("bad sector")),
        };
        assert_eq!(Error::Cache(io).status(), StatusCode::INTERNAL_SERVER_ERROR);
        let disk = dunite_core::Error::Io {
            op: "write",
            path: "/data".into(),
            source: Arc::new(std::io::Error::other("full")),
        };
        assert_eq!(Error::Fill(FillError::Local(Arc::new(disk))).status(), StatusCode::INTERNAL_SERVER_ERROR);
        let idle = FillError::TimedOut { idle: std::time::Duration::from_secs(1), received: 0 };
        assert_eq!(Error::Fill(idle).status(), StatusCode::GATEWAY_TIMEOUT);
        for upstream in
            [Error::UpstreamStatus(StatusCode::INTERNAL_SERVER_ERROR), Error::Fill(FillError::Ended)]
        {
            assert_eq!(upstream.status(), StatusCode::BAD_GATEWAY);
            assert_eq!(upstream.stale_reason(), Some(StaleReason::Failed));
        }
        assert_eq!(
            (Error::BlobUnknown.status(), Error::BlobUnknown.code()),
            (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
        );
        assert_eq!(Error::ManifestUnknown.stale_reason(), None, "a 404 is an answer, not a fault");
    }

    #[test]
    fn a_failed_manifest_fill_is_answered_as_the_manifest_fetch_was() {
        let refused = |status| Error::from_manifest_fill(FillError::Refused { status }, None);
        assert_eq!((refused(404).status(), refused(404).code()), (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"));
        assert_eq!(refused(404).stale_reason(), None);
        assert_eq!(refused(403).status(), StatusCode::UNAUTHORIZED);
        assert!(matches!(refused(503), Error::UpstreamStatus(StatusCode::SERVICE_UNAVAILABLE)));
        assert_eq!(refused(503).stale_reason(), Some(StaleReason::Failed), "a stale tag may stand in");
        // Docker Hub's rate limit: relayed (the client backs off), and an outage to stand in for.
        assert_eq!(
            (refused(429).status(), refused(429).code()),
            (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS")
        );
        assert_eq!(refused(429).stale_reason(), Some(StaleReason::RateLimited));
        assert!(!refused(429).is_fill_limit(), "not the mirror's own limit");
        let blob = Error::Fill(FillError::Refused { status: 429 });
        assert_eq!((blob.status(), blob.code()), (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"));
        let busy = Error::Fill(FillError::other(Busy::Server));
        assert!(busy.is_fill_limit());
        assert_eq!((busy.status(), busy.stale_reason()), (StatusCode::TOO_MANY_REQUESTS, None));

        let invalid = |error| FillError::Invalid(Arc::new(error));
        let large = invalid(dunite_core::Error::TooLarge { size: 5 << 20, max_bytes: 4 << 20 });
        let large = Error::from_manifest_fill(large, None);
        assert_eq!((large.status(), large.code()), (StatusCode::BAD_GATEWAY, "MANIFEST_INVALID"));

        let (asked, got) = (Digest::sha256_of(b"asked"), Digest::sha256_of(b"got"));
        let mismatch = || {
            invalid(dunite_core::Error::DigestMismatch {
                expected: asked.to_string(),
                actual: got.to_string(),
            })
        };
        assert!(matches!(
            Error::from_manifest_fill(mismatch(), Some(&asked)),
            Error::ManifestMismatch { asked: a, got: g } if a == asked && g == got
        ));
        let announced = Error::from_manifest_fill(mismatch(), None);
        assert!(matches!(&announced, Error::AnnouncedMismatch { announced, computed }
            if *announced == asked.to_string() && *computed == got));
        assert!(announced.stale_reason().is_some());
        let ended = Error::from_manifest_fill(FillError::Ended, None);
        assert!(matches!(ended, Error::Fill(FillError::Ended)) && ended.stale_reason().is_some());
    }

    #[tokio::test]
    async fn an_upstream_timeout_is_a_504_and_still_an_upstream_fault() {
        let timeout = crate::upstream::timed_out().await;
        assert!(timeout.is_timeout(), "{timeout}");
        let error = Error::Upstream(UpstreamError::Http(timeout));
        assert_eq!(error.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            error.stale_reason(),
            Some(StaleReason::Failed),
            "a stale tag may stand in for a timed-out upstream"
        );
    }
}
