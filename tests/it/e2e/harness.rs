//! Processes and images for the end-to-end tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sha2::Digest as _;
use tokio::process::{Child, Command};

/// How long any one external command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// A free loopback port (bound and released; the usual small race is acceptable here).
pub fn free_port() -> u16 {
    dunite_testkit::peers::free_addr().unwrap().port()
}

async fn wait_listening(addr: SocketAddr, what: &str, log: &Path) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < give_up,
            "{what} did not listen on {addr}; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn tool(name: &str) -> PathBuf {
    dunite_testkit::peers::tool(name, name).unwrap_or_else(|e| panic!("{e}"))
}

/// Debian's distribution registry, on a free loopback port, storing in a temporary directory
/// (started by the same code as the benchmarks' peers).
pub struct Registry {
    inner: dunite_testkit::peers::Registry,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// The registry's log, for failure messages.
    pub fn log_text(&self) -> String {
        self.inner.log_text()
    }

    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let inner =
            dunite_testkit::peers::Registry::start(dir.path(), dunite_testkit::peers::RegistryMode::Plain)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        Self { addr: inner.addr, inner, _dir: dir }
    }

    /// Fetch `repo:reference`'s manifest as `media_type`.
    pub async fn manifest(&self, repo: &str, reference: &str, media_type: &str) -> Vec<u8> {
        let url = format!("http://{}/v2/{repo}/manifests/{reference}", self.addr);
        let response = reqwest::Client::new().get(url).header("accept", media_type).send().await.unwrap();
        assert!(response.status().is_success(), "{repo}:{reference}: {}", response.status());
        response.bytes().await.unwrap().to_vec()
    }

    /// Push `body` as `repo:reference`, a manifest of `media_type` (its blobs pushed already).
    pub async fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: Vec<u8>) {
        let url = format!("http://{}/v2/{repo}/manifests/{reference}", self.addr);
        let response = reqwest::Client::new()
            .put(url)
            .header("content-type", media_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "pushing {repo}:{reference}: {}", response.status());
    }
}

/// The `dunite` binary, built by the workspace build next to this test binary.
pub fn dunite_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("dunite");
    assert!(
        bin.exists(),
        "{} is not built; run the workspace build (cargo xtask ci builds it)",
        bin.display()
    );
    bin
}

/// A running `dunite serve`, its log and (unless the caller gave one) its data directory.
pub struct Dunite {
    child: Child,
    pub addr: SocketAddr,
    /// Holds the log, and the data directory when the instance owns it.
    _dir: tempfile::TempDir,
    pub log: PathBuf,
    /// `http://ADDR`, or `https://ADDR` when it serves TLS.
    pub base: String,
    /// A client of this instance (trusting the CAs given to [`start_tls`](Self::start_tls)).
    pub client: reqwest::Client,
}

/// A test CA and a leaf certificate it signed for `127.0.0.1` and `localhost`, as PEM.
pub struct Pki {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl Pki {
    /// A new CA named `{name} CA` and a leaf with the common name `name` (each call makes new
    /// keys: two `Pki`s never trust each other's certificates).
    pub fn generate(name: &str) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, name);
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        Self { ca: ca_cert.pem(), cert: cert.pem(), key: key.serialize_pem() }
    }

    /// Write the leaf's certificate and key where a dunite reads them, each by rename (a
    /// reader never sees half a file).
    pub fn install(&self, files: &TlsFiles) {
        for (path, text) in [(&files.cert, &self.cert), (&files.key, &self.key)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
    }

    /// A client trusting this CA only, which keeps its connections alive.
    pub fn client(&self) -> reqwest::Client {
        client_trusting(&[&self.ca])
    }
}

/// Where a TLS dunite reads its certificate and key (in a temporary directory of its own).
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsFiles {
    /// `pki`'s leaf installed in a new temporary directory.
    pub fn of(pki: &Pki) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = Self { cert: dir.path().join("cert.pem"), key: dir.path().join("key.pem"), _dir: dir };
        pki.install(&files);
        files
    }
}

/// A reqwest client whose only roots are the CAs in `roots` (PEM).
pub fn client_trusting(roots: &[&str]) -> reqwest::Client {
    let roots = roots.iter().map(|pem| reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
    reqwest::Client::builder().tls_certs_only(roots).build().unwrap()
}

impl Dunite {
    /// Serve with `upstream` as registry `local` (the default) and `extra` flags.
    pub async fn start(upstream: SocketAddr, oci_max_bytes: &str, extra: &[&str]) -> Self {
        Self::start_logging(upstream, oci_max_bytes, extra, "info").await
    }

    /// As [`start`](Self::start), logging at `level` (`DUNITE_LOG`).
    pub async fn start_logging(
        upstream: SocketAddr,
        oci_max_bytes: &str,
        extra: &[&str],
        level: &str,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("cache");
        Self::spawn(upstream, oci_max_bytes, extra, level, &data_dir, dir, None).await
    }

    /// As [`start`](Self::start), serving HTTPS with the certificate and key in `files`; the
    /// harness's own requests (readiness, [`metric`](Self::metric)) trust the CAs in `roots`.
    pub async fn start_tls(upstream: SocketAddr, extra: &[&str], files: &TlsFiles, roots: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("cache");
        Self::spawn(upstream, "64MiB", extra, "info", &data_dir, dir, Some((files, roots))).await
    }

    /// As [`start_logging`](Self::start_logging), on the caller's `data_dir` (which several
    /// instances may share); only the log lives in a temporary directory of this instance's.
    pub async fn start_with_data(
        upstream: SocketAddr,
        oci_max_bytes: &str,
        extra: &[&str],
        level: &str,
        data_dir: &Path,
    ) -> Self {
        Self::spawn(upstream, oci_max_bytes, extra, level, data_dir, tempfile::tempdir().unwrap(), None).await
    }

    /// Start the process on `data_dir`, logging to `dunite.log` in `dir` (kept as long as this).
    async fn spawn(
        upstream: SocketAddr,
        oci_max_bytes: &str,
        extra: &[&str],
        level: &str,
        data_dir: &Path,
        dir: tempfile::TempDir,
        tls: Option<(&TlsFiles, &[&str])>,
    ) -> Self {
        // `free_port` releases the port it found, and another test may take it before this
        // process binds it: then it fails with "Address already in use", and another port is
        // tried (at most three).
        for attempt in 1.. {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log = dir.path().join("dunite.log");
            let mut command = Command::new(dunite_binary());
            let (base, client) = match tls {
                Some((files, roots)) => {
                    command.arg("serve").arg("--tls-cert").arg(&files.cert).arg("--tls-key").arg(&files.key);
                    (format!("https://{addr}"), client_trusting(roots))
                }
                None => {
                    command.arg("serve");
                    (format!("http://{addr}"), reqwest::Client::new())
                }
            };
            let mut child = command
                .args(["--listen", &addr.to_string()])
                .arg("--data-dir")
                .arg(data_dir)
                .args(["--upstream", &format!("local=http://{upstream}"), "--default-registry", "local"])
                .args(["--oci-max-bytes", oci_max_bytes])
                .args(extra)
                .env("DUNITE_LOG", level)
                .env("NO_COLOR", "1")
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            wait_listening(addr, "dunite", &log).await;
            // It binds before it opens the caches: listening is not serving yet, and it may
            // still fail to start.
            let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
            let healthz = format!("{base}/healthz");
            let ready = || async {
                let answer = tokio::time::timeout(Duration::from_secs(1), client.get(&healthz).send()).await;
                answer.is_ok_and(|answer| answer.is_ok_and(|response| response.status().is_success()))
            };
            let mut port_taken = false;
            while !ready().await {
                let exited = child.try_wait().unwrap();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if exited.is_some() && attempt < 3 && text.contains("Address already in use") {
                    port_taken = true;
                    break;
                }
                assert!(
                    exited.is_none() && tokio::time::Instant::now() < give_up,
                    "dunite did not start ({exited:?}); its log:\n{text}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Another process that took the port may answer `/healthz` itself: this one must
            // still be running.
            if !port_taken && let Some(status) = child.try_wait().unwrap() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                assert!(
                    attempt < 3 && text.contains("Address already in use"),
                    "dunite exited ({status}):\n{text}"
                );
                port_taken = true;
            }
            if !port_taken {
                return Self { child, addr, _dir: dir, log, base, client };
            }
        }
        unreachable!("the attempts above return or panic")
    }

    /// One sample from `GET /metrics` (over TLS when it serves TLS); see [`metric`].
    pub async fn metric(&self, series: &str) -> u64 {
        metric_from(&self.client, &self.base, series).await
    }

    /// The process's id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    /// Send `signal` (`HUP`, `TERM`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().unwrap();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn stop(self) -> std::process::ExitStatus {
        self.stop_with_log().await.0
    }

    /// As [`stop`](Self::stop), also returning the whole log (which goes with `self`).
    pub async fn stop_with_log(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().unwrap();
        let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
        assert!(status.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.unwrap().unwrap();
        (status, self.log_text())
    }
}

/// One sample from a dunite's `GET /metrics`, e.g. `dunite_blob_misses_total` or
/// `dunite_cache_bytes{cache="blobs"}`.
pub async fn metric(addr: SocketAddr, series: &str) -> u64 {
    metric_from(&reqwest::Client::new(), &format!("http://{addr}"), series).await
}

/// As [`metric`], from the dunite at `base` (`http://...` or `https://...`) through `client`.
async fn metric_from(client: &reqwest::Client, base: &str, series: &str) -> u64 {
    let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// An OCI image layout with random layers.
pub struct Image {
    pub layout: tempfile::TempDir,
}

impl Image {
    pub fn build(seed: u64, layers: usize, layer_size: usize) -> Self {
        let layout = tempfile::tempdir().unwrap();
        let blob_dir = layout.path().join("blobs/sha256");
        std::fs::create_dir_all(&blob_dir).unwrap();
        let put = |bytes: &[u8]| {
            let hex = hex::encode(sha2::Sha256::digest(bytes));
            std::fs::write(blob_dir.join(&hex), bytes).unwrap();
            hex
        };
        let mut layer_json = Vec::new();
        for i in 0..layers {
            let bytes = dunite_testkit::pseudo_random_bytes(seed * 1000 + i as u64, layer_size + i);
            let hex = put(&bytes);
            layer_json.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{hex}"),
                "size": bytes.len(),
            }));
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
            "config": {"Labels": {"seed": seed.to_string()}},
        }))
        .unwrap();
        let config_hex = put(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_hex}"), "size": config.len()},
            "layers": layer_json,
        }))
        .unwrap();
        let manifest_hex = put(&manifest);
        std::fs::write(
            layout.path().join("index.json"),
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "manifests": [{
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{manifest_hex}"),
                    "size": manifest.len(),
                    "annotations": {"org.opencontainers.image.ref.name": "v1"},
                }],
            }))
            .unwrap(),
        )
        .unwrap();
        std::fs::write(layout.path().join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Self { layout }
    }

    /// Push to `registry` as `repo:v1`.
    pub async fn push(&self, registry: SocketAddr, repo: &str) {
        let source = format!("oci:{}:v1", self.layout.path().display());
        skopeo(&["copy", "--dest-tls-verify=false", &source, &format!("docker://{registry}/{repo}:v1")])
            .await
            .unwrap();
    }
}

/// Compare two `skopeo copy ... dir:` results file by file; Ok carries the blob bytes (all
/// files but `manifest.json` and `version`).
pub fn same_copy(expected: &Path, actual: &Path) -> Result<u64, String> {
    let names = |dir: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        names
    };
    let (want, got) = (names(expected), names(actual));
    if want != got {
        return Err(format!("the copies hold different files: {want:?} vs {got:?}"));
    }
    let mut blob_bytes = 0;
    for name in want {
        let a = std::fs::read(expected.join(&name)).unwrap();
        if a != std::fs::read(actual.join(&name)).unwrap() {
            return Err(format!("{name:?} differs between the direct and the mirrored copy"));
        }
        if name != "manifest.json" && name != "version" {
            blob_bytes += a.len() as u64;
        }
    }
    Ok(blob_bytes)
}

/// As [`same_copy`], panicking on a difference.
pub fn assert_same_copy(expected: &Path, actual: &Path) -> u64 {
    same_copy(expected, actual).unwrap_or_else(|e| panic!("{e}"))
}

/// Run skopeo with a timeout; Err carries its output.
pub async fn skopeo(args: &[&str]) -> Result<(), String> {
    skopeo_output(args).await.map(drop)
}

/// As [`skopeo`], returning what it printed.
pub async fn skopeo_output(args: &[&str]) -> Result<String, String> {
    let run = Command::new(tool("skopeo")).args(args).kill_on_drop(true).output();
    let output =
        tokio::time::timeout(COMMAND_TIMEOUT, run).await.map_err(|_| "skopeo timed out".to_owned())?;
    let output = output.map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("skopeo {args:?} failed:\n{}", String::from_utf8_lossy(&output.stderr)))
    }
}

/// What curl got: status, headers (lower-cased names), body.
pub struct Got {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

/// `curl -s URL` with `args` (credentials), keeping the status, headers and body.
pub async fn curl(url: &str, args: &[&str]) -> Got {
    curl_with(None, url, args).await
}

/// As [`curl`], trusting the CA certificate file `ca` (for a TLS mirror) if given.
pub async fn curl_with(ca: Option<&Path>, url: &str, args: &[&str]) -> Got {
    let dir = tempfile::tempdir().unwrap();
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let run = Command::new(tool("curl"))
        .args(["-s", "--max-time", "60", "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(ca.map(|ca| ["--cacert".as_ref(), ca.as_os_str()]).into_iter().flatten())
        .args(args)
        .arg(url)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(90), run).await.unwrap().unwrap();
    Got {
        status: String::from_utf8_lossy(&output.stdout).trim().parse().unwrap(),
        headers: std::fs::read_to_string(&head).unwrap_or_default().to_ascii_lowercase(),
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

/// Pull `repo:v1` from `registry` (dunite or the upstream itself) into a fresh `dir:`.
pub async fn pull(dunite: SocketAddr, repo: &str) -> Result<tempfile::TempDir, String> {
    let dest = tempfile::tempdir().unwrap();
    let target = format!("dir:{}", dest.path().display());
    skopeo(&["copy", "--src-tls-verify=false", &format!("docker://{dunite}/{repo}:v1"), &target]).await?;
    Ok(dest)
}
