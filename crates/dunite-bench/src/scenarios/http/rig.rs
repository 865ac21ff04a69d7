//! The servers of the HTTP scenarios, started by the bench itself in one run: the upstream
//! registry (seeded through its push API), its proxy mode (dunite's peer as a mirror), nginx
//! (static files: the limit; `proxy_cache`: dunite's peer as a download proxy) and the real
//! `dunite` binary. The same bytes are in the registry and in nginx's root.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use dunite_testkit::peers::push::{self, PushedImage};
use dunite_testkit::peers::{Dunite, DuniteOptions, Nginx, NginxOptions, Registry, RegistryMode};

use crate::Result;
use crate::payload::GenReader;

/// The repository of every seeded image but the pulled ones.
pub const REPO: &str = "bench/blobs";

/// The sizes and counts of the seeded data.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Small cached blobs: count and size.
    pub small: (usize, usize),
    /// Large cached blobs: count and size.
    pub large: (usize, usize),
    /// Blobs fetched cold, one at a time: count and size.
    pub cold: (usize, usize),
    /// The size of the blob 16 clients ask for at once, cold.
    pub flight: usize,
    /// Images pulled with skopeo: images, layers each, layer size.
    pub images: (usize, usize, usize),
    /// Downloads: count and size.
    pub downloads: (usize, usize),
    /// About how many bytes each cached-blob load asks for (at least one request per client).
    pub hit_bytes: u64,
    /// Requests of each tag-manifest load.
    pub manifest_requests: usize,
}

impl Sizes {
    /// The sizes of a full run (`quick`: a smoke test's).
    pub fn new(quick: bool) -> Self {
        const MIB: usize = 1 << 20;
        if quick {
            Self {
                small: (16, 64 << 10),
                large: (2, MIB),
                cold: (4, 256 << 10),
                flight: MIB,
                images: (2, 2, 64 << 10),
                downloads: (8, 64 << 10),
                hit_bytes: 16 << 20,
                manifest_requests: 500,
            }
        } else {
            Self {
                small: (64, MIB),
                large: (4, 64 * MIB),
                cold: (8, 16 * MIB),
                flight: 64 * MIB,
                images: (4, 6, 4 * MIB),
                downloads: (40, 2 * MIB),
                hit_bytes: 1 << 30,
                manifest_requests: 2_000,
            }
        }
    }

    /// The smallest sizes that still run every load: for the test that keeps this code alive.
    #[cfg(test)]
    pub fn tiny() -> Self {
        Self {
            small: (2, 4 << 10),
            large: (1, 64 << 10),
            cold: (2, 4 << 10),
            flight: 64 << 10,
            images: (1, 1, 4 << 10),
            downloads: (2, 4 << 10),
            hit_bytes: 64 << 10,
            manifest_requests: 64,
        }
    }
}

/// A seeded blob: its digest and length.
#[derive(Debug, Clone)]
pub struct Blob {
    pub digest: String,
    pub len: u64,
}

impl Blob {
    /// Its path on a registry (dunite, the proxy, the upstream).
    pub fn registry_path(&self) -> String {
        format!("/v2/{REPO}/blobs/{}", self.digest)
    }

    /// Its path on nginx's static server.
    pub fn static_path(&self) -> String {
        format!("/blobs/{}", self.digest.trim_start_matches("sha256:"))
    }
}

/// Everything seeded.
#[derive(Debug, Clone)]
pub struct Seeded {
    pub small: Vec<Blob>,
    pub large: Vec<Blob>,
    pub cold: Vec<Blob>,
    pub flight: Blob,
    /// `bench/blobs:v1`, whose layers are the small blobs (the manifest of the tag scenario).
    pub tagged: PushedImage,
    /// The pulled images' repositories (tag `v1`).
    pub images: Vec<String>,
    /// Download file names under nginx's `/dl/` and their length.
    pub downloads: Vec<String>,
    pub download_len: u64,
}

/// The running servers, stopped when dropped.
#[derive(Debug)]
pub struct Rig {
    pub upstream: Registry,
    pub proxy: Registry,
    pub nginx: Nginx,
    pub dunite: Dunite,
    pub seeded: Seeded,
    pub sizes: Sizes,
    /// Holds every server's files.
    _dir: tempfile::TempDir,
}

impl Rig {
    /// Start every server under a fresh directory in `parent`, seed them, and return once all
    /// answer. `dunite` is the binary to run.
    ///
    /// # Errors
    ///
    /// If a server cannot start (the error holds its log) or seeding fails.
    pub async fn start(parent: &Path, dunite: &Path, sizes: Sizes) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("dunite-bench-http-").tempdir_in(parent)?;
        let root = dir.path().join("www");
        let upstream = Registry::start(&dir.path().join("upstream"), RegistryMode::Plain).await?;
        let seeded = seed(upstream.addr, &root, sizes).await?;
        let proxy = Registry::start(&dir.path().join("proxy"), RegistryMode::Proxy(upstream.addr)).await?;
        let cache_max_bytes = 4 * (sizes.downloads.0 * sizes.downloads.1) as u64 + (64 << 20);
        let nginx =
            Nginx::start(&dir.path().join("nginx"), &NginxOptions { root, cache_max_bytes, workers: 2 })
                .await?;
        let dunite = Dunite::start(
            &dir.path().join("dunite"),
            &DuniteOptions {
                binary: dunite.to_path_buf(),
                upstream: upstream.addr,
                oci_max_bytes: 16 << 30,
                // Access logs are off for every server compared (see the registry's config).
                log_level: "warn".to_owned(),
                extra: ["--dl-allow", &nginx.static_addr.to_string(), "--dl-max-bytes", "16GiB"]
                    .map(str::to_owned)
                    .to_vec(),
            },
        )
        .await?;
        Ok(Self { upstream, proxy, nginx, dunite, seeded, sizes, _dir: dir })
    }

    /// The `/dl/` path of download `name` through dunite, `round` making a fresh URL.
    pub fn dunite_download(&self, name: &str, round: &str) -> String {
        format!("/dl/http://{}/dl/{name}?r={round}", self.nginx.static_addr)
    }
}

/// The `dunite` binary to measure: `$DUNITE_BENCH_BINARY` if set (a build of another commit,
/// to compare), else the one beside the running executable (`target/<profile>/`), or one
/// level up from a test binary in `target/<profile>/deps/`.
pub fn dunite_binary() -> Result<PathBuf> {
    if let Some(binary) = std::env::var_os("DUNITE_BENCH_BINARY") {
        return Ok(binary.into());
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().ok_or("the executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().ok_or("deps has no parent")?;
    }
    Ok(dir.join("dunite"))
}

/// Push the blobs and images to the upstream and write the same blob bytes, and the download
/// files, under nginx's `root`.
async fn seed(upstream: SocketAddr, root: &Path, sizes: Sizes) -> Result<Seeded> {
    let mut seeder = Seeder {
        client: reqwest::Client::builder().no_proxy().build()?,
        upstream,
        blobs_dir: root.join("blobs"),
        seed: 700_000,
    };
    std::fs::create_dir_all(&seeder.blobs_dir)?;
    let large = seeder.blobs(sizes.large).await?;
    let cold = seeder.blobs(sizes.cold).await?;
    let flight = seeder.blobs((1, sizes.flight)).await?.remove(0);
    // The small blobs go up as the layers of the tagged image (and to nginx's root).
    let small_bytes: Vec<Vec<u8>> = (0..sizes.small.0).map(|_| seeder.bytes(sizes.small.1)).collect();
    let mut small = Vec::new();
    for bytes in &small_bytes {
        small.push(seeder.write_static(bytes)?);
    }
    let tagged = push::push_image(&seeder.client, upstream, REPO, "v1", small_bytes).await?;
    std::fs::create_dir_all(root.join("manifests"))?;
    std::fs::write(root.join("manifests/v1"), &tagged.manifest)?;
    let (count, layers, layer_len) = sizes.images;
    let mut images = Vec::new();
    for i in 0..count {
        let repo = format!("bench/image-{i}");
        let layer_bytes = (0..layers).map(|_| seeder.bytes(layer_len)).collect();
        push::push_image(&seeder.client, upstream, &repo, "v1", layer_bytes).await?;
        images.push(repo);
    }
    let dl_dir = root.join("dl");
    std::fs::create_dir_all(&dl_dir)?;
    let mut downloads = Vec::new();
    for i in 0..sizes.downloads.0 {
        let name = format!("file-{i}.bin");
        std::fs::write(dl_dir.join(&name), seeder.bytes(sizes.downloads.1))?;
        downloads.push(name);
    }
    Ok(Seeded {
        small,
        large,
        cold,
        flight,
        tagged,
        images,
        downloads,
        download_len: sizes.downloads.1 as u64,
    })
}

/// Generates distinct payloads and puts them in the upstream and nginx's root.
struct Seeder {
    client: reqwest::Client,
    upstream: SocketAddr,
    blobs_dir: PathBuf,
    seed: u64,
}

impl Seeder {
    /// `len` fresh pseudo-random bytes.
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        self.seed += 1;
        GenReader::to_vec(self.seed, len)
    }

    /// Write `bytes` to nginx's root under their digest.
    fn write_static(&self, bytes: &[u8]) -> Result<Blob> {
        let digest = push::sha256_digest(bytes);
        std::fs::write(self.blobs_dir.join(digest.trim_start_matches("sha256:")), bytes)?;
        Ok(Blob { digest, len: bytes.len() as u64 })
    }

    /// `count` fresh blobs of `len` bytes, in the upstream and nginx's root.
    async fn blobs(&mut self, (count, len): (usize, usize)) -> Result<Vec<Blob>> {
        let mut set = Vec::with_capacity(count);
        for _ in 0..count {
            let bytes = self.bytes(len);
            set.push(self.write_static(&bytes)?);
            push::push_blob(&self.client, self.upstream, REPO, bytes).await?;
        }
        Ok(set)
    }
}
