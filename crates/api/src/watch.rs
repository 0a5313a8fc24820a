//! Connections that take too long: a request whose answer has not started within
//! `request_timeout` of its first byte (headers or body trickled in, the slowloris and
//! the slow POST), an answer the client has not taken whole within it of the write that
//! first found the connection full (a slow reader, holding the answer in memory as it
//! reads a byte now and then), or a connection idle that long, is closed.
//!
//! Why not hyper's `header_read_timeout`: it needs hyper's timer, which allocates and
//! registers a sleep for every request a keep-alive connection waits for; measured,
//! ~1,500 more instructions per `GET /healthz` (7.6%). Here a request costs two relaxed
//! atomic stores against a clock that a sweeper ticks, and one sweeper task looks at every
//! connection once a second. It also covers a body sent slowly, which the header timeout
//! does not.
//!
//! **Invariant:** a connection is closed only when a request of it has been in progress
//! (read from, not yet answered), an answer has waited for the client to take it, or it
//! has been idle, for longer than the timeout, give or take the sweep's second. Nothing a well-behaved client does is cut off: the
//! server refuses to start, and refuses a rules change, when the timeout is shorter than
//! the longest answer it may take on its own account under the rules (paced waits, the
//! payment provider's timeout, a held refusal; `longest_answer`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Every open connection's marks, and the coarse clock they are stamped with.
pub struct Watchdog {
    started: Instant,
    /// Milliseconds since `started`, advanced by the sweeper.
    now_ms: AtomicU64,
    next_id: AtomicU64,
    open: Mutex<std::collections::HashMap<u64, Arc<Marks>, foldhash::fast::RandomState>>,
}

/// One connection's marks, in the watchdog's milliseconds.
pub struct Marks {
    /// The first byte read since the last answer began (0: none since).
    request_since: AtomicU64,
    /// The last byte written, or the connection's opening.
    last_write: AtomicU64,
    /// The write that first found the connection full since everything written was last
    /// handed over whole (hyper flushes only then); 0: nothing waiting. Bytes the client
    /// takes a few at a time do not move it.
    write_blocked_since: AtomicU64,
    /// Wakes the connection's task to close it.
    pub close: Notify,
}

impl Watchdog {
    pub fn new() -> Arc<Watchdog> {
        Arc::new(Watchdog {
            started: Instant::now(),
            now_ms: AtomicU64::new(1),
            next_id: AtomicU64::new(0),
            open: Mutex::new(Default::default()),
        })
    }

    fn now(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    /// Registers a new connection; it is forgotten when the guard is dropped.
    pub fn watch<T>(self: &Arc<Self>, io: T) -> (Watched<T>, Registration) {
        let marks = Arc::new(Marks {
            request_since: AtomicU64::new(0),
            last_write: AtomicU64::new(self.now()),
            write_blocked_since: AtomicU64::new(0),
            close: Notify::new(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open.lock().insert(id, marks.clone());
        let registration = Registration {
            watchdog: self.clone(),
            id,
            marks: marks.clone(),
        };
        (
            Watched {
                io,
                marks,
                watchdog: self.clone(),
            },
            registration,
        )
    }

    /// Advances the coarse clock to now; returns it.
    fn tick(&self) -> u64 {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        self.now_ms.store(now, Ordering::Relaxed);
        now
    }

    /// Advances the clock and closes the connections over `timeout`; returns how many.
    pub fn sweep(&self, timeout: Duration) -> usize {
        let now = self.tick();
        let limit = timeout.as_millis() as u64;
        let mut closed = 0;
        for marks in self.open.lock().values() {
            let since = marks.request_since.load(Ordering::Relaxed);
            let since = if since != 0 {
                since
            } else {
                marks.last_write.load(Ordering::Relaxed)
            };
            let blocked = marks.write_blocked_since.load(Ordering::Relaxed);
            if now.saturating_sub(since) > limit
                || (blocked != 0 && now.saturating_sub(blocked) > limit)
            {
                marks.close.notify_one();
                closed += 1;
            }
        }
        closed
    }

    /// Sweeps every second (the clock's resolution in between) for as long as the
    /// watchdog is used elsewhere.
    pub async fn run(self: Arc<Self>, timeout: Duration) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        while Arc::strong_count(&self) > 1 {
            tick.tick().await;
            n += 1;
            if n.is_multiple_of(4) {
                let closed = self.sweep(timeout);
                if closed > 0 {
                    metrics::counter!("stampede_connections_timed_out_total")
                        .increment(closed as u64);
                }
            } else {
                self.tick();
            }
        }
    }

    pub fn open(&self) -> usize {
        self.open.lock().len()
    }
}

/// Removes its connection from the watchdog when dropped.
pub struct Registration {
    watchdog: Arc<Watchdog>,
    id: u64,
    pub marks: Arc<Marks>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.watchdog.open.lock().remove(&self.id);
    }
}

/// The connection's IO, stamping its marks as bytes go in and out.
pub struct Watched<T> {
    io: T,
    marks: Arc<Marks>,
    watchdog: Arc<Watchdog>,
}

impl<T> Watched<T> {
    fn read_some(&self) {
        if self.marks.request_since.load(Ordering::Relaxed) == 0 {
            self.marks
                .request_since
                .store(self.watchdog.now(), Ordering::Relaxed);
        }
    }

    fn wrote_some(&self) {
        self.marks.request_since.store(0, Ordering::Relaxed);
        self.marks
            .last_write
            .store(self.watchdog.now(), Ordering::Relaxed);
    }

    fn write_blocked(&self) {
        if self.marks.write_blocked_since.load(Ordering::Relaxed) == 0 {
            self.marks
                .write_blocked_since
                .store(self.watchdog.now(), Ordering::Relaxed);
        }
    }

    /// Marks what a write call did: progress, or a full connection.
    fn wrote<E>(&self, result: &Poll<Result<usize, E>>) {
        match result {
            Poll::Ready(Ok(n)) if *n > 0 => self.wrote_some(),
            Poll::Pending => self.write_blocked(),
            _ => {}
        }
    }
}

/// The most one read hands hyper. hyper checks its `max_buf_size` only between reads
/// and offers each read all the room its buffer has (which it grows by doubling), so
/// unbounded reads let a request head grow well past that size before it is refused
/// (measured: a 100 KB head served under a 64 KiB cap). With reads this small, a head
/// is refused before more than `max_buf_size` + this much of it is held.
pub const READ_CHUNK_MAX_BYTES: usize = 8 * 1024;

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = if buf.remaining() <= READ_CHUNK_MAX_BYTES {
            Pin::new(&mut self.io).poll_read(cx, buf)
        } else {
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK_MAX_BYTES];
            let mut chunk = ReadBuf::uninit(&mut chunk);
            let result = Pin::new(&mut self.io).poll_read(cx, &mut chunk);
            buf.put_slice(chunk.filled());
            result
        };
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.read_some();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    /// hyper flushes once its buffer is written whole: nothing waits for the client.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_flush(cx);
        if matches!(result, Poll::Ready(Ok(()))) {
            self.marks.write_blocked_since.store(0, Ordering::Relaxed);
        }
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Whether the connection's task has been told to close it.
    async fn told_to_close(registration: &Registration) -> bool {
        tokio::time::timeout(
            Duration::from_millis(10),
            registration.marks.close.notified(),
        )
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn a_request_in_progress_or_an_idle_connection_is_closed_after_the_timeout() {
        let watchdog = Watchdog::new();
        let timeout = Duration::from_millis(100);
        let (client, server) = tokio::io::duplex(1024);
        let (mut io, registration) = watchdog.watch(server);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        // A request and its answer: nothing to close.
        client_write.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 16];
        let _ = io.read(&mut buf).await.unwrap();
        io.write_all(b"200").await.unwrap();
        let _ = client_read.read(&mut buf).await.unwrap();
        assert_eq!(watchdog.sweep(timeout), 0);
        // Idle past the timeout: closed.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(watchdog.sweep(timeout), 1);
        assert!(told_to_close(&registration).await);
        // Bytes trickling in keep the request in progress from its first byte: closed
        // although the last byte is recent.
        io.write_all(b"200").await.unwrap();
        let _ = client_read.read(&mut buf).await.unwrap();
        watchdog.sweep(timeout);
        for _ in 0..4 {
            client_write.write_all(b"x").await.unwrap();
            let _ = io.read(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
            watchdog.sweep(Duration::from_secs(60)); // ticks the clock only
        }
        assert_eq!(watchdog.sweep(timeout), 1);
        assert_eq!(watchdog.open(), 1);
        drop(registration);
        assert_eq!(watchdog.open(), 0);
    }

    /// An answer larger than the connection takes at once, read a few bytes at a time:
    /// every read lets a write through (the last write stays recent), yet the answer
    /// still waits, so the connection is closed once it has waited past the timeout. An
    /// answer taken whole in time leaves nothing to close.
    #[tokio::test]
    async fn a_slow_reader_of_a_large_answer_is_closed_after_the_timeout() {
        let watchdog = Watchdog::new();
        let timeout = Duration::from_millis(100);
        let (client, server) = tokio::io::duplex(64);
        let (io, registration) = watchdog.watch(server);
        let (mut client_read, _client_write) = tokio::io::split(client);
        let mut io = Box::pin(io);
        // Taken whole at once: flushed, nothing waits.
        let writer = async {
            io.write_all(&[b'a'; 200]).await.unwrap();
            io.flush().await.unwrap();
        };
        let reader = async {
            let mut buf = [0u8; 200];
            client_read.read_exact(&mut buf).await.unwrap();
        };
        tokio::join!(writer, reader);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(watchdog.sweep(timeout), 0);
        // Read a byte at a time, 40 ms apart: the answer waits for 200+ ms.
        let writer = tokio::spawn(async move {
            let _ = io.write_all(&[b'b'; 4096]).await;
            let _ = io.flush().await;
            io
        });
        let mut closed = 0;
        for _ in 0..6 {
            let mut byte = [0u8; 1];
            client_read.read_exact(&mut byte).await.unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
            closed += watchdog.sweep(timeout);
        }
        assert!(closed >= 1, "the slow reader's connection was never closed");
        assert!(told_to_close(&registration).await);
        writer.abort();
    }
}
