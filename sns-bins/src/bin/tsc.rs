//! `tsc`: the Tiny SNS client.
//!
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
use sns_core::{Client, Error, TimelineSender, TimelineStream, UserId};

/// Tiny SNS client.
#[derive(Debug, Parser)]
#[command(name = "tsc", version, disable_help_flag = true)]
struct Args {
    /// Host of the server.
    #[arg(short = 'h', long = "host", default_value = "127.0.0.1")]
    host: String,
    /// Port of the server (direct connection).
    #[arg(short = 'p', long = "port")]
    port: u16,
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

async fn run(args: Args) -> Result<(), String> {
    let user = UserId::parse(&args.user).map_err(|_| {
        format!(
            "tsc: invalid user {:?}: a user is a number from 1 to {}",
            args.user,
            UserId::MAX
        )
    })?;
    let addr = format!("{}:{}", args.host, args.port);
    let client = Client::login(&addr, user).await.map_err(|e| match e {
        Error::AlreadyLoggedIn(_) => format!("tsc: user {user} is already logged in elsewhere"),
        Error::Unreachable { reason, .. } | Error::Unavailable(reason) => {
            format!("tsc: cannot reach the server at {addr}: {reason}")
        }
        other => format!("tsc: login failed: {other}"),
    })?;
    let heartbeat = tokio::spawn({
        let client = client.clone();
        let every = Duration::from_secs(args.heartbeat_secs.max(1));
        async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                let _ = client.heartbeat().await;
            }
        }
    });
    let mut console = Console::open();
    let out = console.output();
    out.line(cli::BANNER);
    let result = command_mode(&client, &mut console, &out).await;
    heartbeat.abort();
    // Leaving ends the session at once, so the user may log in again right away.
    let _ = client.logout().await;
    result
}

async fn command_mode(client: &Client, console: &mut Console, out: &Output) -> Result<(), String> {
    loop {
        let line = match console.read(cli::PROMPT).await {
            Input::Line(line) => line,
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
        match execute(client, &command, out).await {
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

/// Runs one command; for TIMELINE returns the opened stream.
async fn execute(
    client: &Client,
    command: &Command,
    out: &Output,
) -> Result<Option<(TimelineSender, TimelineStream)>, Error> {
    match command {
        Command::Follow(target) => {
            client.follow(cli::parse_target(target)?).await?;
            out.line(cli::SUCCESS);
        }
        Command::Unfollow(target) => {
            client.unfollow(cli::parse_target(target)?).await?;
            out.line(cli::SUCCESS);
        }
        Command::List => {
            let listing = client.list().await?;
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
        Command::Timeline => return Ok(Some(client.timeline().await?)),
    }
    Ok(None)
}

async fn timeline_mode(
    (sender, mut stream): (TimelineSender, TimelineStream),
    console: &mut Console,
    out: &Output,
) -> Result<(), String> {
    let mut reader = tokio::spawn({
        let out = out.clone();
        async move {
            while let Some(post) = stream.next().await {
                match post {
                    Ok(post) => out.line(&post.line()),
                    Err(e) => return Err(format!("tsc: timeline closed: {e}")),
                }
            }
            Ok(())
        }
    });
    loop {
        tokio::select! {
            input = console.read("") => match input {
                Input::Line(line) => match sender.post(&line).await {
                    Ok(()) => {}
                    Err(Error::InvalidInput(why)) => out.line(&format!("Post not sent: {why}")),
                    Err(other) => return Err(format!("tsc: timeline closed: {other}")),
                },
                Input::End => break,
            },
            finished = &mut reader => return finished.unwrap_or(Ok(())),
        }
    }
    // End of input: close our side; the server ends the stream once every post is stored.
    drop(sender);
    reader.await.unwrap_or(Ok(()))
}
