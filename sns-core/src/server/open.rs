//! Opening a server: recovery of the snapshot and log, then the commit pipeline's start.
//!
//! Invariant: a master opens with every recovered entry committed (without a slave, what is
//! durable is committed); a slave opens with the entries after the persisted commit index
//! uncommitted, waiting for a master to confirm them or drop them.

use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::committed::RecentEntries;
use super::pipeline::{self, Gate, Pending};
use super::replication::{RefusalLog, Replicas, Roster};
use super::sessions::Sessions;
use super::snapshots::{self, Shadow};
use super::timeline::Subscribers;
use super::uncommitted::Uncommitted;
use super::{Core, Server, ServerConfig, Shared, limits, sync};
use crate::error::Result;
use crate::event::LogEntry;
use crate::ids::{Epoch, LogIndex, Role};
use crate::storage::Storage;

impl Server {
    /// Opens a standalone server on `storage`: recovers the snapshot and log and starts the
    /// commit pipeline. It is master, and without a slave what is durable is committed, so
    /// every recovered entry is.
    pub async fn open(config: ServerConfig, storage: Arc<dyn Storage>) -> Result<Self> {
        Self::open_as(config, storage, Role::Master).await
    }

    /// Opens a server that will [`join`](Self::join) a deployment: it starts as slave, and the
    /// recovered entries after the persisted commit index stay uncommitted until a master
    /// confirms them (or drops them as a tail it never committed), or until this server is made
    /// master.
    pub async fn open_replica(config: ServerConfig, storage: Arc<dyn Storage>) -> Result<Self> {
        Self::open_as(config, storage, Role::Slave).await
    }

    async fn open_as(config: ServerConfig, storage: Arc<dyn Storage>, role: Role) -> Result<Self> {
        let (core, tail, shadow) = recover(&config, storage.as_ref(), role).await?;
        let inflight = config.max_inflight.max(1);
        // One more than the slots: the recovered tail holds none.
        let (commits, queue) = mpsc::channel(inflight + 1);
        let (durable_stage, durable_queue) = mpsc::channel(inflight + 1);
        let gate = Gate {
            generation: 0,
            upto: match role {
                Role::Master => Gate::OPEN,
                Role::Slave => core.commit,
            },
        };
        let (gate, gate_rx) = watch::channel(gate);
        let shared = Arc::new(Shared {
            streams: limits::StreamSlots::new(
                config.max_timeline_streams,
                config.max_timeline_streams_per_user.max(1),
            ),
            pacing: limits::PostPacing::new(config.max_posts_per_second),
            refused: sync::RemoteRefusals::default(),
            inflight: Arc::new(Semaphore::new(inflight)),
            config,
            counters: super::stats::Counters::default(),
            storage,
            commits,
            commit_index: watch::channel(core.commit).0,
            durable_index: watch::channel(core.durable).0,
            sequenced_index: watch::channel(LogIndex(core.next_index.0 - 1)).0,
            gate,
            mirror_target: watch::channel(None).0,
            listed_slaves: watch::channel(Roster::default()).0,
            refusals: Mutex::new(RefusalLog::default()),
            beat_now: Arc::new(Notify::new()),
            truncated: Notify::new(),
            fatal: watch::channel(None).0,
            joined: OnceLock::new(),
            core: Mutex::new(core),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        });
        let weak = Arc::downgrade(&shared);
        let token = shared.shutdown.clone();
        shared.tasks.spawn(pipeline::run_durability(
            weak.clone(),
            queue,
            durable_stage,
            token.clone(),
        ));
        shared.tasks.spawn(pipeline::run_commits(
            weak.clone(),
            durable_queue,
            gate_rx,
            token.clone(),
        ));
        let every = shared.config.snapshot_every;
        shared
            .tasks
            .spawn(snapshots::follow(weak, shadow, every, token));
        if !tail.is_empty() {
            // Already durable: the pipeline commits them once the gate passes them.
            let pending = Pending {
                entries: tail,
                generation: 0,
                durable: Box::pin(async { Ok(()) }),
                reply: None,
                sequenced_at: None,
                _slots: None,
            };
            let _ = shared.commits.send(pending).await;
        }
        Ok(Self { shared })
    }
}

/// Recovers the core of a server in `role` from `storage`: the state at the commit point, and
/// the uncommitted tail after it (already sequenced into the core, to be committed by the
/// pipeline once the gate passes it); and a copy of that state for the snapshots to follow.
async fn recover(
    config: &ServerConfig,
    storage: &dyn Storage,
    role: Role,
) -> Result<(Core, Vec<LogEntry>, Shadow)> {
    let mut recovered = storage.recover().await?;
    let last = recovered.last_index();
    let snapshot_index = recovered.snapshot.as_ref().map(|s| s.index);
    let commit = match role {
        Role::Master => last,
        Role::Slave => recovered.commit.max(snapshot_index.unwrap_or_default()),
    };
    let tail_start = recovered
        .entries
        .iter()
        .position(|e| e.index > commit)
        .unwrap_or(recovered.entries.len());
    let tail = recovered.entries.split_off(tail_start);
    let state = recovered.replay(&config.state_config())?;
    let shadow = Shadow::new(
        state.clone(),
        commit,
        recovered
            .entries
            .last()
            .map(|e| e.epoch)
            .or(recovered.snapshot.as_ref().map(|s| s.epoch))
            .unwrap_or(Epoch(0)),
        recovered.entries.len() as u64,
    );
    let last_epoch = tail
        .last()
        .or(recovered.entries.last())
        .map(|e| e.epoch)
        .or(recovered.snapshot.as_ref().map(|s| s.epoch))
        .unwrap_or(Epoch(0));
    let inflight = config.max_inflight.max(1);
    let mut core = Core {
        next_index: commit.next(),
        next_seq: state.high_water(config.cluster) + 1,
        last_at: state.latest_time(),
        state,
        uncommitted: Uncommitted::default(),
        epoch: last_epoch,
        known_epoch: last_epoch,
        last_epoch,
        role,
        durable: last,
        commit,
        generation: 0,
        truncating: false,
        recent: RecentEntries::new(config.recent_entries.max(2 * inflight)),
        replicas: Replicas::default(),
        counted_by_master: false,
        mirroring: false,
        sessions: Sessions::new(config.session_timeout),
        subscribers: Subscribers::default(),
        failed: None,
    };
    for entry in &tail {
        core.sequenced(entry.clone());
    }
    tracing::info!(
        cluster = %config.cluster,
        server = %config.server_id,
        users = core.state.user_count(),
        commit = %commit,
        uncommitted = tail.len(),
        "server state recovered"
    );
    Ok((core, tail, shadow))
}
