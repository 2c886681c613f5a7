//! Raft networking over the peer protocol ([`crate::peer`]). A single-voter group never sends
//! anything; in a cluster every RPC is one gRPC call to the target's first peer URL.

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use tonic::Request;

use crate::peer::{decode, encode, Peers, RPC_TIMEOUT};
use crate::types::{NodeId, TypeConfig};

pub struct PeerNetwork {
    pub peers: Peers,
}

pub struct PeerConnection {
    peers: Peers,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerConnection {
            peers: self.peers.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

fn io(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

/// Transport failures: a peer that cannot be reached or refuses the connection (down, TLS
/// refused) is `Unreachable`, so openraft backs off instead of retrying in a busy loop; a
/// timed-out or cancelled call is a `Network` error, retried at once.
fn rpc_err<E: std::error::Error>(s: tonic::Status) -> RPCError<NodeId, BasicNode, E> {
    let msg = format!("{}: {}", s.code(), s.message());
    if !matches!(
        s.code(),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    ) {
        RPCError::Unreachable(Unreachable::new(&io(msg)))
    } else {
        RPCError::Network(NetworkError::new(&io(msg)))
    }
}

// openraft's RPCError is what the RaftNetwork trait returns; boxing it here would only move the
// allocation.
#[allow(clippy::result_large_err)]
impl PeerConnection {
    /// Logs a failed RPC (throttled: a member that is down would otherwise fill the log at
    /// the heartbeat rate).
    fn note<T, E: std::error::Error>(
        &self,
        r: Result<T, RPCError<NodeId, BasicNode, E>>,
    ) -> Result<T, RPCError<NodeId, BasicNode, E>> {
        if let Err(e) = &r {
            crate::peer::warn_throttled(&format!("member {:x} ({})", self.target, self.addr), e);
        }
        r
    }

    fn request<T: serde::Serialize, E: std::error::Error>(
        &self,
        v: &T,
        option: &RPCOption,
    ) -> Result<Request<crate::peer::proto::Frame>, RPCError<NodeId, BasicNode, E>> {
        let mut r = Request::new(encode(v).map_err(rpc_err)?);
        r.set_timeout(option.hard_ttl().min(RPC_TIMEOUT));
        Ok(r)
    }

    fn client<E: std::error::Error>(
        &self,
    ) -> Result<
        crate::peer::proto::peer_client::PeerClient<tonic::transport::Channel>,
        RPCError<NodeId, BasicNode, E>,
    > {
        self.peers
            .client(self.target, &self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&io(e.to_string()))))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let r = async {
            let req = self.request(&rpc, &option)?;
            let resp = self.client()?.append_entries(req).await.map_err(rpc_err)?;
            decode(resp.get_ref()).map_err(rpc_err)
        }
        .await;
        self.note(r)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let r = async {
            let req = self.request(&rpc, &option)?;
            let resp = self
                .client()?
                .install_snapshot(req)
                .await
                .map_err(rpc_err)?;
            decode(resp.get_ref()).map_err(rpc_err)
        }
        .await;
        self.note(r)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let r = async {
            let req = self.request(&rpc, &option)?;
            let resp = self.client()?.vote(req).await.map_err(rpc_err)?;
            decode(resp.get_ref()).map_err(rpc_err)
        }
        .await;
        self.note(r)
    }
}
