//! A reverse proxy in front of the upstream registry that counts the blob GETs it forwards,
//! per digest, and can slow one blob's body down (so a test can act while a fill of it runs).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use futures_util::StreamExt as _;

/// How a slowed blob's body is sent: `chunk` bytes every `every`.
#[derive(Debug, Clone, Copy)]
pub struct Throttle {
    pub chunk: usize,
    pub every: Duration,
}

struct Shared {
    upstream: SocketAddr,
    client: reqwest::Client,
    /// Blob GETs forwarded, by digest.
    gets: Mutex<HashMap<String, u64>>,
    /// Digest whose body is slowed, and how.
    slow: Mutex<Option<(String, Throttle)>>,
}

/// The proxy, serving until dropped.
pub struct CountingProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingProxy {
    /// Proxy to the registry at `upstream`, on a free loopback port.
    pub async fn start(upstream: SocketAddr) -> Self {
        let shared = Arc::new(Shared {
            upstream,
            client: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
            gets: Mutex::default(),
            slow: Mutex::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(forward).with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, shared, task }
    }

    /// Slow the body of the blob `digest` (`sha256:...`) down to `throttle`.
    pub fn slow_down(&self, digest: &str, throttle: Throttle) {
        *self.shared.slow.lock().unwrap() = Some((digest.to_owned(), throttle));
    }

    /// Blob GETs forwarded so far, by digest.
    pub fn blob_gets(&self) -> HashMap<String, u64> {
        self.shared.gets.lock().unwrap().clone()
    }
}

/// The digest of a `/v2/<name>/blobs/<digest>` path.
fn blob_digest(path: &str) -> Option<&str> {
    let (_, digest) = path.rsplit_once("/blobs/")?;
    (path.starts_with("/v2/") && !digest.contains('/')).then_some(digest)
}

async fn forward(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let path_and_query = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let digest = blob_digest(request.uri().path()).map(str::to_owned);
    let method = request.method().clone();
    if method == Method::GET
        && let Some(digest) = &digest
    {
        *shared.gets.lock().unwrap().entry(digest.clone()).or_default() += 1;
    }
    let url = format!("http://{}{path_and_query}", shared.upstream);
    let mut outgoing = shared.client.request(method.clone(), url);
    for (name, value) in request.headers() {
        if name != "host" {
            outgoing = outgoing.header(name.as_str(), value.as_bytes());
        }
    }
    let body = axum::body::to_bytes(request.into_body(), 64 << 20).await.unwrap_or_default();
    let answer = match outgoing.body(body).send().await {
        Ok(answer) => answer,
        Err(_) => return Response::builder().status(StatusCode::BAD_GATEWAY).body(Body::empty()).unwrap(),
    };
    let mut response = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name.as_str().as_bytes()), HeaderValue::from_bytes(value.as_bytes()))
        {
            response = response.header(name, value);
        }
    }
    let throttle = shared
        .slow
        .lock()
        .unwrap()
        .as_ref()
        .filter(|(slow, _)| method == Method::GET && digest.as_deref() == Some(slow.as_str()))
        .map(|(_, throttle)| *throttle);
    let stream = answer.bytes_stream();
    let body = match throttle {
        None => Body::from_stream(stream),
        Some(throttle) => Body::from_stream(throttled(stream, throttle)),
    };
    response.body(body).unwrap()
}

/// `stream` re-cut into `throttle.chunk` bytes every `throttle.every`.
fn throttled(
    stream: impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
    throttle: Throttle,
) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static {
    let stream = stream.flat_map(move |chunk| {
        let pieces: Vec<reqwest::Result<bytes::Bytes>> = match chunk {
            Ok(bytes) => (0..bytes.len())
                .step_by(throttle.chunk)
                .map(|at| Ok(bytes.slice(at..(at + throttle.chunk).min(bytes.len()))))
                .collect(),
            Err(e) => vec![Err(e)],
        };
        futures_util::stream::iter(pieces)
    });
    stream.then(move |piece| async move {
        tokio::time::sleep(throttle.every).await;
        piece
    })
}

#[test]
fn blob_paths_are_recognised() {
    assert_eq!(blob_digest("/v2/e2e/img/blobs/sha256:ab"), Some("sha256:ab"));
    assert_eq!(blob_digest("/v2/e2e/img/manifests/v1"), None);
    assert_eq!(blob_digest("/v2/e2e/img/blobs/uploads/x"), None);
}
