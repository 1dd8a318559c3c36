//! Shared pieces of the Tiny SNS binaries: the client's command language and console, logging
//! setup, and shutdown signals. Everything that is not about a terminal or a flag lives in
//! `sns-core`.

pub mod cli;
pub mod console;
pub mod signals;

/// Sets up `tracing` output on stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
