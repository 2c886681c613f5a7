//! Write coalescing for client connections.
//!
//! hyper runs each HTTP/2 request in a task of its own; when one finishes it queues its
//! response frames on the connection and wakes the connection's task, which tokio runs next
//! (its "LIFO slot"). So when a group-commit batch answers a hundred requests at once, each
//! connection wrote each response with a syscall of its own (and its client read each one
//! with a syscall and a wake-up of its own): about one `writev` per request at 256 clients.
//!
//! [`Coalesce`] makes the first write after a flush wait until the worker thread has run
//! everything else that is ready (`tokio::task::yield_now`, whose wake-up tokio defers until
//! its queues are empty). Meanwhile the other requests of the batch queue their responses,
//! and the connection writes them all with one syscall. A lone request waits only for that
//! yield: the thread has nothing else to run, so the task is polled again at once.
//!
//! It also holds what it is given until the next flush ([`HOLD`] bytes at most), and tells h2
//! that it does not write vectors. h2 sends a DATA frame of at least 256 bytes (1 KiB
//! without vectored writes) as its own buffer, and must write it out before it queues the
//! next frame: a unary response of 256 bytes or more went out as two writes, its message and
//! then its trailers, and the client woke for each. Without vectored writes h2 copies
//! frames under 1 KiB into its buffer with the trailers; a longer frame comes as two
//! `poll_write`s (its head, then its payload), which reach the socket as one `writev`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

pub struct Coalesce<S> {
    inner: S,
    state: State,
    /// Yields in a row after which nothing more was ready to write.
    useless: u32,
    /// Writes left before the next yield, after [`USELESS`] useless ones.
    skip: u32,
    /// Bytes accepted but not yet written: they go out with the next write, or at the flush.
    held: Vec<u8>,
}

/// Most bytes held back for the next write: one h2 buffer (16 KiB) and a frame head.
const HOLD: usize = 16 * 1024 + 1024 + 9;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// No write since the last completed flush.
    Idle,
    /// Yielded before writing `len` bytes.
    Yielded { len: usize },
    /// Writing until the next completed flush.
    Writing,
}

/// Useless yields in a row before the connection stops yielding for [`SKIP`] writes: a lone
/// client's requests come one at a time, and each yield costs the worker a poll of its I/O
/// driver and the connection another poll.
const USELESS: u32 = 4;
const SKIP: u32 = 32;

impl<S> Coalesce<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, state: State::Idle, useless: 0, skip: 0, held: Vec::new() }
    }

    /// Before writing `len` bytes: pending (with the task's wake-up deferred) for the first
    /// write after a flush, unless yields have been useless lately.
    fn defer(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<()> {
        match self.state {
            State::Writing => return Poll::Ready(()),
            State::Yielded { len: before } => {
                if len > before {
                    self.useless = 0;
                } else {
                    self.useless += 1;
                    if self.useless >= USELESS {
                        self.useless = 0;
                        self.skip = SKIP;
                    }
                }
                self.state = State::Writing;
                return Poll::Ready(());
            }
            State::Idle if self.skip > 0 => {
                self.skip -= 1;
                self.state = State::Writing;
                return Poll::Ready(());
            }
            State::Idle => {}
        }
        self.state = State::Yielded { len };
        // The first poll of yield_now defers the waker and is always pending. Dropping the
        // future afterwards does not cancel the deferred wake-up.
        let yield_now = std::pin::pin!(tokio::task::yield_now());
        yield_now.poll(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Writes the held bytes and then `buf` with one `writev`; returns how much of `buf` went.
    fn poll_write_through(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            if self.held.is_empty() {
                return Pin::new(&mut self.inner).poll_write(cx, buf);
            }
            let bufs = [io::IoSlice::new(&self.held), io::IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &bufs))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let from_held = n.min(self.held.len());
            self.held.drain(..from_held);
            if n > from_held {
                return Poll::Ready(Ok(n - from_held));
            }
        }
    }

    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.defer(cx, buf.len()));
        if self.held.len() + buf.len() <= HOLD {
            if self.held.capacity() == 0 {
                self.held.reserve_exact(HOLD);
            }
            self.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        self.poll_write_through(cx, buf)
    }

    /// h2 copies small frames together rather than chaining them (see the module's doc).
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_held(cx))?;
        let r = ready!(Pin::new(&mut self.inner).poll_flush(cx));
        self.state = State::Idle;
        Poll::Ready(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_held(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for Coalesce<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Responses written by tasks that are ready together reach the socket in one write;
    /// a lone write still goes out without any other task's help.
    #[tokio::test(flavor = "current_thread")]
    async fn writes_of_tasks_ready_together_go_out_in_one_write() {
        let (server, mut client) = tokio::io::duplex(1 << 16);
        let conn = std::sync::Arc::new(tokio::sync::Mutex::new(Coalesce::new(Counting::new(server))));
        let writes = {
            let conn = conn.clone();
            move || async move { conn.lock().await.inner.writes.clone() }
        };
        // A lone write and flush complete, in one write.
        {
            let mut c = conn.lock().await;
            c.write_all(b"a").await.unwrap();
            c.flush().await.unwrap();
        }
        assert_eq!(writes.clone()().await, [b"a".to_vec()]);
        let mut got = [0u8; 1];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"a");

        // The connection task starts writing (and yields); three more "responses" are
        // queued by tasks that run before it resumes; it then writes them all at once.
        let queued = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        queued.lock().unwrap().push(b'b');
        let writer = {
            let conn = conn.clone();
            let queued = queued.clone();
            tokio::spawn(async move {
                let mut c = conn.lock().await;
                std::future::poll_fn(|cx| {
                    let q = queued.lock().unwrap().clone();
                    let n = ready!(Pin::new(&mut *c).poll_write(cx, &q))?;
                    queued.lock().unwrap().drain(..n);
                    Poll::Ready(Ok::<_, io::Error>(()))
                })
                .await?;
                c.flush().await
            })
        };
        for b in [b'c', b'd', b'e'] {
            let queued = queued.clone();
            tokio::spawn(async move { queued.lock().unwrap().push(b) });
        }
        writer.await.unwrap().unwrap();
        assert_eq!(writes().await, [b"a".to_vec(), b"bcde".to_vec()], "b, c, d and e in one write");
        let mut got = [0u8; 4];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"bcde");
    }

    /// A connection whose yields never find more to write (one client, one request at a
    /// time) stops yielding for a while, then tries again.
    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_writer_stops_yielding_while_it_never_helps() {
        let (server, _client) = tokio::io::duplex(1 << 20);
        let mut c = Coalesce::new(server);
        let mut yields = Vec::new();
        for _ in 0..USELESS + SKIP + 1 {
            let mut polls = 0;
            std::future::poll_fn(|cx| {
                polls += 1;
                Pin::new(&mut c).poll_write(cx, b"x")
            })
            .await
            .unwrap();
            c.flush().await.unwrap();
            yields.push(polls - 1);
        }
        let mut want = vec![1; USELESS as usize];
        want.extend(vec![0; SKIP as usize]);
        want.push(1);
        assert_eq!(yields, want);
    }

    /// A response's message frame (head and payload, as h2 writes a chained frame) and its
    /// trailers reach the socket in one write, at the flush; h2 is told not to chain small
    /// frames.
    #[tokio::test(flavor = "current_thread")]
    async fn a_frame_and_what_follows_it_go_out_in_one_write_at_the_flush() {
        let (server, mut client) = tokio::io::duplex(1 << 16);
        let mut c = Coalesce::new(Counting::new(server));
        assert!(!c.is_write_vectored());
        let head = [1u8; 9];
        let payload = vec![2u8; 2000];
        let trailers = [3u8; 10];
        for part in [&head[..], &payload, &trailers] {
            c.write_all(part).await.unwrap();
        }
        assert!(c.inner.writes.is_empty(), "nothing is written before the flush");
        c.flush().await.unwrap();
        let want: Vec<u8> = [&head[..], &payload, &trailers].concat();
        assert_eq!(c.inner.writes, [want.clone()]);
        let mut got = vec![0u8; want.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
    }

    /// A write that does not fit beside the held bytes goes out with them in one `writev`; one
    /// longer than the hold goes out at once.
    #[tokio::test(flavor = "current_thread")]
    async fn a_long_write_takes_the_held_bytes_with_it() {
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut c = Coalesce::new(Counting::new(server));
        let small = vec![4u8; 100];
        let long = vec![5u8; HOLD + 1];
        c.write_all(&small).await.unwrap();
        c.write_all(&long).await.unwrap();
        assert_eq!(c.inner.writes, [[&small[..], &long].concat()]);
        c.write_all(&long).await.unwrap();
        assert_eq!(c.inner.writes.len(), 2);
        assert_eq!(c.inner.writes[1], long);
        c.flush().await.unwrap();
        let mut got = vec![0u8; small.len() + 2 * long.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [&small[..], &long, &long].concat());
    }

    /// A socket that takes a few bytes at a time still gets every byte once, in order, by the
    /// flush and by the shutdown.
    #[tokio::test(flavor = "current_thread")]
    async fn short_writes_lose_and_repeat_nothing() {
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut c = Coalesce::new(Counting::new(server));
        c.inner.most = 7;
        let mut sent = Vec::new();
        for (i, len) in [5usize, 300, HOLD - 100, 2 * HOLD, 1].into_iter().enumerate() {
            let part = vec![i as u8; len];
            c.write_all(&part).await.unwrap();
            sent.extend_from_slice(&part);
        }
        c.flush().await.unwrap();
        c.write_all(b"last").await.unwrap();
        sent.extend_from_slice(b"last");
        c.shutdown().await.unwrap();
        assert!(c.inner.writes.iter().all(|w| w.len() <= 7));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the bytes arrive in the order written");
    }

    /// Records the writes that reach the inner stream.
    struct Counting<S> {
        inner: S,
        writes: Vec<Vec<u8>>,
        /// Most bytes one write takes.
        most: usize,
    }

    impl<S> Counting<S> {
        fn new(inner: S) -> Self {
            Self { inner, writes: Vec::new(), most: usize::MAX }
        }
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let most = buf.len().min(self.most);
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &buf[..most]))?;
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        /// One write of the slices' concatenation, as `writev` is.
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.poll_write(cx, &all)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }
}
