//! What can go wrong in the admin API, and its one mapping to HTTP (a status and a
//! [`Failure`](super::api::Failure) body).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::api::Failure;

/// An admin request that failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The request names no cache the server has.
    #[error("no cache named {0:?} (blobs, manifests, tags or downloads)")]
    UnknownCache(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// What the request names is not cached (or no job has that id).
    #[error("{0}")]
    NotFound(String),
    /// Too many prefetch jobs are running.
    #[error("{0} prefetch jobs are running; try again when one has ended")]
    TooManyJobs(usize),
    /// Pinning would make the pins larger than the cap.
    #[error(transparent)]
    PinsExceedCap(dunite_core::Error),
    /// The cache failed.
    #[error(transparent)]
    Cache(dunite_core::Error),
}

impl From<dunite_core::Error> for Error {
    fn from(error: dunite_core::Error) -> Self {
        match error {
            error @ dunite_core::Error::PinsExceedCap { .. } => Self::PinsExceedCap(error),
            // The core's own word for a bad cursor.
            dunite_core::Error::InvalidConfig(message) => Self::BadRequest(message),
            error => Self::Cache(error),
        }
    }
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Self::UnknownCache(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::PinsExceedCap(_) => StatusCode::CONFLICT,
            Self::TooManyJobs(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Cache(error) if error.is_database_unavailable() || error.is_pool_timeout() => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Cache(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %crate::error_chain(&self), "admin request failed");
        }
        (status, Json(Failure { error: crate::error_chain(&self) })).into_response()
    }
}
