//! `CoordService` and `sns.v1.Admin` adapters onto [`Coordinator`].

use sns_proto::csce438::coord_service_server::{CoordService, CoordServiceServer};
use sns_proto::csce438::{Confirmation, Id, NodeRole, ServerInfo, ServerList};
use sns_proto::sns_v1::admin_server::{Admin, AdminServer};
use sns_proto::sns_v1::{NodeStatus, StatusReply, StatusRequest};
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use super::alias::{Csce662Coord, Renamed};
use super::metadata::presented_token;
use super::status;
use crate::coordinator::{Address, Beat, Coordinator, ReportedLog};
use crate::error::Error;
use crate::ids::Role;
use crate::ids::{Epoch, LogIndex, ServerId};

/// Longest failure reason a heartbeat may carry (longer ones are cut).
const MAX_FAILURE_CHARS: usize = 300;

/// The routes serving `coordinator` as `csce438.CoordService`, `csce662.CoordService` and
/// `sns.v1.Admin`.
pub(crate) fn routes(coordinator: Coordinator) -> Routes {
    let coord = CoordServiceServer::new(CoordAdapter {
        coordinator: coordinator.clone(),
    });
    Routes::new(coord.clone())
        .add_service(Renamed::<_, Csce662Coord>::new(coord))
        .add_service(AdminServer::new(CoordAdapter { coordinator }))
}

struct CoordAdapter {
    coordinator: Coordinator,
}

impl CoordAdapter {
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let presented = presented_token(request.metadata());
        self.coordinator.authorize(presented).map_err(status)
    }
}

/// The role's name on the wire (the course's string fields).
pub(crate) fn role_name(role: Role) -> &'static str {
    role.name()
}

/// The role as the typed wire enum.
pub(crate) fn node_role(role: Role) -> NodeRole {
    match role {
        Role::Master => NodeRole::Master,
        Role::Slave => NodeRole::Slave,
    }
}

/// A server role from the typed wire enum, if it names one.
pub(crate) fn role_from_wire(role: i32) -> Option<Role> {
    match NodeRole::try_from(role).ok()? {
        NodeRole::Master => Some(Role::Master),
        NodeRole::Slave => Some(Role::Slave),
        NodeRole::Unspecified | NodeRole::Synchronizer => None,
    }
}

fn info(cluster: u32, server: u32, addr: &Address, role: NodeRole) -> ServerInfo {
    let name = match role {
        NodeRole::Master => "master",
        NodeRole::Slave => "slave",
        NodeRole::Synchronizer => "synchronizer",
        NodeRole::Unspecified => "",
    };
    ServerInfo {
        server_id: server as i32,
        hostname: addr.host.clone(),
        port: addr.port.to_string(),
        r#type: name.to_string(),
        cluster_id: cluster as i32,
        is_master: role == NodeRole::Master,
        node_role: role.into(),
        ..ServerInfo::default()
    }
}

fn list(entries: impl Iterator<Item = (u32, u32, Address, &'static str)>) -> ServerList {
    let mut out = ServerList::default();
    for (id, cluster, addr, kind) in entries {
        out.server_id.push(id as i32);
        out.hostname.push(addr.host);
        out.port.push(addr.port.to_string());
        out.r#type.push(kind.to_string());
        out.cluster_id.push(cluster as i32);
    }
    out
}

#[tonic::async_trait]
impl CoordService for CoordAdapter {
    async fn heartbeat(
        &self,
        request: Request<ServerInfo>,
    ) -> Result<Response<Confirmation>, Status> {
        self.authorize(&request)?;
        let info = request.into_inner();
        if info.r#type == "synchronizer" || info.node_role == i32::from(NodeRole::Synchronizer) {
            return self.register(info).await;
        }
        let cluster = self
            .coordinator
            .table()
            .check_cluster(i64::from(info.cluster_id))
            .map_err(status)?;
        let server = u32::try_from(info.server_id)
            .ok()
            .and_then(ServerId::new)
            .ok_or_else(|| {
                status(Error::invalid(format!(
                    "server id {} must be a positive number",
                    info.server_id
                )))
            })?;
        let addr = Address::parse(&info.hostname, &info.port).map_err(status)?;
        let beat = Beat {
            cluster,
            server,
            addr,
            claims_master: info.is_master,
            epoch: Epoch(info.epoch),
            failure: (!info.failure.is_empty())
                .then(|| info.failure.chars().take(MAX_FAILURE_CHARS).collect()),
            log: ReportedLog {
                role: role_from_wire(info.node_role),
                durable: LogIndex(info.durable_index),
                commit: LogIndex(info.commit_index),
                slave_acked: info.slave_acked_index.map(LogIndex),
            },
            in_sync: info
                .in_sync_slaves
                .iter()
                .filter_map(|s| ServerId::new(*s))
                .collect(),
        };
        let assignment = self.coordinator.heartbeat(beat).await.map_err(status)?;
        let now = tokio::time::Instant::now();
        let table = self.coordinator.table();
        // The master and slaves named below must be those of the assignment's epoch.
        if table.epoch(cluster) != assignment.epoch {
            return Err(status(Error::Unavailable(format!(
                "the roles of cluster {cluster} changed while this heartbeat was answered; \
                 beat again"
            ))));
        }
        let master = table.mirror_source(cluster, now);
        // Only a master mirrors to anyone: it accepts mirroring from these servers alone.
        let slaves = match assignment.role {
            Role::Master => table
                .slaves_of(cluster)
                .into_iter()
                .map(|(s, addr)| self::info(cluster.get(), s.get(), &addr, NodeRole::Slave))
                .collect(),
            Role::Slave => Vec::new(),
        };
        Ok(Response::new(Confirmation {
            status: true,
            role: role_name(assignment.role).to_string(),
            epoch: assignment.epoch.0,
            assigned_role: node_role(assignment.role).into(),
            master_server_id: master.as_ref().map_or(0, |(s, _)| s.get() as i32),
            master_hostname: master
                .as_ref()
                .map_or_else(String::new, |(_, a)| a.host.clone()),
            master_port: master
                .as_ref()
                .map_or_else(String::new, |(_, a)| a.port.to_string()),
            slaves,
        }))
    }

    async fn get_server(&self, request: Request<Id>) -> Result<Response<ServerInfo>, Status> {
        let table = self.coordinator.table();
        let (cluster, server, addr) = table
            .route(i64::from(request.get_ref().id), tokio::time::Instant::now())
            .map_err(status)?;
        Ok(Response::new(info(
            cluster.get(),
            server.get(),
            &addr,
            NodeRole::Master,
        )))
    }

    async fn get_slave(&self, request: Request<Id>) -> Result<Response<ServerInfo>, Status> {
        let table = self.coordinator.table();
        let cluster = table
            .check_cluster(i64::from(request.get_ref().id))
            .map_err(status)?;
        let (cluster, server, addr) = table
            .slave(cluster, tokio::time::Instant::now())
            .map_err(status)?;
        Ok(Response::new(info(
            cluster.get(),
            server.get(),
            &addr,
            NodeRole::Slave,
        )))
    }

    async fn get_all_follower_servers(
        &self,
        _request: Request<Id>,
    ) -> Result<Response<ServerList>, Status> {
        let table = self.coordinator.table();
        let syncs = table.syncs(None, tokio::time::Instant::now());
        Ok(Response::new(list(
            syncs
                .into_iter()
                .map(|(id, c, a)| (id, c.get(), a, "synchronizer")),
        )))
    }

    async fn get_follower_server(
        &self,
        request: Request<Id>,
    ) -> Result<Response<ServerInfo>, Status> {
        let table = self.coordinator.table();
        let (id, cluster, addr) = table
            .sync_for_user(i64::from(request.get_ref().id), tokio::time::Instant::now())
            .map_err(status)?;
        Ok(Response::new(info(
            cluster.get(),
            id,
            &addr,
            NodeRole::Synchronizer,
        )))
    }

    async fn register_sync_server(
        &self,
        request: Request<ServerInfo>,
    ) -> Result<Response<Confirmation>, Status> {
        self.authorize(&request)?;
        self.register(request.into_inner()).await
    }

    async fn get_sync_servers(&self, request: Request<Id>) -> Result<Response<ServerList>, Status> {
        self.authorize(&request)?;
        let id = request.get_ref().id;
        if id <= 0 {
            return Err(status(Error::invalid(format!(
                "synchronizer id {id} must be a positive number"
            ))));
        }
        let table = self.coordinator.table();
        let syncs = table.syncs(Some(id as u32), tokio::time::Instant::now());
        Ok(Response::new(list(
            syncs
                .into_iter()
                .map(|(id, c, a)| (id, c.get(), a, "synchronizer")),
        )))
    }
}

impl CoordAdapter {
    async fn register(&self, info: ServerInfo) -> Result<Response<Confirmation>, Status> {
        let addr = Address::parse(&info.hostname, &info.port).map_err(status)?;
        let mut table = self.coordinator.table();
        table
            .register_sync(i64::from(info.server_id), addr, tokio::time::Instant::now())
            .map_err(status)?;
        Ok(Response::new(Confirmation {
            status: true,
            role: "synchronizer".to_string(),
            epoch: 0,
            assigned_role: NodeRole::Synchronizer.into(),
            ..Confirmation::default()
        }))
    }
}

#[tonic::async_trait]
impl Admin for CoordAdapter {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        self.authorize(&request)?;
        let table = self.coordinator.table();
        let config = table.config();
        let nodes = table
            .nodes(tokio::time::Instant::now())
            .into_iter()
            .map(|n| NodeStatus {
                cluster: n.cluster.get(),
                server: n.id,
                role: n.role.map_or("synchronizer", role_name).to_string(),
                hostname: n.addr.host,
                port: n.addr.port.to_string(),
                last_heartbeat_ms: n.since_heartbeat.as_millis() as u64,
                alive: n.alive,
                epoch: n.epoch.0,
                node_role: n.role.map_or(NodeRole::Synchronizer, node_role).into(),
                log_epoch: n.log_epoch.0,
                durable_index: n.log.map_or(0, |l| l.durable.0),
                commit_index: n.log.map_or(0, |l| l.commit.0),
                slave_acked_index: n.log.and_then(|l| l.slave_acked).map(|i| i.0),
                in_sync: n.in_sync,
                failure: n.failure.unwrap_or_default(),
            })
            .collect();
        drop(table);
        let group = self.coordinator.group_status();
        Ok(Response::new(StatusReply {
            clusters: config.clusters,
            nodes,
            heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u64,
            failure_timeout_ms: config.failure_timeout().as_millis() as u64,
            coordinator: group.name,
            routing_store: group.store.to_string(),
            leading: group.leading,
            store_fresh: group.fresh,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::{
        CoordinatorConfig, MAX_STATUS_REPLY, RoutingConfig, SYNCHRONIZERS_PER_CLUSTER,
    };
    use crate::ids::ClusterId;

    #[tokio::test]
    async fn a_full_table_fits_one_status_reply() {
        let (clusters, servers) = (1000u32, 9u32);
        let coordinator = Coordinator::new(CoordinatorConfig {
            routing: RoutingConfig {
                clusters,
                servers,
                ..RoutingConfig::default()
            },
            cluster_token: None,
        });
        let addr = Address::parse(&"h".repeat(253), "65535").expect("longest address");
        let now = tokio::time::Instant::now();
        {
            let mut table = coordinator.table();
            for cluster in (1..=clusters).filter_map(ClusterId::new) {
                for server in (1..=servers).filter_map(ServerId::new) {
                    let beat = Beat {
                        cluster,
                        server,
                        addr: addr.clone(),
                        claims_master: false,
                        epoch: Epoch(u64::MAX - 1),
                        log: ReportedLog {
                            role: Some(Role::Slave),
                            durable: LogIndex(u64::MAX),
                            commit: LogIndex(u64::MAX),
                            slave_acked: Some(LogIndex(u64::MAX)),
                        },
                        in_sync: Vec::new(),
                        failure: Some("f".repeat(MAX_FAILURE_CHARS)),
                    };
                    table.heartbeat(beat, now).expect("registered");
                }
            }
            // Many more synchronizers try; four per cluster are kept.
            for id in 1..=i64::from(clusters) * 5 {
                let _ = table.register_sync(id, addr.clone(), now);
            }
        }
        let reply = CoordAdapter { coordinator }
            .status(Request::new(StatusRequest {}))
            .await
            .expect("status")
            .into_inner();
        let nodes = (clusters * servers) as usize + clusters as usize * SYNCHRONIZERS_PER_CLUSTER;
        assert_eq!(reply.nodes.len(), nodes);
        let size = prost::Message::encoded_len(&reply);
        assert!(size < MAX_STATUS_REPLY, "{size} bytes");
    }
}
