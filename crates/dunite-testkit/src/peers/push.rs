//! Seeding a registry through its HTTP API (the distribution spec's push side): monolithic
//! blob uploads (`POST` then `PUT ?digest=`) and manifests by tag.

use std::net::SocketAddr;

use sha2::Digest as _;

use super::{PeerError, Result};

/// The media type of the manifests [`push_image`] writes.
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// An image pushed by [`push_image`].
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// `sha256:<hex>` of the manifest.
    pub manifest_digest: String,
    /// The manifest's bytes.
    pub manifest: Vec<u8>,
    /// `sha256:<hex>` of each layer, in order.
    pub layers: Vec<String>,
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Push `bytes` as a blob of `repo`; returns its digest.
///
/// # Errors
///
/// If the registry refuses or cannot be reached.
pub async fn push_blob(
    client: &reqwest::Client,
    registry: SocketAddr,
    repo: &str,
    bytes: Vec<u8>,
) -> Result<String> {
    let digest = sha256_digest(&bytes);
    let what = format!("uploading {digest} to {registry}/{repo}");
    let start = client
        .post(format!("http://{registry}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .map_err(PeerError::http(what.clone()))?;
    if start.status() != reqwest::StatusCode::ACCEPTED {
        return Err(PeerError::Status { what, status: start.status().as_u16() });
    }
    let location = start
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| PeerError::Status { what: format!("{what} (no Location)"), status: 202 })?;
    let mut url =
        if location.starts_with('/') { format!("http://{registry}{location}") } else { location.to_owned() };
    url.push(if url.contains('?') { '&' } else { '?' });
    url.push_str("digest=");
    url.push_str(&digest);
    let done = client
        .put(url)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .map_err(PeerError::http(what.clone()))?;
    if done.status() != reqwest::StatusCode::CREATED {
        return Err(PeerError::Status { what, status: done.status().as_u16() });
    }
    Ok(digest)
}

/// Push an image of `layers` (and a small config naming `repo`) as `repo:tag`.
///
/// # Errors
///
/// If the registry refuses or cannot be reached.
pub async fn push_image(
    client: &reqwest::Client,
    registry: SocketAddr,
    repo: &str,
    tag: &str,
    layers: Vec<Vec<u8>>,
) -> Result<PushedImage> {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
        "config": {"Labels": {"repo": repo, "tag": tag}},
    }))
    .map_err(|e| PeerError::Io { op: "encoding", path: "config".into(), source: e.into() })?;
    let config_len = config.len();
    let config_digest = push_blob(client, registry, repo, config).await?;
    let mut entries = Vec::new();
    let mut digests = Vec::new();
    for layer in layers {
        let size = layer.len();
        let digest = push_blob(client, registry, repo, layer).await?;
        entries.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest,
            "size": size,
        }));
        digests.push(digest);
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_len},
        "layers": entries,
    }))
    .map_err(|e| PeerError::Io { op: "encoding", path: "manifest".into(), source: e.into() })?;
    let what = format!("pushing {registry}/{repo}:{tag}");
    let answer = client
        .put(format!("http://{registry}/v2/{repo}/manifests/{tag}"))
        .header(reqwest::header::CONTENT_TYPE, MANIFEST_TYPE)
        .body(manifest.clone())
        .send()
        .await
        .map_err(PeerError::http(what.clone()))?;
    if answer.status() != reqwest::StatusCode::CREATED {
        return Err(PeerError::Status { what, status: answer.status().as_u16() });
    }
    Ok(PushedImage { manifest_digest: sha256_digest(&manifest), manifest, layers: digests })
}
