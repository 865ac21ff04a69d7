//! Fills: single flight, streaming to every client, the last byte held until verified, one
//! write per miss (the spool is renamed into place), and every way a fill can fail.

use std::os::unix::fs::MetadataExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dunite_core::{
    CacheOptions, ContentDigest, DigestAlgorithm, EntryCache, Error, EvictionPolicy, Expected, FillError,
    FillOptions, Fills, Joined,
};
use futures_util::{Stream, StreamExt as _};
use tokio::sync::{mpsc, oneshot};

pub(crate) type Chunk = Result<Bytes, std::io::Error>;

async fn cache(dir: &std::path::Path, cap: u64) -> EntryCache {
    EntryCache::open(CacheOptions::new(dir, "fills", EvictionPolicy::new(cap))).await.unwrap()
}

/// An upstream body the test feeds chunk by chunk.
pub(crate) fn upstream() -> (mpsc::Sender<Chunk>, impl Stream<Item = Chunk> + Send + 'static) {
    let (tx, rx) = mpsc::channel(4);
    (tx, futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) }))
}

fn sha256(bytes: &[u8]) -> Expected {
    Expected::new().with_digest(ContentDigest::of(DigestAlgorithm::Sha256, bytes))
}

/// Everything a client reads, and the error that ended its stream if any.
pub(crate) async fn read_all(
    stream: impl Stream<Item = std::io::Result<Bytes>>,
) -> (Vec<u8>, Option<String>) {
    let mut stream = std::pin::pin!(stream);
    let mut got = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => got.extend_from_slice(&bytes),
            Err(e) => return (got, Some(e.to_string())),
        }
    }
    (got, None)
}

fn spools(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir.join("tmp"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("fill-")))
        .collect()
}

/// Two clients of one key share one upstream fetch and each read every byte, streamed as it
/// arrives; the spool becomes the payload by rename (the same inode: one write, no copy).
#[tokio::test]
async fn one_fetch_per_key_streamed_to_every_client_and_renamed_into_place() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20).await;
    let fills: Fills<&'static str, &'static str> = Fills::new(cache.entries().clone(), FillOptions::new());
    let runs = Arc::new(AtomicU32::new(0));
    let (feed, body) = upstream();
    let bytes: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    let runs_in = Arc::clone(&runs);
    let mut first = fills
        .join("k", sha256(&bytes), move |mut filling| async move {
            runs_in.fetch_add(1, Ordering::SeqCst);
            filling.respond("text/plain", Some(100_000)).await?;
            filling.receive(body).await?;
            filling.commit("k", |_| "meta".to_owned()).await
        })
        .unwrap();
    let second = fills.join("k", Expected::new(), |_| async { panic!("a second fetch") }).unwrap();
    assert_eq!(fills.in_flight(), 1);
    feed.send(Ok(Bytes::copy_from_slice(&bytes[..60_000]))).await.unwrap();
    let started = first.started().await.unwrap();
    assert_eq!((*started.head(), started.total()), ("text/plain", Some(100_000)));
    // The first 60,000 bytes (but the last, held back) reach a client before the rest exists.
    let mut stream = std::pin::pin!(second.body(0, None));
    let mut early = Vec::new();
    while early.len() < 59_999 {
        early.extend_from_slice(&stream.next().await.unwrap().unwrap());
    }
    assert_eq!(early, bytes[..59_999]);
    let spool = spools(dir.path()).pop().expect("a spool in tmp/");
    let spool_inode = std::fs::metadata(&spool).unwrap().ino();
    feed.send(Ok(Bytes::copy_from_slice(&bytes[60_000..]))).await.unwrap();
    drop(feed);
    let (rest, error) = read_all(stream).await;
    assert_eq!(error, None);
    assert_eq!([early, rest].concat(), bytes);
    assert_eq!(first.finished().await.unwrap().size(), 100_000);
    let (got, error) = read_all(first.body(0, None)).await;
    assert_eq!((got == bytes, error), (true, None));
    let entry = cache.open_entry("k").await.unwrap().expect("stored");
    assert_eq!(entry.info.meta, "meta");
    assert_eq!(entry.file.metadata().await.unwrap().ino(), spool_inode, "the spool itself is the payload");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(spools(dir.path()).is_empty());
}

/// The last byte waits for verification: bytes of the wrong digest end every client's stream
/// with an error, never as a complete body, and nothing is cached or left in `tmp/`.
#[tokio::test]
async fn a_digest_mismatch_never_yields_a_complete_body() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20).await;
    let fills: Fills<&'static str, ()> = Fills::new(cache.entries().clone(), FillOptions::new());
    let (feed, body) = upstream();
    let mut joined = fills
        .join("k", sha256(b"the right bytes"), |mut filling| async move {
            filling.respond((), Some(15)).await?;
            filling.receive(body).await?;
            filling.commit("k", |_| String::new()).await
        })
        .unwrap();
    let mut waiter = fills.join("k", Expected::new(), |_| async { panic!("a second fetch") }).unwrap();
    feed.send(Ok(Bytes::from_static(b"the wrong bytes"))).await.unwrap();
    joined.started().await.unwrap();
    let reader = tokio::spawn(read_all(joined.body(0, None)));
    drop(feed);
    let (got, error) = reader.await.unwrap();
    assert!(got.len() < 15, "a client got the whole body of a failed fill");
    assert!(error.is_some_and(|e| e.contains("bad content")));
    assert!(matches!(waiter.finished().await, Err(FillError::Invalid(_))));
    assert!(!cache.contains("k").await.unwrap());
    assert!(spools(dir.path()).is_empty());
}

/// Verification belongs to the bytes the clients receive: an entry committed meanwhile under
/// the key (by another fill or instance) that matches the pin does not make the spool's
/// other bytes pass.
#[tokio::test]
async fn the_spool_is_verified_whatever_the_cache_holds() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20).await;
    cache.store("k", &b"pinned bytes"[..], &Expected::new(), "").await.unwrap();
    let fills: Fills<&'static str, ()> = Fills::new(cache.entries().clone(), FillOptions::new());
    let mut joined = fills
        .join("k", sha256(b"pinned bytes"), |mut filling| async move {
            filling.respond((), None).await?;
            filling
                .receive(futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(
                    b"other bytes!",
                ))]))
                .await?;
            filling.commit("k", |_| String::new()).await
        })
        .unwrap();
    let error = joined.finished().await.unwrap_err();
    assert!(
        matches!(&error, FillError::Invalid(e) if matches!(**e, Error::DigestMismatch { .. })),
        "{error:?}"
    );
    let entry = cache.open_entry("k").await.unwrap().unwrap();
    assert_eq!(entry.info.size, 12);
}

/// A client that joined before the spool was renamed into place, and reads after, reads the
/// whole body (never a missing file); one that comes once the fill has landed starts anew
/// (the caller looks the cache up first, where the entry now is).
#[tokio::test]
async fn a_client_reading_after_the_rename_reads_the_whole_body() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20).await;
    let fills: Fills<&'static str, ()> = Fills::new(cache.entries().clone(), FillOptions::new());
    let (verified_tx, verified) = oneshot::channel();
    let (commit_tx, commit) = oneshot::channel::<()>();
    let mut first = fills
        .join("k", Expected::new().with_size(5), |mut filling| async move {
            filling.respond((), Some(5)).await?;
            filling
                .receive(futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"12345"))]))
                .await?;
            verified_tx.send(()).unwrap();
            let _ = commit.await;
            filling.commit("k", |_| String::new()).await
        })
        .unwrap();
    verified.await.unwrap();
    let late = fills.join("k", Expected::new(), |_| async { panic!("a second fetch") }).unwrap();
    commit_tx.send(()).unwrap();
    assert_eq!(first.finished().await.unwrap().size(), 5);
    assert!(spools(dir.path()).is_empty(), "renamed into data/");
    assert_eq!(read_all(late.body(0, None)).await, (b"12345".to_vec(), None));
    let mut anew =
        fills.join("k", Expected::new(), |_| async { Err(FillError::Refused { status: 404 }) }).unwrap();
    assert!(anew.finished().await.unwrap_err().is_not_found(), "a landed fill is not joined");
}

/// A fill whose task panics fails its clients and frees its key: the next client starts a new
/// fill.
#[tokio::test]
async fn a_panicking_fill_fails_its_clients_and_frees_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20).await;
    let fills: Fills<&'static str, ()> = Fills::new(cache.entries().clone(), FillOptions::new());
    let mut first = fills
        .join("k", Expected::new(), |mut filling| async move {
            filling.respond((), None).await?;
            panic!("a fill that panics (expected by this test)");
        })
        .unwrap();
    let error = first.finished().await.unwrap_err();
    assert!(matches!(error, FillError::Ended), "{error:?}");
    let mut second = fills
        .join("k", Expected::new(), |mut filling| async move {
            filling.respond((), None).await?;
            filling
                .receive(futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"ok"))]))
                .await?;
            filling.commit("k", |_| String::new()).await
        })
        .unwrap();
    assert_eq!(second.finished().await.unwrap().size(), 2);
    assert!(spools(dir.path()).is_empty(), "the spool went with the failed fill");
}

/// Every error reaches every client as the same typed error, and frees the key.
#[tokio::test]
async fn refusals_timeouts_and_the_cap_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1_000).await;
    let fills: Fills<u32, ()> =
        Fills::new(cache.entries().clone(), FillOptions::new().with_idle_timeout(Duration::from_millis(50)));
    let finished = |mut joined: Joined<()>| async move { joined.finished().await.unwrap_err() };

    let refused =
        fills.join(1, Expected::new(), |_| async { Err(FillError::Refused { status: 404 }) }).unwrap();
    assert!(finished(refused).await.is_not_found());

    let announced = fills
        .join(2, Expected::new(), |mut filling| async move { filling.respond((), Some(1_001)).await })
        .unwrap();
    let error = finished(announced).await;
    assert!(matches!(&error, FillError::Invalid(e) if matches!(**e, Error::TooLarge { .. })), "{error:?}");

    let endless = fills
        .join(3, Expected::new(), |mut filling| async move {
            filling.respond((), None).await?;
            let chunks =
                futures_util::stream::repeat_with(|| Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 100])));
            filling.receive(chunks).await
        })
        .unwrap();
    let error = finished(endless).await;
    assert!(matches!(&error, FillError::Invalid(e) if matches!(**e, Error::TooLarge { .. })), "{error:?}");

    let (_feed, quiet) = upstream();
    let silent = fills
        .join(4, Expected::new(), |mut filling| async move {
            filling.respond((), None).await?;
            filling.receive(quiet).await
        })
        .unwrap();
    assert!(matches!(finished(silent).await, FillError::TimedOut { .. }));

    let cut = fills
        .join(5, Expected::new(), |mut filling| async move {
            filling.respond((), Some(10)).await?;
            let chunks = [Ok(Bytes::from_static(b"12345")), Err(std::io::Error::other("reset"))];
            filling.receive(futures_util::stream::iter(chunks)).await
        })
        .unwrap();
    assert!(matches!(finished(cut).await, FillError::Upstream { received: 5, .. }));

    let short = fills
        .join(6, Expected::new(), |mut filling| async move {
            filling.respond((), Some(10)).await?;
            filling
                .receive(futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"12345"))]))
                .await
        })
        .unwrap();
    let error = finished(short).await;
    assert!(matches!(&error, FillError::Invalid(e) if matches!(**e, Error::Truncated { .. })), "{error:?}");

    assert_eq!(fills.in_flight(), 0);
    assert!(spools(dir.path()).is_empty());
    assert_eq!(cache.len().await.unwrap(), 0);
}

/// A range that ends before the last byte is served as soon as it has arrived; one that
/// includes the last byte waits for verification.
#[tokio::test]
async fn a_range_is_served_as_soon_as_it_has_arrived() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20).await;
    let fills: Fills<&'static str, ()> = Fills::new(cache.entries().clone(), FillOptions::new());
    let (feed, body) = upstream();
    let mut joined = fills
        .join("k", Expected::new().with_size(10), |mut filling| async move {
            filling.respond((), Some(10)).await?;
            filling.receive(body).await?;
            filling.commit("k", |_| String::new()).await
        })
        .unwrap();
    feed.send(Ok(Bytes::from_static(b"0123456"))).await.unwrap();
    joined.started().await.unwrap();
    let range = fills.join("k", Expected::new(), |_| async { Ok(()) }).unwrap();
    assert_eq!(read_all(range.body(2, Some(5))).await, (b"234".to_vec(), None));
    let tail =
        tokio::spawn(read_all(fills.join("k", Expected::new(), |_| async { Ok(()) }).unwrap().body(7, None)));
    feed.send(Ok(Bytes::from_static(b"789"))).await.unwrap();
    drop(feed);
    assert_eq!(tail.await.unwrap(), (b"789".to_vec(), None));
    assert_eq!(joined.finished().await.unwrap().size(), 10);
}

/// Bytes verified but not recorded (the database lost the commit) reach the clients, and
/// `Finished::uncached` says why they were not stored.
#[tokio::test]
async fn a_lost_commit_serves_the_bytes_and_says_why_they_were_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20).await;
    cache.entries().faults().lose_commits(1);
    let fills: Fills<&'static str, ()> = Fills::new(cache.entries().clone(), FillOptions::new());
    let mut joined = fills
        .join("k", Expected::new(), |mut filling| async move {
            filling.respond((), None).await?;
            filling
                .receive(futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"bytes"))]))
                .await?;
            filling.commit("k", |_| String::new()).await
        })
        .unwrap();
    let finished = joined.finished().await.unwrap();
    assert!(finished.stored().is_none());
    assert!(
        matches!(finished.uncached(), Some(FillError::Local(e)) if matches!(**e, Error::Database { .. })),
        "{finished:?}"
    );
    assert_eq!(read_all(joined.body(0, None)).await, (b"bytes".to_vec(), None));
}

/// Fills bound below the cache's cap (`FillOptions::with_max_bytes`) refuse a body announced
/// past the bound before reading it, and one streamed past it as it arrives; a body at the
/// bound is stored.
#[tokio::test]
async fn a_bound_below_the_cap_holds_as_the_bytes_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20).await;
    let fills: Fills<u32, ()> = Fills::new(cache.entries().clone(), FillOptions::new().with_max_bytes(10));
    let too_large = |error: &FillError, size: u64| matches!(error, FillError::Invalid(e) if matches!(**e, Error::TooLarge { size: s, max_bytes: 10 } if s == size));

    let mut announced = fills
        .join(1, Expected::new(), |mut filling| async move { filling.respond((), Some(11)).await })
        .unwrap();
    let error = announced.finished().await.unwrap_err();
    assert!(too_large(&error, 11), "{error:?}");

    let (feed, body) = upstream();
    let mut streamed = fills
        .join(2, Expected::new(), |mut filling| async move {
            filling.respond((), None).await?;
            filling.receive(body).await
        })
        .unwrap();
    feed.send(Ok(Bytes::from_static(b"123456"))).await.unwrap();
    feed.send(Ok(Bytes::from_static(b"789012"))).await.unwrap();
    // Refused at the chunk that crossed the bound: the body has not ended (`feed` is open).
    let error = streamed.finished().await.unwrap_err();
    assert!(too_large(&error, 12), "{error:?}");
    drop(feed);

    let mut at_the_bound = fills
        .join(3, Expected::new(), |mut filling| async move {
            filling.respond((), None).await?;
            let chunks = [Ok::<_, std::io::Error>(Bytes::from_static(b"1234567890"))];
            filling.receive(futures_util::stream::iter(chunks)).await?;
            filling.commit("k", |_| String::new()).await
        })
        .unwrap();
    assert_eq!(at_the_bound.finished().await.unwrap().size(), 10);
    assert_eq!(cache.len().await.unwrap(), 1);
    assert!(spools(dir.path()).is_empty());
}

/// A digest learnt from the upstream's answer (`Filling::expect_digest`; say, the one a
/// registry announces for a tag) is verified with its own algorithm, and the verified digest
/// (`Filling::digest`) keys the commit; an announcement that contradicts the digest the fill
/// was joined with fails it before any byte is read.
#[tokio::test]
async fn a_digest_learnt_from_the_answer_is_verified_and_keys_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20).await;
    let fills: Fills<&'static str, ()> = Fills::new(cache.entries().clone(), FillOptions::new());
    let fill = |announced: ContentDigest, bytes: &'static [u8]| {
        move |mut filling: dunite_core::Filling<()>| async move {
            filling.expect_digest(announced)?;
            filling.respond((), None).await?;
            let chunks = [Ok::<_, std::io::Error>(Bytes::from_static(bytes))];
            filling.receive(futures_util::stream::iter(chunks)).await?;
            let key = filling.digest().expect("verified").to_string();
            filling.commit(&key, |_| String::new()).await
        }
    };
    let sha512 = ContentDigest::of(DigestAlgorithm::Sha512, b"a manifest");

    let mut right = fills.join("tag", Expected::new(), fill(sha512.clone(), b"a manifest")).unwrap();
    right.finished().await.unwrap();
    assert!(cache.contains(&sha512.to_string()).await.unwrap(), "committed under the sha512 digest");

    let mut wrong = fills.join("tag", Expected::new(), fill(sha512.clone(), b"other bytes")).unwrap();
    let error = wrong.finished().await.unwrap_err();
    assert!(
        matches!(&error, FillError::Invalid(e) if matches!(**e, Error::DigestMismatch { .. })),
        "{error:?}"
    );

    let joined_with = Expected::new().with_digest(ContentDigest::of(DigestAlgorithm::Sha256, b"x"));
    let mut contradicted = fills.join("tag", joined_with, fill(sha512, b"a manifest")).unwrap();
    let error = contradicted.finished().await.unwrap_err();
    assert!(
        matches!(&error, FillError::Invalid(e) if matches!(**e, Error::DigestMismatch { .. })),
        "{error:?}"
    );
    assert_eq!(cache.len().await.unwrap(), 1);
    assert!(spools(dir.path()).is_empty());
}
