//! The address a request came from, as the connection shows it.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;

/// The client's address: the TCP peer of the connection the request came on. `None` when the
/// router is called without a connection (in-process tests), which counts as no address.
/// Behind a load balancer this is the balancer's address: per-client limits then apply to it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) Option<SocketAddr>);

impl Peer {
    /// The client's IP address, if known.
    pub(crate) fn ip(self) -> Option<IpAddr> {
        self.0.map(|addr| addr.ip())
    }

    /// Whether the client connected from a loopback address (an IPv4-mapped one counts).
    pub(crate) fn is_loopback(self) -> bool {
        self.ip().is_some_and(|ip| match ip {
            IpAddr::V4(v4) => v4.is_loopback(),
            IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|info| info.0)))
    }
}
