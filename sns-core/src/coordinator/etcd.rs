//! [`EtcdStore`]: the routing records in an etcd cluster (etcd v3 API), for a group of
//! coordinators.
//!
//! Keys, under a prefix (default `/sns`): `PREFIX/clusters/N` holds cluster `N`'s
//! [`RolesRecord`] as one line of text; `PREFIX/leader` names the leading coordinator and is
//! bound to its lease. A write is one etcd transaction that compares the record's modification
//! revision with the one the writer read and the leader key's creation revision with the
//! writer's term (its fence): a coordinator that lost its lease, or read an older record,
//! changes nothing. The leader keeps its lease alive three times per lease; it ends its term
//! as soon as the last renewal etcd confirmed is a lease's time to live old (the lease may
//! expire at etcd from then on, so another coordinator may lead), which is before etcd can let
//! another coordinator take over.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::store::{Revision, RolesRecord, RoutingStore, StoredRoles, Swap, Term};
use crate::error::{Error, Result};
use crate::ids::ClusterId;

/// The leader's lease unless set otherwise ([`EtcdOptions::lease`]): etcd's usual minimum.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(2);

/// Where the etcd store is and how it behaves.
///
/// Non-exhaustive, so that fields can be added later: build it with [`EtcdOptions::new`] and
/// set the fields you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EtcdOptions {
    /// The etcd members' URLs (`http://host:port`).
    pub endpoints: Vec<String>,
    /// The prefix of every key (default `/sns`): one etcd cluster can hold several deployments.
    pub prefix: String,
    /// The deployment's clusters (records of others are refused).
    pub clusters: u32,
    /// Server slots per cluster (records naming others are refused).
    pub servers: u32,
    /// The leader's lease (default 2 s, etcd's usual minimum): after a leader dies, another
    /// leads within about this long.
    pub lease: Duration,
    /// How long one etcd call may take (default 2 s).
    pub timeout: Duration,
}

impl EtcdOptions {
    /// Options for a deployment of `clusters` × `servers` on the etcd members at `endpoints`.
    pub fn new(endpoints: Vec<String>, clusters: u32, servers: u32) -> Self {
        Self {
            endpoints,
            prefix: "/sns".to_string(),
            clusters,
            servers,
            lease: DEFAULT_LEASE,
            timeout: Duration::from_secs(2),
        }
    }
}

/// The routing records in etcd. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    options: EtcdOptions,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.options.endpoints)
            .field("prefix", &self.options.prefix)
            .finish_non_exhaustive()
    }
}

/// An etcd client error as this crate's: etcd could not be reached or did not answer.
fn lost(error: etcd_client::Error) -> Error {
    Error::ConnectionLost(format!("etcd: {error}"))
}

impl EtcdStore {
    /// A store on the etcd members of `options`; connects lazily (an etcd that is down now
    /// fails the calls, not this).
    pub async fn connect(options: EtcdOptions) -> Result<Self> {
        if options.endpoints.is_empty() {
            return Err(Error::invalid("no etcd endpoint given"));
        }
        if options.prefix.is_empty() || options.prefix.ends_with('/') {
            return Err(Error::invalid(format!(
                "etcd key prefix {:?} must be non-empty and not end with '/'",
                options.prefix
            )));
        }
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.timeout)
            .with_timeout(options.timeout)
            .with_keep_alive(Duration::from_secs(1), options.timeout);
        let client = Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(|e| Error::Unreachable {
                addr: options.endpoints.join(","),
                reason: e.to_string(),
            })?;
        Ok(Self { client, options })
    }

    fn leader_key(&self) -> String {
        format!("{}/leader", self.options.prefix)
    }

    fn clusters_prefix(&self) -> String {
        format!("{}/clusters/", self.options.prefix)
    }

    fn cluster_key(&self, cluster: ClusterId) -> String {
        format!("{}{}", self.clusters_prefix(), cluster.get())
    }

    /// A record as read from etcd, checked: its key names a cluster of the deployment, its
    /// value is a valid record.
    fn read(&self, key: &[u8], value: &[u8], revision: i64) -> Result<StoredRoles> {
        let key = String::from_utf8_lossy(key);
        let cluster = key
            .strip_prefix(&self.clusters_prefix())
            .and_then(|id| id.parse::<u32>().ok())
            .filter(|id| (1..=self.options.clusters).contains(id))
            .and_then(ClusterId::new)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "etcd key {key:?} names no cluster of this deployment (1..={})",
                    self.options.clusters
                ))
            })?;
        let record = RolesRecord::decode(value, self.options.servers)
            .map_err(|e| Error::invalid(format!("etcd key {key:?}: {e}")))?;
        Ok(StoredRoles {
            cluster,
            record,
            revision: revision_of(revision),
        })
    }

    /// Tries once to take the leader key under a new lease; on failure returns the store
    /// revision at which the key was seen held.
    async fn campaign(&self, candidate: &str) -> Result<std::result::Result<Term, i64>> {
        let mut client = self.client.clone();
        let ttl = i64::try_from(self.options.lease.as_secs().max(1)).unwrap_or(2);
        // The lease runs from no earlier than this, for what etcd granted (whole seconds).
        let granted = Instant::now();
        let grant = client.lease_grant(ttl, None).await.map_err(lost)?;
        let (lease, lease_ttl) = (grant.id(), grant.ttl());
        let lease_ttl = Duration::from_secs(u64::try_from(lease_ttl).unwrap_or(0));
        let key = self.leader_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                candidate,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let answer = client.txn(txn).await.map_err(lost)?;
        let revision = answer.header().map_or(0, |h| h.revision());
        if !answer.succeeded() {
            let _ = client.lease_revoke(lease).await;
            return Ok(Err(revision));
        }
        let ended = CancellationToken::new();
        tokio::spawn(keep_leading(
            client,
            lease,
            granted,
            lease_ttl,
            ended.clone(),
        ));
        Ok(Ok(Term::new(revision, ended)))
    }

    /// Waits until the leader key, seen held at store revision `seen`, is deleted (its lease
    /// expired or its holder resigned).
    async fn await_vacancy(&self, seen: i64) -> Result<()> {
        let mut client = self.client.clone();
        let options = WatchOptions::new().with_start_revision(seen + 1);
        let mut stream = client
            .watch(self.leader_key(), Some(options))
            .await
            .map_err(lost)?;
        while let Some(answer) = stream.message().await.map_err(lost)? {
            if answer.canceled() {
                return Ok(());
            }
            if answer
                .events()
                .iter()
                .any(|e| e.event_type() == EventType::Delete)
            {
                return Ok(());
            }
        }
        Err(Error::ConnectionLost("etcd ended the watch".to_string()))
    }
}

/// A store revision from etcd's signed one.
fn revision_of(revision: i64) -> Revision {
    u64::try_from(revision).unwrap_or(0)
}

/// What became of one renewal of the leader's lease.
enum Renewal {
    /// etcd confirmed it: the lease lives a whole time to live from when it was sent.
    Renewed(Instant),
    /// etcd says the lease is gone.
    Expired,
    /// No answer in time; try again on a new stream.
    Failed,
}

/// Renews the leader's lease a third of a lease apart until the term ends, and ends it when
/// the last renewal etcd confirmed is one lease old (whatever a renewal is waiting on); revokes
/// the lease when the holder resigns.
async fn keep_leading(
    mut client: Client,
    lease: i64,
    granted: Instant,
    ttl: Duration,
    ended: CancellationToken,
) {
    let mut valid_until = granted + ttl;
    let mut renewing = None;
    loop {
        let renewal = renew(&mut client, lease, &mut renewing, ttl);
        let outcome = tokio::select! {
            () = ended.cancelled() => None,
            () = tokio::time::sleep_until(valid_until) => Some(Renewal::Expired),
            outcome = renewal => Some(outcome),
        };
        match outcome {
            None => {
                let _ = tokio::time::timeout(ttl, client.lease_revoke(lease)).await;
                return;
            }
            Some(Renewal::Renewed(sent)) => valid_until = sent + ttl,
            Some(Renewal::Expired) => {
                tracing::warn!(
                    "this coordinator's lease expired or was not renewed in time: it no longer leads"
                );
                ended.cancel();
                return;
            }
            Some(Renewal::Failed) => renewing = None,
        }
    }
}

/// Waits a third of a lease, then renews the lease once on `renewing` (opened if need be).
async fn renew(
    client: &mut Client,
    lease: i64,
    renewing: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    ttl: Duration,
) -> Renewal {
    tokio::time::sleep(ttl / 3).await;
    let sent = Instant::now();
    let attempt = async {
        if renewing.is_none() {
            *renewing = client.lease_keep_alive(lease).await.ok();
        }
        let (keeper, stream) = renewing.as_mut()?;
        keeper.keep_alive().await.ok()?;
        stream.message().await.ok().flatten()
    };
    match tokio::time::timeout(ttl / 3, attempt).await {
        Ok(Some(answer)) if answer.ttl() > 0 => Renewal::Renewed(sent),
        Ok(Some(_)) => Renewal::Expired,
        _ => Renewal::Failed,
    }
}

#[async_trait::async_trait]
impl RoutingStore for EtcdStore {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn load(&self) -> Result<(Vec<StoredRoles>, Revision)> {
        let mut client = self.client.clone();
        let answer = client
            .get(
                self.clusters_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(lost)?;
        let revision = answer.header().map_or(0, |h| h.revision());
        let records = answer
            .kvs()
            .iter()
            .map(|kv| self.read(kv.key(), kv.value(), kv.mod_revision()))
            .collect::<Result<Vec<_>>>()?;
        Ok((records, revision_of(revision)))
    }

    async fn swap(
        &self,
        term: &Term,
        cluster: ClusterId,
        expected: Revision,
        record: &RolesRecord,
    ) -> Result<Swap> {
        if term.has_ended() {
            return Ok(Swap::NotLeading);
        }
        let expected =
            i64::try_from(expected).map_err(|_| Error::invalid("record revision out of range"))?;
        let key = self.cluster_key(cluster);
        let leader = self.leader_key();
        let txn = Txn::new()
            .when([
                Compare::create_revision(leader.clone(), CompareOp::Equal, term.fence),
                Compare::mod_revision(key.clone(), CompareOp::Equal, expected),
            ])
            .and_then([TxnOp::put(key, record.encode(), None)])
            .or_else([TxnOp::get(leader, None)]);
        let mut client = self.client.clone();
        let answer = client.txn(txn).await.map_err(lost)?;
        if answer.succeeded() {
            let revision = answer.header().map_or(0, |h| h.revision());
            return Ok(Swap::Done(revision_of(revision)));
        }
        let still_leads = answer.op_responses().iter().any(|op| match op {
            TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == term.fence),
            _ => false,
        });
        if still_leads {
            Ok(Swap::Conflict)
        } else {
            term.resign();
            Ok(Swap::NotLeading)
        }
    }

    async fn follow(&self, after: Revision, changes: mpsc::Sender<StoredRoles>) -> Result<()> {
        let mut client = self.client.clone();
        let start = i64::try_from(after)
            .ok()
            .and_then(|a| a.checked_add(1))
            .ok_or_else(|| Error::invalid("revision out of range"))?;
        let options = WatchOptions::new().with_prefix().with_start_revision(start);
        let mut stream = client
            .watch(self.clusters_prefix(), Some(options))
            .await
            .map_err(lost)?;
        loop {
            let answer = tokio::select! {
                () = changes.closed() => return Ok(()),
                answer = stream.message() => answer.map_err(lost)?,
            };
            let Some(answer) = answer else {
                return Err(Error::ConnectionLost("etcd ended the watch".to_string()));
            };
            if answer.canceled() {
                return Err(Error::ConnectionLost(format!(
                    "etcd cancelled the watch: {}",
                    answer.cancel_reason()
                )));
            }
            for event in answer.events() {
                let Some(kv) = event.kv() else { continue };
                if event.event_type() == EventType::Delete {
                    return Err(Error::invalid(format!(
                        "etcd key {:?} was deleted: a cluster's roles are never removed",
                        String::from_utf8_lossy(kv.key())
                    )));
                }
                let change = self.read(kv.key(), kv.value(), kv.mod_revision())?;
                if changes.send(change).await.is_err() {
                    return Ok(());
                }
            }
        }
    }

    async fn lead(&self, candidate: &str) -> Result<Term> {
        loop {
            match self.campaign(candidate).await? {
                Ok(term) => return Ok(term),
                Err(seen) => self.await_vacancy(seen).await?,
            }
        }
    }
}
