//! The `dunite` command: `dunite serve` runs the mirror and proxy; `dunite admin` steers a
//! running server's caches; `dunite check` checks a stopped server's data directory.

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

use dunite::tls::ServerTls;
use dunite::{App, Cli, Command, Config, serve, serve_tls, shutdown_signal};

#[tokio::main]
async fn main() -> ExitCode {
    // Registered before anything slow (opening and reconciling the caches): a SIGTERM during
    // start-up then ends in a clean shutdown, not a kill.
    let shutdown = shutdown_signal();
    let cli = Cli::parse();
    let filter =
        |default: &str| EnvFilter::try_from_env("DUNITE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let args = match cli.command {
        Command::Serve(args) => args,
        // The other commands print their results on standard output; their log goes to
        // standard error, warnings only unless DUNITE_LOG says otherwise.
        Command::Admin(args) => {
            tracing_subscriber::fmt().with_env_filter(filter("warn")).with_writer(std::io::stderr).init();
            return dunite::cli::admin(args).await;
        }
        Command::Check(args) => {
            tracing_subscriber::fmt().with_env_filter(filter("warn")).with_writer(std::io::stderr).init();
            return dunite::cli::check(args).await;
        }
    };
    tracing_subscriber::fmt().with_env_filter(filter("info")).init();
    let config = match Config::resolve(args) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(%error, "bad configuration");
            return ExitCode::from(2);
        }
    };
    // Read and checked before anything slow; SIGHUP (which would otherwise end the process)
    // reloads them from here on.
    let tls = match &config.tls {
        Some(files) => match ServerTls::load(files.clone()) {
            Ok(tls) => {
                tracing::info!(certificate = %tls.summary(), "serving HTTPS");
                Some(tls)
            }
            Err(error) => {
                tracing::error!(error = %dunite::error_chain(&error), "cannot load the TLS certificate");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    #[cfg(unix)]
    if let Some(tls) = &tls {
        match dunite::tls::reload_on_sighup(tls.clone()) {
            Ok(reload) => drop(tokio::spawn(reload)),
            Err(error) => {
                tracing::error!(%error, "cannot handle SIGHUP (TLS reload)");
                return ExitCode::FAILURE;
            }
        }
    }
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, listen = %config.listen, "cannot listen (setting `listen`)");
            return ExitCode::from(2);
        }
    };
    let addr = listener.local_addr().map_or_else(|_| config.listen.to_string(), |a| a.to_string());
    let app = match App::open(config).await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(error = %dunite::error_chain(&error), "cannot start");
            return ExitCode::FAILURE;
        }
    };
    #[cfg(unix)]
    match app.reload_client_auth_on_sighup() {
        Ok(Some(reload)) => drop(tokio::spawn(reload)),
        Ok(None) => {}
        Err(error) => {
            tracing::error!(%error, "cannot handle SIGHUP (client credentials reload)");
            return ExitCode::FAILURE;
        }
    }
    tracing::info!(%addr, tls = tls.is_some(), "dunite listening");
    let served = match &tls {
        Some(tls) => serve_tls(app, listener, tls, shutdown).await,
        None => serve(app, listener, shutdown).await,
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "server failed");
            ExitCode::FAILURE
        }
    }
}
