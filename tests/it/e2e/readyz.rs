//! `/readyz`: ready while the metadata database answers and the data directory is writable;
//! `503` once the database is cut off (here, the TCP path to it), while `/healthz` still says
//! the process is alive.

use std::sync::Arc;
use std::time::Duration;

use dunite_testkit::pg;
use reqwest::StatusCode;
use tokio::task::JoinSet;

use super::harness::{Dunite, Registry};

/// A TCP forwarder to `target` that can be cut: every connection through it closed and no
/// new one accepted.
struct Forwarder {
    port: u16,
    tasks: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tasks = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
        let accepted = Arc::clone(&tasks);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                accepted.lock().await.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { port, tasks, accept }
    }

    async fn cut(&self) {
        self.accept.abort();
        self.tasks.lock().await.abort_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_503_once_the_database_is_unreachable_and_healthz_still_200() {
    let Some(database) = pg::fresh_database().await else {
        return; // No test server, and none required.
    };
    let url = database.url().to_owned();
    let (scheme_user, rest) = url.split_once('@').unwrap();
    let (host_port, name) = rest.split_once('/').unwrap();
    let forwarder = Forwarder::start(host_port.to_owned()).await;
    let forwarded = format!("{scheme_user}@127.0.0.1:{}/{name}", forwarder.port);
    let registry = Registry::start().await;
    let dunite = Dunite::start(registry.addr, "16MiB", &["--database-url", &forwarded]).await;
    let get = async |path: &str| {
        let response = dunite.client.get(format!("{}{path}", dunite.base)).send().await.unwrap();
        (response.status(), response.text().await.unwrap())
    };
    assert_eq!(get("/readyz").await, (StatusCode::OK, "ready\n".to_owned()));

    forwarder.cut().await;
    let (status, text) = get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.starts_with("not ready: database"), "{text}");
    assert!(!text.contains("disk"), "the disk is fine: {text}");
    assert_eq!(get("/healthz").await.0, StatusCode::OK, "alive all the same");
    let status = tokio::time::timeout(Duration::from_secs(60), dunite.stop()).await.unwrap();
    assert!(status.success(), "{status}");
}
