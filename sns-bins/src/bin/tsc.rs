//! `tsc`: the Tiny SNS client.
//!
//! `tsc -h HOST -k PORT -u USER` asks the coordinator at HOST:PORT for the master serving USER
//! and logs in there; when that server stops answering, it asks again and carries on (the
//! failover is `sns_core::Session`'s; this binary only prints, one line on stderr per reconnect).
//! In timeline mode a line typed while the server is lost is kept and posted once the timeline
//! is reopened: every post is stored exactly once (the session re-sends unacknowledged posts
//! under their idempotency keys).
//! `tsc -h HOST -p PORT -u USER` connects straight to a server (the course's MP1 form). Command
//! mode takes `FOLLOW <user>`, `UNFOLLOW <user>`, `LIST` and `TIMELINE`; timeline mode posts
//! every line typed and shows followed users' posts live. Works on a terminal (line editing,
//! history) and with piped stdin (same output lines, no prompts). Exits 1 with a one-line
//! message when the server cannot be reached. No files are written.

use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser};
use sns_bins::cli::{self, Command};
use sns_bins::console::{Console, Input, Output};
use sns_core::session::Target;
use sns_core::transport::{self, Network};
use sns_core::{Error, Session, SessionConfig, SessionEvent, SessionTimeline, UserId};
use tokio::sync::broadcast;

/// Tiny SNS client.
#[derive(Debug, Parser)]
#[command(name = "tsc", version, disable_help_flag = true)]
struct Args {
    /// Host of the coordinator (with -k) or of the server (with -p).
    #[arg(short = 'h', long = "host", default_value = "127.0.0.1")]
    host: String,
    /// Port of the coordinator, which routes you to your cluster's master.
    #[arg(
        short = 'k',
        long = "coordinator-port",
        required_unless_present_any = ["port", "coordinators"]
    )]
    coordinator_port: Option<u16>,
    /// Every coordinator of a group, HOST:PORT,HOST:PORT,...: asks whichever answers
    /// (instead of -h/-k).
    #[arg(long, value_name = "HOST:PORT,...", conflicts_with_all = ["coordinator_port", "port"])]
    coordinators: Option<String>,
    /// Port of a server to connect to directly (the course's MP1 form).
    #[arg(short = 'p', long = "port", conflicts_with = "coordinator_port")]
    port: Option<u16>,
    /// Your user id (a positive integer).
    #[arg(short = 'u', long = "user")]
    user: String,
    /// Seconds between session heartbeats.
    #[arg(long, default_value_t = 3)]
    heartbeat_secs: u64,
    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tsc: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args));
    // The input thread may be blocked reading stdin; do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

/// The one line printed when the first login fails.
fn first_login_failure(error: Error, target: &Target, user: UserId) -> String {
    match (error, target) {
        (Error::AlreadyLoggedIn(_), _) => {
            format!("tsc: user {user} is already logged in elsewhere")
        }
        (Error::Unavailable(reason), Target::Coordinator(_)) => {
            format!("tsc: no server is available for user {user}: {reason}")
        }
        (e @ (Error::NotMaster(_) | Error::ShuttingDown(_)), Target::Direct(addr)) => {
            format!("tsc: the server at {addr} cannot take user {user} now: {e}")
        }
        (Error::Unreachable { addr, reason }, Target::Coordinator(coordinator))
            if addr == *coordinator =>
        {
            format!("tsc: cannot reach the coordinator at {addr}: {reason}")
        }
        (Error::Unreachable { addr, reason }, _) => {
            format!("tsc: cannot reach the server at {addr}: {reason}")
        }
        (Error::ConnectionLost(why), Target::Direct(addr)) => {
            format!("tsc: cannot use the server at {addr}: {why}")
        }
        (e, Target::Direct(addr)) if e.calls_for_reconnect() => {
            format!("tsc: the server at {addr} is unavailable: {e}")
        }
        (Error::Rpc(reason), Target::Direct(addr)) => {
            format!("tsc: cannot use {addr}: {reason}")
        }
        (other, _) => format!("tsc: login failed: {other}"),
    }
}

async fn run(args: Args) -> Result<(), String> {
    let user = UserId::parse(&args.user).map_err(|_| {
        format!(
            "tsc: invalid user {:?}: a user is a number from 1 to {}",
            args.user,
            UserId::MAX
        )
    })?;
    let target = match (args.coordinator_port, args.port) {
        _ if args.coordinators.is_some() => Target::Coordinator(
            sns_bins::coordinator_addr(args.coordinators.as_deref(), &args.host, 0)
                .map_err(|e| format!("tsc: {e}"))?,
        ),
        (Some(port), _) => Target::Coordinator(transport::address(&args.host, port)),
        (None, Some(port)) => Target::Direct(transport::address(&args.host, port)),
        (None, None) => return Err("tsc: give -k COORDINATOR_PORT or -p SERVER_PORT".into()),
    };
    let mut config = SessionConfig::default();
    config.heartbeat_interval = Duration::from_secs(args.heartbeat_secs.max(1));
    let mut signals = sns_bins::signals::ExitSignals::install();
    let session = Session::connect(&Network::tcp(), target.clone(), user, config)
        .await
        .map_err(|e| first_login_failure(e, &target, user))?;
    let mut console = Console::open();
    let out = console.output();
    let reporter = tokio::spawn(report(session.subscribe(), out.clone()));
    out.line(cli::BANNER);
    // A signal (Ctrl-C on a pipe, SIGTERM, or SIGHUP when the terminal window closes) leaves
    // like the end of input: logged out, so the user may log in again at once.
    let result = tokio::select! {
        result = command_mode(&session, &mut console, &out) => result,
        () = signals.recv() => {
            out.notice("tsc: stopped by a signal; logging out");
            Ok(())
        }
    };
    // Leaving ends the session at once, so the user may log in again right away.
    let _ = session.logout().await;
    session.close().await;
    reporter.abort();
    result
}

/// Prints each session event as one line, so a failover never looks like a freeze.
async fn report(mut events: broadcast::Receiver<SessionEvent>, out: Output) {
    loop {
        match events.recv().await {
            Ok(event) => out.notice(&describe(&event)),
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn describe(event: &SessionEvent) -> String {
    match event {
        SessionEvent::Reconnecting { .. } => {
            "tsc: server lost; finding the new master...".to_string()
        }
        SessionEvent::Reconnected { addr } => format!("tsc: reconnected to {addr}"),
        SessionEvent::GaveUp { reason } => format!("tsc: could not reconnect: {reason}"),
        other => format!("tsc: {other:?}"),
    }
}

async fn command_mode(
    session: &Session,
    console: &mut Console,
    out: &Output,
) -> Result<(), String> {
    loop {
        let line = match console.read(cli::PROMPT).await {
            Input::Line(line) => line,
            Input::NotText => {
                out.notice(NOT_TEXT);
                continue;
            }
            Input::End => return Ok(()),
        };
        let command = match cli::parse_command(&line) {
            None => continue,
            Some(Err(e)) => {
                out.line(e.message());
                continue;
            }
            Some(Ok(command)) => command,
        };
        match execute(session, &command, out).await {
            Ok(Some(timeline)) => {
                out.line(cli::SUCCESS);
                out.line(cli::IN_TIMELINE);
                return timeline_mode(timeline, console, out).await;
            }
            Ok(None) => {}
            Err(e) => out.line(&cli::failure_message(&command, &e)),
        }
    }
}

/// Runs one command; for TIMELINE returns the opened timeline.
async fn execute(
    session: &Session,
    command: &Command,
    out: &Output,
) -> Result<Option<SessionTimeline>, Error> {
    match command {
        Command::Follow(target) => {
            session.follow(cli::parse_target(target)?).await?;
            out.line(cli::SUCCESS);
        }
        Command::Unfollow(target) => {
            session.unfollow(cli::parse_target(target)?).await?;
            out.line(cli::SUCCESS);
        }
        Command::List => {
            let listing = session.list().await?;
            out.line(cli::SUCCESS);
            out.line(&format!(
                "All users: {}",
                cli::user_list(&listing.all_users)
            ));
            out.line(&format!(
                "Followers: {}",
                cli::user_list(&listing.followers)
            ));
        }
        Command::Timeline => return Ok(Some(session.timeline().await?)),
    }
    Ok(None)
}

/// Posts every line typed and prints incoming posts (from a reader task) until the input ends
/// or the timeline fails for good.
async fn timeline_mode(
    mut timeline: SessionTimeline,
    console: &mut Console,
    out: &Output,
) -> Result<(), String> {
    let poster = timeline.poster();
    let mut reader = tokio::spawn({
        let out = out.clone();
        let poster = poster.clone();
        async move {
            while let Some(post) = timeline.next().await {
                match post {
                    Ok(post) => out.line(&cli::local_post_line(&post)),
                    Err(e) => return Err(timeline_closed(&e, poster.unacknowledged())),
                }
            }
            Ok(())
        }
    });
    loop {
        tokio::select! {
            input = console.read("") => match input {
                Input::Line(line) => match poster.post(&line).await {
                    Ok(()) => {}
                    Err(Error::InvalidInput(why)) => out.line(&format!("Post not sent: {why}")),
                    Err(e) => out.notice(&format!("tsc: post not sent: {e}")),
                },
                Input::NotText => out.notice(NOT_TEXT),
                Input::End => break,
            },
            finished = &mut reader => return finished.unwrap_or(Ok(())),
        }
    }
    // End of input: close our side; the server ends the stream once every post is stored.
    poster.close();
    reader.await.unwrap_or(Ok(()))
}

/// What a line that is not UTF-8 text gets (it is dropped; the client carries on).
const NOT_TEXT: &str = "tsc: that line is not UTF-8 text; it was ignored";

/// The line printed when the timeline ends for good, saying how many typed posts were not
/// stored (sent or typed, and never acknowledged).
fn timeline_closed(error: &Error, unstored: usize) -> String {
    match unstored {
        0 => format!("tsc: timeline closed: {error}"),
        1 => format!("tsc: timeline closed: {error} (1 post was not stored)"),
        n => format!("tsc: timeline closed: {error} ({n} posts were not stored)"),
    }
}
