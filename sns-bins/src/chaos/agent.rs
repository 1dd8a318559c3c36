//! The load client of a chaos run: `sns chaos-agent`, started by the run inside its own
//! namespace. It drives the deployment through the client library (failing-over sessions) and
//! writes the history ([`super::history`]) to stdout, one JSON event per line.
//!
//! Phases: set up the population (log everyone in, wait until every cluster knows everyone,
//! make the standing follows and wait until each author's cluster lists them, open every
//! timeline), say so (`population`), then post at `--rate`, have the churning users follow and
//! unfollow, and watch the coordinator's roles until a line `heal` arrives on stdin (the run
//! has healed every fault). Then stop, wait (each step at most `--settle`) until every post is
//! acknowledged or given up, every acknowledged post delivered, and every cluster's slave
//! caught up with its master, and record what the deployment ends with.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sns_core::admin::{AdminClient, DeploymentStatus};
use sns_core::session::Target;
use sns_core::{ClusterId, Error, Network, Role, Session, SessionConfig, TimelinePoster, UserId};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::history::{Event, Millis, Outcome, Standing, parse_post_text, post_text};
use crate::bench::Rng;

/// `sns chaos-agent`'s flags (set by `sns chaos`).
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Coordinators, HOST:PORT,...
    #[arg(long)]
    pub coordinators: String,
    /// Clusters of the deployment.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub clusters: u32,
    /// Servers per cluster.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub servers: u32,
    /// Reading, posting users per cluster.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub users_per_cluster: u32,
    /// Standing follows per user.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub follows: u32,
    /// Posts per second, all users together.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rate: u32,
    /// Seed of the follow graph, the authors and the churn.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How long each step of setting up and of settling may take.
    #[arg(long, default_value = "60s", value_parser = crate::bench::parse_duration)]
    pub settle: Duration,
}

/// Writes events to stdout, stamped with the time since the agent started.
#[derive(Clone)]
struct Recorder {
    start: Instant,
    out: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Recorder {
    fn now(&self) -> Millis {
        self.start.elapsed().as_millis() as Millis
    }

    fn record(&self, event: &Event) {
        if let Ok(line) = serde_json::to_string(event) {
            let _ = self.out.send(line);
        }
    }

    fn trouble(&self, what: String) {
        self.record(&Event::Trouble {
            at: self.now(),
            what,
        });
    }
}

/// Deliveries so far per post, and acknowledged posts per author: what settling waits for.
#[derive(Default)]
struct Ledger {
    delivered: HashMap<(u32, u64), u32>,
    stored: HashMap<u32, u64>,
    posted: HashMap<u32, u64>,
    /// Each churning user's FOLLOW and UNFOLLOW answers, by (user, target), in order.
    calls: BTreeMap<(u32, u32), Vec<(bool, Outcome)>>,
}

fn user(id: u32) -> UserId {
    UserId::new(id).unwrap_or_else(|| unreachable!("population ids start at 1"))
}

fn cluster_of(id: u32, clusters: u32) -> u32 {
    ClusterId::of_user(user(id), clusters).get()
}

/// Runs the agent; the history goes to stdout.
pub async fn run(args: AgentArgs) -> Result<(), String> {
    let (out, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(mut line) = lines.recv().await {
            line.push('\n');
            if stdout.write_all(line.as_bytes()).await.is_err() {
                break;
            }
            let _ = stdout.flush().await;
        }
    });
    let recorder = Recorder {
        start: Instant::now(),
        out,
    };
    let result = drive(&args, &recorder).await;
    if let Err(e) = &result {
        recorder.trouble(e.clone());
    }
    drop(recorder);
    let _ = writer.await;
    result
}

async fn drive(args: &AgentArgs, recorder: &Recorder) -> Result<(), String> {
    let token = std::env::var(crate::token::TOKEN_VARIABLE).ok();
    let coordinators: Vec<String> = args.coordinators.split(',').map(str::to_string).collect();
    let admin = Admin {
        coordinators: coordinators.clone(),
        token,
    };
    let clusters = args.clusters;
    admin
        .wait_until(args.settle, "every cluster has a master", |status| {
            (1..=clusters).all(|c| {
                status
                    .nodes
                    .iter()
                    .any(|n| n.cluster == c && n.role == Some(Role::Master) && n.alive)
            })
        })
        .await?;

    let readers = args.users_per_cluster * clusters;
    let users: Vec<u32> = (1..=readers).collect();
    let churners: Vec<u32> = (readers + 1..=readers + clusters).collect();
    let mut rng = Rng::new(args.seed);
    let follows = standing_follows(&users, args.follows, clusters, &mut rng);

    let config = {
        let mut config = SessionConfig::default();
        // Longer than any fault a run makes: a session gives up only if the system never
        // comes back.
        config.patience = Duration::from_secs(120);
        config
    };
    let network = Network::tcp();
    let mut sessions: BTreeMap<u32, Arc<Session>> = BTreeMap::new();
    for &id in users.iter().chain(&churners) {
        let session = Session::connect(
            &network,
            Target::Coordinator(args.coordinators.clone()),
            user(id),
            config.clone(),
        )
        .await
        .map_err(|e| format!("logging in user {id}: {e}"))?;
        sessions.insert(id, Arc::new(session));
    }
    let everyone: Vec<UserId> = users.iter().chain(&churners).map(|&u| user(u)).collect();
    for cluster in 1..=clusters {
        let session = &sessions[&cluster];
        wait_for(
            args.settle,
            &format!("cluster {cluster} knows every user"),
            || async {
                let listing = session.list().await.ok()?;
                everyone
                    .iter()
                    .all(|u| listing.all_users.contains(u))
                    .then_some(())
            },
        )
        .await?;
    }
    for &(follower, author) in &follows {
        match sessions[&follower].follow(user(author)).await {
            Ok(()) | Err(Error::AlreadyFollowing) => {}
            Err(e) => return Err(format!("user {follower} following {author}: {e}")),
        }
    }
    let mut followers: HashMap<u32, Vec<u32>> = HashMap::new();
    for &(follower, author) in &follows {
        followers.entry(author).or_default().push(follower);
    }
    for (&author, wanted) in &followers {
        let session = &sessions[&author];
        wait_for(
            args.settle,
            &format!("user {author}'s cluster lists its followers"),
            || async {
                let listing = session.list().await.ok()?;
                wanted
                    .iter()
                    .all(|f| listing.followers.contains(&user(*f)))
                    .then_some(())
            },
        )
        .await?;
    }

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = CancellationToken::new();
    let mut posters: HashMap<u32, TimelinePoster> = HashMap::new();
    let mut background = JoinSet::new();
    for &id in &users {
        let timeline = sessions[&id]
            .timeline()
            .await
            .map_err(|e| format!("opening the timeline of user {id}: {e}"))?;
        let poster = timeline.poster();
        background.spawn(watch_stored(
            id,
            poster.stored(),
            recorder.clone(),
            Arc::clone(&ledger),
        ));
        posters.insert(id, poster);
        background.spawn(read(id, timeline, recorder.clone(), Arc::clone(&ledger)));
    }
    recorder.record(&Event::Population {
        clusters,
        servers: args.servers,
        users: users.clone(),
        follows: follows.clone(),
        churners: churners.clone(),
    });
    background.spawn(watch_roles(admin.clone(), recorder.clone()));

    let mut load = JoinSet::new();
    load.spawn(post(
        args.rate,
        posters.clone(),
        users.clone(),
        rng.next_u64(),
        recorder.clone(),
        Arc::clone(&ledger),
        stop.clone(),
    ));
    for &churner in &churners {
        // Two different users (one when there is only one).
        let first = users[rng.below(users.len() as u32) as usize];
        let mut targets = vec![first];
        if users.len() > 1 {
            let mut second = first;
            while second == first {
                second = users[rng.below(users.len() as u32) as usize];
            }
            targets.push(second);
        }
        load.spawn(churn(
            Arc::clone(&sessions[&churner]),
            churner,
            targets,
            rng.next_u64(),
            recorder.clone(),
            Arc::clone(&ledger),
            stop.clone(),
        ));
    }

    // Until the run has healed every fault.
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        match stdin.next_line().await {
            Ok(Some(line)) if line.trim() == "heal" => break,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => break,
        }
    }
    stop.cancel();
    while load.join_next().await.is_some() {}

    settle(args, &ledger, &followers, recorder).await;
    let status = admin
        .wait_until(args.settle, "every slave is caught up", |status| {
            converged(status, clusters, args.servers)
        })
        .await;
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            recorder.trouble(e);
            admin.status().await?
        }
    };
    recorder.record(&Event::Servers {
        servers: status
            .nodes
            .iter()
            .filter(|n| n.role.is_some())
            .map(|n| Standing {
                cluster: n.cluster,
                server: n.id,
                role: match n.role {
                    Some(Role::Master) => "master",
                    Some(Role::Slave) => "slave",
                    None => "none",
                }
                .to_string(),
                alive: n.alive,
                in_sync: n.in_sync,
                durable: n.durable.0,
                commit: n.commit.0,
            })
            .collect(),
    });
    for cluster in 1..=clusters {
        let listing = sessions[&cluster]
            .list()
            .await
            .map_err(|e| format!("LIST on cluster {cluster}: {e}"))?;
        recorder.record(&Event::Users {
            cluster,
            users: listing.all_users.iter().map(|u| u.get()).collect(),
        });
    }
    // The last FOLLOWs and UNFOLLOWs may still be on their way to the followed user's
    // cluster: wait until every list is one the answers allow (what is still wrong after
    // `--settle`, the checker reports).
    let calls = ledger.lock().map(|l| l.calls.clone()).unwrap_or_default();
    let settled = wait_for(
        args.settle,
        "every follower list is as the answers leave it",
        || async {
            let mut lists = Vec::with_capacity(users.len());
            for &id in &users {
                let listing = sessions[&id].list().await.ok()?;
                let listed: Vec<u32> = listing.followers.iter().map(|u| u.get()).collect();
                let standing = followers.get(&id).map(Vec::as_slice).unwrap_or_default();
                if !standing.iter().all(|f| listed.contains(f)) {
                    return None;
                }
                for ((churner, target), answers) in &calls {
                    let (may_not, may) = super::check::possible_after(answers);
                    let follows = listed.contains(churner);
                    if *target == id && ((follows && !may) || (!follows && !may_not)) {
                        return None;
                    }
                }
                lists.push((id, listed));
            }
            Some(lists)
        },
    )
    .await;
    // The lists the wait ended on; after a timeout, as they are now.
    let lists = match settled {
        Ok(lists) => lists,
        Err(_) => {
            let mut lists = Vec::with_capacity(users.len());
            for &id in &users {
                let listing = sessions[&id]
                    .list()
                    .await
                    .map_err(|e| format!("LIST for user {id}: {e}"))?;
                lists.push((id, listing.followers.iter().map(|u| u.get()).collect()));
            }
            lists
        }
    };
    for (user, followers) in lists {
        recorder.record(&Event::Followers { user, followers });
    }
    background.abort_all();
    for session in sessions.values() {
        let _ = session.logout().await;
    }
    Ok(())
}

/// Each user follows `count` others: at least one on another cluster when there is one.
fn standing_follows(users: &[u32], count: u32, clusters: u32, rng: &mut Rng) -> Vec<(u32, u32)> {
    let mut follows = Vec::new();
    let count = count.min(users.len() as u32 - 1);
    for &follower in users {
        let mut chosen: Vec<u32> = Vec::new();
        while (chosen.len() as u32) < count {
            let author = users[rng.below(users.len() as u32) as usize];
            let away = cluster_of(author, clusters) != cluster_of(follower, clusters);
            let need_away = clusters > 1 && chosen.is_empty();
            if author == follower || chosen.contains(&author) || (need_away && !away) {
                continue;
            }
            chosen.push(author);
        }
        follows.extend(chosen.into_iter().map(|author| (follower, author)));
    }
    follows
}

/// Asks `probe` again, with a growing pause, until it gives something or `limit` has passed.
async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    // A limit too far to add is as good as none.
    let deadline = Instant::now() + limit.min(Duration::from_secs(365 * 86_400));
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(found) = probe().await {
            return Ok(found);
        }
        if Instant::now() + pause > deadline {
            return Err(format!("not within {limit:?}: {what}"));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// The coordinators' admin service.
#[derive(Clone)]
struct Admin {
    coordinators: Vec<String>,
    token: Option<String>,
}

impl Admin {
    /// The first answer of a coordinator of the group.
    async fn status(&self) -> Result<DeploymentStatus, String> {
        let mut last = String::from("no coordinator");
        for addr in &self.coordinators {
            let asked = async {
                let client =
                    AdminClient::connect(&Network::tcp(), addr, self.token.clone()).await?;
                client.status().await
            };
            match tokio::time::timeout(Duration::from_secs(2), asked).await {
                Ok(Ok(status)) => return Ok(status),
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: no answer within 2 s"),
            }
        }
        Err(format!("no coordinator answered: {last}"))
    }

    async fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&DeploymentStatus) -> bool,
    ) -> Result<DeploymentStatus, String> {
        let last = Mutex::new(String::from("no coordinator answered"));
        let found = wait_for(limit, what, || async {
            let status = match self.status().await {
                Ok(status) => status,
                Err(e) => {
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = e;
                    return None;
                }
            };
            if done(&status) {
                return Some(status);
            }
            *last.lock().unwrap_or_else(|e| e.into_inner()) = describe(&status);
            None
        })
        .await;
        found.map_err(|e| {
            let last = last.lock().unwrap_or_else(|e| e.into_inner());
            format!("{e} (last seen: {last})")
        })
    }
}

/// Every server's standing in a few words.
fn describe(status: &DeploymentStatus) -> String {
    status
        .nodes
        .iter()
        .filter(|n| n.role.is_some())
        .map(|n| {
            format!(
                "c{}s{} {:?}{}{} durable {} commit {}",
                n.cluster,
                n.id,
                n.role,
                if n.alive { "" } else { " dead" },
                if n.in_sync { " in sync" } else { "" },
                n.durable.0,
                n.commit.0
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether every cluster has `servers` servers: one live master, and every other a live,
/// in-sync slave at its durable and committed index. (Synchronizers, listed without a role, do
/// not count.)
fn converged(status: &DeploymentStatus, clusters: u32, servers: u32) -> bool {
    (1..=clusters).all(|cluster| {
        let nodes: Vec<_> = status
            .nodes
            .iter()
            .filter(|n| n.cluster == cluster && n.role.is_some())
            .collect();
        let masters: Vec<_> = nodes
            .iter()
            .filter(|n| n.role == Some(Role::Master) && n.alive)
            .collect();
        let [master] = masters[..] else {
            return false;
        };
        nodes.len() == servers as usize
            && nodes.iter().filter(|n| n.id != master.id).all(|n| {
                n.alive
                    && n.in_sync
                    && n.role == Some(Role::Slave)
                    && n.durable == master.durable
                    && n.commit == master.commit
            })
    })
}

/// Records every change of a cluster's epoch or master the coordinators report. Of a group,
/// a member that answers with an older epoch than another member gave is behind on the shared
/// record (it follows etcd), which is not a change; a coordinator going back on what it said
/// itself is recorded, and so is every master of an answer that names two (the checker flags
/// both).
async fn watch_roles(admin: Admin, recorder: Recorder) {
    // Per cluster: the newest (epoch, master) recorded.
    let mut newest: HashMap<u32, (u64, Option<u32>)> = HashMap::new();
    // Per (coordinator, cluster): the newest epoch it answered.
    let mut said: HashMap<(String, u32), u64> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let Ok(status) = admin.status().await else {
            continue;
        };
        let mut roles: BTreeMap<u32, (u64, Vec<u32>)> = BTreeMap::new();
        for node in status.nodes.iter().filter(|n| n.role.is_some()) {
            let entry = roles.entry(node.cluster).or_default();
            entry.0 = entry.0.max(node.epoch.0);
            if node.role == Some(Role::Master) {
                entry.1.push(node.id);
            }
        }
        for (cluster, (epoch, masters)) in roles {
            let own = said
                .entry((status.coordinator.clone(), cluster))
                .or_default();
            let went_back = epoch < *own;
            *own = (*own).max(epoch);
            let known = newest.get(&cluster).copied();
            let behind = known.is_some_and(|(e, _)| epoch < e) && !went_back;
            let master = masters.first().copied();
            if behind || (known == Some((epoch, master)) && masters.len() < 2) {
                continue;
            }
            if !went_back {
                newest.insert(cluster, (epoch, master));
            }
            let masters: Vec<Option<u32>> = if masters.is_empty() {
                vec![None]
            } else {
                masters.into_iter().map(Some).collect()
            };
            for master in masters {
                recorder.record(&Event::Roles {
                    at: recorder.now(),
                    cluster,
                    epoch,
                    master,
                });
            }
        }
    }
}

/// Records how far each of `author`'s posts is acknowledged.
async fn watch_stored(
    author: u32,
    mut stored: tokio::sync::watch::Receiver<u64>,
    recorder: Recorder,
    ledger: Arc<Mutex<Ledger>>,
) {
    while stored.changed().await.is_ok() {
        let seq = *stored.borrow_and_update();
        if let Ok(mut ledger) = ledger.lock() {
            ledger.stored.insert(author, seq);
        }
        recorder.record(&Event::Stored {
            at: recorder.now(),
            author,
            seq,
        });
    }
}

/// Reads `reader`'s timeline to its end.
async fn read(
    reader: u32,
    mut timeline: sns_core::SessionTimeline,
    recorder: Recorder,
    ledger: Arc<Mutex<Ledger>>,
) {
    while let Some(next) = timeline.next().await {
        match next {
            Ok(post) => {
                let (author, seq) = match parse_post_text(&post.text) {
                    Some((author, seq)) if author == post.author.get() => (author, seq),
                    _ => (post.author.get(), 0),
                };
                if let Ok(mut ledger) = ledger.lock() {
                    *ledger.delivered.entry((author, seq)).or_default() += 1;
                }
                recorder.record(&Event::Delivered {
                    at: recorder.now(),
                    reader,
                    author,
                    seq,
                    id: post.id.map(|id| (id.origin.get(), id.seq)),
                });
            }
            Err(e) => {
                recorder.trouble(format!("the timeline of user {reader} ended: {e}"));
                return;
            }
        }
    }
}

/// Posts `rate` posts a second, each by an author drawn at random, until stopped. An author
/// whose earlier post is still being handed over is skipped for that tick.
async fn post(
    rate: u32,
    posters: HashMap<u32, TimelinePoster>,
    authors: Vec<u32>,
    seed: u64,
    recorder: Recorder,
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
) {
    let mut rng = Rng::new(seed);
    let mut queues = HashMap::new();
    let mut tasks = JoinSet::new();
    for (&author, poster) in &posters {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        queues.insert(author, tx);
        let (poster, recorder, ledger) = (poster.clone(), recorder.clone(), Arc::clone(&ledger));
        tasks.spawn(async move {
            let mut seq = 0;
            while rx.recv().await.is_some() {
                seq += 1;
                let at = recorder.now();
                if let Err(e) = poster.post(&post_text(author, seq)).await {
                    recorder.trouble(format!("user {author} cannot post any more: {e}"));
                    return;
                }
                if let Ok(mut ledger) = ledger.lock() {
                    ledger.posted.insert(author, seq);
                }
                recorder.record(&Event::Posted { at, author, seq });
            }
        });
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                let author = authors[rng.below(authors.len() as u32) as usize];
                let _ = queues[&author].try_send(());
            }
        }
    }
    drop(queues);
    while tasks.join_next().await.is_some() {}
}

/// Follows and unfollows `targets` in turn until stopped.
async fn churn(
    session: Arc<Session>,
    user_id: u32,
    targets: Vec<u32>,
    seed: u64,
    recorder: Recorder,
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
) {
    let mut rng = Rng::new(seed);
    let mut following: HashMap<u32, bool> = HashMap::new();
    while !stop.is_cancelled() {
        let target = targets[rng.below(targets.len() as u32) as usize];
        let follow = !following.get(&target).copied().unwrap_or(false);
        let at = recorder.now();
        let result = if follow {
            session.follow(user(target)).await
        } else {
            session.unfollow(user(target)).await
        };
        let outcome = match result {
            Ok(()) => Outcome::Applied,
            Err(Error::AlreadyFollowing | Error::NotFollowing) => Outcome::AlreadyThere,
            Err(_) => Outcome::Unknown,
        };
        following.insert(target, follow);
        if let Ok(mut ledger) = ledger.lock() {
            ledger
                .calls
                .entry((user_id, target))
                .or_default()
                .push((follow, outcome));
        }
        recorder.record(&Event::Follow {
            at,
            user: user_id,
            target,
            follow,
            outcome,
        });
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(150)) => {}
        }
    }
}

/// Waits until every post is acknowledged, then until every acknowledged post reached every
/// standing follower; each at most `--settle`. What is still missing then, the checker finds.
async fn settle(
    args: &AgentArgs,
    ledger: &Arc<Mutex<Ledger>>,
    followers: &HashMap<u32, Vec<u32>>,
    recorder: &Recorder,
) {
    let acknowledged = wait_for(args.settle, "every post is acknowledged", || async {
        let ledger = ledger.lock().ok()?;
        ledger
            .posted
            .iter()
            .all(|(author, &seq)| ledger.stored.get(author).copied().unwrap_or(0) >= seq)
            .then_some(())
    })
    .await;
    if let Err(e) = acknowledged {
        recorder.trouble(e);
    }
    let delivered = wait_for(
        args.settle,
        "every acknowledged post is delivered",
        || async {
            let ledger = ledger.lock().ok()?;
            ledger
                .stored
                .iter()
                .all(|(author, &stored)| {
                    let wanted = followers.get(author).map_or(0, Vec::len) as u32;
                    (1..=stored).all(|seq| {
                        ledger.delivered.get(&(*author, seq)).copied().unwrap_or(0) >= wanted
                    })
                })
                .then_some(())
        },
    )
    .await;
    if let Err(e) = delivered {
        recorder.trouble(e);
    }
}
