//! The commands besides `serve`: `dunite admin` (a client of the admin API) and
//! `dunite check` (the offline check of a data directory). Each prints its results on
//! standard output and its progress on standard error.

mod admin;
mod args;
mod check;
mod progress;

pub use self::admin::admin;
pub use self::args::{AdminArgs, AdminCommand, CheckArgs, Target};
pub use self::check::check;
