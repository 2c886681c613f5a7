//! The thread raft runs on.
//!
//! openraft's core, its state machine worker and the proposer hand every write to one another
//! (propose, append, flushed, apply, reply). On the server's multi-thread runtime each hand-off
//! could wake another worker; here they are queue pushes on one thread, and only the request's
//! arrival and its reply cross threads.
//!
//! Those two crossings each wake a thread, and on a VM waking an idle vCPU costs tens of
//! microseconds (a HLT exit). While writes come one at a time (see [`Quiet`]) the raft thread
//! therefore spins a little before it parks, yielding its CPU to whatever else is runnable,
//! and the writer spins for its reply the same way (`Proposer::propose`): a lone client's put
//! then finds both threads awake.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How long a thread waiting for the next step of a lone write spins before it sleeps: about
/// one request's round trip to its client plus an fsync here (0.25-0.35 ms).
pub(crate) const SPIN: Duration = Duration::from_micros(500);

/// Whether writes come one at a time to a lone node: the proposer notes when it proposes a
/// group of one request and forgets it when a group has several or the node has peers. Only
/// after [`STREAK`] such groups in a row, and in the 10 ms after the last one, do the raft
/// thread and a writer spin: with many clients the
/// threads have work queued anyway, and spinning would take CPU from it; an idle server does
/// not spin on its timers.
#[derive(Clone)]
pub(crate) struct Quiet(Arc<QuietState>);

struct QuietState {
    base: Instant,
    /// When the last lone write was proposed, in microseconds since `base`, plus 1 (0: none
    /// since the last group of several).
    at: AtomicU64,
    /// Lone writes proposed in a row.
    streak: AtomicU64,
}

/// How long after a lone write the threads still expect the next one.
const QUIET_FOR: Duration = Duration::from_millis(10);
/// Lone writes in a row before the threads spin. With 16 clients an occasional group of one
/// (a client's request arriving just after a group left) made the raft thread spin most of
/// the time, taking CPU the clients' requests needed; a lone client makes every group a lone
/// write.
const STREAK: u64 = 8;

impl Quiet {
    fn new() -> Quiet {
        Quiet(Arc::new(QuietState {
            base: Instant::now(),
            at: AtomicU64::new(0),
            streak: AtomicU64::new(0),
        }))
    }

    /// Records a proposed group of `n` requests (0: forget, the node has peers): the
    /// proposer's task for each group, a writer for the lone write it proposes itself.
    pub fn group(&self, n: usize) {
        let q = &*self.0;
        if n == 1 {
            q.at.store(q.base.elapsed().as_micros() as u64 + 1, Ordering::Relaxed);
            q.streak.fetch_add(1, Ordering::Relaxed);
        } else {
            q.at.store(0, Ordering::Relaxed);
            q.streak.store(0, Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> bool {
        let q = &*self.0;
        if q.streak.load(Ordering::Relaxed) < STREAK {
            return false;
        }
        match q.at.load(Ordering::Relaxed) {
            0 => false,
            t => {
                (q.base.elapsed().as_micros() as u64 + 1).saturating_sub(t)
                    < QUIET_FOR.as_micros() as u64
            }
        }
    }
}

/// Spins (yielding the CPU) until `done` holds or [`SPIN`] has passed; returns whether `done`
/// held.
pub(crate) fn spin_until(mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() >= SPIN {
            return false;
        }
        std::thread::yield_now();
    }
}

pub(crate) struct RaftThread {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    quiet: Quiet,
}

impl RaftThread {
    /// Starts the thread; it calls `idle` whenever it has nothing to run, before it parks.
    pub fn start(idle: impl Fn() + Send + Sync + 'static) -> std::io::Result<RaftThread> {
        let quiet = Quiet::new();
        let hook = quiet.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // Before sleeping: while writes come one at a time, wait briefly for the next one
            // (a task woken from another thread lands in the global queue). If it comes, the
            // park that follows returns at once instead of sleeping in the kernel.
            .on_thread_park(move || {
                idle();
                if hook.get() {
                    let metrics = tokio::runtime::Handle::current().metrics();
                    spin_until(|| metrics.global_queue_depth() > 0);
                }
            })
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
            quiet,
        })
    }

    /// The flag the proposer keeps and the thread's park hook reads.
    pub fn quiet(&self) -> Quiet {
        self.quiet.clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_recent_lone_write_makes_the_threads_spin() {
        let q = Quiet::new();
        assert!(!q.get(), "nothing written yet");
        let lone = |n| (0..n).for_each(|_| q.group(1));
        lone(STREAK - 1);
        assert!(!q.get(), "too few lone writes in a row");
        lone(1);
        assert!(q.get());
        q.group(7);
        assert!(
            !q.get(),
            "a group of several: other clients keep the threads busy"
        );
        lone(1);
        assert!(!q.get(), "one lone write after a group of several");
        lone(STREAK);
        q.group(0);
        assert!(!q.get(), "a node with peers");
        lone(STREAK);
        assert!(q.get());
        std::thread::sleep(QUIET_FOR + Duration::from_millis(5));
        assert!(!q.get(), "an idle server stops spinning");
    }

    #[test]
    fn a_spin_ends_when_its_condition_holds_or_its_time_is_up() {
        let mut polls = 0;
        assert!(spin_until(|| {
            polls += 1;
            polls == 3
        }));
        assert_eq!(polls, 3);
        let start = Instant::now();
        assert!(!spin_until(|| false));
        assert!(start.elapsed() >= SPIN);
    }
}
