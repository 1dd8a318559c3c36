//! A coordinator as one of a group on a [`RoutingStore`]: how it takes a heartbeat (judge it
//! on the table, write a change through the store under its term, then answer), and the work it
//! does with the store in the background: following the records, reading them once per
//! heartbeat interval (which also tells it that it can still reach the store), and
//! campaigning to lead.
//!
//! Rules:
//! - roles change only by a store write under this coordinator's term, from the revision the
//!   change was judged on; a conflict reloads the records and judges again;
//! - a coordinator answers heartbeats only while its last successful read of the store is at
//!   most a failure timeout old: one that lost its store cannot know whether roles changed,
//!   so it stops vouching for masters (they step down, as when no coordinator answers) and
//!   changes nothing;
//! - a coordinator alone ([`Coordinator::new`]) keeps its roles in a [`MemoryStore`] it leads
//!   from the start, and never goes stale.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::store::{MemoryStore, RoutingStore, StoredRoles, Swap, Term};
use super::{Assignment, Beat, Coordinator, Verdict};
use crate::error::{Error, Result};

/// How many times a heartbeat is judged again after its write met a newer record.
const JUDGEMENTS: usize = 3;

/// A coordinator's place in its group.
#[derive(Debug)]
pub(super) struct Group {
    name: String,
    store: Arc<dyn RoutingStore>,
    /// The term while this coordinator leads.
    term: Mutex<Option<Term>>,
    /// With a shared store: how old the last successful read may be, and when it was sent.
    freshness: Option<(Duration, Mutex<Option<Instant>>)>,
}

/// Where a coordinator stands in its group, for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// This coordinator's name in the group.
    pub name: String,
    /// The store's kind (`memory`, `etcd`).
    pub store: &'static str,
    /// Whether it leads (changes roles).
    pub leading: bool,
    /// Whether it has read the store within a failure timeout (else it answers no heartbeat).
    pub fresh: bool,
}

impl Group {
    /// A coordinator alone, leading a store in memory.
    pub(super) fn alone() -> Self {
        let store = MemoryStore::new();
        let term = store.lead_now();
        Self {
            name: "coordinator".to_string(),
            store: Arc::new(store),
            term: Mutex::new(term),
            freshness: None,
        }
    }

    /// One of a group on `store`, stale until its first read, not leading until elected.
    pub(super) fn new(name: String, store: Arc<dyn RoutingStore>, limit: Duration) -> Self {
        Self {
            name,
            store,
            term: Mutex::new(None),
            freshness: Some((limit, Mutex::new(None))),
        }
    }

    /// The term, if this coordinator leads.
    fn term(&self) -> Option<Term> {
        let mut term = self.term.lock().unwrap_or_else(|p| p.into_inner());
        if term.as_ref().is_some_and(Term::has_ended) {
            *term = None;
        }
        term.clone()
    }

    fn set_term(&self, term: Option<Term>) {
        *self.term.lock().unwrap_or_else(|p| p.into_inner()) = term;
    }

    /// Whether the last successful read of the store is recent enough to answer heartbeats.
    fn fresh(&self) -> bool {
        match &self.freshness {
            None => true,
            Some((limit, read)) => read
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|at| at.elapsed() <= *limit),
        }
    }

    /// A read of the store sent at `at` succeeded.
    fn read_at(&self, at: Instant) {
        if let Some((_, read)) = &self.freshness {
            let mut read = read.lock().unwrap_or_else(|p| p.into_inner());
            *read = Some(read.map_or(at, |last| last.max(at)));
        }
    }
}

impl Coordinator {
    /// Takes a server's heartbeat and answers with its role, changing its cluster's roles
    /// through the store first where the beat calls for it (see the module's rules).
    pub async fn heartbeat(&self, beat: Beat) -> Result<Assignment> {
        let group = &self.group;
        for _ in 0..JUDGEMENTS {
            if !group.fresh() {
                // It is still heard (so that when the store returns, a master that kept beating
                // is not taken for dead), but neither judged nor answered.
                let _ = self.table().judge(beat, Instant::now(), false);
                return Err(Error::Unavailable(format!(
                    "coordinator {} has not reached its routing store ({}) lately; ask another",
                    group.name,
                    group.store.name()
                )));
            }
            let term = group.term();
            let verdict = self
                .table()
                .judge(beat.clone(), Instant::now(), term.is_some())?;
            let (cluster, expected, record, assignment, term) = match (verdict, term) {
                (Verdict::Answer(assignment), _) => return Ok(assignment),
                (
                    Verdict::Write {
                        cluster,
                        expected,
                        record,
                        assignment,
                    },
                    Some(term),
                ) => (cluster, expected, record, assignment, term),
                // `judge` asks for a write only of a coordinator that leads.
                (Verdict::Write { .. }, None) => {
                    return Err(Error::Unavailable("no term to write under".to_string()));
                }
            };
            match group.store.swap(&term, cluster, expected, &record).await? {
                Swap::Done(revision) => {
                    self.table().install(StoredRoles {
                        cluster,
                        record,
                        revision,
                    });
                    return Ok(assignment);
                }
                Swap::Conflict => {
                    self.reload().await?;
                }
                Swap::NotLeading => group.set_term(None),
            }
        }
        Err(Error::Unavailable(
            "the cluster's roles kept changing under this heartbeat; beat again".to_string(),
        ))
    }

    /// Where this coordinator stands in its group.
    pub fn group_status(&self) -> GroupStatus {
        GroupStatus {
            name: self.group.name.clone(),
            store: self.group.store.name(),
            leading: self.group.term().is_some(),
            fresh: self.group.fresh(),
        }
    }

    /// Reads every record and installs the newer ones; returns the store revision read at.
    async fn reload(&self) -> Result<u64> {
        let sent = Instant::now();
        let (records, revision) = self.group.store.load().await?;
        let mut table = self.table();
        for record in records {
            table.install(record);
        }
        drop(table);
        self.group.read_at(sent);
        Ok(revision)
    }
}

/// Starts the work with the store of a coordinator in a group, until `shutdown`.
pub(super) fn spawn(coordinator: Coordinator, interval: Duration, shutdown: CancellationToken) {
    tokio::spawn(follow(coordinator.clone(), shutdown.clone()));
    tokio::spawn(refresh(coordinator.clone(), interval, shutdown.clone()));
    tokio::spawn(campaign(coordinator, interval, shutdown));
}

/// Pause between two attempts after the store failed.
fn backoff(interval: Duration) -> Duration {
    interval.max(Duration::from_millis(100))
}

/// Pause before following the records again after the store failed.
const FOLLOW_AGAIN: Duration = Duration::from_millis(200);

/// Installs every change of the records as the store reports it; after a failure, loads
/// again and follows from there.
async fn follow(coordinator: Coordinator, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        let failure = match coordinator.reload().await {
            Ok(revision) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(
                        store = coordinator.group.store.name(),
                        "routing store reachable again"
                    );
                }
                let (changes, mut news) = mpsc::channel(64);
                let install = async {
                    while let Some(change) = news.recv().await {
                        coordinator.table().install(change);
                    }
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    followed = coordinator.group.store.follow(revision, changes) => followed.err(),
                    () = install => None,
                }
            }
            Err(e) => Some(e),
        };
        if let Some(e) = failure
            && !std::mem::replace(&mut failing, true)
        {
            tracing::warn!(store = coordinator.group.store.name(), "routing store: {e}");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(FOLLOW_AGAIN) => {}
        }
    }
}

/// Reads the records once per heartbeat interval: that a read succeeds is what keeps this
/// coordinator answering heartbeats.
async fn refresh(coordinator: Coordinator, interval: Duration, shutdown: CancellationToken) {
    loop {
        let read = tokio::select! {
            () = shutdown.cancelled() => return,
            read = coordinator.reload() => read,
        };
        if let Err(e) = read {
            tracing::debug!("routing store read failed: {e}");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Campaigns to lead, leads until the term ends, and campaigns again; resigns at shutdown.
async fn campaign(coordinator: Coordinator, interval: Duration, shutdown: CancellationToken) {
    let group = &coordinator.group;
    let mut failing = false;
    loop {
        let elected = tokio::select! {
            () = shutdown.cancelled() => return,
            elected = group.store.lead(&group.name) => elected,
        };
        match elected {
            Ok(term) => {
                failing = false;
                tracing::info!(coordinator = %group.name, "this coordinator leads its group");
                group.set_term(Some(term.clone()));
                tokio::select! {
                    () = shutdown.cancelled() => {
                        term.resign();
                        group.set_term(None);
                        return;
                    }
                    () = term.ended() => {}
                }
                group.set_term(None);
                tracing::warn!(coordinator = %group.name, "this coordinator no longer leads its group");
            }
            Err(e) => {
                // Said once per outage; the store's own reads say when it is back.
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(coordinator = %group.name, "cannot campaign to lead: {e}");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff(interval)) => {}
                }
            }
        }
    }
}
