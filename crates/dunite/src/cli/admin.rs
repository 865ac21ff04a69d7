//! `dunite admin`: a client of the admin API (`/admin/`), one request per subcommand (a
//! prefetch then polls its job, with progress).

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::args::{AdminArgs, AdminCommand, Target};
use super::progress::Progress;
use crate::admin::api;

/// How often a followed prefetch job is asked how far it is.
const POLL: Duration = Duration::from_millis(250);

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
enum ClientError {
    #[error("cannot reach the server: {0}")]
    Http(#[from] reqwest::Error),
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the server answered {status}: {message}")]
    Refused { status: reqwest::StatusCode, message: String },
    #[error("prefetch failed: {0}")]
    Prefetch(String),
}

/// Run `dunite admin`: exit status 0 on success, 1 if the server refused or failed, 2 for a
/// usage error.
pub async fn admin(args: AdminArgs) -> ExitCode {
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "dunite admin: {}", crate::error_chain(&error));
            match error {
                ClientError::Read { .. } => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
    args: AdminArgs,
}

impl Client {
    fn new(args: AdminArgs) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(300));
        if let Some(path) = &args.cacert {
            let pem = std::fs::read(path)
                .map_err(|source| ClientError::Read { path: path.display().to_string(), source })?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let base = args.url.trim_end_matches('/').to_owned();
        Ok(Self { http: builder.build()?, base, args })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match (&self.args.token, &self.args.user) {
            (Some(token), _) => request.bearer_auth(token),
            (None, Some(user)) => request.basic_auth(user, self.args.password.as_deref()),
            (None, None) => request,
        }
    }

    /// Send, and read the JSON answer or the server's error.
    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(T, String), ClientError> {
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            let message = serde_json::from_str::<api::Failure>(&text)
                .map_or_else(|_| text.trim().to_owned(), |f| f.error);
            return Err(ClientError::Refused { status, message });
        }
        let parsed = serde_json::from_str(&text).map_err(|e| ClientError::Refused {
            status,
            message: format!("unreadable answer ({e}): {text}"),
        })?;
        Ok((parsed, text))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<(T, String), ClientError> {
        self.call(self.request(reqwest::Method::GET, path)).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(T, String), ClientError> {
        self.call(self.request(reqwest::Method::POST, path).json(body)).await
    }
}

fn target(target: Target) -> api::Target {
    api::Target { digest: target.digest, repository: target.repository, url: target.url }
}

async fn run(args: AdminArgs) -> Result<(), ClientError> {
    let json = args.json;
    let client = Client::new(args)?;
    let mut out = std::io::stdout().lock();
    let (lines, raw) = match &client.args.command {
        AdminCommand::Caches => {
            let (answer, raw): (api::Caches, _) = client.get("/admin/caches").await?;
            let lines = answer
                .caches
                .iter()
                .map(|c| {
                    format!(
                        "{:<10} {:>14} of {:>14} bytes  {:>8} entries  {:>12} pinned bytes",
                        c.name, c.bytes, c.max_bytes, c.entries, c.pinned_bytes
                    )
                })
                .collect();
            (lines, raw)
        }
        AdminCommand::List { cache, order, limit, cursor } => {
            let mut path = format!("/admin/caches/{cache}/entries?order={order}&limit={limit}");
            if let Some(cursor) = cursor {
                path.push_str("&cursor=");
                path.push_str(&url::form_urlencoded::byte_serialize(cursor.as_bytes()).collect::<String>());
            }
            let (answer, raw): (api::Entries, _) = client.get(&path).await?;
            let mut lines: Vec<String> = answer
                .entries
                .iter()
                .map(|e| format!("{:>14} {}{}", e.size, e.key, if e.pinned { "  (pinned)" } else { "" }))
                .collect();
            if let Some(next) = answer.next {
                lines.push(format!("next page: --cursor '{next}'"));
            }
            (lines, raw)
        }
        AdminCommand::Usage => {
            let (answer, raw): (api::Usage, _) = client.get("/admin/usage").await?;
            let mut lines: Vec<String> = answer
                .repositories
                .iter()
                .map(|r| {
                    format!(
                        "{:>14} bytes {:>6} entries {:>14} exclusive  {}",
                        r.bytes, r.entries, r.exclusive_bytes, r.repository
                    )
                })
                .collect();
            lines.push(format!("note: {}", answer.note));
            (lines, raw)
        }
        AdminCommand::Purge(what) => {
            let (answer, raw): (api::Purged, _) = client.post("/admin/purge", &target(what.clone())).await?;
            let mut lines: Vec<String> = answer
                .removed
                .iter()
                .map(|r| format!("removed {} {} ({} bytes)", r.cache, r.key, r.bytes))
                .collect();
            lines.extend(
                answer.shared_kept.iter().map(|key| format!("kept {key} (shared with other repositories)")),
            );
            (lines, raw)
        }
        AdminCommand::Pin(what) | AdminCommand::Unpin(what) => {
            let path = if matches!(client.args.command, AdminCommand::Pin(_)) {
                "/admin/pin"
            } else {
                "/admin/unpin"
            };
            let (answer, raw): (api::Pinned, _) = client.post(path, &target(what.clone())).await?;
            let state = if answer.pinned { "pinned" } else { "unpinned" };
            (vec![format!("{state} {} {} ({} bytes)", answer.cache, answer.key, answer.size)], raw)
        }
        AdminCommand::Prefetch { image, platform, no_wait } => {
            let request = api::PrefetchRequest { image: image.clone(), platform: Some(platform.clone()) };
            let (job, raw): (api::PrefetchJob, _) = client.post("/admin/prefetch", &request).await?;
            if *no_wait {
                (vec![format!("prefetch job {} started", job.id)], raw)
            } else {
                let job = follow(&client, job.id).await?;
                let line = format!(
                    "prefetched {}: {} manifests, {} blobs ({} already cached), {} bytes",
                    job.image, job.manifests, job.blobs_done, job.blobs_cached, job.bytes_done
                );
                (vec![line], serde_json::to_string(&job).unwrap_or_default())
            }
        }
    };
    if json {
        let _ = writeln!(out, "{raw}");
    } else {
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
    }
    Ok(())
}

/// Poll prefetch job `id` until it ends, showing its progress.
async fn follow(client: &Client, id: u64) -> Result<api::PrefetchJob, ClientError> {
    let progress = Progress::new("prefetch");
    loop {
        let (job, _): (api::PrefetchJob, _) = client.get(&format!("/admin/prefetch/{id}")).await?;
        progress.set(job.bytes_done, job.bytes_total);
        match job.state.as_str() {
            "running" => tokio::time::sleep(POLL).await,
            "failed" => {
                progress.finish();
                return Err(ClientError::Prefetch(job.error.unwrap_or_default()));
            }
            _ => {
                progress.finish();
                return Ok(job);
            }
        }
    }
}
