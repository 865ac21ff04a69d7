//! A minimal HTTP/1.1 origin server for the download proxy's tests: fixed files, ETags,
//! `304 Not Modified`, one redirect, and a request counter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// What the origin answers for a path.
#[derive(Clone)]
pub enum Answer {
    /// 200 with this body and `ETag: "<etag>"` (304 when the request's If-None-Match matches).
    File { body: Vec<u8>, etag: String },
    /// 302 to this location.
    Redirect(String),
}

pub struct Origin {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request as the handler sees it: the request line's method and path, and the headers,
/// lower-cased.
pub struct Head {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
}

impl Head {
    /// Read a request's head from `socket` (up to 16 KiB); `None` if the client goes first.
    pub async fn read(socket: &mut tokio::net::TcpStream) -> Option<Self> {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let mut lines = text.lines();
        let mut request_line = lines.next().unwrap_or("").split_whitespace();
        let method = request_line.next().unwrap_or("GET").to_owned();
        let path = request_line.next().unwrap_or("/").to_owned();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Some(Self { method, path, headers })
    }
}

type Handler = dyn Fn(&Head, SocketAddr) -> Vec<u8> + Send + Sync;

impl Origin {
    /// Serve fixed answers by path.
    pub async fn start(answers: HashMap<String, Answer>) -> Self {
        Self::serve(move |head, _| match answers.get(&head.path) {
            Some(Answer::File { etag, .. }) if head.headers.get("if-none-match") == Some(&format!("\"{etag}\"")) => {
                format!("HTTP/1.1 304 Not Modified\r\nETag: \"{etag}\"\r\nConnection: close\r\n\r\n").into_bytes()
            }
            Some(Answer::File { body, etag }) => {
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nETag: \"{etag}\"\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend_from_slice(body);
                r
            }
            Some(Answer::Redirect(to)) => {
                format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()
            }
            None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
        })
        .await
    }

    /// Serve whatever `handler` answers (a whole HTTP/1.1 response); it also gets the
    /// server's own address.
    pub async fn serve(handler: impl Fn(&Head, SocketAddr) -> Vec<u8> + Send + Sync + 'static) -> Self {
        Self::serve_on([127, 0, 0, 1], handler).await
    }

    /// As [`serve`](Self::serve), on a free port of the loopback address `ip` (any of
    /// 127.0.0.0/8: a second address stands for "another host" without leaving the machine).
    pub async fn serve_on(
        ip: [u8; 4],
        handler: impl Fn(&Head, SocketAddr) -> Vec<u8> + Send + Sync + 'static,
    ) -> Self {
        let handler: Arc<Handler> = Arc::new(handler);
        let listener = tokio::net::TcpListener::bind(SocketAddr::from((ip, 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                let (handler, counter) = (Arc::clone(&handler), Arc::clone(&counter));
                tokio::spawn(async move {
                    let Some(head) = Head::read(&mut socket).await else { return };
                    counter.fetch_add(1, Ordering::SeqCst);
                    let response = handler(&head, addr);
                    let _ = socket.write_all(&response).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Self { addr, requests, task }
    }
}
