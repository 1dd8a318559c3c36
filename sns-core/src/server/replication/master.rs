//! The master's side of mirroring: one shipping session per connected slave.
//!
//! A session plans where the slave continues (see the parent module), then ships entries from
//! the window of recent entries or, for older ones, from the log, and forwards the commit index.
//! A second loop reads the slave's acknowledgements; a slave silent for the mirror timeout is
//! dropped. Leaving the session detaches the slave (through the coordinator if it was
//! announced in sync).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};

use super::{FromSlave, Hello, MAX_BATCH, SNAPSHOT_CHUNK, Shipment, SnapshotChunk, ToSlave};
use crate::error::{Error, Result};
use crate::ids::{Epoch, LogIndex, ServerId};
use crate::server::{Role, Server};
use crate::storage::Snapshot;

/// One shipping session: the slave, its session with [`Replicas`](super::Replicas), and the
/// discard generation the session serves. A master that stepped down discarded its
/// uncommitted tail (a new generation), which this slave may hold: even if the server is made
/// master again before the session notices, nothing more is shipped in it, so the slave dials
/// again and its `Hello` finds where its log diverged.
#[derive(Debug, Clone, Copy)]
struct Link {
    server: ServerId,
    session: u64,
    generation: u64,
}

/// Where a slave continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    truncate_after: Option<LogIndex>,
    snapshot: bool,
    start: LogIndex,
}

impl Server {
    /// Serves one slave's mirroring stream until it ends, this server stops being master, or
    /// the slave falls silent.
    pub(crate) async fn ship_to_slave<S>(
        &self,
        hello: Hello,
        inbound: S,
        out: mpsc::Sender<ToSlave>,
    ) where
        S: Stream<Item = Result<FromSlave>> + Send + Unpin,
    {
        let server = hello.server;
        let link = match self.attach_slave(&hello) {
            Ok(link) => link,
            Err(e) => {
                tracing::info!(slave = %server, "mirroring refused: {e}");
                return;
            }
        };
        tracing::info!(
            cluster = %self.shared.config.cluster,
            slave = %server,
            last_index = %hello.last_index,
            commit = %hello.commit,
            "slave attached"
        );
        let why = tokio::select! {
            biased;
            // A stopping master leaves its slave counted: the coordinator may promote it.
            () = self.shared.shutdown.cancelled() => return,
            result = self.ship(&hello, link, &out) => result.err(),
            result = self.read_acks(server, link.session, inbound) => result.err(),
        };
        let leaving = {
            let mut core = self.lock();
            let leaving = core
                .replicas
                .detach(server, link.session, &*self.shared.storage);
            if core.role == Role::Master {
                self.open_gate(&core);
            }
            leaving
        };
        match why {
            Some(e) => tracing::warn!(slave = %server, "mirroring stopped: {e}"),
            None => tracing::info!(slave = %server, "mirroring stopped"),
        }
        if leaving {
            tracing::warn!(
                slave = %server,
                "slave lost while in sync: commits wait until the coordinator knows"
            );
            self.shared.beat_now.notify_one();
        }
    }

    fn attach_slave(&self, hello: &Hello) -> Result<Link> {
        let mut core = self.readable()?;
        if hello.cluster != self.shared.config.cluster
            || hello.server == self.shared.config.server_id
        {
            return Err(Error::invalid(format!(
                "server {} of cluster {} cannot mirror this server",
                hello.server, hello.cluster
            )));
        }
        if hello.known_epoch > core.epoch {
            self.learn_epoch(&mut core, hello.known_epoch);
        }
        if core.role != Role::Master {
            return Err(Error::Unavailable(
                "this server is not the master of its cluster".to_string(),
            ));
        }
        let commit = core.commit;
        Ok(Link {
            server: hello.server,
            session: core.replicas.attach(hello.server, commit),
            generation: core.generation,
        })
    }

    /// This server learned of a newer epoch: if it is master, it has been replaced.
    pub(in crate::server) fn learn_epoch(&self, core: &mut super::super::Core, epoch: Epoch) {
        core.known_epoch = core.known_epoch.max(epoch);
        if core.role == Role::Master && epoch > core.epoch {
            tracing::warn!(
                cluster = %self.shared.config.cluster,
                server = %self.shared.config.server_id,
                %epoch,
                "a newer epoch exists: stepping down"
            );
            self.change_role(core, Role::Slave);
            self.shared.beat_now.notify_one();
        }
    }

    /// The header of a message in `link`'s session, unless the session is over: the server
    /// is no longer master, or it discarded entries since the session began.
    fn header(&self, link: Link, body: Shipment) -> Result<ToSlave> {
        let core = self.lock();
        if core.role != Role::Master || self.shared.shutdown.is_cancelled() {
            return Err(Error::Unavailable("no longer master".to_string()));
        }
        if core.generation != link.generation {
            return Err(Error::Unavailable(
                "this master discarded entries the slave may hold; it must dial again".to_string(),
            ));
        }
        Ok(ToSlave {
            epoch: core.epoch,
            commit: core.commit,
            in_sync: core.replicas.is_counted(link.server, link.session),
            body,
        })
    }

    async fn send(&self, out: &mpsc::Sender<ToSlave>, link: Link, body: Shipment) -> Result<()> {
        let message = self.header(link, body)?;
        out.send(message)
            .await
            .map_err(|_| Error::Unavailable("the slave went away".to_string()))
    }

    async fn ship(&self, hello: &Hello, link: Link, out: &mpsc::Sender<ToSlave>) -> Result<()> {
        let Link {
            server, session, ..
        } = link;
        let plan = self.plan(hello).await?;
        if let Some(index) = plan.truncate_after {
            self.send(out, link, Shipment::TruncateAfter(index)).await?;
        }
        let mut next = plan.start;
        if plan.snapshot {
            next = self.send_snapshot(out, link).await?;
        }
        let mut sequenced = self.shared.sequenced_index.subscribe();
        let mut commits = self.shared.commit_index.subscribe();
        let keepalive = self.shared.config.mirror_timeout / 4;
        let mut ticks = tokio::time::interval(keepalive.max(Duration::from_millis(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let last = *sequenced.borrow_and_update();
            if next <= last {
                match self.entries(next, last).await {
                    Ok(batch) if !batch.is_empty() => {
                        next = batch.last().map_or(next, |e| e.index.next());
                        self.send(out, link, Shipment::Entries(batch)).await?;
                        continue;
                    }
                    Ok(_) => {}
                    Err(Error::Compacted { .. }) => {
                        next = self.send_snapshot(out, link).await?;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            } else {
                let mut core = self.lock();
                let commit = core.commit;
                core.replicas.caught_up(server, session, commit);
                self.open_gate(&core);
            }
            tokio::select! {
                changed = sequenced.changed() => {
                    if changed.is_err() { return Ok(()); }
                }
                changed = commits.changed() => {
                    if changed.is_err() { return Ok(()); }
                    commits.borrow_and_update();
                    self.send(out, link, Shipment::KeepAlive).await?;
                }
                _ = ticks.tick() => {
                    self.send(out, link, Shipment::KeepAlive).await?;
                }
            }
        }
    }

    /// Sequenced entries from `from` up to `to`, at most a batch: from the window of recent
    /// entries, or from the log (durable entries only, so possibly fewer).
    async fn entries(&self, from: LogIndex, to: LogIndex) -> Result<Vec<crate::event::LogEntry>> {
        let recent = self.lock().recent.range(from, to, MAX_BATCH);
        match recent {
            Some(batch) => Ok(batch),
            None => {
                let last = LogIndex(to.0.min(from.0 + MAX_BATCH as u64 - 1));
                self.shared.storage.read(from, last).await
            }
        }
    }

    /// Decides where the slave continues: right after its last entry when the master holds
    /// the same entry (same index and epoch); else after its commit index, dropping its tail;
    /// from a snapshot when the master's log no longer reaches back that far.
    async fn plan(&self, hello: &Hello) -> Result<Plan> {
        let (sequenced, in_window) = {
            let core = self.lock();
            (
                LogIndex(core.next_index.0 - 1),
                core.recent.epoch_at(hello.last_index),
            )
        };
        if hello.commit > sequenced {
            return Err(Error::Conflict(format!(
                "the slave committed up to {} but this master's log ends at {sequenced}; \
                 its data directory must be rebuilt",
                hello.commit
            )));
        }
        let snapshot = self.shared.storage.snapshot().await?;
        let snapshot_index = snapshot.as_ref().map(|s| s.index).unwrap_or_default();
        let mut plan = Plan {
            truncate_after: None,
            snapshot: false,
            start: hello.last_index.next(),
        };
        if hello.last_index > LogIndex(0) {
            let ours = match in_window {
                Some(epoch) => Some(Some(epoch)),
                None if hello.last_index > sequenced => Some(None),
                None => self.epoch_at(hello.last_index, snapshot.as_ref()).await?,
            };
            match ours {
                Some(Some(epoch)) if epoch == hello.last_epoch => {}
                Some(_) => {
                    plan.truncate_after = Some(hello.commit);
                    plan.start = hello.commit.next();
                }
                None => plan.snapshot = true,
            }
        }
        // Far behind a snapshot: installing it is cheaper than replaying the log.
        let far = self.shared.config.snapshot_every;
        if !plan.snapshot && snapshot_index.0 > plan.start.0.saturating_add(far) {
            plan.snapshot = true;
        }
        if !plan.snapshot && plan.start <= sequenced {
            let held = self.lock().recent.epoch_at(plan.start).is_some();
            if !held
                && let Err(Error::Compacted { .. }) =
                    self.shared.storage.read(plan.start, plan.start).await
            {
                plan.snapshot = true;
            }
        }
        Ok(plan)
    }

    /// The epoch of the entry at `index` in this master's log: `Some(None)` if the log does not
    /// hold it, `None` if it was compacted away (unknown).
    async fn epoch_at(
        &self,
        index: LogIndex,
        snapshot: Option<&Snapshot>,
    ) -> Result<Option<Option<Epoch>>> {
        if let Some(snapshot) = snapshot
            && snapshot.index == index
        {
            return Ok(Some(Some(snapshot.epoch)));
        }
        match self.shared.storage.read(index, index).await {
            Ok(entries) => Ok(Some(entries.first().map(|e| e.epoch))),
            Err(Error::Compacted { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Ships the latest snapshot in pieces; returns the index after it.
    async fn send_snapshot(&self, out: &mpsc::Sender<ToSlave>, link: Link) -> Result<LogIndex> {
        let Some(snapshot) = self.shared.storage.snapshot().await? else {
            return Err(Error::Corrupt(
                "the log was compacted but no snapshot exists".to_string(),
            ));
        };
        tracing::info!(slave = %link.server, index = %snapshot.index, bytes = snapshot.state.len(), "shipping a snapshot");
        let mut chunks = snapshot.state.chunks(SNAPSHOT_CHUNK).peekable();
        let mut offset = 0u64;
        loop {
            let data = chunks.next().unwrap_or_default().to_vec();
            let last = chunks.peek().is_none();
            let len = data.len() as u64;
            let chunk = SnapshotChunk {
                index: snapshot.index,
                epoch: snapshot.epoch,
                offset,
                data,
                last,
            };
            self.send(out, link, Shipment::Snapshot(chunk)).await?;
            offset += len;
            if last {
                break;
            }
        }
        Ok(snapshot.index.next())
    }

    async fn read_acks<S>(&self, server: ServerId, session: u64, mut inbound: S) -> Result<()>
    where
        S: Stream<Item = Result<FromSlave>> + Send + Unpin,
    {
        let timeout = self.shared.config.mirror_timeout;
        loop {
            let message = match tokio::time::timeout(timeout, inbound.next()).await {
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "the slave said nothing for {timeout:?}"
                    )));
                }
                Ok(None) => return Ok(()),
                Ok(Some(message)) => message?,
            };
            match message {
                FromSlave::Durable(index) => {
                    let mut core = self.lock();
                    let in_sync =
                        core.replicas
                            .acked(server, session, index, &*self.shared.storage);
                    if core.role == Role::Master {
                        self.open_gate(&core);
                    }
                    drop(core);
                    if in_sync {
                        tracing::info!(slave = %server, "slave in sync");
                        self.shared.beat_now.notify_one();
                    }
                }
                FromSlave::NewerEpoch(epoch) => {
                    let mut core = self.lock();
                    self.learn_epoch(&mut core, epoch);
                    return Ok(());
                }
                FromSlave::Hello(_) => {
                    return Err(Error::invalid("a second hello on one mirroring stream"));
                }
            }
        }
    }
}
