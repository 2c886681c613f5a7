//! Group commit in front of raft.
//!
//! openraft 0.9 submits one log write at a time, so proposing each request as its own entry
//! caps throughput at one fsync per write. The proposer instead gathers every request that
//! arrives while earlier entries are in flight into one `Command::Batch` entry: one fsync and
//! one state machine txn for the whole group, each request still getting its own revision and
//! result. A single client sees no extra latency (a lone request is proposed at once).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cairn_backend::{BackendError, Result};
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::raft_thread::{spin_until, Quiet};
use crate::types::{Command, CommandResult, Raft, TypeConfig};

/// Most commands in one entry.
const MAX_BATCH: usize = 512;
/// Entries in flight at once. One: requests that arrive while an entry is being written and
/// applied wait for it and then go as one group. With two, the second entry's fsync overlapped
/// the first one's apply, but the groups were half as big, and at 16 clients, where the server
/// and its clients share the two cores, the extra fsyncs and wake-ups cost more than the
/// overlap gained (16 clients: 8.3-8.9k -> 9.0-10.7k puts/s, 7.5k -> 8.4-9.0k txns/s).
const IN_FLIGHT: usize = 1;

type Reply = oneshot::Sender<Result<(CommandResult, u64)>>;

/// The error of a write refused because this member is not (or no longer) the leader: nothing
/// was appended, so it may be sent to the leader instead.
pub(crate) const NOT_LEADER: &str = "not leader";

#[derive(Clone)]
pub(crate) struct Proposer {
    raft: Raft,
    tx: mpsc::UnboundedSender<(Command, Reply)>,
    /// Held for writing while a leadership transfer is in progress: no new entry is proposed
    /// (requests queue up), as etcd stops proposing during a transfer.
    gate: Arc<tokio::sync::RwLock<()>>,
    /// Proposals not yet answered.
    waiting: Arc<AtomicUsize>,
    quiet: Quiet,
}

impl Proposer {
    pub fn start(
        raft: Raft,
        quiet: Quiet,
        replies_on: tokio::runtime::Handle,
    ) -> (Proposer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let task = tokio::spawn(run(
            raft.clone(),
            rx,
            gate.clone(),
            quiet.clone(),
            replies_on,
        ));
        let waiting = Arc::default();
        (
            Proposer {
                raft,
                tx,
                gate,
                waiting,
                quiet,
            },
            task,
        )
    }

    /// Stops proposing until the returned guard is dropped (requests wait meanwhile).
    pub async fn pause(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.gate.clone().write_owned().await
    }

    /// Proposes one command and waits until it is applied; returns its result and the log
    /// index it was applied at. The state machine's rejections stay inside the result
    /// (`CommandResult::Err`).
    pub async fn propose(&self, cmd: Command) -> Result<(CommandResult, u64)> {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let alone = self.waiting.fetch_add(1, Ordering::Relaxed) == 0;
        let _waiting = Waiting(&self.waiting);
        // A lone write while writes come one at a time: nothing is in flight (every proposal
        // in flight is still waiting), so it goes to raft from here as a group of one, without
        // a hop through the proposer's task and a reply task on the raft thread. Its reply is
        // waited for on this thread for about an fsync (see raft_thread.rs) rather than slept
        // for; that holds the runtime's worker, which is why it is done only when nothing else
        // writes.
        if alone && self.quiet.get() {
            if let Ok(open) = self.gate.try_read() {
                note_group(&self.raft, &self.quiet, 1);
                let pending = self.raft.client_write_ff(cmd).await;
                drop(open);
                let mut rx = match pending {
                    Ok(rx) => rx,
                    Err(fatal) => return Err(map_write_error(RaftError::Fatal(fatal))),
                };
                let mut reply = None;
                spin_until(|| match rx.try_recv() {
                    Err(oneshot::error::TryRecvError::Empty) => false,
                    other => {
                        reply = Some(other);
                        true
                    }
                });
                return match reply {
                    Some(Ok(r)) => outcome(r),
                    Some(Err(_)) => Err(BackendError::Stopped),
                    None => outcome(rx.await.map_err(|_| BackendError::Stopped)?),
                };
            }
        }
        let (tx, rx) = oneshot::channel();
        self.tx.send((cmd, tx)).map_err(|_| BackendError::Stopped)?;
        rx.await.map_err(|_| BackendError::Stopped)?
    }
}

/// Tells `quiet` of a group of `n` requests about to be proposed. Spinning helps only a lone
/// node: with other members the raft thread waits for their answers on sockets, which only its
/// park notices.
fn note_group(raft: &Raft, quiet: &Quiet, n: usize) {
    let members = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .nodes()
        .count();
    quiet.group(if members == 1 { n } else { 0 });
}

async fn run(
    raft: Raft,
    mut rx: mpsc::UnboundedReceiver<(Command, Reply)>,
    gate: Arc<tokio::sync::RwLock<()>>,
    quiet: Quiet,
    replies_on: tokio::runtime::Handle,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let open = gate.read().await;
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut group = vec![first];
        while group.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => group.push(item),
                Err(_) => break,
            }
        }
        note_group(&raft, &quiet, group.len());
        let (mut cmds, replies): (Vec<Command>, Vec<Reply>) = group.into_iter().unzip();
        let cmd = if cmds.len() == 1 {
            cmds.pop().expect("one command")
        } else {
            Command::Batch(cmds)
        };
        let pending = raft.client_write_ff(cmd).await;
        drop(open);
        let replies_on = replies_on.clone();
        tokio::spawn(async move {
            let result = match pending {
                Ok(rx) => match rx.await {
                    Ok(r) => outcome(r),
                    Err(_) => Err(BackendError::Stopped),
                },
                Err(fatal) => Err(map_write_error(RaftError::Fatal(fatal))),
            };
            drop(permit);
            // A group's replies are sent from one task on the server's runtime: each wakes
            // its request's task there without a cross-thread wake-up of its own, and the
            // connections write the group's responses together (api's coalesce.rs).
            if replies.len() > 1 {
                replies_on.spawn(async move { deliver(result, replies) });
            } else {
                deliver(result, replies);
            }
        });
    }
}

fn deliver(result: Result<(CommandResult, u64)>, mut replies: Vec<Reply>) {
    match result {
        Ok((CommandResult::Batch(results), index))
            if results.len() == replies.len() && replies.len() > 1 =>
        {
            for (r, reply) in results.into_iter().zip(replies) {
                let _ = reply.send(Ok((r, index)));
            }
        }
        Ok(r) if replies.len() == 1 => {
            let _ = replies.pop().expect("one reply").send(Ok(r));
        }
        Ok((r, _)) => {
            let e = BackendError::Internal(format!("state machine answered a batch with {r:?}"));
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// What the proposer's caller gets for raft's answer to a write: its result and log index.
fn outcome(r: openraft::raft::ClientWriteResult<TypeConfig>) -> Result<(CommandResult, u64)> {
    r.map(|resp| (resp.data, resp.log_id.index))
        .map_err(|e| map_write_error(RaftError::APIError(e)))
}

fn map_write_error(e: RaftError<u64, ClientWriteError<u64, openraft::BasicNode>>) -> BackendError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            BackendError::Unavailable(NOT_LEADER.into())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            BackendError::internal(e)
        }
        RaftError::Fatal(e) => {
            tracing::error!(error = %e, "raft stopped");
            BackendError::Stopped
        }
    }
}
