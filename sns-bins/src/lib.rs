//! Shared pieces of the Tiny SNS binaries: the client's command language and console, the
//! `--bus` flag, the cluster token and protected mode, logging setup, and shutdown signals;
//! and the commands of `sns` itself (`up`, `status`, `bench`) with the tables they print.
//! Everything that is not about a terminal, a flag or a file of the operator's lives in
//! `sns-core`.

pub mod bench;
pub mod bus;
pub mod chaos;
pub mod cli;
pub mod console;
pub mod metrics;
pub mod signals;
pub mod status;
pub mod status_page;
mod tables;
pub mod token;
pub mod up;

pub use token::TokenArgs;

/// Sets up `tracing` output on stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    init_logging_at("info");
}

/// Sets up `tracing` output on stderr, filtered by `RUST_LOG` (default `level`), in colour
/// only when stderr is a terminal and `NO_COLOR` is not set (so a log piped to a file or a
/// collector carries no escape codes).
pub fn init_logging_at(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour_wanted(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .try_init();
}

/// Whether logs get colours: on a terminal, unless `NO_COLOR` is set to anything but the empty
/// string (<https://no-color.org>).
fn colour_wanted(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Heartbeat timing flags.
#[derive(Debug, Clone, clap::Args)]
pub struct HeartbeatArgs {
    /// Milliseconds between heartbeats (the course used 5000; 500 detects a dead master within
    /// 1 s with the default 2 missed beats).
    #[arg(long = "heartbeat-ms", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub heartbeat_ms: u64,
    /// Missed heartbeats after which a node is dead.
    #[arg(long = "missed-heartbeats", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub missed_heartbeats: u32,
}

impl HeartbeatArgs {
    /// The interval as a duration.
    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.heartbeat_ms)
    }
}

/// The coordinator address a process uses: the group given with `--coordinators`
/// (`HOST:PORT,HOST:PORT,...`), each member checked, else the one coordinator at
/// `host`:`port`.
pub fn coordinator_addr(group: Option<&str>, host: &str, port: u16) -> Result<String, String> {
    let Some(group) = group else {
        return Ok(sns_core::transport::address(host, port));
    };
    let members = sns_core::coordinator::group_addrs(group).map_err(|e| e.to_string())?;
    for member in &members {
        let valid = member.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            return Err(format!(
                "--coordinators: {member:?} is not HOST:PORT (give HOST:PORT,HOST:PORT,...)"
            ));
        }
    }
    Ok(members.join(","))
}

/// The etcd store of a deployment of `clusters` × `servers` on the etcd members `urls`
/// (`http://HOST:PORT,...`), its keys under `prefix`.
pub async fn etcd_store(
    urls: &str,
    prefix: &str,
    clusters: u32,
    servers: u32,
) -> Result<sns_core::coordinator::EtcdStore, String> {
    let endpoints: Vec<String> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect();
    if endpoints.is_empty() {
        return Err(format!("--etcd {urls:?} names no etcd member"));
    }
    for endpoint in &endpoints {
        check_etcd_url(endpoint)?;
    }
    let mut options = sns_core::coordinator::EtcdOptions::new(endpoints, clusters, servers);
    options.prefix = prefix.to_string();
    sns_core::coordinator::EtcdStore::connect(options)
        .await
        .map_err(|e| format!("--etcd: {e}"))
}

/// Checks that `url` is `http://HOST:PORT` (etcd is reached without TLS).
fn check_etcd_url(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Err(format!(
            "--etcd {url:?}: etcd over TLS is not supported; give http://HOST:PORT"
        ));
    }
    let valid = url.strip_prefix("http://").is_some_and(|rest| {
        rest.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        })
    });
    if valid {
        Ok(())
    } else {
        Err(format!("--etcd {url:?} is not http://HOST:PORT"))
    }
}

/// Runs `body` on a multi-threaded runtime; prints `<name>: <error>` and exits 1 on failure.
pub fn run_main<F>(name: &str, body: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), String>>,
{
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(body) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{name}: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{colour_wanted, coordinator_addr};
    use std::ffi::OsStr;

    #[test]
    fn an_etcd_member_is_an_http_url_with_a_port() {
        assert!(super::check_etcd_url("http://127.0.0.1:2379").is_ok());
        assert!(super::check_etcd_url("http://etcd-1.example:2379").is_ok());
        for bad in [
            "notaurl",
            "127.0.0.1:2379",
            "http://host",
            "http://:2379",
            "http://h:0",
        ] {
            assert!(super::check_etcd_url(bad).is_err(), "{bad:?}");
        }
        let tls = super::check_etcd_url("https://h:2379").expect_err("TLS");
        assert!(tls.contains("TLS"), "{tls}");
    }

    #[test]
    fn a_coordinator_group_is_a_list_of_host_and_port() {
        assert_eq!(coordinator_addr(None, "h", 9), Ok("h:9".to_string()));
        assert_eq!(
            coordinator_addr(Some("a:1, b:2,"), "h", 9),
            Ok("a:1,b:2".to_string())
        );
        for bad in ["", ",", "a", "a:0", "a:x", ":1", "a:1,b"] {
            assert!(coordinator_addr(Some(bad), "h", 9).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))));
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None));
        assert!(!colour_wanted(false, Some(OsStr::new("1"))));
    }
}
