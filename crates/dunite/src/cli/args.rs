//! The flags of `dunite admin` and `dunite check`.

use std::path::PathBuf;

/// `dunite admin` flags: where the server is and who is asking.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The server's base URL (given before the subcommand: after it, `--url` names a
    /// download).
    #[arg(long, env = "DUNITE_ADMIN_URL", default_value = "http://127.0.0.1:5080")]
    pub url: String,
    /// User name for Basic authentication (with `--htpasswd` on the server); the password is
    /// read from DUNITE_ADMIN_PASSWORD.
    #[arg(long, env = "DUNITE_ADMIN_USER")]
    pub user: Option<String>,
    /// The password of `--user` (better set in the environment than on the command line).
    #[arg(long, env = "DUNITE_ADMIN_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// A bearer token (with `--client-token-file` on the server).
    #[arg(long, env = "DUNITE_ADMIN_TOKEN", hide_env_values = true, conflicts_with = "user")]
    pub token: Option<String>,
    /// A PEM file of CA certificates to trust for an `https://` URL (besides the system's).
    #[arg(long, env = "DUNITE_ADMIN_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Print the server's JSON answers as they are.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// `dunite admin` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// The caches: bytes, cap, entries, pinned bytes.
    Caches,
    /// One page of a cache's entries.
    List {
        /// `blobs`, `manifests`, `tags` or `downloads`.
        cache: String,
        /// `recent` (most recently used first) or `size` (largest first).
        #[arg(long, default_value = "recent")]
        order: String,
        /// Entries per page (at most 1000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Continue after this cursor (printed with the previous page).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Bytes per repository (blobs and manifests), largest first.
    Usage,
    /// Remove entries now: by digest, by repository (its entries no other repository
    /// shares), or by download URL.
    Purge(Target),
    /// Keep an entry out of eviction (it still counts against the cap).
    Pin(Target),
    /// Let the evictor choose an entry again.
    Unpin(Target),
    /// Pull an image's manifests, config and layers into the cache.
    Prefetch {
        /// `[registry/]repository[:tag|@digest]`; without a registry, the server's default.
        image: String,
        /// `os/arch[/variant]`, or `all` for every platform of a multi-platform image.
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        /// Print the job's id and return instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
}

/// What a purge or a pin applies to: exactly one of these.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// A blob or manifest digest (`sha256:...`).
    #[arg(long)]
    pub digest: Option<String>,
    /// A repository, `registry/name` (purge only).
    #[arg(long)]
    pub repository: Option<String>,
    /// A download's URL.
    #[arg(long)]
    pub url: Option<String>,
}

/// `dunite check` flags.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The data directory of a stopped server.
    #[arg(long, env = "DUNITE_DATA_DIR", default_value = "./dunite-data")]
    pub data_dir: PathBuf,
    /// The metadata database URL, if not SQLite at `DATA_DIR/metadata.db`.
    #[arg(long, env = "DUNITE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Hash this many payloads per cache, chosen at random, against their digests.
    #[arg(long, conflicts_with = "all")]
    pub sample: Option<u64>,
    /// Hash every payload against its digest.
    #[arg(long)]
    pub all: bool,
    /// Fix what can be fixed: remove orphan and temporary files, drop rows without their
    /// file, remove entries whose size or digest is wrong, correct the totals.
    #[arg(long)]
    pub repair: bool,
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::AdminCommand;
    use crate::{Cli, Command};

    /// `--url` before the subcommand is the server; after `purge`, `pin` or `unpin` it is the
    /// download to act on. `--json` goes anywhere.
    #[test]
    fn the_server_url_and_a_download_url_are_told_apart() {
        let argv =
            ["dunite", "admin", "--url", "http://server:5080", "purge", "--url", "http://origin/x", "--json"];
        let Command::Admin(args) = Cli::try_parse_from(argv).unwrap().command else { panic!("not admin") };
        assert_eq!(args.url, "http://server:5080");
        assert!(args.json);
        let AdminCommand::Purge(target) = args.command else { panic!("not a purge") };
        assert_eq!(target.url.as_deref(), Some("http://origin/x"));
        assert!(target.digest.is_none());
        let two = ["dunite", "admin", "pin", "--digest", "sha256:00", "--url", "http://origin/x"];
        assert!(Cli::try_parse_from(two).is_err(), "one target at a time");
    }
}
