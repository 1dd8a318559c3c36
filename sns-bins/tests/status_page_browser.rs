//! The status page in a real headless browser (Debian's `chromium`): served for a whole
//! deployment in this process and loaded with `chromium --headless --dump-dom`, the DOM its
//! script rendered names every server with its role and shows the sync rows.
//!
//! The browser prints the DOM once the page has loaded. The page's event stream never ends,
//! so waiting on virtual time (`--virtual-time-budget`) would wait for ever; the page carries
//! the picture of the moment it was served instead, which its script draws on load with the
//! same code that draws each event (the stream itself is checked in `tests/metrics.rs`).
//!
//! Without `chromium` on the `PATH` the test prints that it was skipped and passes; with
//! `SNS_REQUIRE_CHROMIUM=1` (as `.ci/run` sets) a missing browser fails it instead.

use std::time::Duration;

use sns_bins::metrics::Exporter;
use sns_core::Role;
use sns_core::deployment::{Deployment, DeploymentConfig};
use sns_core::testing::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the deployment, the page and the browser may take, each.
const WAIT: Duration = Duration::from_secs(60);
/// Longest run of one `chromium --dump-dom`.
const BROWSER_RUN: Duration = Duration::from_secs(30);
/// The browser.
const CHROMIUM: &str = "chromium";
/// The variable that turns a missing browser into a failure (`1`).
const REQUIRE_CHROMIUM_VAR: &str = "SNS_REQUIRE_CHROMIUM";

/// Whether `chromium` runs here; `false` after printing that `test` was skipped.
///
/// # Panics
///
/// When `SNS_REQUIRE_CHROMIUM=1` and it does not.
async fn chromium_present(test: &str) -> bool {
    let required = std::env::var(REQUIRE_CHROMIUM_VAR).is_ok_and(|v| v == "1");
    let probe = tokio::process::Command::new(CHROMIUM)
        .arg("--version")
        .kill_on_drop(true)
        .output();
    let outcome = match tokio::time::timeout(BROWSER_RUN, probe).await {
        Ok(Ok(out)) if out.status.success() => return true,
        Ok(Ok(out)) => format!("`{CHROMIUM} --version` exited with {}", out.status),
        Ok(Err(e)) => format!("cannot run {CHROMIUM}: {e}"),
        Err(_) => format!("`{CHROMIUM} --version` took over {BROWSER_RUN:?}"),
    };
    assert!(!required, "{test}: {REQUIRE_CHROMIUM_VAR}=1 but {outcome}");
    eprintln!("{test}: skipped: {outcome} (apt-get install chromium)");
    false
}

/// The DOM of `url` once its scripts ran for a while, as `chromium --headless --dump-dom`
/// prints it; `None` when the browser failed or took longer than [`BROWSER_RUN`].
async fn dump_dom(url: &str) -> Option<String> {
    let profile = tempfile::tempdir().expect("a profile directory");
    let run = tokio::process::Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(BROWSER_RUN, run).await {
        Ok(Ok(out)) if out.status.success() => Some(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => {
            eprintln!(
                "{CHROMIUM} exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            None
        }
        Ok(Err(e)) => {
            eprintln!("cannot run {CHROMIUM}: {e}");
            None
        }
        Err(_) => {
            eprintln!("{CHROMIUM} took over {BROWSER_RUN:?}");
            None
        }
    }
}

/// The text of every cell of every body row of the table with id `table` in `dom`.
fn rows(dom: &str, table: &str) -> Vec<Vec<String>> {
    let Some(start) = dom.find(&format!("<table id=\"{table}\"")) else {
        return Vec::new();
    };
    let rest = &dom[start..];
    let rest = &rest[..rest.find("</table>").unwrap_or(rest.len())];
    let Some(body) = rest.find("<tbody>").map(|at| &rest[at..]) else {
        return Vec::new();
    };
    body.split("<tr>")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let text = cell.split_once('>').map_or("", |(_, t)| t);
                    text.split('<').next().unwrap_or("").trim().to_string()
                })
                .collect()
        })
        .collect()
}

/// Whether the servers table of `dom` has a row `cluster, server, role` for each of `expected`.
fn shows_every_role(dom: &str, expected: &[(u32, u32, &str)]) -> bool {
    let servers = rows(dom, "servers");
    expected.iter().all(|(cluster, server, role)| {
        servers.iter().any(|cells| {
            cells.len() >= 3
                && cells[0] == cluster.to_string()
                && cells[1] == server.to_string()
                && cells[2] == *role
        })
    })
}

/// The raw body of `GET /` (the page before any script ran).
async fn page_source(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the page");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_every_server_with_its_role_in_a_browser() {
    let test = "the_status_page_renders_every_server_with_its_role_in_a_browser";
    if !chromium_present(test).await {
        return;
    }
    let mut config = DeploymentConfig::in_memory();
    config.clusters = 2;
    let deployment = Deployment::start(config).await.expect("start");
    deployment.wait_for_masters(WAIT).await.expect("masters");
    let exporter = Exporter::of_deployment(&deployment);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = sns_bins::metrics::spawn(
        listener,
        exporter.clone(),
        sns_bins::status_page::router(exporter),
        stop.clone(),
    );

    let expected: Vec<(u32, u32, &str)> = deployment
        .servers()
        .into_iter()
        .map(|place| {
            let role = deployment
                .server(place.cluster, place.server)
                .expect("running")
                .positions()
                .role;
            let role = if role == Role::Master {
                "master"
            } else {
                "slave"
            };
            (place.cluster.get(), place.server.get(), role)
        })
        .collect();
    assert_eq!(expected.len(), 4, "two clusters of two servers");
    assert!(
        expected.iter().filter(|e| e.2 == "master").count() == 2,
        "a master per cluster: {expected:?}"
    );

    // The page as served has no rows: only its script fills them (from the picture embedded
    // in the page, then from the event stream), so the check below fails unless the browser
    // ran the page.
    let source = page_source(addr).await;
    assert!(source.contains("<table id=\"servers\""), "{source}");
    assert!(!shows_every_role(&source, &expected));

    let url = format!("http://{addr}/");
    // The newest DOM the browser printed.
    let last = std::sync::Mutex::new(String::new());
    let rendered = eventually(WAIT, || async {
        let Some(dom) = dump_dom(&url).await else {
            return false;
        };
        let shown = shows_every_role(&dom, &expected);
        *last.lock().unwrap_or_else(|p| p.into_inner()) = dom;
        shown
    })
    .await;
    let last = last.into_inner().unwrap_or_else(|p| p.into_inner());
    assert!(
        rendered,
        "the rendered page never showed every server with its role {expected:?}:\n{last}"
    );
    assert!(
        last.contains("as of "),
        "the page says when its picture is from"
    );
    let sync = rows(&last, "sync");
    assert_eq!(sync.len(), 2, "a row per synchronizer and origin: {sync:?}");
    assert!(
        last.contains("alone (roles in its memory)"),
        "the page tells where the coordinator stands"
    );

    stop.cancel();
    serving.await.expect("the page's server stops");
    deployment.shutdown().await;
}
