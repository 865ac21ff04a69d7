//! The address a request came from, as the connection shows it.

use std::net::{IpAddr, SocketAddr};

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};

use crate::tls::TlsListener;
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
        Ok(Self(parts.extensions.get::<ConnectInfo<PeerAddr>>().map(|info| info.0.0)))
    }
}

/// The connection's remote address as `axum::serve` hands it to the router
/// (`into_make_service_with_connect_info::<PeerAddr>`), for any listener whose address is a
/// socket address: plain TCP and TLS alike.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(SocketAddr);

#[cfg(test)]
impl From<SocketAddr> for PeerAddr {
    /// For in-process requests that stand for a connection from `addr`.
    fn from(addr: SocketAddr) -> Self {
        Self(addr)
    }
}

impl Connected<IncomingStream<'_, NoDelay>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, NoDelay>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl<L> Connected<IncomingStream<'_, TlsListener<L>>> for PeerAddr
where
    L: Listener<Addr = SocketAddr>,
{
    fn connect_info(stream: IncomingStream<'_, TlsListener<L>>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// A TCP listener that sets `TCP_NODELAY` on every connection it accepts: a response's head
/// and its body's chunks are separate writes, and with Nagle's algorithm the second small
/// write waits for the client's (delayed, up to 40 ms) ACK of the first, a 40 ms stall on
/// small blobs, manifests and downloads.
#[derive(Debug)]
pub(crate) struct NoDelay(TcpListener);

impl NoDelay {
    pub(crate) fn new(listener: TcpListener) -> Self {
        Self(listener)
    }
}

impl Listener for NoDelay {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        let (tcp, addr) = Listener::accept(&mut self.0).await;
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a connection");
        }
        (tcp, addr)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Listener::local_addr(&self.0)
    }
}
