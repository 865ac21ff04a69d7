//! A throwaway PostgreSQL cluster for the test suite and the benchmarks.
//!
//! [`Cluster::start`] runs `initdb` into a fresh directory, writes its settings into the
//! cluster's `postgresql.conf`, starts the server on a free loopback port with `pg_ctl` and waits
//! until it accepts TCP connections. Dropping the [`Cluster`] stops the server and removes the
//! directory, so a task that returns an error (rather than calling `process::exit`) still
//! cleans up. A watchdog covers the case Drop cannot: the task being killed (Ctrl-C).
//!
//! The settings live in `postgresql.conf` (not on `pg_ctl -o`), so a test that stops and starts
//! the server with plain `pg_ctl stop` / `pg_ctl start` (see [`Cluster::ctl_prefix`]) gets it
//! back on the same port with the same settings.

use std::ffi::OsStr;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The superuser `initdb` creates; tests connect as it, without a password (`-A trust`).
const USER: &str = "dunite";
/// The OS account that owns the cluster when we run as root (`initdb` refuses root).
const OS_USER: &str = "postgres";
/// How long to wait for the server to start, and then to accept TCP connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// A Unix socket path must fit `sun_path`: 108 bytes with the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// A running, throwaway PostgreSQL server. Stopped, and its directory removed, on drop.
pub struct Cluster {
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    bin: Binaries,
    as_postgres: bool,
    watchdog: Option<Child>,
}

/// Where `initdb` and `pg_ctl` are.
struct Binaries {
    initdb: PathBuf,
    pg_ctl: PathBuf,
}

impl Cluster {
    /// Create and start a cluster under `<workspace_root>/target` (or the temporary directory,
    /// see [`choose_dir`]).
    pub fn start(workspace_root: &Path) -> Result<Self, String> {
        let started = Instant::now();
        let bin = Binaries::find()?;
        let as_postgres = running_as_root()?;
        let port = free_port()?;
        let dir = choose_dir(workspace_root, port, as_postgres)?;
        let data = dir.join("data");
        let log = dir.join("server.log");
        let mut cluster = Self { dir, data, log, port, bin, as_postgres, watchdog: None };
        // From here on, Drop (or the watchdog) cleans up whatever part of the set-up was done.
        cluster.watchdog = cluster.spawn_watchdog();
        cluster.init()?;
        cluster.configure()?;
        cluster.run_ctl(&["-w", "-t", &START_TIMEOUT.as_secs().to_string(), "start"])?;
        cluster.wait_for_tcp()?;
        eprintln!(
            "xtask: pg         PostgreSQL on 127.0.0.1:{port} (in {}), started in {:.1}s",
            cluster.dir.display(),
            started.elapsed().as_secs_f32()
        );
        Ok(cluster)
    }

    /// The URL of the server's `postgres` database, as the `dunite` superuser.
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// The command line, space-separated, that runs `pg_ctl` for this cluster (as the
    /// `postgres` user when we are root, with `-D` and `-l`): append `stop -m fast -w` or
    /// `start -w -t 60`. Every path in it is ours and free of whitespace (checked in
    /// [`choose_dir`] and [`Binaries::find`]), so splitting it on whitespace gives the argv back.
    pub fn ctl_prefix(&self) -> String {
        let argv = self.ctl_argv();
        let words: Vec<_> = argv.iter().map(|word| word.to_string_lossy()).collect();
        assert!(
            words.iter().all(|word| !word.is_empty() && !word.contains(char::is_whitespace)),
            "pg_ctl command line {words:?} has a word with whitespace"
        );
        words.join(" ")
    }

    /// `ctl_prefix` as an argv.
    fn ctl_argv(&self) -> Vec<&OsStr> {
        let mut argv: Vec<&OsStr> = Vec::new();
        if self.as_postgres {
            argv.extend(["runuser", "-u", OS_USER, "--"].map(OsStr::new));
        }
        argv.extend([self.bin.pg_ctl.as_os_str(), "-D".as_ref(), self.data.as_os_str()]);
        argv.extend(["-l".as_ref(), self.log.as_os_str()]);
        argv
    }

    /// `initdb`: superuser `dunite`, trusted local and loopback connections, UTF-8, C locale
    /// (no dependence on the machine's installed locales), no fsync of the new files.
    fn init(&self) -> Result<(), String> {
        let mut command = self.command(&self.bin.initdb);
        command.arg("-D").arg(&self.data);
        command.args(["-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]);
        run_quietly(command, "initdb")
    }

    /// Append our settings to `postgresql.conf`; later ones win over the defaults above them.
    fn configure(&self) -> Result<(), String> {
        let settings = format!(
            "\n# Added by `cargo xtask` for a throwaway test cluster.\n\
             port = {port}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{dir}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 300\n\
             shared_buffers = 128MB\n",
            port = self.port,
            dir = self.dir.display(),
        );
        let conf = self.data.join("postgresql.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut file| file.write_all(settings.as_bytes()))
            .map_err(|e| format!("cannot append to {}: {e}", conf.display()))
    }

    /// Run `pg_ctl` (through `ctl_prefix`) with `args` appended.
    fn run_ctl(&self, args: &[&str]) -> Result<(), String> {
        let argv = self.ctl_argv();
        let mut command = Command::new(argv[0]);
        command.args(&argv[1..]).args(args).current_dir(&self.dir);
        run_quietly(command, "pg_ctl").map_err(|e| format!("{e}\nserver log:\n{}", self.log_tail()))
    }

    /// `program`, run as the `postgres` user when we are root, from the cluster directory (so
    /// it never starts in a directory that user cannot enter).
    fn command(&self, program: &Path) -> Command {
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", OS_USER, "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command.current_dir(&self.dir);
        command
    }

    /// `pg_ctl -w` returns once the server is ready; poll the port too, with a deadline, since
    /// TCP is what the tests use.
    fn wait_for_tcp(&self) -> Result<(), String> {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match TcpStream::connect_timeout(&address, Duration::from_secs(1)) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "PostgreSQL does not accept connections on {address} after {START_TIMEOUT:?}: \
                         {e}\nserver log:\n{}",
                        self.log_tail()
                    ));
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Stop the cluster and remove its directory should this process die without running
    /// Drop (Ctrl-C or a kill): `pg_ctl` detaches the server from our process group, so the
    /// terminal's signal does not reach it. The watchdog is a shell in a process group of its
    /// own that polls for our pid once a second; Drop kills it before cleaning up itself. Best
    /// effort: without it, only a kill leaks the cluster.
    fn spawn_watchdog(&self) -> Option<Child> {
        use std::os::unix::process::CommandExt as _;
        let script = r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done; shift; dir=$1; shift; "$@" stop -m immediate -w >/dev/null 2>&1; rm -rf "$dir""#;
        let mut command = Command::new("sh");
        command.args(["-c", script, "xtask-pg-watchdog"]);
        command.arg(std::process::id().to_string()).arg(&self.dir).args(self.ctl_argv());
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        command.current_dir(&self.dir).process_group(0);
        command.spawn().map_err(|e| eprintln!("xtask: pg         no watchdog ({e}); continuing")).ok()
    }

    /// The end of the server log, for error messages.
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(cannot read: {e})"));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if self.data.join("postmaster.pid").exists() {
            let _ = self.run_ctl(&["stop", "-m", "immediate", "-w"]);
        }
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => eprintln!("xtask: pg         stopped, removed {}", self.dir.display()),
            Err(e) => eprintln!("xtask: pg         cannot remove {}: {e}", self.dir.display()),
        }
    }
}

impl Binaries {
    /// The highest-versioned `/usr/lib/postgresql/<version>/bin` (Debian's layout) holding
    /// both programs, else both on `PATH`.
    fn find() -> Result<Self, String> {
        let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let version: Option<Vec<u32>> = name.split('.').map(|part| part.parse().ok()).collect();
                Some((version?, entry.path().join("bin")))
            })
            .filter(|(_, bin)| bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
            .collect();
        versions.sort();
        let found = match versions.pop() {
            Some((_, bin)) => Some(Self { initdb: bin.join("initdb"), pg_ctl: bin.join("pg_ctl") }),
            None => on_path("initdb").zip(on_path("pg_ctl")).map(|(initdb, pg_ctl)| Self { initdb, pg_ctl }),
        };
        let found = found.ok_or_else(|| {
            "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin with initdb and \
             pg_ctl, and neither on PATH): install the Debian package `postgresql` \
             (`apt-get install --no-install-recommends postgresql`), or set DUNITE_TEST_DATABASE_URL \
             to a server of your own"
                .to_owned()
        })?;
        for path in [&found.initdb, &found.pg_ctl] {
            if path.to_string_lossy().contains(char::is_whitespace) {
                return Err(format!("{} has whitespace in its path; not supported", path.display()));
            }
        }
        Ok(found)
    }
}

/// `program`'s absolute path from `PATH` (absolute because `runuser` may reset `PATH`).
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .and_then(|found| std::path::absolute(found).ok())
}

/// Whether we are root (`id -u` prints 0): then the cluster belongs to the `postgres` user.
fn running_as_root() -> Result<bool, String> {
    let out = Command::new("id").arg("-u").output().map_err(|e| format!("cannot run `id -u`: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// A free loopback port: bind port 0, read what the kernel picked, release it. Another process
/// could take it before the server binds it; unlikely enough for a test cluster.
fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("cannot bind: {e}"))?;
    listener.local_addr().map(|address| address.port()).map_err(|e| format!("no local address: {e}"))
}

/// A fresh, empty directory for the cluster, owned by `postgres` when we are root.
///
/// The first choice is `<workspace_root>/target/pg-<pid>`: next to the build, and cleaned by
/// `cargo clean`. It does not do when its Unix socket path would not fit `sun_path`, or, when we
/// are root, when the `postgres` user cannot reach it (a workspace under a home directory with
/// mode 0700, say). Whether it can is found by trying (`runuser -u postgres -- test -w DIR`),
/// not by reasoning about modes, ACLs and mounts. The fallbacks are `dunite-pg-<pid>` in
/// `std::env::temp_dir()` and then in `/tmp`, which both are world-traversable in practice.
fn choose_dir(workspace_root: &Path, port: u16, as_postgres: bool) -> Result<PathBuf, String> {
    let pid = std::process::id();
    let mut candidates = vec![
        workspace_root.join("target").join(format!("pg-{pid}")),
        std::env::temp_dir().join(format!("dunite-pg-{pid}")),
        PathBuf::from(format!("/tmp/dunite-pg-{pid}")),
    ];
    candidates.dedup();
    let mut rejected = Vec::new();
    for dir in candidates {
        let text = dir.to_string_lossy();
        let socket_len = text.len() + format!("/.s.PGSQL.{port}").len();
        if text.contains(char::is_whitespace) {
            rejected.push(format!("{text}: has whitespace"));
            continue;
        }
        if socket_len > MAX_SOCKET_PATH {
            rejected.push(format!("{text}: socket path of {socket_len} bytes is too long"));
            continue;
        }
        match make_dir(&dir, as_postgres) {
            Ok(()) => {
                for reason in &rejected {
                    eprintln!("xtask: pg         not using {reason}");
                }
                return Ok(dir);
            }
            Err(reason) => {
                let _ = fs::remove_dir_all(&dir);
                rejected.push(format!("{text}: {reason}"));
            }
        }
    }
    Err(format!("no usable directory for the PostgreSQL cluster:\n  {}", rejected.join("\n  ")))
}

/// Create `dir` afresh (removing what a previous run with our pid left); when `as_postgres`,
/// give it to `postgres` and check that user can write in it.
fn make_dir(dir: &Path, as_postgres: bool) -> Result<(), String> {
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| format!("cannot remove the old one: {e}"))?;
    }
    fs::create_dir_all(dir).map_err(|e| format!("cannot create: {e}"))?;
    if as_postgres {
        let mut chown = Command::new("chown");
        chown.arg("-R").arg(OS_USER).arg(dir);
        run_quietly(chown, "chown")?;
        let reachable = Command::new("runuser")
            .args(["-u", OS_USER, "--", "test", "-w"])
            .arg(dir)
            .current_dir("/")
            .status()
            .map_err(|e| format!("cannot run runuser: {e}"))?;
        if !reachable.success() {
            return Err(format!("user `{OS_USER}` cannot write in it (a parent is not traversable?)"));
        }
    }
    Ok(())
}

/// Run `command` with its output captured; on failure, the error carries that output.
fn run_quietly(mut command: Command, name: &str) -> Result<(), String> {
    let out = command.stdin(Stdio::null()).output().map_err(|e| format!("{name}: cannot start: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{name} failed ({}): {command:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
