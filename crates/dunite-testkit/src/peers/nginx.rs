//! nginx (Debian `nginx`) with two servers: static files from a directory with `sendfile`
//! (the limit a file server reaches on this machine, and the origin of downloads), and a
//! `proxy_cache` in front of that static server (the download proxy dunite is compared to).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::{PeerError, Process, ProcessUsage, Result, free_addr, tool};

/// How nginx is set up.
#[derive(Debug, Clone)]
pub struct NginxOptions {
    /// The directory the static server serves (`root`).
    pub root: PathBuf,
    /// The `proxy_cache_path`'s `max_size`, in bytes.
    pub cache_max_bytes: u64,
    /// `worker_processes`.
    pub workers: u32,
}

/// A running nginx: a master and its workers.
#[derive(Debug)]
pub struct Nginx {
    process: Process,
    /// The static file server (`sendfile on`).
    pub static_addr: SocketAddr,
    /// The caching proxy of the static server.
    pub cache_addr: SocketAddr,
}

impl Nginx {
    /// Start it with its configuration, temp directories, cache and log under `dir`.
    ///
    /// nginx writes no fsync when it fills its cache: its cache fills are not durable the way
    /// dunite's are.
    ///
    /// # Errors
    ///
    /// If it is not installed or does not answer in time (the error holds its log).
    pub async fn start(dir: &Path, options: &NginxOptions) -> Result<Self> {
        let program = tool("nginx", "nginx")?;
        for sub in ["tmp", "cache", "logs"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(PeerError::io("creating", &path))?;
        }
        let (static_addr, cache_addr) = (free_addr()?, free_addr()?);
        let tmp = dir.join("tmp");
        // `tcp_nopush` (TCP_CORK with sendfile) on the static server only: on the cache server
        // it stalled one keep-alive response in ten by 40 ms (a delayed ACK), which would make
        // the peer look worse than it is.
        // nginx refuses `user` unless it runs as root; as root, the workers must stay root to
        // read the caller's (private) temporary directories.
        let user = if is_root() { "user root;\n" } else { "" };
        let config = format!(
            "{user}daemon off;\nmaster_process on;\nworker_processes {workers};\npid {pid};\n\
             error_log {log} warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
               access_log off;\n  sendfile on;\n  keepalive_requests 1000000;\n\
               default_type application/octet-stream;\n\
               client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n\
               fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n\
               proxy_cache_path {cache} levels=1:2 keys_zone=dl:10m max_size={max} inactive=1d use_temp_path=off;\n\
               server {{ listen {static_addr}; root {root}; tcp_nopush on; }}\n\
               server {{\n    listen {cache_addr};\n    tcp_nopush off;\n    location / {{\n\
                 proxy_pass http://{static_addr};\n      proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\";\n      proxy_cache dl;\n\
                 proxy_cache_valid 200 1d;\n      proxy_cache_lock on;\n    }}\n  }}\n\
             }}\n",
            workers = options.workers,
            pid = dir.join("nginx.pid").display(),
            log = dir.join("logs/error.log").display(),
            tmp = tmp.display(),
            cache = dir.join("cache").display(),
            max = options.cache_max_bytes,
            root = options.root.display(),
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).map_err(PeerError::io("writing", &path))?;
        let mut command = Command::new(program);
        command.arg("-p").arg(dir).arg("-c").arg(&path).arg("-e").arg(dir.join("logs/error.log"));
        let mut process = Process::spawn("nginx", command, &dir.join("nginx.out"))?;
        process.wait_ready(static_addr, "/").await?;
        process.wait_ready(cache_addr, "/").await?;
        Ok(Self { process, static_addr, cache_addr })
    }

    /// CPU time and peak RSS of the master and its workers so far.
    ///
    /// # Errors
    ///
    /// If `/proc` cannot be read.
    pub fn usage(&self) -> Result<ProcessUsage> {
        self.process.usage()
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status.lines().any(|line| {
            line.strip_prefix("Uid:").is_some_and(|ids| ids.split_whitespace().next() == Some("0"))
        })
    })
}
