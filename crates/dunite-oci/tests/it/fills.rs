//! Blob fills: what a fill does when the cache already holds its blob.

use dunite_core::FillError;

use crate::{blob, open};

/// A fill whose upstream fails for a blob the cache holds by then (committed by a fill that
/// ended between the caller's look-up and its join) serves the cached blob: never a 404 for
/// a cached blob (found by review; failed before the fill looked at the cache).
#[tokio::test]
async fn a_fill_whose_upstream_fails_serves_the_blob_the_cache_holds() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20).await;
    let (digest, bytes) = blob(1, 5_000);
    cache.store(&digest, &bytes[..]).await.unwrap();
    let fetch = || async {
        Err::<(Option<u64>, futures_util::stream::Empty<Result<bytes::Bytes, std::io::Error>>), _>(
            FillError::Refused { status: 404 },
        )
    };
    let mut joined = cache.fill(&digest, fetch).unwrap();
    assert_eq!(joined.started().await.unwrap().total(), Some(5_000));
    let mut served = Vec::new();
    let mut body = std::pin::pin!(joined.body(0, None));
    while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
        served.extend_from_slice(&chunk.unwrap());
    }
    assert!(served == bytes);
}
