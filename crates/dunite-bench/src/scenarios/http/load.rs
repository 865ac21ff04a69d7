//! The HTTP load generator every server is measured with: N clients, each one keep-alive
//! HTTP/1.1 connection (hyper's bare client connection, no pool), taking request numbers
//! from a shared counter until a fixed count is done, reading and discarding each body.
//!
//! One client for every server keeps the figures comparable: whatever it costs, it costs
//! each server's run the same.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::Result;

/// One kind of request: a path (with its query) and the headers to send.
#[derive(Debug, Clone)]
pub struct Target {
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    /// The body length every answer must have.
    pub len: u64,
}

impl Target {
    pub fn get(path: impl Into<String>, len: u64) -> Self {
        Self { path: path.into(), headers: Vec::new(), len }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// What one load run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub elapsed: Duration,
    pub requests: u64,
    pub bytes: u64,
    /// Every request's latency, sorted.
    pub latencies: Vec<Duration>,
}

impl Outcome {
    pub fn mib_per_s(&self) -> f64 {
        crate::report::mib_per_s(self.bytes, self.elapsed)
    }

    pub fn requests_per_s(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at quantile `q` (0..=1), in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        crate::report::ms(self.latencies[i.min(self.latencies.len() - 1)])
    }

    /// Two runs as one: times and counts added.
    pub fn merge(mut self, other: Self) -> Self {
        self.elapsed += other.elapsed;
        self.requests += other.requests;
        self.bytes += other.bytes;
        self.latencies.extend(other.latencies);
        self.latencies.sort_unstable();
        self
    }
}

/// `requests` requests to `addr` from `clients` connections, request *i* asking
/// `targets[i % targets.len()]`. The connections are opened before the clock starts.
///
/// # Errors
///
/// On a connection failure, or an answer that is not 200 with the target's length.
pub async fn run(
    addr: SocketAddr,
    targets: Arc<Vec<Target>>,
    clients: usize,
    requests: usize,
) -> Result<Outcome> {
    if targets.is_empty() {
        return Err("a load run needs at least one target".into());
    }
    let mut senders = Vec::with_capacity(clients);
    for _ in 0..clients {
        senders.push(connect(addr).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut sender in senders {
        let (targets, next) = (Arc::clone(&targets), Arc::clone(&next));
        tasks.spawn(async move {
            let (mut bytes, mut latencies) = (0u64, Vec::new());
            // Bounded: each turn takes a fresh number, and the loop ends at `requests`.
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let target = &targets[i % targets.len()];
                let asked = Instant::now();
                bytes += fetch(&mut sender, addr, target).await?;
                latencies.push(asked.elapsed());
            }
            Ok::<_, crate::BoxError>((bytes, latencies))
        });
    }
    let mut outcome = Outcome { elapsed: Duration::ZERO, requests: 0, bytes: 0, latencies: Vec::new() };
    for result in tasks.join_all().await {
        let (bytes, latencies) = result?;
        outcome.requests += latencies.len() as u64;
        outcome.bytes += bytes;
        outcome.latencies.extend(latencies);
    }
    outcome.elapsed = started.elapsed();
    outcome.latencies.sort_unstable();
    Ok(outcome)
}

type Sender = http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the sender is dropped (or the server closes): nothing to report then.
        let _ = connection.await;
    });
    Ok(sender)
}

/// One request; the body's length.
async fn fetch(sender: &mut Sender, addr: SocketAddr, target: &Target) -> Result<u64> {
    sender.ready().await?;
    let mut request = hyper::Request::get(target.path.as_str()).header(hyper::header::HOST, addr.to_string());
    for (name, value) in &target.headers {
        request = request.header(*name, value.as_str());
    }
    let response = sender.send_request(request.body(Empty::new())?).await?;
    let status = response.status();
    let mut body = response.into_body();
    let mut len = 0u64;
    // Bounded by the body, which the server ends.
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            len += data.len() as u64;
        }
    }
    if status != hyper::StatusCode::OK || len != target.len {
        return Err(format!(
            "GET {addr}{}: {status} with {len} bytes, expected 200 with {}",
            target.path, target.len
        )
        .into());
    }
    Ok(len)
}
