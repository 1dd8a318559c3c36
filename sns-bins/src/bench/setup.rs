//! Building the benchmark's population before the timed window: log every user in, wait until
//! every cluster knows them all, follow along the graph, wait until every author's cluster
//! lists its followers, open every timeline; and log everyone out at the end.
//!
//! Each step runs on a few lanes of tasks ([`on_lanes`]) behind a progress bar; the first
//! error of a step fails the run. Waiting steps ask again with a growing pause (20 ms to
//! 500 ms) until what they wait for is there, or `--setup-timeout` (counted from the first
//! wait) has passed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sns_core::{Network, UserId};
use tokio::task::JoinSet;

use super::member::{Inbox, Member, Poster};
use super::{BenchArgs, Failure, Graph};

/// Tasks used for setting up the population.
const SETUP_LANES: u32 = 32;

/// The population's members, by index.
pub(super) type Members = Arc<Vec<Arc<Member>>>;

/// A progress bar on stderr when it is a terminal and no JSON is asked for.
pub(super) fn progress(args: &BenchArgs, length: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(length),
        if args.json {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    if let Ok(style) = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_string());
    bar
}

/// Runs `work(index)` for every index in `0..count` on `lanes` tasks; the first error wins.
async fn on_lanes<T, F, Fut>(
    count: u32,
    lanes: u32,
    bar: &ProgressBar,
    work: F,
) -> Result<Vec<T>, Failure>
where
    T: Send + 'static,
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, Failure>> + Send,
{
    let work = Arc::new(work);
    let mut tasks = JoinSet::new();
    let lanes = lanes.clamp(1, count.max(1));
    for lane in 0..lanes {
        let work = Arc::clone(&work);
        let bar = bar.clone();
        tasks.spawn(async move {
            let mut done = Vec::new();
            let mut index = lane;
            while index < count {
                done.push((index, work(index).await?));
                bar.inc(1);
                index += lanes;
            }
            Ok::<_, Failure>(done)
        });
    }
    let mut all: Vec<Option<T>> = (0..count).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let done = joined.map_err(|e| format!("a setup task failed: {e}"))??;
        for (index, value) in done {
            all[index as usize] = Some(value);
        }
    }
    bar.finish_and_clear();
    Ok(all.into_iter().flatten().collect())
}

/// The user id of population index `index` (the range was checked by `check`).
fn user_id(first: u32, index: u32) -> UserId {
    UserId::new(first + index).unwrap_or_else(|| unreachable!("user ids checked before the run"))
}

/// How many of `listed` are in the population of `users` ids from `first`.
fn inside(listed: &[UserId], first: u32, users: u32) -> u32 {
    listed
        .iter()
        .filter(|u| u.get() >= first && u.get() - first < users)
        .count() as u32
}

/// Logs every user of the population in, through the coordinator at `coordinator`.
pub(super) async fn log_in(args: &BenchArgs, coordinator: &str) -> Result<Members, Failure> {
    let network = Network::tcp();
    let first = args.first_user;
    let id = move |index: u32| user_id(first, index);
    let bar = progress(args, u64::from(args.users), "logging in");
    let coordinator = coordinator.to_string();
    let course = args.course;
    let members = on_lanes(args.users, SETUP_LANES, &bar, move |index| {
        let network = network.clone();
        let coordinator = coordinator.clone();
        async move {
            Member::connect(&network, &coordinator, id(index), course)
                .await
                .map(Arc::new)
                .map_err(|e| format!("logging in user {}: {e}", id(index)))
        }
    })
    .await?;
    Ok(Arc::new(members))
}

/// Logs everyone out, so a rerun can log in at once; errors do not matter any more.
pub(super) async fn log_out(args: &BenchArgs, members: &Members) {
    let bar = progress(args, u64::from(args.users), "logging out");
    let _ = on_lanes(args.users, SETUP_LANES, &bar, {
        let members = Arc::clone(members);
        move |index| {
            let members = Arc::clone(&members);
            async move {
                let _ = members[index as usize].logout().await;
                Ok(())
            }
        }
    })
    .await;
}

/// A follow names a user its cluster must know: waits until every cluster lists the whole
/// population (logins on other clusters arrive through the synchronizers), asking one member
/// of each.
pub(super) async fn wait_until_users_known(
    args: &BenchArgs,
    members: &Members,
    deadline: tokio::time::Instant,
) -> Result<(), Failure> {
    let (first, users) = (args.first_user, args.users);
    let id = move |index: u32| user_id(first, index);
    let clusters = args.clusters.min(users);
    let bar = progress(args, u64::from(clusters), "users known");
    on_lanes(clusters, clusters, &bar, {
        let members = Arc::clone(members);
        move |index| {
            let members = Arc::clone(&members);
            async move {
                let member = &members[index as usize];
                let mut pause = Duration::from_millis(20);
                loop {
                    let listed = member
                        .all_users()
                        .await
                        .map_err(|e| format!("LIST for user {}: {e}", id(index)))?;
                    let known = inside(&listed, first, users);
                    if known == users {
                        return Ok(());
                    }
                    if tokio::time::Instant::now() + pause > deadline {
                        return Err(format!(
                            "the cluster of user {} knows {known} of the {users} users after --setup-timeout; are the synchronizers running?",
                            id(index)
                        ));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    })
    .await?;
    Ok(())
}

/// Has every member follow its targets in `graph`.
pub(super) async fn follow(
    args: &BenchArgs,
    graph: &Arc<Graph>,
    members: &Members,
) -> Result<(), Failure> {
    let first = args.first_user;
    let id = move |index: u32| user_id(first, index);
    let bar = progress(args, u64::from(args.users), "following");
    on_lanes(args.users, SETUP_LANES, &bar, {
        let members = Arc::clone(members);
        let graph = Arc::clone(graph);
        move |index| {
            let members = Arc::clone(&members);
            let graph = Arc::clone(&graph);
            async move {
                for target in graph.follows(index) {
                    members[index as usize]
                        .follow(id(*target))
                        .await
                        .map_err(|e| {
                            format!("user {} following {}: {e}", id(index), id(*target))
                        })?;
                }
                Ok(())
            }
        }
    })
    .await?;
    Ok(())
}

/// Every author's cluster must know its followers (follows made on other clusters arrive
/// through the synchronizers) before posts count: waits until each member's `LIST` shows the
/// followers `graph` gives it. Returns, by index, the followers inside the population each
/// post must then reach (they all read their timelines).
pub(super) async fn wait_for_followers(
    args: &BenchArgs,
    graph: &Graph,
    members: &Members,
    deadline: tokio::time::Instant,
) -> Result<Vec<u32>, Failure> {
    let (first, users) = (args.first_user, args.users);
    let id = move |index: u32| user_id(first, index);
    let wanted = Arc::new(graph.follower_counts());
    let bar = progress(args, u64::from(users), "syncing");
    on_lanes(users, SETUP_LANES, &bar, {
        let members = Arc::clone(members);
        move |index| {
            let members = Arc::clone(&members);
            let wanted = Arc::clone(&wanted);
            async move {
                let mut pause = Duration::from_millis(20);
                loop {
                    let listed = members[index as usize]
                        .followers()
                        .await
                        .map_err(|e| format!("LIST for user {}: {e}", id(index)))?;
                    let inside = inside(&listed, first, users);
                    if inside >= wanted[index as usize] {
                        return Ok(inside);
                    }
                    if tokio::time::Instant::now() + pause > deadline {
                        return Err(format!(
                            "user {} has {inside} of its {} followers after --setup-timeout; are the synchronizers running?",
                            id(index),
                            wanted[index as usize]
                        ));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    })
    .await
}

/// Opens every member's timeline: a poster and an inbox each, by index.
pub(super) async fn open_timelines(
    args: &BenchArgs,
    members: &Members,
) -> Result<Vec<(Poster, Inbox)>, Failure> {
    let first = args.first_user;
    let id = move |index: u32| user_id(first, index);
    let bar = progress(args, u64::from(args.users), "timelines");
    on_lanes(args.users, SETUP_LANES, &bar, {
        let members = Arc::clone(members);
        move |index| {
            let members = Arc::clone(&members);
            async move {
                members[index as usize]
                    .timeline()
                    .await
                    .map_err(|e| format!("opening the timeline of user {}: {e}", id(index)))
            }
        }
    })
    .await
}
