//! What a synchronizer needs from a server: the cluster's own committed events after a sequence
//! number, the committed high-water mark of every origin, and applying other clusters' events.
//!
//! Invariants:
//! - Only committed events leave the cluster ([`Server::own_events_after`] reads the
//!   committed-entry stream), so a sequence number seen outside names the same event forever.
//! - Applying is idempotent by (origin, sequence): an event at or below its origin's high-water
//!   mark (committed or sequenced) is dropped; a batch that would leave a hole is refused whole.
//! - [`Server::apply_remote`] answers once every event of the batch is committed, i.e. durable
//!   on the master and on the slaves it counts; a consumer may acknowledge its source then.
//! - Remote events go through the same pipeline as local ones: sequenced into the log, mirrored
//!   to the slave, committed, fanned out to the live timelines of local followers.
//! - Nothing another cluster says is believed for its shape alone: every event of a batch must
//!   pass the origin-authority rule ([`check_authority`]: an origin speaks only for its own
//!   users) and the clock bounds ([`check_clock`]), or the whole batch is refused, changing
//!   nothing, and the refusal is logged and counted against the origin
//!   ([`Server::refused_remote`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::pipeline::Pending;
use super::{CommittedEntries, Core, Server};
use crate::error::{Error, Result};
use crate::event::{
    Event, EventKind, IMAGE_PIECE_BYTES, LogEntry, check_post_text, check_record_len,
};
use crate::ids::{ClusterId, EventId, LogIndex, Timestamp};
use crate::state::{Refusal, check_authority, check_clock};
use crate::storage::Storage;

/// Most events [`Server::apply_remote`] takes in one call.
pub const MAX_APPLY_BATCH: usize = 1024;

/// Pieces of a state transfer yielded in one batch of [`OwnEvents`] (each at most
/// [`IMAGE_PIECE_BYTES`] of content, so one batch stays a few MiB on any transport).
const IMAGE_PIECES_PER_BATCH: usize = 4;

/// Other clusters' events a server refused, for one origin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusalCounts {
    /// Events that spoke for what the origin may not (another cluster's user, a post of
    /// another origin in a state transfer, an origin outside the deployment).
    pub forged: u64,
    /// Events dated before 2000 or beyond this server's clock plus the allowed skew: the
    /// origin's clock is wrong.
    pub clock: u64,
    /// Events otherwise malformed (a post that is not terminal-safe, sequence number 0, this
    /// cluster's own origin).
    pub invalid: u64,
}

/// Refusals per origin (see [`Server::refused_remote`]).
#[derive(Debug, Default)]
pub(super) struct RemoteRefusals(Mutex<BTreeMap<ClusterId, RefusalCounts>>);

impl RemoteRefusals {
    fn count(&self, origin: ClusterId, bump: impl FnOnce(&mut RefusalCounts)) {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        bump(counts.entry(origin).or_default());
    }

    fn snapshot(&self) -> BTreeMap<ClusterId, RefusalCounts> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// This cluster's own committed events after a sequence number, in order: those already
/// committed, then new ones as they commit. Made by [`Server::own_events_after`].
pub struct OwnEvents {
    cluster: ClusterId,
    entries: CommittedEntries,
    /// The sequence number of the last event yielded (or the starting point).
    last: u64,
    /// The named reader whose retention mark moves as events are read, and where.
    reader: Option<(String, Arc<dyn Storage>)>,
    /// The first log index of the previous batch read.
    previous: Option<LogIndex>,
    /// The pieces of a state transfer to yield first.
    image: VecDeque<Event>,
}

impl std::fmt::Debug for OwnEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnEvents")
            .field("cluster", &self.cluster)
            .field("last", &self.last)
            .field("reader", &self.reader.as_ref().map(|(name, _)| name))
            .finish_non_exhaustive()
    }
}

impl OwnEvents {
    /// The sequence number of the last event yielded (the starting point before the first).
    pub fn position(&self) -> u64 {
        self.last
    }

    /// The next own events (at least one, at most `max`, consecutive sequence numbers), waiting
    /// until there is one. `Ok(None)` once the server has stopped.
    pub async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Event>>> {
        if !self.image.is_empty() {
            let take = self.image.len().min(IMAGE_PIECES_PER_BATCH.min(max).max(1));
            let pieces: Vec<Event> = self.image.drain(..take).collect();
            if self.image.is_empty()
                && let Some(last) = pieces.last()
            {
                self.last = last.id.seq;
            }
            return Ok(Some(pieces));
        }
        loop {
            let Some(entries) = self.entries.next_batch(max).await? else {
                return Ok(None);
            };
            // The reader's mark trails by a batch: what it was handed last may not have reached
            // its destination yet, so only what came before is released.
            if let (Some((name, storage)), Some(first)) = (&self.reader, entries.first())
                && let Some(previous) = self.previous.replace(first.index)
            {
                storage.retain(name, LogIndex(previous.0 - 1));
            }
            let mut batch = Vec::new();
            for entry in entries {
                let id = entry.event.id;
                if id.origin != self.cluster || id.seq <= self.last {
                    continue;
                }
                if id.seq != self.last + 1 {
                    return Err(Error::Corrupt(format!(
                        "the log holds event {id} where {}:{} was expected",
                        self.cluster,
                        self.last + 1
                    )));
                }
                self.last = id.seq;
                batch.push(entry.event);
            }
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
        }
    }
}

/// The events of `events` not yet sequenced here, in order: an event at or below its origin's
/// high-water mark (committed or sequenced, or earlier in the batch) is dropped; one that
/// skips a sequence number refuses the whole batch (`Conflict`).
fn fresh_events(core: &Core, events: Vec<Event>) -> Result<Vec<Event>> {
    let mut next: BTreeMap<ClusterId, u64> = BTreeMap::new();
    let mut fresh = Vec::new();
    for event in events {
        let origin = event.id.origin;
        let last = next
            .entry(origin)
            .or_insert_with(|| core.uncommitted.high_water(&core.state, origin));
        if event.id.seq <= *last {
            continue;
        }
        if !event.continues(*last) {
            return Err(Error::Conflict(format!(
                "event {} skips sequence numbers: {origin}:{} is next",
                event.id,
                *last + 1
            )));
        }
        if event.completes() {
            *last = event.id.seq;
        }
        fresh.push(event);
    }
    Ok(fresh)
}

impl Server {
    /// The committed high-water mark of every origin with an applied event (this cluster's
    /// own included).
    pub fn high_water(&self) -> Result<BTreeMap<ClusterId, u64>> {
        let core = self.readable()?;
        Ok(core
            .state
            .origins()
            .map(|origin| (origin, core.state.high_water(origin)))
            .collect())
    }

    /// This cluster's own committed events with a sequence number above `after`. When the log
    /// no longer holds the next one, the stream starts with a state transfer
    /// ([`EventKind::Image`]) instead. Fails with [`Error::InvalidInput`] when `after` is
    /// beyond every committed event.
    ///
    /// A named `reader` (see [`check_reader`]) is registered with the storage from the
    /// starting position on, and moved as events are read, so compaction keeps what it still
    /// needs (within the storage's retention bound) even while it is away.
    pub async fn own_events_after(&self, after: u64, reader: Option<&str>) -> Result<OwnEvents> {
        if let Some(name) = reader {
            check_reader(name)?;
        }
        let cluster = self.shared.config.cluster;
        let (commit, high_water) = {
            let core = self.readable()?;
            (core.commit, core.state.high_water(cluster))
        };
        if after > high_water {
            return Err(Error::invalid(format!(
                "cluster {cluster} has committed events up to {high_water} only, not {after}"
            )));
        }
        let start = if after == high_water {
            // Every event up to `after` is committed, so at or before the commit index.
            commit
        } else {
            let next = EventId {
                origin: cluster,
                seq: after + 1,
            };
            match self.shared.storage.position(next).await? {
                Some(index) => LogIndex(index.0 - 1),
                None => {
                    // The log no longer holds what the reader needs: start it with a state
                    // transfer as of the commit index, then carry on from there.
                    let first = self.first_held().await;
                    return self.image_then_events(after, reader, first);
                }
            }
        };
        Ok(self.own_stream(after, start, reader, VecDeque::new()))
    }

    /// The stream of own events after `after`, from the committed entries after `start`,
    /// yielding `image` first if given; a named `reader` is registered at `start`.
    fn own_stream(
        &self,
        after: u64,
        start: LogIndex,
        reader: Option<&str>,
        image: VecDeque<Event>,
    ) -> OwnEvents {
        let reader = reader.map(|name| {
            let name = format!("sync-{name}");
            self.shared.storage.retain(&name, start);
            (name, Arc::clone(&self.shared.storage))
        });
        OwnEvents {
            cluster: self.shared.config.cluster,
            entries: self.committed_after(start),
            last: after,
            reader,
            previous: None,
            image,
        }
    }

    /// A stream that starts with a state transfer ([`EventKind::Image`]) of this cluster as of
    /// the commit index (a reader after `after` whose next event was compacted away, the first
    /// entry held being `first`), then goes on with the events committed after it. Building
    /// the image copies this cluster's users, follows and recent posts under the lock.
    fn image_then_events(
        &self,
        after: u64,
        reader: Option<&str>,
        first: LogIndex,
    ) -> Result<OwnEvents> {
        let cluster = self.shared.config.cluster;
        let (commit, image) = {
            let core = self.readable()?;
            let seq = core.state.high_water(cluster);
            let at = core.state.latest_time();
            let pieces: VecDeque<Event> = core
                .state
                .image()
                .into_pieces(IMAGE_PIECE_BYTES)
                .into_iter()
                .map(|piece| Event {
                    id: EventId {
                        origin: cluster,
                        seq,
                    },
                    at,
                    kind: EventKind::Image(Arc::new(piece)),
                })
                .collect();
            (core.commit, pieces)
        };
        tracing::info!(
            %cluster,
            after,
            upto = image.front().map_or(0, |piece| piece.id.seq),
            pieces = image.len(),
            first_held = %first,
            "a reader fell behind the log; sending a state transfer"
        );
        Ok(self.own_stream(after, commit, reader, image))
    }

    /// The first log index still held (for a [`Error::Compacted`] answer).
    async fn first_held(&self) -> LogIndex {
        match self.shared.storage.read(LogIndex(1), LogIndex(1)).await {
            Err(Error::Compacted { first }) => first,
            _ => LogIndex(1),
        }
    }

    /// Applies events of other clusters (each origin's events in order; several origins may
    /// mix) and answers once all of them are committed. Events at or below their origin's
    /// high-water mark are dropped. Refused, changing nothing: on a server that is not master,
    /// a batch over [`MAX_APPLY_BATCH`], an event of this cluster's own origin or an invalid
    /// one, and a batch that skips a sequence number (`Conflict`).
    pub async fn apply_remote(&self, events: Vec<Event>) -> Result<()> {
        self.believe_batch(&events)?;
        let slots = self.batch_slots(events.len()).await?;
        let (wait, generation, upto) = {
            let mut guard = self.writable()?;
            let core = &mut *guard;
            let fresh = fresh_events(core, events)?;
            if fresh.is_empty() {
                // Nothing new, but a duplicate may still be uncommitted: answer once everything
                // sequenced so far has committed.
                let upto = LogIndex(core.next_index.0 - 1);
                (None, core.generation, upto)
            } else {
                let (wait, last) = self.sequence_remote(core, fresh, slots);
                (Some(wait), core.generation, last)
            }
        };
        match wait {
            Some(wait) => super::finish(wait).await,
            None => self.committed_through(generation, upto).await,
        }
    }

    /// Refuses a batch over [`MAX_APPLY_BATCH`] or holding an event not to be believed (see
    /// [`Server::believe`]), as of this server's clock.
    fn believe_batch(&self, events: &[Event]) -> Result<()> {
        if events.len() > MAX_APPLY_BATCH {
            return Err(Error::invalid(format!(
                "a batch holds at most {MAX_APPLY_BATCH} events, not {}",
                events.len()
            )));
        }
        let now = Timestamp(
            Timestamp::now()
                .0
                .saturating_add(self.shared.config.clock_offset_micros),
        );
        for event in events {
            self.believe(event, now)?;
        }
        Ok(())
    }

    /// Waits for the in-flight slots of a batch of `len` events: one per event, at least one,
    /// at most all there are.
    async fn batch_slots(&self, len: usize) -> Result<OwnedSemaphorePermit> {
        let slots =
            u32::try_from(len.clamp(1, self.shared.config.max_inflight.max(1))).unwrap_or(u32::MAX);
        Arc::clone(&self.shared.inflight)
            .acquire_many_owned(slots)
            .await
            .map_err(|_| Error::server_shutting_down())
    }

    /// Sequences `fresh` events into the log under the current epoch, starts writing them and
    /// queues them for commit (holding `slots` until then). Returns the wait for their commit
    /// and the index of the last.
    fn sequence_remote(
        &self,
        core: &mut Core,
        fresh: Vec<Event>,
        slots: OwnedSemaphorePermit,
    ) -> (oneshot::Receiver<Result<()>>, LogIndex) {
        let mut entries = Vec::with_capacity(fresh.len());
        for event in fresh {
            let entry = LogEntry {
                index: core.next_index,
                epoch: core.epoch,
                event,
            };
            core.sequenced(entry.clone());
            entries.push(entry);
        }
        let last = LogIndex(core.next_index.0 - 1);
        let durable = self.shared.storage.append(entries.clone());
        self.shared.counters.appended.add(entries.len() as u64);
        self.shared.sequenced_index.send_replace(last);
        let (reply, wait) = oneshot::channel();
        self.enqueue(Pending {
            entries,
            generation: core.generation,
            durable,
            reply: Some(reply),
            sequenced_at: None,
            _slots: Some(slots),
        });
        (wait, last)
    }

    /// Other clusters' events this server refused so far, per origin (an origin the
    /// deployment does not have included).
    pub fn refused_remote(&self) -> BTreeMap<ClusterId, RefusalCounts> {
        self.shared.refused.snapshot()
    }

    /// Checks an event offered by another cluster (as of this server's clock `now`); a
    /// refusal is logged and counted against the event's origin.
    fn believe(&self, event: &Event, now: Timestamp) -> Result<()> {
        let config = &self.shared.config;
        let origin = event.id.origin;
        let refusal = match check_authority(event, config.clusters)
            .and_then(|()| check_clock(event, now, config.max_clock_skew))
        {
            Ok(()) => match check_remote(config.cluster, event) {
                Ok(()) => return Ok(()),
                Err(error) => {
                    self.shared.refused.count(origin, |c| c.invalid += 1);
                    tracing::error!(
                        cluster = %config.cluster,
                        %origin,
                        "refused an invalid event of cluster {origin}: {error}"
                    );
                    return Err(error);
                }
            },
            Err(refusal) => refusal,
        };
        if refusal.is_clock() {
            self.shared.refused.count(origin, |c| c.clock += 1);
        } else {
            self.shared.refused.count(origin, |c| c.forged += 1);
        }
        log_refusal(config.cluster, &refusal);
        Err(refusal.into())
    }

    /// Waits until the commit index reaches `upto` with no discard since `generation`.
    async fn committed_through(&self, generation: u64, upto: LogIndex) -> Result<()> {
        let mut commit = self.shared.commit_index.subscribe();
        let lost = || Error::NotMaster("this server lost its role before the commit".into());
        loop {
            if *commit.borrow_and_update() >= upto {
                return if self.lock().generation == generation {
                    Ok(())
                } else {
                    Err(lost())
                };
            }
            if self.lock().generation != generation {
                return Err(lost());
            }
            tokio::select! {
                changed = commit.changed() => {
                    if changed.is_err() {
                        return Err(Error::server_shutting_down());
                    }
                }
                () = self.shared.shutdown.cancelled() => {
                    return Err(Error::server_shutting_down());
                }
            }
        }
    }
}

/// Checks a reader's name: 1 to 32 ASCII letters, digits or dashes.
pub fn check_reader(name: &str) -> Result<()> {
    let valid = (1..=32).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "reader name {name:?} must be 1 to 32 ASCII letters, digits or dashes"
        )))
    }
}

/// Logs a refused event loudly: an origin's clock that is wrong, or an event it may not say.
fn log_refusal(cluster: ClusterId, refusal: &Refusal) {
    let origin = refusal.event().origin;
    if refusal.is_clock() {
        tracing::error!(
            %cluster,
            %origin,
            "the clock of cluster {origin} is wrong; its event was refused: {refusal}"
        );
    } else {
        tracing::error!(
            %cluster,
            %origin,
            "refused an event cluster {origin} may not send (forged?): {refusal}"
        );
    }
}

/// Checks an event offered by another cluster for what the authority rule does not cover.
fn check_remote(own: ClusterId, event: &Event) -> Result<()> {
    if event.id.origin == own {
        return Err(Error::invalid(format!(
            "event {} is of this cluster's own origin; only other clusters' events are applied",
            event.id
        )));
    }
    if event.id.seq == 0 {
        return Err(Error::invalid("sequence numbers start at 1"));
    }
    let check = |id: &EventId, text: &str| {
        check_post_text(text).map_err(|e| Error::invalid(format!("post {id}: {e}")))
    };
    match &event.kind {
        EventKind::Posted { text, .. } => check(&event.id, text),
        EventKind::Image(image) => {
            check_record_len(event.record_len())?;
            for post in &image.posts {
                if post.id.origin != event.id.origin || post.id.seq > event.id.seq {
                    return Err(Error::invalid(format!(
                        "the image {} holds post {} of another origin or a later one",
                        event.id, post.id
                    )));
                }
                check(&post.id, &post.text)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}
