//! `tsc`: the Tiny SNS client.
//!
//! `tsc -h HOST -k PORT -u USER` asks the coordinator at HOST:PORT for the master serving USER
//! and logs in there; when that server stops answering, it asks again and carries on.
//! `tsc -h HOST -p PORT -u USER` connects straight to a server (the course's MP1 form). Command
//! mode takes `FOLLOW <user>`, `UNFOLLOW <user>`, `LIST` and `TIMELINE`; timeline mode posts
//! every line typed and shows followed users' posts live. Works on a terminal (line editing,
//! history) and with piped stdin (same output lines, no prompts). Exits 1 with a one-line
//! message when the server cannot be reached. No files are written.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{ArgAction, Parser};
use sns_bins::cli::{self, Command};
use sns_bins::console::{Console, Input, Output};
use sns_core::transport::{self, Network};
use sns_core::{
    Client, CoordinatorClient, Error, TimelineSender, TimelineStream, Timestamp, UserId,
};

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
        required_unless_present = "port"
    )]
    coordinator_port: Option<u16>,
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

/// Where the client finds its server.
#[derive(Debug, Clone)]
enum Target {
    /// A server at this address.
    Direct(String),
    /// The master the coordinator names (one connection to it, kept for failovers).
    Coordinator(CoordinatorClient),
}

/// Logs in for the first time, with one-line errors.
async fn first_login(target: &Target, user: UserId) -> Result<Client, String> {
    let result = match target {
        Target::Direct(addr) => Client::login(&Network::tcp(), addr, user).await,
        Target::Coordinator(coordinator) => coordinator.login(user).await,
    };
    result.map_err(|e| match (e, target) {
        (Error::AlreadyLoggedIn(_), _) => {
            format!("tsc: user {user} is already logged in elsewhere")
        }
        (Error::Unavailable(reason), Target::Coordinator(_)) => {
            format!("tsc: no server is available for user {user}: {reason}")
        }
        (Error::Unreachable { addr, reason }, _) => {
            format!("tsc: cannot reach {addr}: {reason}")
        }
        (Error::Unavailable(reason), Target::Direct(addr)) => {
            format!("tsc: the server at {addr} is unavailable: {reason}")
        }
        (other, _) => format!("tsc: login failed: {other}"),
    })
}

/// After the server stopped answering: asks the coordinator again and resumes the session on
/// the master it names (waiting up to `patience` for one).
async fn reconnect(target: &Target, user: UserId, patience: Duration) -> Option<Client> {
    let Target::Coordinator(coordinator) = target else {
        return None;
    };
    let deadline = tokio::time::Instant::now() + patience;
    let mut pause = Duration::from_millis(100);
    loop {
        if let Ok(addr) = coordinator.locate(user).await {
            let network = Network::tcp();
            match Client::login(&network, &addr, user).await {
                Ok(client) => return Some(client),
                Err(Error::AlreadyLoggedIn(_)) => {
                    if let Ok(client) = Client::attach(&network, &addr, user).await {
                        return Some(client);
                    }
                }
                Err(_) => {}
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// How long the client waits for a new master before reporting a failure.
const FAILOVER_PATIENCE: Duration = Duration::from_secs(10);

fn is_unreachable(e: &Error) -> bool {
    matches!(e, Error::Unavailable(_) | Error::Unreachable { .. })
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
        (Some(port), _) => Target::Coordinator(
            CoordinatorClient::new(&Network::tcp(), &transport::address(&args.host, port))
                .map_err(|e| format!("tsc: {e}"))?,
        ),
        (None, Some(port)) => Target::Direct(transport::address(&args.host, port)),
        (None, None) => return Err("tsc: give -k COORDINATOR_PORT or -p SERVER_PORT".into()),
    };
    let client = first_login(&target, user).await?;
    let (current, watched) = tokio::sync::watch::channel(client);
    let heartbeat = tokio::spawn({
        let mut watched = watched.clone();
        let every = Duration::from_secs(args.heartbeat_secs.max(1));
        async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                let client = watched.borrow_and_update().clone();
                let _ = client.heartbeat().await;
            }
        }
    });
    let mut console = Console::open();
    let out = console.output();
    out.line(cli::BANNER);
    let mut session = Session {
        target,
        user,
        current: Arc::new(current),
    };
    let result = command_mode(&mut session, &mut console, &out).await;
    heartbeat.abort();
    // Leaving ends the session at once, so the user may log in again right away.
    let _ = session.client().logout().await;
    result
}

/// The user's connection, replaced after a failover.
#[derive(Clone)]
struct Session {
    target: Target,
    user: UserId,
    current: Arc<tokio::sync::watch::Sender<Client>>,
}

impl Session {
    fn client(&self) -> Client {
        self.current.borrow().clone()
    }

    /// Reconnects through the coordinator; `false` if that is impossible.
    async fn failover(&mut self) -> bool {
        match reconnect(&self.target, self.user, FAILOVER_PATIENCE).await {
            Some(client) => {
                self.current.send_replace(client);
                true
            }
            None => false,
        }
    }
}

async fn command_mode(
    session: &mut Session,
    console: &mut Console,
    out: &Output,
) -> Result<(), String> {
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
        let mut result = execute(&session.client(), &command, out).await;
        if let Err(e) = &result
            && is_unreachable(e)
            && session.failover().await
        {
            // The first attempt may have been applied before its answer was lost: on the
            // retry, finding the change already made means it succeeded.
            result = match (&command, execute(&session.client(), &command, out).await) {
                (Command::Follow(_), Err(Error::AlreadyFollowing))
                | (Command::Unfollow(_), Err(Error::NotFollowing)) => {
                    out.line(cli::SUCCESS);
                    Ok(None)
                }
                (_, retried) => retried,
            };
        }
        match result {
            Ok(Some(timeline)) => {
                out.line(cli::SUCCESS);
                out.line(cli::IN_TIMELINE);
                return timeline_mode(session, timeline, console, out).await;
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
    session: &Session,
    (sender, stream): (TimelineSender, TimelineStream),
    console: &mut Console,
    out: &Output,
) -> Result<(), String> {
    // The current sender; the reader replaces it after a reconnect, and end of input clears it.
    let senders = Arc::new(tokio::sync::watch::Sender::new(Some(sender)));
    let closing = Arc::new(AtomicBool::new(false));
    let mut reader = tokio::spawn(read_timeline(
        session.clone(),
        stream,
        Arc::clone(&senders),
        Arc::clone(&closing),
        out.clone(),
    ));
    loop {
        tokio::select! {
            input = console.read("") => match input {
                Input::Line(line) => {
                    let sender = senders.borrow().clone();
                    // A post on a broken stream is lost with it; the reader reconnects (or
                    // says why it cannot).
                    if let Some(sender) = sender
                        && let Err(Error::InvalidInput(why)) = sender.post(&line).await
                    {
                        out.line(&format!("Post not sent: {why}"));
                    }
                }
                Input::End => break,
            },
            finished = &mut reader => return finished.unwrap_or(Ok(())),
        }
    }
    // End of input: close our side; the server ends the stream once every post is stored.
    closing.store(true, Ordering::Release);
    senders.send_replace(None);
    reader.await.unwrap_or(Ok(()))
}

/// Prints incoming posts. When the stream breaks and the client is routed by the coordinator,
/// reconnects to the (new) master, reopens the timeline and skips the posts already shown.
async fn read_timeline(
    mut session: Session,
    mut stream: TimelineStream,
    senders: Arc<tokio::sync::watch::Sender<Option<TimelineSender>>>,
    closing: Arc<AtomicBool>,
    out: Output,
) -> Result<(), String> {
    // A post is identified by its author and server-assigned time (unique per author).
    let mut shown: HashSet<(UserId, Timestamp)> = HashSet::new();
    loop {
        let broken = loop {
            match stream.next().await {
                Some(Ok(post)) => {
                    if shown.insert((post.author, post.at)) {
                        out.line(&post.line());
                    }
                }
                Some(Err(e)) => break e,
                None => {
                    if closing.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    break Error::Unavailable("the server ended the stream".into());
                }
            }
        };
        if closing.load(Ordering::Acquire) || !is_unreachable(&broken) || !session.failover().await
        {
            return Err(format!("tsc: timeline closed: {broken}"));
        }
        match session.client().timeline().await {
            Ok((sender, reopened)) => {
                if closing.load(Ordering::Acquire) {
                    return Ok(());
                }
                senders.send_replace(Some(sender));
                stream = reopened;
            }
            Err(e) => return Err(format!("tsc: timeline closed: {e}")),
        }
    }
}
