//! Debian's distribution registry (`docker-registry serve config.yml`), plain or as a
//! pull-through proxy of another registry.

use std::net::SocketAddr;
use std::path::Path;

use tokio::process::Command;

use super::{PeerError, Process, ProcessUsage, Result, free_addr, tool};

/// How the registry serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryMode {
    /// A registry of its own (pushes accepted).
    Plain,
    /// A pull-through mirror of the registry at this address (its `proxy.remoteurl`).
    Proxy(SocketAddr),
}

/// A running distribution registry, storing under a directory of the caller's.
#[derive(Debug)]
pub struct Registry {
    process: Process,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Registry {
    /// Start it in `mode`, with its configuration, storage and log under `dir`; access logs
    /// are off (as for every peer the benchmarks compare).
    ///
    /// # Errors
    ///
    /// If it is not installed or does not answer `GET /v2/` in time (the error holds its log).
    /// In [`RegistryMode::Proxy`] the remote must be up: the registry checks it at start.
    pub async fn start(dir: &Path, mode: RegistryMode) -> Result<Self> {
        let program = tool("docker-registry", "docker-registry")?;
        std::fs::create_dir_all(dir).map_err(PeerError::io("creating", dir))?;
        let addr = free_addr()?;
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  cache:\n    blobdescriptor: inmemory\n\
             http:\n  addr: {addr}\n",
            dir.join("data").display()
        );
        if let RegistryMode::Proxy(remote) = mode {
            config.push_str(&format!("proxy:\n  remoteurl: http://{remote}\n"));
        }
        let path = dir.join("config.yml");
        std::fs::write(&path, config).map_err(PeerError::io("writing", &path))?;
        let mut command = Command::new(program);
        command.arg("serve").arg(&path);
        let mut process = Process::spawn("docker-registry", command, &dir.join("registry.log"))?;
        process.wait_ready(addr, "/v2/").await?;
        Ok(Self { process, addr })
    }

    /// Its CPU time and peak RSS so far.
    ///
    /// # Errors
    ///
    /// If `/proc` cannot be read.
    pub fn usage(&self) -> Result<ProcessUsage> {
        self.process.usage()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}
