//! One peer process: spawned with its output in a log file, polled until it answers HTTP,
//! measured (CPU time, peak RSS) from `/proc`, and stopped when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::{PeerError, Result};

/// How long a peer may take to answer after it is spawned.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a stopped peer may take to exit after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(5);
/// The interval between readiness polls (polling with a deadline, never a fixed wait).
const POLL: Duration = Duration::from_millis(20);
/// Linux's `USER_HZ`: the unit of the CPU times in `/proc/<pid>/stat` (100 on every
/// architecture Linux supports today).
const TICKS_PER_SECOND: f64 = 100.0;

/// A free loopback address (bound and released: another process could take the port in
/// between, a race acceptable for tests and benchmarks).
///
/// # Errors
///
/// If no port can be bound.
pub fn free_addr() -> Result<SocketAddr> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(PeerError::io("binding", "127.0.0.1:0"))?;
    listener.local_addr().map_err(PeerError::io("binding", "127.0.0.1:0"))
}

/// The installed program `name` (from the Debian package `package`).
///
/// # Errors
///
/// [`PeerError::NotInstalled`] if it is in none of the usual directories.
pub fn tool(name: &str, package: &str) -> Result<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
        .ok_or_else(|| PeerError::NotInstalled { program: name.to_owned(), package: package.to_owned() })
}

/// CPU time, memory and disk writes of a process and its children (nginx's workers).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessUsage {
    /// User plus system CPU seconds so far.
    pub cpu_seconds: f64,
    /// The sum of the processes' peak resident set sizes (`VmHWM`), in bytes.
    pub peak_rss_bytes: u64,
    /// Bytes the processes caused to be written to storage so far (`write_bytes` of
    /// `/proc/<pid>/io`, counted when pages are dirtied; 0 where unreadable).
    pub disk_write_bytes: u64,
}

/// A running peer process, stopped when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    peer: &'static str,
    log: PathBuf,
}

impl Process {
    /// Spawn `command` as `peer`, its stdout and stderr going to `log`.
    ///
    /// # Errors
    ///
    /// If the log cannot be created or the program cannot be started.
    pub fn spawn(peer: &'static str, mut command: Command, log: &Path) -> Result<Self> {
        let out = std::fs::File::create(log).map_err(PeerError::io("creating", log))?;
        let err = out.try_clone().map_err(PeerError::io("opening", log))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(PeerError::io("starting", peer))?;
        Ok(Self { child, peer, log: log.to_path_buf() })
    }

    /// The process id (none once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Poll `GET http://{addr}{path}` until it answers with a status below 500.
    ///
    /// # Errors
    ///
    /// [`PeerError::Exited`] if the process ends first, [`PeerError::NotReady`] if it has not
    /// answered within 30 s.
    pub async fn wait_ready(&mut self, addr: SocketAddr, path: &str) -> Result<()> {
        let url = format!("http://{addr}{path}");
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(PeerError::http("building a client"))?;
        let give_up = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().map_err(PeerError::io("waiting for", self.peer))? {
                return Err(PeerError::Exited { peer: self.peer, status, log: self.log_text() });
            }
            let answered = client.get(&url).send().await.is_ok_and(|r| !r.status().is_server_error());
            if answered {
                return Ok(());
            }
            if Instant::now() >= give_up {
                return Err(PeerError::NotReady { peer: self.peer, addr, log: self.log_text() });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// CPU time and peak RSS of the process and its direct children, from `/proc`.
    ///
    /// # Errors
    ///
    /// If the process is gone or `/proc` cannot be read.
    pub fn usage(&self) -> Result<ProcessUsage> {
        let pid = self.pid().ok_or_else(|| PeerError::Io {
            op: "measuring",
            path: self.peer.into(),
            source: std::io::Error::other("the process has exited"),
        })?;
        let mut usage = ProcessUsage::default();
        for pid in std::iter::once(pid).chain(children(pid)) {
            let Some((cpu, rss)) = proc_usage(pid) else { continue };
            usage.cpu_seconds += cpu;
            usage.peak_rss_bytes += rss;
            usage.disk_write_bytes += disk_write_bytes(pid).unwrap_or(0);
        }
        Ok(usage)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGTERM first (nginx's master then stops its workers), SIGKILL if it lingers.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let give_up = Instant::now() + STOP_DEADLINE;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.start_kill();
    }
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| stat_fields(child).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(pid))
        .collect()
}

/// The fields of `/proc/<pid>/stat` after the command name (state is field 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after its last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// `write_bytes` of one process's `/proc/<pid>/io`.
fn disk_write_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines().find_map(|line| line.strip_prefix("write_bytes:")).and_then(|v| v.trim().parse().ok())
}

/// (CPU seconds, `VmHWM` bytes) of one process.
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let fields = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of stat(5), 11 and 12 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let seconds = ticks as f64 / TICKS_PER_SECOND;
    Some((seconds, hwm_kib * 1024))
}
