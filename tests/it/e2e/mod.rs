//! End-to-end tests with real clients: Debian's `docker-registry` as the upstream, `skopeo`
//! as the client, and the real `dunite` binary in between. `.ci/run` installs both tools;
//! the tests fail (never skip) when they are missing.

mod admin;
mod auth;
mod client_auth;
mod counting_proxy;
mod downloads;
mod faults;
pub(crate) mod harness;
mod hostile_upstream;
mod instances;
mod listings;
mod metrics;
pub(crate) mod origin;
mod pg_restart;
mod pinned_race;
mod pulls;
mod readyz;
mod shared_fills;
mod stale;
mod tls;
mod upstream_redirects;
