//! A pinned download (`/dl/sha256:P/<url>`) is verified against the bytes its client receives,
//! even when another fill of the same URL commits content matching P while it runs (issue #15).
//!
//! Driven over HTTP against the real `dunite` binary and a hand-written loopback origin whose
//! answers the test orders with channels: no sleeps, every wait bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, watch};

use super::harness::Dunite;
use super::origin::Head;

/// The one path the origin serves.
const PATH: &str = "/artifact.bin";
/// The bound on every wait that a working server satisfies quickly.
const DEADLINE: Duration = Duration::from_secs(60);
/// How long the origin waits for a second request before the test concludes the server
/// coalesced the unpinned request into the held pinned fill (a valid design, in which the
/// race below cannot happen). On loopback the second request arrives within milliseconds.
const SECOND_REQUEST_GRACE: Duration = Duration::from_secs(10);

/// A loopback HTTP/1.1 origin for [`PATH`]. Its first request (the pinned fill's) gets the
/// response head at once and its body, `held`, only once [`release`](Self::release) is
/// called; every later request gets `served` whole. Each request of [`PATH`] is reported on
/// `arrivals` by its index: the first once its head is sent, the others as they come.
struct GatedOrigin {
    addr: SocketAddr,
    arrivals: mpsc::UnboundedReceiver<usize>,
    release: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GatedOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ok_head(len: usize) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    )
}

impl GatedOrigin {
    async fn start(held: Vec<u8>, served: Vec<u8>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (arrived, arrivals) = mpsc::unbounded_channel();
        let (release, released) = watch::channel(false);
        let (held, served) = (Arc::new(held), Arc::new(served));
        let count = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                let (held, served, count) = (Arc::clone(&held), Arc::clone(&served), Arc::clone(&count));
                let (arrived, mut released) = (arrived.clone(), released.clone());
                tokio::spawn(async move {
                    let Some(head) = Head::read(&mut socket).await else { return };
                    if head.path != PATH {
                        let _ = socket
                            .write_all(
                                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                            )
                            .await;
                        return;
                    }
                    let index = count.fetch_add(1, Ordering::SeqCst);
                    if index == 0 {
                        if socket.write_all(ok_head(held.len()).as_bytes()).await.is_err() {
                            return;
                        }
                        let _ = socket.flush().await;
                        let _ = arrived.send(index);
                        // Held until released; past the deadline the connection just closes
                        // (the body cut short), so a forgotten release cannot hang the test.
                        let opened = tokio::time::timeout(DEADLINE, released.wait_for(|open| *open))
                            .await
                            .is_ok_and(|gate| gate.is_ok());
                        if !opened {
                            return;
                        }
                        let _ = socket.write_all(&held).await;
                    } else {
                        let _ = arrived.send(index);
                        let mut response = ok_head(served.len()).into_bytes();
                        response.extend_from_slice(&served);
                        let _ = socket.write_all(&response).await;
                    }
                    let _ = socket.shutdown().await;
                });
            }
        });
        Self { addr, arrivals, release, task }
    }

    /// The index of the next request of [`PATH`], if one arrives within `within`.
    async fn next_arrival(&mut self, within: Duration) -> Option<usize> {
        tokio::time::timeout(within, self.arrivals.recv()).await.ok().flatten()
    }

    /// Let the first request's body go.
    fn release(&self) {
        self.release.send_replace(true);
    }
}

/// What a client got: the status and the whole body, or how reading it failed.
#[derive(Debug)]
struct Got {
    status: u16,
    body: Result<Vec<u8>, String>,
}

async fn get(url: String) -> Got {
    let response = match reqwest::Client::new().get(&url).send().await {
        Ok(response) => response,
        Err(e) => return Got { status: 0, body: Err(format!("request failed: {e}")) },
    };
    let status = response.status().as_u16();
    let body = response.bytes().await.map(|b| b.to_vec()).map_err(|e| format!("body failed: {e:?}"));
    Got { status, body }
}

/// Await a spawned client within [`DEADLINE`].
async fn finish(client: tokio::task::JoinHandle<Got>, what: &str) -> Got {
    tokio::time::timeout(DEADLINE, client)
        .await
        .unwrap_or_else(|_| panic!("the {what} request did not finish within {DEADLINE:?}"))
        .unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Issue #15. A pinned miss for `sha256:P` is held at the origin while an unpinned request of
/// the same URL fetches and commits bytes A, whose sha256 is P. Then the pinned fill's
/// upstream sends bytes B (sha256 not P). Today the pinned fill's store step finds the fresh
/// entry matching P, returns it as a hit without reading its own spool, and marks the fill
/// done: the pinned client receives B as a complete 200. A correct server fails the pinned
/// transfer (an error status or a cut body) or serves A; it never completes a 200 whose
/// bytes miss the pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_miss_never_completes_with_bytes_off_its_pin_when_another_fill_commits_the_pin_first() {
    let a = dunite_testkit::pseudo_random_bytes(1501, 256 * 1024);
    let b = dunite_testkit::pseudo_random_bytes(1502, 256 * 1024);
    let pin = sha256_hex(&a);
    assert_ne!(sha256_hex(&b), pin);
    let mut origin = GatedOrigin::start(b.clone(), a.clone()).await;
    // The upstream registry is never asked here; `dunite serve` only needs one named.
    let allow = origin.addr.to_string();
    let dunite = Dunite::start(origin.addr, "64MiB", &["--dl-allow", &allow]).await;
    let target = format!("http://{}{PATH}", origin.addr);
    let pinned_url = format!("http://{}/dl/sha256:{pin}/{target}", dunite.addr);
    let unpinned_url = format!("http://{}/dl/{target}", dunite.addr);

    // 1. The pinned miss reaches the origin, which sends the response head and holds the body.
    let pinned = tokio::spawn(get(pinned_url.clone()));
    assert_eq!(
        origin.next_arrival(DEADLINE).await,
        Some(0),
        "the pinned request did not reach the origin; dunite's log:\n{}",
        dunite.log_text()
    );

    // 2. An unpinned request for the same URL fetches A (sha256 = P), which is committed
    //    before its client gets the last byte.
    let unpinned = tokio::spawn(get(unpinned_url.clone()));
    let coalesced = match origin.next_arrival(SECOND_REQUEST_GRACE).await {
        Some(_) => {
            let got = finish(unpinned, "unpinned").await;
            assert_eq!(got.status, 200, "setup: the unpinned request failed: {got:?}");
            let body = got.body.unwrap_or_else(|e| panic!("setup: the unpinned body failed: {e}"));
            assert!(body == a, "setup: the unpinned request got other bytes than the origin's");
            None
        }
        // The server made the unpinned request wait on the pinned fill: no race to provoke.
        None => Some(unpinned),
    };

    // 3. The pinned fill's upstream now sends B, whose sha256 is not the pin.
    origin.release();
    let got = finish(pinned, "pinned").await;
    if let Some(unpinned) = coalesced {
        finish(unpinned, "unpinned").await;
    }
    if got.status == 200
        && let Ok(body) = &got.body
    {
        let sha = sha256_hex(body);
        assert!(
            sha == pin,
            "the pinned client got a complete 200 of {} bytes whose sha256 is {sha}, not the pin {pin} \
             (the bytes are {}); it must get an error status, a cut body, or the pinned content",
            body.len(),
            if *body == b { "the pinned fill's own upstream bytes B" } else { "neither A nor B" },
        );
    }

    // Whatever the pinned client got, the cache holds only content matching what was asked.
    let again = finish(tokio::spawn(get(pinned_url)), "second pinned").await;
    assert_eq!(again.status, 200, "{again:?}");
    assert!(again.body.is_ok_and(|body| body == a), "a later pinned request got other bytes than A");
    assert!(dunite.stop().await.success());
}
