//! Why a peer could not be started, seeded or asked.

use std::net::SocketAddr;
use std::path::PathBuf;

/// A peer's failure, naming the peer and, where there is one, its log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// A program is not installed.
    #[error("`{program}` is not installed (`.ci/run` installs it: apt-get install {package})")]
    NotInstalled {
        /// The program looked for.
        program: String,
        /// The Debian package that has it.
        package: String,
    },
    /// A file or process operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The peer did not answer before its deadline.
    #[error("{peer} did not answer on {addr} in time; its log:\n{log}")]
    NotReady {
        /// Which peer.
        peer: &'static str,
        /// Where it should listen.
        addr: SocketAddr,
        /// Its log, for the failure message.
        log: String,
    },
    /// The peer exited while starting.
    #[error("{peer} exited while starting ({status}); its log:\n{log}")]
    Exited {
        /// Which peer.
        peer: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its log.
        log: String,
    },
    /// An HTTP request to a peer failed.
    #[error("{what}: {source}")]
    Http {
        /// The request.
        what: String,
        /// The cause.
        source: reqwest::Error,
    },
    /// A peer answered with an unexpected status.
    #[error("{what}: the peer answered {status}")]
    Status {
        /// The request.
        what: String,
        /// The answer's status.
        status: u16,
    },
}

impl PeerError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }

    pub(crate) fn http(what: impl Into<String>) -> impl FnOnce(reqwest::Error) -> Self {
        let what = what.into();
        move |source| Self::Http { what, source }
    }
}
