//! Crashes at random moments under concurrent follows, unfollows and posts: the plug is pulled
//! on a simulated disk (every append not yet synced is lost), the server restarts on what was
//! synced, and then every acknowledged change is there, and nothing that anyone saw before the
//! crash is missing (what was visible had been committed, so durable).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use sns_core::{
    CrashDisk, CrashDiskOptions, EventId, EventKind, LogIndex, Server, ServerConfig, State,
    Storage, UserId,
};

const USERS: u32 = 4;

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

/// One client command, issued by `user`.
#[derive(Debug, Clone)]
enum Op {
    Follow(u32),
    Unfollow(u32),
    Post,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1..=USERS).prop_map(Op::Follow),
        (1..=USERS).prop_map(Op::Unfollow),
        Just(Op::Post),
    ]
}

/// What the clients were told and saw before the crash.
#[derive(Debug, Default)]
struct Observed {
    /// Per (follower, followee): the effect of the last acknowledged follow/unfollow, and
    /// that of a later one still in flight when the server crashed (it may or may not stay).
    follows: BTreeMap<(u32, u32), (Option<bool>, Option<bool>)>,
    /// Acknowledged posts.
    acked_posts: BTreeSet<EventId>,
    /// Posts some follower received live before the crash.
    seen_posts: BTreeSet<EventId>,
}

/// Runs `ops` of one user in order until the first error (the crash), recording outcomes.
async fn client(server: Server, user: u32, ops: Vec<Op>, observed: Arc<Mutex<Observed>>) {
    for op in ops {
        let (pair, effect) = match op {
            Op::Follow(target) => ((user, target), true),
            Op::Unfollow(target) => ((user, target), false),
            Op::Post => {
                match server
                    .post(u(user), format!("from {user}").as_bytes())
                    .await
                {
                    Ok(Some(id)) => lock(&observed).acked_posts.insert(id),
                    _ => return,
                };
                continue;
            }
        };
        let result = if effect {
            server.follow(u(user), &pair.1.to_string()).await
        } else {
            server.unfollow(u(user), &pair.1.to_string()).await
        };
        let mut observed = lock(&observed);
        let slot = observed.follows.entry(pair).or_default();
        match result {
            Ok(()) => *slot = (Some(effect), None),
            // Refused as bad input (yourself, already following...): nothing changed.
            Err(e) if !e.calls_for_reconnect() => {}
            // The crash: this one may or may not have become durable.
            Err(_) => {
                slot.1 = Some(effect);
                return;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads every post a user's feed delivers, until the feed ends.
async fn watch(mut feed: sns_core::TimelineFeed, observed: Arc<Mutex<Observed>>) {
    while let Some(Ok(post)) = feed.next().await {
        lock(&observed).seen_posts.insert(post.id);
    }
}

fn run_case(ops: Vec<Vec<Op>>, crash_after: Duration) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut options = CrashDiskOptions::default();
        options.sync_delay = Duration::from_micros(300);
        let disk = CrashDisk::with_options(options);
        let mut config = ServerConfig::default();
        // One cluster: every user is local and has a timeline.
        config.clusters = 1;
        config.snapshot_every = 16;
        let storage = Arc::new(disk.open().expect("open"));
        // Snapshots compact the log every 16 entries; a reader keeps it whole for the checks.
        storage.retain("crash-test", LogIndex(0));
        let server = Server::open(config.clone(), storage).await.expect("open");
        for user in 1..=USERS {
            server.login(u(user)).await.expect("login");
        }
        let observed = Arc::new(Mutex::new(Observed::default()));
        let mut tasks = Vec::new();
        for user in 1..=USERS {
            let feed = server.open_timeline(u(user)).expect("timeline");
            tasks.push(tokio::spawn(watch(feed, Arc::clone(&observed))));
        }
        for (user, ops) in (1..=USERS).zip(ops) {
            tasks.push(tokio::spawn(client(
                server.clone(),
                user,
                ops,
                Arc::clone(&observed),
            )));
        }
        tokio::time::sleep(crash_after).await;
        disk.pull_plug();
        server.close().await;
        for task in tasks {
            task.await.expect("task");
        }
        drop(server);

        // What survived, read straight from the disk, then through a restarted server.
        let storage = disk.open().expect("reopen");
        let recovered = storage.recover().await.expect("recover");
        let mut state = match &recovered.snapshot {
            Some(snapshot) => snapshot.restore(&config.state_config()).expect("restore"),
            None => State::new(config.state_config()),
        };
        let mut posts = BTreeSet::new();
        let everything = storage
            .read(LogIndex(1), recovered.last_index())
            .await
            .expect("the whole log was retained");
        for entry in &everything {
            if let EventKind::Posted { .. } = entry.event.kind {
                posts.insert(entry.event.id);
            }
        }
        for entry in &recovered.entries {
            state.apply(&entry.event);
        }
        let observed = std::mem::take(&mut *lock(&observed));
        for (&(follower, followee), &(acked, in_flight)) in &observed.follows {
            let now = state.follows(u(follower), u(followee));
            prop_assert!(
                now == acked.unwrap_or(false) || in_flight == Some(now),
                "{follower}->{followee}: acknowledged {acked:?}, in flight {in_flight:?}, after restart {now}"
            );
        }
        for id in &observed.acked_posts {
            prop_assert!(posts.contains(id), "acknowledged post {id} lost");
        }
        for id in &observed.seen_posts {
            prop_assert!(posts.contains(id), "post {id} was seen, then lost");
        }
        drop(storage);
        let restarted = Server::open(config, Arc::new(disk.open().expect("reopen")))
            .await
            .expect("restart");
        for user in 1..=USERS {
            restarted.login(u(user)).await.expect("login after restart");
        }
        restarted.close().await;
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn acknowledged_and_visible_changes_survive_a_crash_at_any_moment(
        ops in proptest::collection::vec(proptest::collection::vec(op(), 0..25), USERS as usize),
        crash_after_us in 0u64..6_000,
    ) {
        run_case(ops, Duration::from_micros(crash_after_us))?;
    }
}
