//! The master's side of mirroring: one shipping session per connected slave.
//!
//! A session is admitted first (module `admission`: the slave the coordinator lists, from its
//! registered host, with no claim of a newer epoch). It plans where the slave continues (see the parent module), then ships entries from
//! the window of recent entries or, for older ones, from the log, and forwards the commit index.
//! A second loop reads the slave's acknowledgements; a slave silent for the mirror timeout is
//! dropped. Leaving the session detaches the slave (through the coordinator if it was
//! announced in sync).

use std::net::IpAddr;
use std::sync::MutexGuard;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt};

use super::admission::{self, Caller, Identity, ListedSlave, Refusal};
use super::{FromSlave, Hello, MAX_BATCH, SNAPSHOT_CHUNK, Shipment, SnapshotChunk, ToSlave};
use crate::error::{Error, Result};
use crate::ids::{Epoch, LogIndex, ServerId};
use crate::server::{Core, Role, Server};
use crate::storage::Snapshot;
use crate::transport::address;

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

/// How long a commit may wait to be told to the slave by the next shipment of entries (whose
/// header carries the commit index) before it is told alone. Under load the next shipment
/// usually comes first, so most commits cost no message of their own (nor the slave's
/// acknowledgement of one). The slave needs the commit index only to commit what it holds,
/// which nothing waits for: a promoted slave commits every entry it holds.
pub(super) const COMMIT_LINGER: Duration = Duration::from_millis(5);

/// Where a slave continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    truncate_after: Option<LogIndex>,
    snapshot: bool,
    start: LogIndex,
}

/// A mirroring session the master admitted, counted in with [`Replicas`](super::Replicas):
/// [`Server::ship_to_slave`] serves it.
#[derive(Debug)]
pub(crate) struct Admitted {
    hello: Hello,
    link: Link,
}

impl Server {
    /// Decides whether the session that opens with `hello`, coming from `caller`, may mirror
    /// this master (see module `admission`), and if so counts it in. A session the
    /// coordinator's last answer does not vouch for gets one more look, on the answer to a
    /// heartbeat sent at once: the slave may have registered, or the cluster's epoch moved,
    /// since. A refusal is `PermissionDenied`, logged at WARN, and changes nothing for the
    /// slaves already mirroring.
    pub(crate) async fn admit_slave(&self, hello: Hello, caller: &Caller) -> Result<Admitted> {
        let mut asked = false;
        while let Some(refusal) = self.vet(&hello, caller).await? {
            if asked {
                return Err(self.refuse(&hello, caller, refusal));
            }
            self.hear_coordinator().await;
            asked = true;
        }
        self.attach_slave(hello)
    }

    /// Why the session of `hello` may not mirror this master, if it may not; an error if
    /// this server cannot be mirrored at all.
    async fn vet(&self, hello: &Hello, caller: &Caller) -> Result<Option<Refusal>> {
        let epoch = self.check_mirrorable(hello)?.epoch;
        let roster = self.shared.listed_slaves.borrow().clone();
        let unverifiable = |slave: &ListedSlave| {
            tracing::warn!(
                cluster = %hello.cluster,
                slave = %slave.server,
                from = %caller.describe(),
                "the transport cannot tell where this mirroring session comes from: \
                 admitted on the server id alone"
            );
        };
        match admission::identify(&roster, hello.server, caller) {
            Identity::Confirmed => {}
            Identity::Refused(refusal) => return Ok(Some(refusal)),
            Identity::Unverifiable(slave) => unverifiable(&slave),
            Identity::Resolve { slave, ip } => match self.resolve(&slave.host).await {
                Some(resolved) if admission::resolves_to(&resolved, ip) => {}
                Some(_) => return Ok(Some(Refusal::WrongHost(slave))),
                None => unverifiable(&slave),
            },
        }
        Ok(admission::check_epoch(hello.known_epoch, epoch).err())
    }

    /// The addresses `host` stands for on this server's network (`None`: it cannot tell; a
    /// name that does not resolve stands for none).
    async fn resolve(&self, host: &str) -> Option<Vec<IpAddr>> {
        let network = &self.shared.joined.get()?.network;
        match network.resolve(host).await {
            Ok(resolved) => resolved,
            Err(e) => {
                tracing::warn!(%host, "cannot resolve a slave's registered host: {e}");
                Some(Vec::new())
            }
        }
    }

    /// Beats at once and waits, at most a mirror timeout, for the coordinator's answer to that
    /// beat (or a later one).
    async fn hear_coordinator(&self) {
        let built = self.lock().replicas.beats();
        let mut roster = self.shared.listed_slaves.subscribe();
        self.shared.beat_now.notify_one();
        let answered = roster.wait_for(|r| r.beat > built);
        let _ = tokio::time::timeout(self.shared.config.mirror_timeout, answered).await;
    }

    /// The refusal of the session of `hello`, logged.
    fn refuse(&self, hello: &Hello, caller: &Caller, refusal: Refusal) -> Error {
        let listed = self.shared.listed_slaves.borrow().describe();
        let why = match refusal {
            Refusal::NotListed => format!(
                "server {} is not a slave of cluster {}",
                hello.server, hello.cluster
            ),
            Refusal::WrongHost(slave) => format!(
                "server {} registered at {}, and this session comes from {}",
                slave.server,
                address(&slave.host, slave.port),
                caller.describe_host()
            ),
            Refusal::EpochAhead { ours } => format!(
                "the hello claims epoch {}, newer than this master's epoch {ours}; only the \
                 coordinator names epochs",
                hello.known_epoch
            ),
        };
        let now = Instant::now();
        if let Some(unlogged) = self.shared.refusals().note(now) {
            tracing::warn!(
                cluster = %hello.cluster,
                claimed_server = %hello.server,
                from = %caller.describe(),
                claimed_epoch = %hello.known_epoch,
                coordinator_lists = %listed,
                "mirroring session refused: {why} ({unlogged} more refused since the last \
                 warning)"
            );
        }
        Error::PermissionDenied(format!(
            "mirroring refused: {why} (the coordinator lists {listed} for this master)"
        ))
    }

    /// Serves one admitted slave's mirroring stream until it ends, this server stops being
    /// master, or the slave falls silent.
    pub(crate) async fn ship_to_slave<S>(
        &self,
        admitted: Admitted,
        inbound: S,
        out: mpsc::Sender<ToSlave>,
    ) where
        S: Stream<Item = Result<FromSlave>> + Send + Unpin,
    {
        let Admitted { hello, link } = admitted;
        let server = hello.server;
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

    /// The core, if `hello` names another server of this cluster and this server is a master
    /// that can be mirrored.
    fn check_mirrorable(&self, hello: &Hello) -> Result<MutexGuard<'_, Core>> {
        let core = self.readable()?;
        if hello.cluster != self.shared.config.cluster
            || hello.server == self.shared.config.server_id
        {
            return Err(Error::invalid(format!(
                "server {} of cluster {} cannot mirror this server",
                hello.server, hello.cluster
            )));
        }
        if core.role != Role::Master {
            return Err(Error::NotMaster(
                "this server is not the master of its cluster".to_string(),
            ));
        }
        Ok(core)
    }

    /// Counts the session of `hello` in, without asking who it comes from ([`admit_slave`]
    /// does, before).
    ///
    /// [`admit_slave`]: Server::admit_slave
    pub(in crate::server) fn attach_slave(&self, hello: Hello) -> Result<Admitted> {
        let mut core = self.check_mirrorable(&hello)?;
        let commit = core.commit;
        let link = Link {
            server: hello.server,
            session: core.replicas.attach(hello.server, commit),
            generation: core.generation,
        };
        Ok(Admitted { hello, link })
    }

    /// This server learned of a newer epoch: if it is master, it has been replaced.
    pub(in crate::server) fn learn_epoch(&self, core: &mut Core, epoch: Epoch) {
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
            return Err(Error::NotMaster("no longer master".to_string()));
        }
        if core.generation != link.generation {
            return Err(Error::ConnectionLost(
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

    /// Sends `body` in `link`'s session; returns the commit index its header carried.
    async fn send(
        &self,
        out: &mpsc::Sender<ToSlave>,
        link: Link,
        body: Shipment,
    ) -> Result<LogIndex> {
        let message = self.header(link, body)?;
        let commit = message.commit;
        out.send(message)
            .await
            .map_err(|_| Error::ConnectionLost("the slave went away".to_string()))?;
        Ok(commit)
    }

    /// Ships the session: first the truncation or the snapshot the plan calls for, then
    /// entries as they are sequenced. The slave takes any other first message as this master
    /// continuing right after its last entry, its whole log agreeing (see the parent module).
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
        // The newest commit index a message of this loop carried, and when the slave is told
        // of a newer one, unless a shipment carries it first.
        let mut told = LogIndex(0);
        let mut commit_due: Option<Instant> = None;
        loop {
            let last = *sequenced.borrow_and_update();
            if next <= last {
                match self.entries(next, last).await {
                    Ok(batch) if !batch.is_empty() => {
                        next = batch.last().map_or(next, |e| e.index.next());
                        told = self.send(out, link, Shipment::Entries(batch)).await?;
                        commit_due = None;
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
                    // A commit a shipment already carried (it landed before that shipment's
                    // header was made) is not told again.
                    if *commits.borrow_and_update() > told {
                        commit_due.get_or_insert_with(|| Instant::now() + COMMIT_LINGER);
                    }
                }
                () = sleep_until_some(commit_due) => {
                    told = self.send(out, link, Shipment::KeepAlive).await?;
                    commit_due = None;
                }
                _ = ticks.tick() => {
                    told = self.send(out, link, Shipment::KeepAlive).await?;
                    commit_due = None;
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
                    return Err(Error::ConnectionLost(format!(
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

/// Waits until `at`, or for ever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
