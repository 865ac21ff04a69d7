//! Upstreams that would exhaust the mirror: a manifest that never ends, a download larger
//! than its cache, an upstream that goes silent mid-answer. Each is an error to the client
//! within bounds (memory, disk, time), and the next request for the same thing starts afresh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;

use super::harness::Dunite;
use super::origin::Head;

/// What the hostile upstream sends at most on one answer: far more than any limit below, so
/// a mirror that reads it all is caught by the byte count, and the test still ends.
const BOUND: u64 = 512 << 20;
const CHUNK: usize = 64 << 10;

/// A raw HTTP/1.1 upstream. Paths containing `/manifests/` and `/endless` get a chunked body
/// without end (up to [`BOUND`]); `/announced` declares 100 MiB; `/stall` sends 10 of 1,000
/// bytes and then nothing until `release` (or a minute), unless `healed`, when it sends all.
struct Hostile {
    addr: SocketAddr,
    /// Body bytes written to clients, over all answers.
    sent: Arc<AtomicU64>,
    healed: Arc<AtomicBool>,
    release: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.release.notify_waiters();
        self.task.abort();
    }
}

const STALLED: &[u8] = &[7u8; 1000];

impl Hostile {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sent, healed, release) = (Arc::default(), Arc::default(), Arc::new(tokio::sync::Notify::new()));
        let (s, h, r) = (Arc::clone(&sent), Arc::clone(&healed), Arc::clone(&release));
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                tokio::spawn(answer(socket, Arc::clone(&s), Arc::clone(&h), Arc::clone(&r)));
            }
        });
        Self { addr, sent, healed, release, task }
    }
}

async fn answer(
    mut socket: tokio::net::TcpStream,
    sent: Arc<AtomicU64>,
    healed: Arc<AtomicBool>,
    release: Arc<tokio::sync::Notify>,
) {
    let Some(Head { path, .. }) = Head::read(&mut socket).await else { return };
    // Write `head`, then `chunk` until the client goes or BOUND bytes of body were sent.
    let flood = async |socket: &mut tokio::net::TcpStream, head: &str, chunk: &[u8]| {
        if socket.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        while sent.load(Ordering::SeqCst) < BOUND && socket.write_all(chunk).await.is_ok() {
            sent.fetch_add(CHUNK as u64, Ordering::SeqCst);
        }
    };
    if path.contains("/manifests/") || path.contains("/endless") {
        let ct = if path.contains("/manifests/") {
            "application/vnd.oci.image.manifest.v1+json"
        } else {
            "application/octet-stream"
        };
        let head = format!("HTTP/1.1 200 OK\r\nContent-Type: {ct}\r\nTransfer-Encoding: chunked\r\n\r\n");
        let mut chunk = format!("{CHUNK:x}\r\n").into_bytes();
        chunk.extend(std::iter::repeat_n(b' ', CHUNK));
        chunk.extend_from_slice(b"\r\n");
        flood(&mut socket, &head, &chunk).await;
    } else if path.contains("/announced") {
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n\r\n";
        flood(&mut socket, head, &[b' '; CHUNK]).await;
    } else if path.contains("/stall") {
        let head =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", STALLED.len());
        let whole = healed.load(Ordering::SeqCst);
        let body = if whole { STALLED } else { &STALLED[..10] };
        if socket.write_all(head.as_bytes()).await.is_err() || socket.write_all(body).await.is_err() {
            return;
        }
        if !whole {
            let _ = tokio::time::timeout(Duration::from_secs(60), release.notified()).await;
        }
    } else {
        let _ = socket
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    }
}

/// Poll until `data`'s spool directory is empty, failing after 10 s.
async fn until_no_spool(data: &std::path::Path) {
    // Fills spool in each cache's `tmp/`.
    let spools = || {
        ["blobs", "manifests", "tags", "downloads"]
            .iter()
            .filter_map(|cache| std::fs::read_dir(data.join(cache).join("tmp")).ok())
            .flatten()
            .filter(|entry| {
                entry.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().starts_with("fill-"))
            })
            .count()
    };
    let empty = async || spools() == 0;
    dunite_testkit::poll_until(Duration::from_secs(10), "no spool file left", empty).await;
}

/// `dunite serve` on `data` with downloads allowed from the loopback upstream and `extra`
/// flags, and a client that gives up after 30 s.
async fn serve_downloads(
    upstream: &Hostile,
    data: &std::path::Path,
    extra: &[&str],
) -> (Dunite, reqwest::Client) {
    let allow = upstream.addr.to_string();
    let flags: Vec<&str> = ["--dl-allow", &allow].into_iter().chain(extra.iter().copied()).collect();
    let dunite = Dunite::start_with_data(upstream.addr, "64MiB", &flags, "info", data).await;
    (dunite, reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap())
}

/// A manifest without end (chunked, no length) is refused once it passes the manifest limit:
/// read to 4 MiB, not to the end. Before the limit applied to the bytes as read, the mirror
/// buffered the whole answer in memory (all 512 MiB here; 1.8 GB of RSS for four such pulls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_without_end_is_refused_at_its_limit() {
    let upstream = Hostile::start().await;
    let dunite = Dunite::start(upstream.addr, "64MiB", &[]).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let response =
        client.get(format!("http://{}/v2/huge/app/manifests/latest", dunite.addr)).send().await.unwrap();
    assert_eq!(response.status(), 502);
    let body = response.text().await.unwrap();
    assert!(body.contains("MANIFEST_INVALID"), "{body}");
    let sent = upstream.sent.load(Ordering::SeqCst);
    assert!(sent < 64 << 20, "the mirror read {sent} bytes of a manifest limited to 4 MiB");
}

/// A download larger than its cache's cap is cut at the cap (chunked, no length) or refused
/// before its body (a `Content-Length` over the cap): the spool never grows past the cap and
/// is gone afterwards, nothing is cached. Before, the whole body was spooled to disk first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_over_its_cap_is_cut_at_the_cap() {
    let upstream = Hostile::start().await;
    let data = tempfile::tempdir().unwrap();
    let (dunite, client) = serve_downloads(&upstream, data.path(), &["--dl-max-bytes", "1MiB"]).await;
    let origin = format!("http://{}", upstream.addr);

    let response = client.get(format!("http://{}/dl/{origin}/endless", dunite.addr)).send().await.unwrap();
    let got = match response.bytes().await {
        Ok(bytes) => panic!("a body of {} bytes was served as complete", bytes.len()),
        Err(e) => e,
    };
    assert!(got.is_body() || got.is_decode(), "{got}");
    let sent = upstream.sent.swap(0, Ordering::SeqCst);
    assert!(sent < 64 << 20, "the mirror took {sent} bytes of a download capped at 1 MiB");

    let response = client.get(format!("http://{}/dl/{origin}/announced", dunite.addr)).send().await.unwrap();
    assert_eq!(response.status(), 502);
    let message = response.text().await.unwrap();
    assert!(message.contains("cap"), "{message}");

    until_no_spool(data.path()).await;
    assert_eq!(dunite.metric("dunite_cache_bytes{cache=\"downloads\"}").await, 0);
}

/// An upstream that goes silent mid-answer fails the fill after `--upstream-timeout`, and the
/// next request for the URL starts a new fill (no client stays attached to a dead one).
/// Before the timeout, the fill waited forever and every later request joined it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_fails_its_fill_and_the_next_request_starts_afresh() {
    let upstream = Hostile::start().await;
    let data = tempfile::tempdir().unwrap();
    let (dunite, client) = serve_downloads(&upstream, data.path(), &["--upstream-timeout", "1s"]).await;
    let url = format!("http://{}/dl/http://{}/stall", dunite.addr, upstream.addr);

    let response = client.get(&url).send().await.unwrap();
    let failed = response.bytes().await.expect_err("a stalled body must not complete");
    assert!(!failed.is_timeout(), "the mirror held the client until the client gave up: {failed}");

    upstream.healed.store(true, Ordering::SeqCst);
    let bytes = client.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&bytes[..], STALLED);
    until_no_spool(data.path()).await;
}
