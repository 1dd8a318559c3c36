//! The slave's side of mirroring: keep a stream open to the master the coordinator names,
//! append what it ships, acknowledge what is durable, commit what it has committed.
//!
//! The slave refuses a master whose epoch is older than the newest it knows and tells it so
//! (the old master then steps down). When the stream breaks, the slave dials again with a short
//! backoff and heartbeats more often, so a promotion reaches it quickly.
//!
//! Which messages it takes, up to where it commits, how much it may acknowledge and how long
//! the master may stay silent are decided by a plain value, `session::MirrorSession` (tested
//! without sockets or clocks); this file opens the stream, feeds it and carries out its
//! verdicts.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{FromSlave, Hello, MirrorTarget, Shipment, SnapshotChunk, ToSlave};
use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::LogIndex;
use crate::server::pipeline::Pending;
use crate::server::{Role, Server, Shared};
use crate::storage::Snapshot;
use session::{Handled, MirrorSession, Verdict};

mod session;
#[cfg(test)]
mod tests;

/// Largest snapshot a slave accepts.
const MAX_SNAPSHOT_BYTES: u64 = 4 << 30;

/// Mirrors the master named in `mirror_target` for as long as the server runs.
pub(in crate::server) async fn run_mirror(shared: Weak<Shared>, shutdown: CancellationToken) {
    let Some(mut targets) = shared.upgrade().map(|s| s.mirror_target.subscribe()) else {
        return;
    };
    let mut backoff = Duration::from_millis(20);
    let mut last_error = String::new();
    loop {
        let target = targets.borrow_and_update().clone();
        let Some(target) = target else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = targets.changed() => if changed.is_err() { return },
            }
            continue;
        };
        let Some(server) = shared.upgrade().map(|shared| Server { shared }) else {
            return;
        };
        let max_backoff = server.shared.config.mirror_timeout;
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            changed = targets.changed() => {
                if changed.is_err() { return; }
                continue;
            }
            result = server.mirror(&target) => result,
        };
        server.set_mirroring(false);
        match result {
            Ok(()) => backoff = Duration::from_millis(20),
            Err(e) => {
                let why = e.to_string();
                if why != last_error {
                    tracing::warn!(master = %target.addr, "mirroring interrupted: {why}");
                    last_error = why;
                }
            }
        }
        server.shared.beat_now.notify_one();
        drop(server);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// A snapshot arriving in pieces.
struct Assembly {
    index: LogIndex,
    epoch: crate::ids::Epoch,
    data: Vec<u8>,
}

impl Server {
    fn set_mirroring(&self, on: bool) {
        self.lock().mirroring = on;
    }

    /// One mirroring stream to `target`, until it breaks or this server stops being slave.
    async fn mirror(&self, target: &MirrorTarget) -> Result<()> {
        self.wait_truncated().await;
        let Some(joined) = self.shared.joined.get() else {
            return Err(Error::invalid("this server is not part of a deployment"));
        };
        let Some((hello, mut session)) = self.greet()? else {
            return Ok(());
        };
        let (out, outbound) = mpsc::channel(16);
        let _ = out.send(FromSlave::Hello(hello)).await;
        let mut inbound = joined.peers.mirror(&target.addr, outbound).await?;
        let mut durable = self.shared.durable_index.subscribe();
        let ack = session.acknowledge(*durable.borrow_and_update());
        let _ = out.send(FromSlave::Durable(ack)).await;
        tracing::info!(master = %target.addr, last_index = %hello.last_index, "mirroring the master");
        let mut assembly: Option<Assembly> = None;
        let opened = Instant::now();
        loop {
            session.waiting(opened.elapsed());
            let deadline = opened + session.deadline();
            let message = tokio::select! {
                message = tokio::time::timeout_at(deadline, inbound.recv()) => match message {
                    Err(_) => return Err(session.silence()),
                    Ok(None) => return Err(Error::ConnectionLost("the master ended the stream".to_string())),
                    Ok(Some(message)) => message?,
                },
                changed = durable.changed() => {
                    if changed.is_err() { return Ok(()); }
                    let ack = session.acknowledge(*durable.borrow_and_update());
                    acknowledge(&out, ack).await?;
                    continue;
                }
            };
            match self.judge(&session, &message) {
                Verdict::Refuse { newer } => {
                    let _ = out.send(FromSlave::NewerEpoch(newer)).await;
                    return Err(Error::NotMaster(format!(
                        "refused a master of epoch {} (epoch {newer} exists)",
                        message.epoch
                    )));
                }
                Verdict::Leave { .. } => return Ok(()),
                Verdict::Mirror { .. } => {}
            }
            let asks = message.body == Shipment::KeepAlive;
            let handled = self.handle(message.body, &mut assembly).await?;
            session.handled(handled);
            if asks {
                let ack = session.acknowledge(*durable.borrow());
                acknowledge(&out, ack).await?;
            }
            let core = self.lock();
            if let Some(upto) = session.committed(message.commit, core.commit, core.role) {
                self.set_gate(&core, upto);
            }
        }
    }

    /// Where this slave's log stands, for a new master, and the session that starts with it;
    /// `None` when this server is no longer slave.
    fn greet(&self) -> Result<Option<(Hello, MirrorSession)>> {
        let core = self.readable()?;
        if core.role != Role::Slave {
            return Ok(None);
        }
        let last_index = LogIndex(core.next_index.0 - 1);
        let session =
            MirrorSession::new(self.shared.config.mirror_timeout, core.commit, last_index);
        // Nothing more commits until this master says so.
        self.set_gate(&core, session.gate());
        let hello = Hello {
            cluster: self.shared.config.cluster,
            server: self.shared.config.server_id,
            known_epoch: core.known_epoch,
            last_index,
            last_epoch: core.last_epoch,
            commit: core.commit,
        };
        Ok(Some((hello, session)))
    }

    /// Judges a master's message under the lock and records what a taken one says.
    fn judge(&self, session: &MirrorSession, message: &ToSlave) -> Verdict {
        let mut core = self.lock();
        let verdict = session.receive(message, core.known_epoch, core.role);
        match verdict {
            Verdict::Refuse { .. } => {}
            Verdict::Leave { known_epoch } => core.known_epoch = known_epoch,
            Verdict::Mirror {
                known_epoch,
                counted,
            } => {
                core.known_epoch = known_epoch;
                core.counted_by_master = counted;
                core.mirroring = true;
            }
        }
        verdict
    }

    /// Carries out what a master shipped; says what it did to the log.
    async fn handle(&self, body: Shipment, assembly: &mut Option<Assembly>) -> Result<Handled> {
        match body {
            Shipment::TruncateAfter(index) => {
                self.truncate_tail(index).await?;
                Ok(Handled::Truncated(index))
            }
            Shipment::Snapshot(chunk) => match assemble(assembly, chunk)? {
                Some(snapshot) => {
                    let index = snapshot.index;
                    self.install_snapshot(snapshot).await?;
                    Ok(Handled::Installed(index))
                }
                None => Ok(Handled::SnapshotPiece),
            },
            Shipment::Entries(entries) => {
                let last = entries.last().map(|e| e.index);
                self.append_shipped(entries).await?;
                Ok(last.map_or(Handled::Nothing, Handled::Appended))
            }
            Shipment::KeepAlive => Ok(Handled::Nothing),
        }
    }

    /// Waits until no truncation after a discard is running.
    async fn wait_truncated(&self) {
        loop {
            let done = self.shared.truncated.notified();
            if !self.lock().truncating {
                return;
            }
            done.await;
        }
    }

    /// Drops the tail after `index`, which the master never committed.
    async fn truncate_tail(&self, index: LogIndex) -> Result<()> {
        {
            let mut core = self.lock();
            if index != core.commit {
                return Err(Error::Conflict(format!(
                    "the master asked to truncate after {index}, but this server committed up to {}",
                    core.commit
                )));
            }
            if core.next_index == index.next() {
                return Ok(());
            }
            tracing::warn!(
                cluster = %self.shared.config.cluster,
                server = %self.shared.config.server_id,
                after = %index,
                dropped = core.next_index.0 - index.0 - 1,
                "dropping a log tail the master never committed"
            );
            self.forget_uncommitted(&mut core);
            core.truncating = true;
        }
        let result = self.shared.storage.truncate_after(index).await;
        self.lock().truncating = false;
        self.shared.truncated.notify_waiters();
        result
    }

    /// Replaces this server's state and log with the master's snapshot.
    async fn install_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let config = self.shared.config.state_config();
        let (state, snapshot) = tokio::task::spawn_blocking(move || {
            snapshot.restore(&config).map(|state| (state, snapshot))
        })
        .await
        .map_err(|e| Error::StorageFailed(format!("snapshot task failed: {e}")))??;
        let index = snapshot.index;
        let epoch = snapshot.epoch;
        tracing::info!(%index, "installing the master's snapshot");
        {
            let mut core = self.lock();
            self.forget_uncommitted(&mut core);
            core.recent.clear();
            core.truncating = true;
        }
        let result = self.shared.storage.save_snapshot(snapshot).await;
        let mut core = self.lock();
        core.truncating = false;
        if result.is_ok() {
            core.next_seq = state.high_water(self.shared.config.cluster) + 1;
            core.last_at = state.latest_time();
            core.state = state;
            core.commit = index;
            core.durable = index;
            core.next_index = index.next();
            core.last_epoch = epoch;
            core.epoch = core.epoch.max(epoch);
            self.shared.storage.set_commit(index);
            self.shared.commit_index.send_replace(index);
            self.shared.durable_index.send_replace(index);
            self.shared.sequenced_index.send_replace(index);
            self.set_gate(&core, index);
        }
        drop(core);
        self.shared.truncated.notify_waiters();
        result
    }

    /// Appends entries the master shipped and hands them to the commit pipeline.
    async fn append_shipped(&self, entries: Vec<LogEntry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let wanted = entries.len().min(self.shared.config.max_inflight.max(1));
        let slots = Arc::clone(&self.shared.inflight)
            .acquire_many_owned(u32::try_from(wanted).unwrap_or(u32::MAX))
            .await
            .map_err(|_| Error::server_shutting_down())?;
        let mut core = self.readable()?;
        if core.role != Role::Slave || core.truncating {
            return Err(Error::NotMaster("no longer mirroring".to_string()));
        }
        crate::storage::check_contiguous(core.next_index, &entries)?;
        for entry in &entries {
            core.epoch = core.epoch.max(entry.epoch);
            core.sequenced(entry.clone());
        }
        let last = LogIndex(core.next_index.0 - 1);
        let durable = self.shared.storage.append(entries.clone());
        self.shared.counters.appended.add(entries.len() as u64);
        self.shared.sequenced_index.send_replace(last);
        let generation = core.generation;
        drop(core);
        self.enqueue(Pending {
            entries,
            generation,
            durable,
            reply: None,
            sequenced_at: None,
            _slots: Some(slots),
        });
        Ok(())
    }
}

/// Tells the master the slave's durable index (as its session lets it say).
async fn acknowledge(out: &mpsc::Sender<FromSlave>, durable: LogIndex) -> Result<()> {
    out.send(FromSlave::Durable(durable))
        .await
        .map_err(|_| Error::ConnectionLost("the master went away".to_string()))
}

/// Adds a piece to the snapshot being assembled; the whole snapshot once the last arrived.
fn assemble(assembly: &mut Option<Assembly>, chunk: SnapshotChunk) -> Result<Option<Snapshot>> {
    if chunk.offset == 0 {
        *assembly = Some(Assembly {
            index: chunk.index,
            epoch: chunk.epoch,
            data: Vec::new(),
        });
    }
    let Some(current) = assembly.as_mut() else {
        return Err(Error::invalid("a snapshot piece arrived without its start"));
    };
    if current.index != chunk.index || current.data.len() as u64 != chunk.offset {
        return Err(Error::invalid("snapshot pieces arrived out of order"));
    }
    if chunk.offset + chunk.data.len() as u64 > MAX_SNAPSHOT_BYTES {
        return Err(Error::invalid(
            "the snapshot is larger than this server accepts",
        ));
    }
    current.data.extend_from_slice(&chunk.data);
    if !chunk.last {
        return Ok(None);
    }
    let Some(done) = assembly.take() else {
        return Ok(None);
    };
    Ok(Some(Snapshot {
        index: done.index,
        epoch: done.epoch,
        state: done.data,
    }))
}
