//! Where a coordinator keeps the durable facts of each cluster: its epoch, its master and the
//! slaves the master counts as in sync ([`RolesRecord`]). Heartbeats and liveness stay in the
//! coordinator's memory; these facts outlive it.
//!
//! A [`RoutingStore`] changes a record only by a compare-and-swap on the record's revision,
//! made under a leadership [`Term`] that the store checks in the same step (fencing): a
//! coordinator whose term ended, or that read an older record, changes nothing. Every
//! coordinator of a group follows the records' changes; one leads at a time and only the leader
//! writes.
//!
//! [`MemoryStore`] keeps the records in the process (one coordinator, which always leads: the
//! default of `sns up` and of tests); `EtcdStore` (feature `etcd`) keeps them in an etcd
//! cluster, with leadership on an etcd lease. Both pass the shared suite
//! `testing::routing_store_suite` (feature `test-util`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::ids::{ClusterId, Epoch, ServerId};

/// A record's version in its store: it rises with every change; `0` means no record.
pub type Revision = u64;

/// The durable facts of one cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolesRecord {
    /// The cluster's epoch: it rises every time a master is named.
    pub epoch: Epoch,
    /// The master named under that epoch, if any.
    pub master: Option<ServerId>,
    /// The slaves the master last reported in sync (only these may replace it).
    pub in_sync: BTreeSet<ServerId>,
    /// Slaves named master in place of a dead one, over the cluster's life.
    pub promotions: u64,
}

/// The first word of an encoded record: the format and its version.
const FORMAT: &str = "sns-roles/1";

impl RolesRecord {
    /// The record as stored: one line of text, e.g.
    /// `sns-roles/1 epoch=4 master=2 in_sync=1,3 promotions=1`.
    pub fn encode(&self) -> String {
        let master = self.master.map_or(0, ServerId::get);
        let in_sync: Vec<String> = self.in_sync.iter().map(|s| s.get().to_string()).collect();
        format!(
            "{FORMAT} epoch={} master={master} in_sync={} promotions={}",
            self.epoch.0,
            in_sync.join(","),
            self.promotions
        )
    }

    /// Reads a record written by [`RolesRecord::encode`], checking every field: server ids
    /// must lie in `1..=servers`, the master must not be among its own in-sync slaves, and a
    /// record naming a master must have an epoch.
    pub fn decode(text: &[u8], servers: u32) -> Result<Self> {
        let text =
            std::str::from_utf8(text).map_err(|_| Error::invalid("a roles record is not UTF-8"))?;
        let mut words = text.split(' ');
        if words.next() != Some(FORMAT) {
            return Err(Error::invalid(format!(
                "a roles record does not start with {FORMAT:?}"
            )));
        }
        let mut fields = BTreeMap::new();
        for word in words {
            let (name, value) = word
                .split_once('=')
                .ok_or_else(|| Error::invalid(format!("roles record field {word:?} has no '='")))?;
            if fields.insert(name, value).is_some() {
                return Err(Error::invalid(format!("roles record field {name:?} twice")));
            }
        }
        let field = |name: &str| {
            fields
                .get(name)
                .copied()
                .ok_or_else(|| Error::invalid(format!("roles record without {name:?}")))
        };
        let number = |name: &str| -> Result<u64> {
            field(name)?
                .parse()
                .map_err(|_| Error::invalid(format!("roles record {name:?} is not a number")))
        };
        let server = |text: &str| -> Result<ServerId> {
            text.parse::<u32>()
                .ok()
                .filter(|s| *s <= servers)
                .and_then(ServerId::new)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "roles record names server {text:?}, not in 1..={servers}"
                    ))
                })
        };
        let master = match field("master")? {
            "0" => None,
            id => Some(server(id)?),
        };
        let in_sync = match field("in_sync")? {
            "" => BTreeSet::new(),
            list => list.split(',').map(server).collect::<Result<_>>()?,
        };
        let record = Self {
            epoch: Epoch(number("epoch")?),
            master,
            in_sync,
            promotions: number("promotions")?,
        };
        if fields.len() != 4 {
            return Err(Error::invalid("a roles record has unknown fields"));
        }
        if let Some(master) = record.master {
            if record.in_sync.contains(&master) {
                return Err(Error::invalid("a roles record counts its master in sync"));
            }
            if record.epoch == Epoch(0) {
                return Err(Error::invalid(
                    "a roles record names a master under epoch 0",
                ));
            }
        }
        Ok(record)
    }
}

/// A record with its cluster and revision, as read from a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRoles {
    /// The cluster.
    pub cluster: ClusterId,
    /// Its record.
    pub record: RolesRecord,
    /// The record's revision.
    pub revision: Revision,
}

/// What became of a [`RoutingStore::swap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swap {
    /// Written: the record's new revision.
    Done(Revision),
    /// Not written: the record is no longer at the expected revision.
    Conflict,
    /// Not written: the term no longer leads (it has been ended).
    NotLeading,
}

/// A coordinator's time as leader of its group. It ends when the store can no longer vouch
/// for it (its lease may have expired, its store is unreachable) or when its holder calls
/// [`Term::resign`] (dropping it does not end it); a store refuses writes under a term that
/// ended.
#[derive(Debug, Clone)]
pub struct Term {
    /// The store's token for this term, compared at every write.
    pub(crate) fence: i64,
    ended: CancellationToken,
}

impl Term {
    /// A term fenced by `fence`, which ends when `ended` is cancelled.
    pub(crate) fn new(fence: i64, ended: CancellationToken) -> Self {
        Self { fence, ended }
    }

    /// Whether the term has ended.
    pub fn has_ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    /// Waits until the term ends.
    pub async fn ended(&self) {
        self.ended.cancelled().await;
    }

    /// Gives up leadership.
    pub fn resign(&self) {
        self.ended.cancel();
    }
}

/// Durable routing facts shared by a group of coordinators. See the module documentation.
#[async_trait::async_trait]
pub trait RoutingStore: Send + Sync + std::fmt::Debug {
    /// A short name for logs and status (`memory`, `etcd`).
    fn name(&self) -> &'static str;

    /// Every cluster's record, and the store's revision as of the read (changes after it are
    /// what [`RoutingStore::follow`] from there reports). Records that fail to decode are an
    /// error, not skipped.
    async fn load(&self) -> Result<(Vec<StoredRoles>, Revision)>;

    /// Writes `record` for `cluster` if its record is still at revision `expected` (`0`: it
    /// has none) and `term` still leads.
    async fn swap(
        &self,
        term: &Term,
        cluster: ClusterId,
        expected: Revision,
        record: &RolesRecord,
    ) -> Result<Swap>;

    /// Sends every change made after store revision `after`, in order, until the receiver is
    /// dropped (then `Ok`) or the store fails (then the error; the caller loads again).
    async fn follow(&self, after: Revision, changes: mpsc::Sender<StoredRoles>) -> Result<()>;

    /// Waits until `candidate` leads the group, and returns its term. Fails when the store
    /// cannot be reached; the caller tries again.
    async fn lead(&self, candidate: &str) -> Result<Term>;
}

/// Changes a [`MemoryStore`] keeps for its followers.
const HISTORY: usize = 1024;

/// The records in this process: one coordinator, which leads as soon as it asks.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Memory>,
}

#[derive(Debug)]
struct Memory {
    state: Mutex<MemoryState>,
    /// The store's revision, for followers to wait on.
    changed: watch::Sender<Revision>,
}

#[derive(Debug, Default)]
struct MemoryState {
    revision: Revision,
    records: BTreeMap<ClusterId, (RolesRecord, Revision)>,
    /// The latest changes, in order (at most [`HISTORY`]; a follower further behind is told to
    /// load again, as etcd does after a compaction).
    history: std::collections::VecDeque<StoredRoles>,
    /// The fence of the term that leads, if any.
    leader: Option<(i64, CancellationToken)>,
    terms: i64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Memory {
                state: Mutex::new(MemoryState::default()),
                changed: watch::channel(0).0,
            }),
        }
    }

    /// The term of the first candidate, which leads at once; `None` if one already leads.
    pub(crate) fn lead_now(&self) -> Option<Term> {
        let mut state = self.state();
        if state
            .leader
            .as_ref()
            .is_some_and(|(_, e)| !e.is_cancelled())
        {
            return None;
        }
        state.terms += 1;
        let ended = CancellationToken::new();
        state.leader = Some((state.terms, ended.clone()));
        Some(Term::new(state.terms, ended))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // Updates complete before anything that could panic: a poisoned lock is usable.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl RoutingStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn load(&self) -> Result<(Vec<StoredRoles>, Revision)> {
        let state = self.state();
        let records = state
            .records
            .iter()
            .map(|(cluster, (record, revision))| StoredRoles {
                cluster: *cluster,
                record: record.clone(),
                revision: *revision,
            })
            .collect();
        Ok((records, state.revision))
    }

    async fn swap(
        &self,
        term: &Term,
        cluster: ClusterId,
        expected: Revision,
        record: &RolesRecord,
    ) -> Result<Swap> {
        let mut state = self.state();
        let leads = state
            .leader
            .as_ref()
            .is_some_and(|(fence, ended)| *fence == term.fence && !ended.is_cancelled());
        if !leads {
            return Ok(Swap::NotLeading);
        }
        let current = state.records.get(&cluster).map_or(0, |(_, r)| *r);
        if current != expected {
            return Ok(Swap::Conflict);
        }
        state.revision += 1;
        let revision = state.revision;
        state.records.insert(cluster, (record.clone(), revision));
        if state.history.len() == HISTORY {
            state.history.pop_front();
        }
        state.history.push_back(StoredRoles {
            cluster,
            record: record.clone(),
            revision,
        });
        drop(state);
        self.inner.changed.send_replace(revision);
        Ok(Swap::Done(revision))
    }

    async fn follow(&self, after: Revision, changes: mpsc::Sender<StoredRoles>) -> Result<()> {
        let mut changed = self.inner.changed.subscribe();
        let mut seen = after;
        loop {
            let news: Vec<StoredRoles> = {
                let state = self.state();
                let oldest = state
                    .history
                    .front()
                    .map_or(state.revision + 1, |c| c.revision);
                if seen + 1 < oldest {
                    return Err(Error::Unavailable(format!(
                        "changes after revision {seen} are no longer kept; load again"
                    )));
                }
                let start = state.history.partition_point(|c| c.revision <= seen);
                state.history.range(start..).cloned().collect()
            };
            for change in news {
                seen = change.revision;
                if changes.send(change).await.is_err() {
                    return Ok(());
                }
            }
            tokio::select! {
                () = changes.closed() => return Ok(()),
                moved = changed.changed() => if moved.is_err() { return Ok(()) },
            }
        }
    }

    async fn lead(&self, _candidate: &str) -> Result<Term> {
        loop {
            if let Some(term) = self.lead_now() {
                return Ok(term);
            }
            let held = self.state().leader.as_ref().map(|(_, ended)| ended.clone());
            if let Some(ended) = held {
                ended.cancelled().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: u32) -> ServerId {
        ServerId::new(id).expect("server")
    }

    #[tokio::test]
    async fn the_memory_store_keeps_a_bounded_history_and_sends_a_follower_too_far_behind_to_load()
    {
        let store = MemoryStore::new();
        let term = store.lead_now().expect("the first candidate leads");
        let cluster = ClusterId::new(1).expect("cluster");
        let mut at = 0;
        for epoch in 1..=(HISTORY as u64 + 1) {
            let record = RolesRecord {
                epoch: Epoch(epoch),
                master: Some(server(1)),
                ..RolesRecord::default()
            };
            let Swap::Done(revision) = store.swap(&term, cluster, at, &record).await.expect("swap")
            else {
                panic!("write {epoch}");
            };
            at = revision;
        }
        assert_eq!(store.state().history.len(), HISTORY);
        let (changes, _seen) = mpsc::channel(1);
        let behind = store.follow(0, changes).await;
        assert!(matches!(behind, Err(Error::Unavailable(_))), "{behind:?}");
        let (changes, mut seen) = mpsc::channel(1);
        let following = tokio::spawn({
            let store = store.clone();
            async move { store.follow(at - 1, changes).await }
        });
        let last = seen.recv().await.expect("the newest change");
        assert_eq!(
            (last.revision, last.record.epoch),
            (at, Epoch(HISTORY as u64 + 1))
        );
        drop(seen);
        following
            .await
            .expect("the follower")
            .expect("ends cleanly");
    }

    #[test]
    fn a_record_survives_its_encoding() {
        let record = RolesRecord {
            epoch: Epoch(7),
            master: Some(server(2)),
            in_sync: [server(1), server(3)].into(),
            promotions: 2,
        };
        let text = record.encode();
        assert_eq!(
            text,
            "sns-roles/1 epoch=7 master=2 in_sync=1,3 promotions=2"
        );
        assert_eq!(
            RolesRecord::decode(text.as_bytes(), 3).expect("decodes"),
            record
        );
        let empty = RolesRecord::default();
        assert_eq!(
            RolesRecord::decode(empty.encode().as_bytes(), 2).expect("decodes"),
            empty
        );
    }

    #[test]
    fn a_record_that_says_something_impossible_is_refused() {
        let bad = [
            "sns-roles/2 epoch=1 master=1 in_sync= promotions=0",
            "sns-roles/1 epoch=1 master=3 in_sync= promotions=0",
            "sns-roles/1 epoch=1 master=1 in_sync=1 promotions=0",
            "sns-roles/1 epoch=0 master=1 in_sync= promotions=0",
            "sns-roles/1 epoch=1 master=1 in_sync=2,x promotions=0",
            "sns-roles/1 epoch=-1 master=1 in_sync= promotions=0",
            "sns-roles/1 epoch=1 master=1 in_sync=",
            "sns-roles/1 epoch=1 epoch=2 master=1 in_sync= promotions=0",
            "sns-roles/1 epoch=1 master=1 in_sync= promotions=0 extra=1",
            "sns-roles/1 epoch=1 master=1 in_sync=0 promotions=0",
        ];
        for text in bad {
            assert!(RolesRecord::decode(text.as_bytes(), 2).is_err(), "{text}");
        }
        assert!(RolesRecord::decode(&[0xff, 0xfe], 2).is_err());
    }
}
