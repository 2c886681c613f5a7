//! The thread raft runs on.
//!
//! openraft's core, its state machine worker and the proposer hand every write to one another
//! (propose, append, flushed, apply, reply). On the server's multi-thread runtime each hand-off
//! could wake another worker; here they are queue pushes on one thread, and only the request's
//! arrival and its reply cross threads.

use std::future::Future;

use tokio::sync::oneshot;

pub(crate) struct RaftThread {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
}

impl RaftThread {
    pub fn start() -> std::io::Result<RaftThread> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("cairn-raft".into())
            .spawn(move || {
                let _ = rt.block_on(stopped);
                // Whatever is still running (a stopped raft's leftovers) is dropped here.
                rt.shutdown_background();
            })?;
        Ok(RaftThread {
            handle,
            stop: Some(stop),
        })
    }

    /// Runs `f` on the raft thread: what it spawns stays there.
    pub async fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        match self.handle.spawn(f).await {
            Ok(t) => t,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl Drop for RaftThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
