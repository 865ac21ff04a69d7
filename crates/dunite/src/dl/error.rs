//! Every way a `/dl/` request fails, and its one mapping to a status and a plain-text body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use dunite_core::FillError;

use super::fetch::UpstreamStatus;
use super::target::TargetError;
use crate::limits::Busy;

/// Why a `/dl/` request failed. Answered in plain text: a bad request is a 400, a host off
/// the allowlist a 403, an upstream 404 a 404, a local failure
/// a 500, a busy metadata pool a 503 (retry), an upstream fault (a download over the cap, a
/// cut body, or a pin the bytes do not match) a 502, an upstream timeout a 504.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Error {
    /// The request names no download.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// The URL's host is not on `--dl-allow`.
    #[error("host is not on the download allowlist")]
    NotAllowed,
    /// The download cache failed, or its fetch did.
    #[error(transparent)]
    Download(#[from] dunite_download::Error),
}

impl Error {
    /// The HTTP status this error is answered with.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::Target(_) => StatusCode::BAD_REQUEST,
            Self::NotAllowed => StatusCode::FORBIDDEN,
            Self::Download(error) => download_status(error),
        }
    }
}

fn download_status(error: &dunite_download::Error) -> StatusCode {
    use dunite_core::Error as Core;
    use dunite_download::Error as Download;
    match error {
        Download::Fetch { source, .. } => {
            if source.downcast_ref::<Busy>().is_some() {
                return StatusCode::TOO_MANY_REQUESTS;
            }
            if let Some(UpstreamStatus(status)) = source.downcast_ref::<UpstreamStatus>() {
                return if *status == StatusCode::NOT_FOUND {
                    StatusCode::NOT_FOUND
                } else {
                    StatusCode::BAD_GATEWAY
                };
            }
            let idle = matches!(source.downcast_ref::<FillError>(), Some(FillError::TimedOut { .. }));
            match source.downcast_ref::<reqwest::Error>() {
                Some(e) if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
                _ if idle => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            }
        }
        // What the upstream sent cannot be passed on: over the cap, cut, or not the pin.
        Download::Cache(
            Core::TooLarge { .. }
            | Core::DigestMismatch { .. }
            | Core::Truncated { .. }
            | Core::TooLong { .. }
            | Core::Source { .. },
        ) => StatusCode::BAD_GATEWAY,
        Download::Cache(e) if e.is_pool_timeout() => StatusCode::SERVICE_UNAVAILABLE,
        Download::Cache(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_GATEWAY,
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = crate::error_chain(&self);
        match status {
            StatusCode::INTERNAL_SERVER_ERROR => tracing::error!(error = %message, "download failed"),
            s if s.is_server_error() => tracing::warn!(error = %message, "download failed"),
            _ => {}
        }
        let mut response = (status, [("content-type", "text/plain")], format!("{message}\n")).into_response();
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

    fn fetch(source: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Download(dunite_download::Error::Fetch {
            url: "https://h.example/f".into(),
            source: Arc::new(source),
        })
    }

    fn cache(error: dunite_core::Error) -> Error {
        Error::Download(dunite_download::Error::Cache(error))
    }

    #[test]
    fn each_failure_has_its_status() {
        assert_eq!(fetch(UpstreamStatus(StatusCode::NOT_FOUND)).status(), StatusCode::NOT_FOUND);
        assert_eq!(fetch(UpstreamStatus(StatusCode::FORBIDDEN)).status(), StatusCode::BAD_GATEWAY);
        assert_eq!(fetch(std::io::Error::other("reset")).status(), StatusCode::BAD_GATEWAY);
        let busy =
            dunite_core::Error::Database { op: "acquire", source: Arc::new(sqlx::Error::PoolTimedOut) };
        assert_eq!(cache(busy).status(), StatusCode::SERVICE_UNAVAILABLE);
        let down = dunite_core::Error::Database { op: "look up", source: Arc::new(sqlx::Error::PoolClosed) };
        assert_eq!(cache(down).status(), StatusCode::INTERNAL_SERVER_ERROR);
        let disk = dunite_core::Error::Io {
            op: "write",
            path: "/data".into(),
            source: Arc::new(std::io::Error::other("full")),
        };
        assert_eq!(cache(disk).status(), StatusCode::INTERNAL_SERVER_ERROR);
        let mismatch = dunite_core::Error::DigestMismatch { expected: "a".into(), actual: "b".into() };
        assert_eq!(cache(mismatch).status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            cache(dunite_core::Error::TooLarge { size: 2, max_bytes: 1 }).status(),
            StatusCode::BAD_GATEWAY
        );
        let cut =
            dunite_core::Error::Source { received: 1, source: Arc::new(std::io::Error::other("reset")) };
        assert_eq!(cache(cut).status(), StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn an_upstream_idle_past_the_fill_timeout_is_a_504() {
        let url: dunite_download::UrlKey = "http://example.com/f".parse().unwrap();
        let idle = FillError::TimedOut { idle: std::time::Duration::from_secs(1), received: 0 };
        let error = Error::Download(dunite_download::Error::from_fill(&url, idle));
        assert_eq!(error.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[tokio::test]
    async fn an_upstream_timeout_is_a_504() {
        assert_eq!(fetch(crate::upstream::timed_out().await).status(), StatusCode::GATEWAY_TIMEOUT);
    }
}
