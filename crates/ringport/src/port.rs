//! The port, its workers, and the routing of operations between them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::BuildHasherDefault;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::fault::{Effect, Faults};
use crate::handle::Handle;
use crate::inflight::Inflight;
use crate::op::{Completion, IdHasher, Op, OpId, OpKind, Packet};
use crate::pool::Pool;
use crate::sys::{self, Cancel, Driver, Event, OpBody, Target};

/// Bits of an [`OpId`] below the worker index.
const ID_WORKER_SHIFT: u32 = 48;
/// How long dropping a worker waits for the kernel to give back cancelled operations before it
/// leaks their memory rather than free it under the kernel.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// How long a worker waits for completions, at most, while a cancel it could not queue waits
/// to be asked again.
const CANCEL_RETRY: Duration = Duration::from_millis(1);

/// Why [`Worker::dequeue`] returned without a completion.
#[derive(Debug)]
#[non_exhaustive]
pub enum WaitError {
    /// The timeout passed with no completion: nothing failed.
    TimedOut,
    /// [`Port::shutdown`] was called and this worker has delivered every completion it owed.
    Shutdown,
    /// Waiting on the kernel failed. What was reaped before the failure is still handed out,
    /// and the next wait may succeed. One error says more was lost: on io_uring, `EBADR`
    /// (`raw_os_error`) means the kernel dropped completions (its completion queue overflowed
    /// while it was short of memory). The operations they were for never complete: their
    /// sockets and buffers stay held until the worker is dropped, which waits for them (up to
    /// 10 s) and then leaks them rather than free them. Treat such a worker as lost.
    Io(io::Error),
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::TimedOut => f.write_str("timed out waiting for a completion"),
            WaitError::Shutdown => f.write_str("the port is shut down"),
            WaitError::Io(e) => write!(f, "waiting for completions failed: {e}"),
        }
    }
}

impl std::error::Error for WaitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WaitError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<WaitError> for io::Error {
    fn from(e: WaitError) -> io::Error {
        match e {
            WaitError::TimedOut => io::Error::new(io::ErrorKind::TimedOut, e),
            WaitError::Shutdown => io::Error::new(io::ErrorKind::NotConnected, e),
            WaitError::Io(e) => e,
        }
    }
}

/// Work posted to a worker that is already gone (dropped, or not one of this port's: a handle
/// from another port names a worker this port may not have), given back unstarted rather than
/// dropped: the operation with its buffer and per-I/O data ([`Port::submit`]), or the packet
/// ([`Port::post`], [`Worker::post`]). [`Rejected::into_inner`] takes it back; `?` into an
/// [`io::Error`] (`NotConnected`) drops it. (Work a worker accepted and had not taken when it
/// was dropped is dropped with it: see [`Worker`].)
///
/// `Send` and `Sync` whenever what it holds is `Send`, so it also converts into
/// `Box<dyn Error + Send + Sync>`.
pub struct Rejected<T> {
    item: T,
}

// SAFETY: a `Rejected` gives no shared access to what it holds (only `into_inner`, by value;
// its `Debug` and `Display` do not look at it), so sharing a `&Rejected<T>` between threads
// shares nothing of `T`: as with `std::sync::Exclusive`, `T: Send` is enough.
unsafe impl<T: Send> Sync for Rejected<T> {}

impl<T> Rejected<T> {
    /// What was posted, as it was handed in.
    pub fn into_inner(self) -> T {
        self.item
    }
}

impl<T> fmt::Debug for Rejected<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejected").finish_non_exhaustive()
    }
}

impl<T> fmt::Display for Rejected<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the worker it was posted to is gone (dropped, or not of this port)")
    }
}

impl<T> std::error::Error for Rejected<T> {}

impl<T> From<Rejected<T>> for io::Error {
    fn from(e: Rejected<T>) -> io::Error {
        io::Error::new(io::ErrorKind::NotConnected, e.to_string())
    }
}

/// Which kernel interface produces the completions. See the backend table in the [`crate`]
/// docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Backend {
    /// io_uring when the kernel allows it, else epoll (logged once, with the reason: whatever
    /// it is, running out of descriptors included).
    #[default]
    Auto,
    /// io_uring, or an error saying why it cannot start.
    Uring,
    /// epoll readiness plus non-blocking system calls.
    Epoll,
}

impl Backend {
    /// The name used on command lines and in logs: `auto`, `uring`, `epoll`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Backend::Uring),
            "epoll" => Ok(Backend::Epoll),
            _ => Err(format!(
                "unknown backend `{s}` (expected auto, uring or epoll)"
            )),
        }
    }
}

/// The environment variable that makes io_uring setup fail with the errno it names (`EPERM`,
/// `ENOSYS`, `ENOMEM`, or a number), as a container or kernel that refuses io_uring would: a
/// fault-injection hook to exercise the fallback to epoll.
pub const FAULT_URING_SETUP_ENV: &str = "RINGPORT_FAULT_URING_SETUP";

/// Configures and creates a [`Port`].
#[derive(Debug, Clone)]
pub struct Builder {
    workers: usize,
    entries: u32,
    backend: Backend,
    pool: Option<(usize, u16)>,
    /// The most pool buffers in circulation at once (see [`Builder::recv_pool_working_set`]).
    working_set: Option<u16>,
    /// io_uring: fill pool buffers incrementally (see [`Builder::recv_pool_incremental`]).
    incremental: bool,
    /// io_uring: each worker's ring driven by one thread (see
    /// [`Builder::single_thread_workers`]).
    single_thread: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            workers: 0,
            entries: 256,
            backend: Backend::Auto,
            pool: None,
            working_set: None,
            incremental: false,
            single_thread: false,
        }
    }
}

impl Builder {
    /// The number of workers, each with its own ring (or epoll instance) and the sockets placed
    /// on it; `0`, the default, means one per available core. (A completion port's concurrency
    /// value lets any of its threads take any completion; here a worker takes only its own
    /// sockets', so one that blocks holds those up: see the porting guide.)
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Submission-queue slots per worker ring (default 256; the completion queue has 8x, and
    /// at least 32768, as a full one ends multishot operations).
    /// More operations than this may be in flight: the queue is flushed when full.
    pub fn entries(mut self, n: u32) -> Self {
        self.entries = n.max(8);
        self
    }

    /// Gives each worker a receive pool of `buffers` buffers of `size` bytes, for
    /// [`Op::recv_pooled`]: the kernel takes a buffer from the pool only when data arrives, so
    /// a connection waiting for input holds none (on io_uring, a provided-buffer ring with a
    /// multishot receive, Linux 6.0+). Receives fill a buffer one after another (see the crate
    /// docs), so `size` bounds one receive, not one message. Without a pool, pooled receives
    /// fail with `InvalidInput`; `buffers` must be 1 to 32768 (else [`Builder::build`] fails).
    pub fn recv_pool(mut self, size: usize, buffers: u16) -> Self {
        self.pool = Some((size, buffers));
        self
    }

    /// Keeps at most `buffers` (at least one) of each worker's receive pool
    /// ([`Builder::recv_pool`]) in circulation at once (default: all of them). A buffer
    /// circulates from when the worker gives it to the kernel (or, on epoll, receives into it)
    /// until every slice of it is dropped; one that slices have held for 20 ms no longer
    /// counts: it is parked (the echo of a peer that stopped reading, say), and the worker puts
    /// another in its place. So this bounds the bytes between a receive and the send that
    /// passes them on, not what can be held: the whole pool stays usable by those who hold on
    /// to their bytes.
    ///
    /// Where every connection has more in flight than the pool holds, a worker lends out
    /// every buffer and cycles through all of them, and a pool larger than the cache then
    /// costs a cache miss on both copies of each byte; a working set that fits the cache
    /// avoids that (`ringport serve` keeps 4 MiB of its 16 MiB pool circulating; 10,000
    /// connections each with 64 KiB in flight: 16-35% less server CPU per message,
    /// `BENCHMARKS.md`, L). Receives that find no buffer end with `ENOBUFS`, as with an
    /// empty pool; [`Worker::pool_available`] counts what the working set allows. The worker
    /// counts buffers as parked when it waits, so that count can grow with no completion to
    /// say so: an application that re-posts receives once buffers are available should wait
    /// with a timeout (20 ms suits) while any receive waits for one.
    pub fn recv_pool_working_set(mut self, buffers: u16) -> Self {
        self.working_set = Some(buffers);
        self
    }

    /// On io_uring, fill pool buffers incrementally (`IOU_PBUF_RING_INC`, Linux 6.12; ignored
    /// where the kernel lacks it): each receive takes only the bytes it got, where the previous
    /// one stopped, so small messages share a buffer and a burst of them pages in little of the
    /// pool. The price: a receive larger than what is left of the current buffer completes in
    /// two parts. With buffers the size of a typical receive (8 KiB) that happens to nearly
    /// every buffer-sized batch once small messages have put the fill point off a boundary,
    /// which costs completions and CPU; with buffers several times larger (`ringport serve`
    /// uses 64 KiB) it is rare (`BENCHMARKS.md`, G7 and H). Off by default. The epoll backend
    /// always fills incrementally: its extra `recv` at a buffer's end costs little.
    pub fn recv_pool_incremental(mut self, on: bool) -> Self {
        self.incremental = on;
        self
    }

    /// On io_uring, promise that each worker stays on one thread: the first that waits on it
    /// (or that submits so much at once that its submission queue must be flushed); posting
    /// from the thread that builds the port, before moving the worker, is fine. Its ring is
    /// then single-issuer with deferred task work (`IORING_SETUP_SINGLE_ISSUER |
    /// IORING_SETUP_DEFER_TASKRUN`, Linux 6.1; ignored where the kernel lacks it): the
    /// kernel's part of completing operations (running a multishot receive once data has
    /// arrived, say) waits for the worker's next wait and runs there in one batch, so each
    /// completion carries what arrived meanwhile. Where many connections
    /// keep data in flight this cuts the CPU per message (10,000 connections with 16 messages
    /// of 512 B in flight each: 0.40-0.42 µs in every round, against 0.42-0.71 without,
    /// `BENCHMARKS.md`). A worker used from another thread afterwards cannot wait: its next
    /// wait that enters the kernel fails with [`WaitError::Io`] (`EEXIST`), and dropping it
    /// there leaks what it has in flight rather than free it (with nothing in flight, only the
    /// 8-byte buffer of its wake-up read). [`Worker::single_thread`] says whether it took
    /// effect. Off by default; the epoll backend ignores it.
    pub fn single_thread_workers(mut self, on: bool) -> Self {
        self.single_thread = on;
        self
    }

    /// The backend (default [`Backend::Auto`]).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Creates the port and its workers; give each [`Worker`] to a thread of its own.
    ///
    /// # Errors
    /// `InvalidInput`: 65,536 workers or more; a receive pool ([`Builder::recv_pool`]) of no
    /// buffers, of more than 32,768, or of buffers of 0 bytes or of 2 GiB or more; a malformed
    /// [`FAULTS_ENV`](crate::FAULTS_ENV). `OutOfMemory`: a receive pool too large to allocate.
    /// Otherwise, creating a worker's eventfd, ring, epoll instance or pool failed. With
    /// [`Backend::Uring`], the error says why io_uring was refused (`EPERM` from a seccomp
    /// profile or `kernel.io_uring_disabled`, `ENOSYS`, `ENOMEM` from `RLIMIT_MEMLOCK`, a
    /// missing opcode): its message names the errno, and its [`kind`](io::Error::kind) is the
    /// errno's (`PermissionDenied`, `Unsupported`, `OutOfMemory`), but
    /// [`raw_os_error`](io::Error::raw_os_error) is `None`, except for `EMFILE` and `ENFILE`
    /// (out of descriptors: ask for fewer workers), which come back as they are.
    #[allow(clippy::type_complexity)] // The pair is the API: one port, its workers.
    pub fn build<K, D>(self) -> io::Result<(Port<K, D>, Vec<Worker<K, D>>)>
    where
        K: Send + Sync + 'static,
        D: Send + 'static,
    {
        let n = if self.workers == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            self.workers
        };
        if n >= 1 << (64 - ID_WORKER_SHIFT) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{n} workers is more than a port supports"),
            ));
        }
        let mut slots = Vec::with_capacity(n);
        for _ in 0..n {
            slots.push(Slot::new()?);
        }
        let faults = Faults::from_env()?.map(Arc::new);
        // Made (and dropped) before any backend is tried: a pool that cannot be had, on any
        // backend, is not io_uring's failure, nor a reason to fall back to epoll.
        if let Some((size, count)) = self.pool {
            drop(Pool::new(size, count, count)?);
        }
        let (drivers, pools) = self.drivers(&slots)?;
        let backend = drivers[0].name();
        let shared = Arc::new(Shared {
            slots,
            clone: std::sync::OnceLock::new(),
            next_seq: AtomicU64::new(1),
            shutdown: AtomicBool::new(false),
            backend,
            kind: if backend == "epoll" {
                Backend::Epoll
            } else {
                Backend::Uring
            },
        });
        let workers = drivers
            .into_iter()
            .zip(pools)
            .enumerate()
            .map(|(index, (driver, pool))| Worker {
                index,
                pool,
                faults: faults.clone(),
                shared: Arc::clone(&shared),
                driver,
                inflight: Inflight::new(),
                ready: VecDeque::new(),
                handed_out: 0,
                thread: 0,
                moved: false,
                owed: 0,
                events: Vec::new(),
                shutting_down: false,
                unsent_cancels: Vec::new(),
                held: HashMap::default(),
                sent_before: HashMap::default(),
                sends_cancelled: HashSet::default(),
                sockets_cancelled: HashSet::default(),
                gaps: HashMap::default(),
            })
            .collect();
        Ok((Port { shared }, workers))
    }
}

/// Each worker's driver and receive pool.
type Drivers = (Vec<Box<dyn Driver>>, Vec<Option<Arc<Pool>>>);

impl Builder {
    /// Gives each driver its pool, if one is configured.
    fn with_pools(&self, mut drivers: Vec<Box<dyn Driver>>) -> io::Result<Drivers> {
        let mut pools = Vec::with_capacity(drivers.len());
        for d in &mut drivers {
            let pool = match self.pool {
                Some((size, count)) => {
                    let pool = Pool::new(size, count, self.working_set.unwrap_or(count))?;
                    d.set_pool(Arc::clone(&pool), self.incremental)?;
                    Some(pool)
                }
                None => None,
            };
            pools.push(pool);
        }
        Ok((drivers, pools))
    }

    fn drivers<K, D>(&self, slots: &[Slot<K, D>]) -> io::Result<Drivers> {
        let uring = || -> io::Result<Drivers> {
            fault_injected_uring_error()?;
            let drivers = slots
                .iter()
                .map(|s| {
                    sys::uring::Uring::new(self.entries, s.wake.as_raw_fd(), self.single_thread)
                        .map(|d| Box::new(d) as Box<dyn Driver>)
                })
                .collect::<io::Result<_>>()?;
            self.with_pools(drivers)
        };
        let epoll = || -> io::Result<Drivers> {
            let drivers = slots
                .iter()
                .map(|s| {
                    sys::epoll::Epoll::new(s.wake.as_raw_fd())
                        .map(|d| Box::new(d) as Box<dyn Driver>)
                })
                .collect::<io::Result<_>>()?;
            self.with_pools(drivers)
        };
        match self.backend {
            Backend::Epoll => epoll(),
            Backend::Uring => uring().map_err(|e| {
                // Out of descriptors is no refusal of io_uring: the caller may ask for fewer
                // workers, which it can tell from the errno.
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    return e;
                }
                io::Error::new(
                    e.kind(),
                    format!(
                        "io_uring is not available: {e}; it may be blocked by a seccomp profile \
                         (containers), disabled by the sysctl kernel.io_uring_disabled, or short \
                         of locked memory (RLIMIT_MEMLOCK); the epoll backend works there"
                    ),
                )
            }),
            Backend::Auto => match uring() {
                Ok(d) => Ok(d),
                Err(e) => {
                    tracing::warn!("io_uring is not available ({e}); using the epoll backend");
                    epoll()
                }
            },
        }
    }
}

/// Fails the way a kernel that refuses io_uring would, when [`FAULT_URING_SETUP_ENV`] is set.
fn fault_injected_uring_error() -> io::Result<()> {
    let Ok(v) = std::env::var(FAULT_URING_SETUP_ENV) else {
        return Ok(());
    };
    let code = match v.trim() {
        "" => return Ok(()),
        "EPERM" => libc::EPERM,
        "ENOSYS" => libc::ENOSYS,
        "ENOMEM" => libc::ENOMEM,
        "EINVAL" => libc::EINVAL,
        other => other.parse().unwrap_or(libc::EPERM),
    };
    Err(io::Error::from_raw_os_error(code))
}

/// The completion port: associate sockets, post operations and packets from any thread, shut
/// down. Cheap to clone; `Send + Sync`.
///
/// `K` is the completion key (per-handle data) type, `D` the per-I/O data type.
pub struct Port<K, D> {
    shared: Arc<Shared<K, D>>,
}

impl<K, D> Clone for Port<K, D> {
    fn clone(&self) -> Self {
        Port {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K, D> fmt::Debug for Port<K, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Port")
            .field("backend", &self.shared.backend)
            .field("workers", &self.shared.slots.len())
            .finish()
    }
}

impl Port<(), ()> {
    /// A builder with the defaults: one worker per core.
    pub fn builder() -> Builder {
        Builder::default()
    }
}

impl<K, D> Port<K, D>
where
    K: Send + Sync + 'static,
    D: Send + 'static,
{
    /// The number of workers.
    pub fn workers(&self) -> usize {
        self.shared.slots.len()
    }

    /// The backend in use, as logs name it: `"io_uring"` or `"epoll"`. (See
    /// [`Port::backend_kind`] for the [`Backend`] to compare with.)
    pub fn backend(&self) -> &'static str {
        self.shared.backend
    }

    /// The backend in use: [`Backend::Uring`] or [`Backend::Epoll`] (never `Auto`, which
    /// resolves to one of them when the port is built).
    pub fn backend_kind(&self) -> Backend {
        self.shared.kind
    }

    /// Associates a socket with the port under completion key `key`, on the worker with the
    /// fewest live handles (ties go to the lowest index). The port takes ownership of the
    /// descriptor.
    ///
    /// # Errors
    /// Only when the descriptor's flags cannot be read or set.
    pub fn associate(&self, socket: impl Into<OwnedFd>, key: K) -> io::Result<Handle<K>> {
        let worker = self.shared.least_loaded();
        self.associate_with(worker, socket, key)
    }

    /// Associates a socket with a chosen worker (`worker % workers()`).
    ///
    /// # Errors
    /// Only when the descriptor's flags cannot be read or set.
    pub fn associate_with(
        &self,
        worker: usize,
        socket: impl Into<OwnedFd>,
        key: K,
    ) -> io::Result<Handle<K>> {
        let fd: OwnedFd = socket.into();
        // io_uring waits on a blocking socket itself (on an O_NONBLOCK one it could hand back
        // EAGAIN); the epoll backend needs O_NONBLOCK.
        set_nonblocking(&fd, self.shared.kind == Backend::Epoll)?;
        let worker = worker % self.shared.slots.len();
        let load = Arc::clone(&self.shared.slots[worker].load);
        Ok(Handle::new(fd, key, worker, load))
    }

    /// Posts an operation from any thread. It runs on its socket's home worker (a timeout on
    /// the least-loaded one), which also dequeues its completion.
    ///
    /// # Errors
    /// The target worker is gone: the operation and `data` come back unstarted in the
    /// [`Rejected`].
    pub fn submit(&self, op: Op<K>, data: D) -> Result<OpId, Rejected<(Op<K>, D)>> {
        self.submit_from_here(op, data, None)
    }

    /// Like [`Port::submit`], for an operation that completes many times, such as
    /// [`Op::recv_pooled`] (see [`Worker::submit_multishot`]).
    ///
    /// # Errors
    /// The target worker is gone: the operation and `data` come back unstarted in the
    /// [`Rejected`].
    pub fn submit_multishot(&self, op: Op<K>, data: D) -> Result<OpId, Rejected<(Op<K>, D)>>
    where
        D: Clone,
    {
        self.submit_from_here(op, data, Some(<D as Clone>::clone))
    }

    fn submit_from_here(
        &self,
        op: Op<K>,
        data: D,
        clone: Option<fn(&D) -> D>,
    ) -> Result<OpId, Rejected<(Op<K>, D)>> {
        let worker = match &op.handle {
            Some(h) => h.worker(),
            None => self.shared.least_loaded(),
        };
        let (id, pending) = self.shared.pending(worker, op, data, clone);
        match self
            .shared
            .send(worker, pending, |pending| Remote::Op(id, pending))
        {
            Ok(()) => Ok(OpId::from_raw(id)),
            Err(pending) => Err(Rejected {
                item: pending.into_parts(),
            }),
        }
    }

    /// Posts a custom packet to worker `worker % workers()`, from any thread: the
    /// `PostQueuedCompletionStatus` analog. It reaches the worker through its eventfd.
    ///
    /// # Errors
    /// The worker is gone: the packet comes back in the [`Rejected`].
    pub fn post(&self, worker: usize, packet: Packet<K, D>) -> Result<(), Rejected<Packet<K, D>>> {
        let worker = worker % self.shared.slots.len();
        self.shared
            .send(worker, packet, |p| {
                Remote::Done(self.shared.packet(worker, p))
            })
            .map_err(|item| Rejected { item })
    }

    /// Cancels one operation, from any thread. It still completes: with `ECANCELED`, or with
    /// its own result if it had already finished.
    pub fn cancel(&self, id: OpId) {
        let worker = id_worker(id.get());
        if worker < self.shared.slots.len() {
            let _ = self.shared.send(worker, id.get(), Remote::Cancel);
        }
    }

    /// Cancels every operation outstanding on `socket`, from any thread.
    pub fn cancel_all(&self, socket: &Handle<K>) {
        let _ = self
            .shared
            .send(socket.worker(), socket.clone(), Remote::CancelAll);
    }

    /// Shuts the port down: every worker cancels what it has in flight, delivers those
    /// completions, and then answers [`WaitError::Shutdown`]. A cancelled operation fails with
    /// `ECANCELED`; one that ended first keeps its result: a send already part-way out
    /// completes `Ok` with the count that went (check it against the buffer's length, not
    /// [`Completion::is_cancelled`]), a timeout that was due `Ok(0)`. Operations
    /// posted afterwards complete at once with `ECANCELED`; once a worker has answered
    /// `Shutdown`, work sent to it from other threads comes back instead: in the [`Rejected`]
    /// from [`Port::submit`], [`Port::post`] and [`Worker::post`], and as an `ECANCELED`
    /// completion on the posting worker from [`Worker::submit`] (and `submit_multishot`).
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for slot in &self.shared.slots {
            slot.wake();
        }
    }

    /// Whether [`Port::shutdown`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.shared.shutdown.load(Ordering::Acquire)
    }

    /// Live handles per worker, in worker order.
    pub fn loads(&self) -> Vec<usize> {
        self.shared
            .slots
            .iter()
            .map(|s| s.load.load(Ordering::Relaxed))
            .collect()
    }
}

/// One worker: a ring of its own, the operations in flight on it, and the completions it has
/// to hand out. `Send`, not `Sync`: it lives on one thread, which posts and dequeues.
///
/// Operations posted here on a socket whose home is another worker are forwarded to that
/// worker (through its queue and eventfd), and complete there.
///
/// Dropping a worker is closing its completion queue: it cancels what it has in flight and
/// waits for the kernel to give every buffer back, and the completions nobody can dequeue any
/// more are dropped with their buffers and per-I/O data, as are operations and packets posted
/// to it that it had not taken yet. To have every completion delivered, call
/// [`Port::shutdown`] and dequeue until [`WaitError::Shutdown`] before dropping it; posting to
/// a dropped worker, or from another thread to one that has answered `Shutdown`, fails: the
/// work comes back in the [`Rejected`] ([`Port::submit`], [`Port::post`], [`Worker::post`]),
/// or as an `ECANCELED` completion on the posting worker ([`Worker::submit`]).
///
/// On io_uring, the kernel counts each thread that entered the worker's ring (to submit or
/// wait: [`Worker::dequeue`] and the like, and dropping a worker with operations in flight,
/// which waits for them) as a user of the ring, and interrupts each such thread still alive
/// when the ring is torn down: a blocking call with a timeout that the thread is in, or makes
/// next (a socket read with `SO_RCVTIMEO`), may fail once with `EINTR`. The thread that built
/// the port is not one of them unless it did so: the rings are created by a thread of their
/// own. A worker may move to another thread between calls (unless
/// [`Builder::single_thread_workers`]); the kernel still finishes the network operations
/// that the old thread submitted on that thread, when it next enters the kernel or sleeps, so
/// a thread that hands a worker on and then computes for long without a system call delays
/// those completions as long. Should that thread exit first, the kernel cancels what it
/// submitted (a send it was running in one of its own threads, waiting for room, is
/// interrupted there with `EINTR`, as a stop of the process can interrupt it too: such a one,
/// nothing of it done, is started again on any worker, unless a cancel was asked, which it
/// then completes as, with `ECANCELED`); the worker starts those
/// operations again from the thread it is on (receives, accepts, and sends from where they got
/// to), so that they complete as if it had not, but
/// a connect still in progress then completes with `ECANCELED` (its handshake goes on in the
/// kernel, and the socket is best closed). (The port tells such cancels from those asked for
/// only on io_uring, on a worker that has been used from more than one thread, and by handle
/// (counting a socket's cancels modulo 16: sixteen [`Worker::cancel_all`]s of one socket while
/// one of its `ECANCELED`s waits unreaped make it look unasked): there, the
/// operations of another handle of the same socket, from a duplicated descriptor, which a
/// close or [`Worker::cancel_all`] of one handle cancels in the kernel, are started again.)
/// Packets and operations posted from other threads
/// wake the worker through a read that the thread which last dequeued armed, so they wait on
/// that thread in the same way.
pub struct Worker<K, D> {
    index: usize,
    /// The receive pool, when the port has one.
    pool: Option<Arc<Pool>>,
    /// Fault injection rules, when [`crate::FAULTS_ENV`] is set.
    faults: Option<Arc<Faults>>,
    shared: Arc<Shared<K, D>>,
    driver: Box<dyn Driver>,
    /// Every operation the driver has started and not yet reported, by id. Its body (buffer,
    /// address, timespec) stays boxed here, at a fixed address, until its event arrives.
    inflight: Inflight<Pending<K, D>>,
    /// Completions ready to hand out.
    ready: VecDeque<Completion<K, D>>,
    /// Completions handed out since the driver last submitted and reaped.
    handed_out: usize,
    /// The thread that last used this worker ([`thread_token`]; 0: none yet).
    thread: u64,
    /// Operations may have gone into the kernel from a thread other than the one dequeuing
    /// now (see [`Worker::restart_orphaned`]).
    moved: bool,
    /// Of the completions queued when the driver last took in new input, how many are still
    /// to be handed out (counted down a turn at a time). While a turn's worth is left, the
    /// turns between them only flush ([`Driver::flush`]): completions the worker queues for
    /// itself meanwhile (posts, operations that finish at once) go behind without holding new
    /// input back for good.
    owed: usize,
    events: Vec<Event>,
    shutting_down: bool,
    /// Cancels the driver could not queue (the kernel short of memory for a while): tried
    /// again on each turn, so that a cancel asked for is never lost.
    unsent_cancels: Vec<Unsent<K>>,
    /// Operations waiting for the one in the kernel on the same side of their socket (see
    /// [`side`]), by the socket's serial number: receives first, then sends. Their records
    /// are in `inflight` (they can be cancelled, and count as in flight).
    held: HashMap<u64, [VecDeque<u64>; 2], BuildHasherDefault<IdHasher>>,
    /// Sends on streams that the kernel took only part of, going on from where they stopped:
    /// the bytes sent so far, by operation id (see [`Worker::send_goes_on`]).
    sent_before: HashMap<u64, usize, BuildHasherDefault<IdHasher>>,
    /// Sends in the kernel whose cancel was asked for, by operation id, and sockets with a
    /// send in the kernel when all their operations were cancelled, by serial number: should
    /// the kernel have taken part of the send before the cancel reached it, the rest is not
    /// sent (see [`Worker::send_goes_on`]). Each is forgotten with the send's completion.
    sends_cancelled: HashSet<u64, BuildHasherDefault<IdHasher>>,
    sockets_cancelled: HashSet<u64, BuildHasherDefault<IdHasher>>,
    /// Sends that left a gap in their socket's stream and are not handed out yet, by id, with
    /// their socket (marked [`SEND_GAP`] until then).
    gaps: HashMap<u64, Handle<K>, BuildHasherDefault<IdHasher>>,
}

/// The side of a socket whose operations run one at a time, in the order posted, and its bit
/// in the handle's busy mask: receives (0), sends and a connect ahead of them (1). The kernel
/// would not keep the order of operations that wait on one socket (io_uring wakes the last
/// one posted first), and a send that went out in part would let the next one's bytes in
/// ahead of the rest of its own. Accepts are independent (each takes its own connection).
fn side(kind: OpKind) -> Option<(usize, u8)> {
    match kind {
        OpKind::Recv | OpKind::RecvPooled => Some((0, 1)),
        OpKind::Send | OpKind::Connect => Some((1, SEND_SIDE)),
        _ => None,
    }
}

/// The busy bit of a socket's sends (see [`side`]).
const SEND_SIDE: u8 = 2;

/// A bit of the handle's busy mask: a send on the socket left a gap in its stream, and the
/// completion that says so has not been handed out yet. Until it is, the socket's sends are
/// cancelled (see [`Worker::open_gap`]).
const SEND_GAP: u8 = 4;

/// A number for the calling thread, never given to another, even once it has exited (a
/// thread id's number could come back); `u64::MAX` where thread-local storage is gone (a
/// thread-local destructor), which counts as another thread.
fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TOKEN.try_with(|t| *t).unwrap_or(u64::MAX)
}

/// The body of an operation of `kind` to hand the driver: its boxed `body`, or, for a pooled
/// receive, whose body is not boxed (the driver keeps no pointer into it), `scratch`
/// (`OpBody::RecvPooled(limit)`); `None` for an operation without one. (Fields, not the
/// record: the caller reads the record's other fields meanwhile.)
fn driver_body<'a>(
    body: &'a mut Option<OpBox>,
    kind: OpKind,
    scratch: &'a mut OpBody,
) -> Option<&'a mut OpBody> {
    match body.as_mut() {
        Some(b) => Some(b.get_mut()),
        None if kind == OpKind::RecvPooled => Some(scratch),
        None => None,
    }
}

/// What the driver is told of an operation's socket (`h`), or of none (a timeout).
fn target_of<K>(h: Option<&Handle<K>>) -> Target {
    Target {
        fd: h.map_or(-1, AsRawFd::as_raw_fd),
        serial: h.map_or(0, Handle::serial),
        stream: h.is_some_and(Handle::is_stream),
        tcp: h.is_some_and(Handle::is_tcp),
    }
}

/// A cancel the driver could not queue. A socket's is kept with a clone of its handle, so that
/// its descriptor number cannot go to another socket before the cancel is queued.
enum Unsent<K> {
    Op(u64),
    Socket(Handle<K>),
}

impl<K, D> fmt::Debug for Worker<K, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("index", &self.index)
            .field("in_flight", &self.inflight.len())
            .field("ready", &self.ready.len())
            .finish()
    }
}

impl<K, D> Worker<K, D>
where
    K: Send + Sync + 'static,
    D: Send + 'static,
{
    /// This worker's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// A handle to the port this worker belongs to.
    pub fn port(&self) -> Port<K, D> {
        Port {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Operations posted to this worker and not yet completed: those on its ring, and those
    /// waiting behind another on the same side of their socket.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Posts an operation with its per-I/O data. Returns at once; the result arrives as a
    /// [`Completion`] on the socket's home worker (this one for timeouts). Never fails here:
    /// a failure to start is reported as that operation's completion, with its buffer. Among
    /// those, `InvalidInput` for an operation that completes many times ([`Op::recv_pooled`],
    /// [`Op::accept_multishot`]: post it with [`Worker::submit_multishot`]) and for a socket
    /// associated with another port.
    pub fn submit(&mut self, op: Op<K>, data: D) -> OpId {
        let worker = op.handle.as_ref().map_or(self.index, Handle::worker);
        let pending = self.shared.record(op, data, None);
        self.submit_pending(worker, pending)
    }

    /// Posts an operation that may complete many times, such as [`Op::recv_pooled`]: every
    /// completion but the last has [`Completion::more`] set and carries a clone of `data`.
    ///
    /// Should that clone panic, the panic reaches the caller of the dequeue, and the completion
    /// it was for is lost (the bytes it brought, or the connection it accepted, which is
    /// closed); the operation is cancelled, so that it ends (with `ECANCELED`) rather than
    /// going on past the gap. The other completions are kept for the next dequeue.
    pub fn submit_multishot(&mut self, op: Op<K>, data: D) -> OpId
    where
        D: Clone,
    {
        let worker = op.handle.as_ref().map_or(self.index, Handle::worker);
        let pending = self.shared.record(op, data, Some(<D as Clone>::clone));
        self.submit_pending(worker, pending)
    }

    /// Buffers of this worker's receive pool not in user hands, as far as its working set
    /// ([`Builder::recv_pool_working_set`]) lets them be used (0 without a pool). Pooled
    /// receives that ended with `ENOBUFS` can be posted again once this is non-zero.
    pub fn pool_available(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| {
            let count = usize::from(p.count());
            let usable = (usize::from(p.working_set()) + self.driver.pool_parked()).min(count);
            usable.saturating_sub(p.out())
        })
    }

    /// Buffers of this worker's receive pool that slices in user hands
    /// ([`PoolBuf`](crate::PoolBuf)s) keep from the pool (0 without a pool).
    pub fn pool_in_use(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.out())
    }

    /// Whether pooled receives share buffers, each going on where the previous one stopped
    /// (see the crate docs): always on epoll; on io_uring when asked for with
    /// [`Builder::recv_pool_incremental`] and the kernel has `IOU_PBUF_RING_INC` (Linux 6.12);
    /// otherwise each receive takes a whole buffer. `false` without a pool.
    pub fn pool_shares_buffers(&self) -> bool {
        self.pool.is_some() && self.driver.pool_incremental()
    }

    /// Whether this worker is tied to the thread that first waits on it: asked for with
    /// [`Builder::single_thread_workers`], on io_uring, where the kernel has it (Linux 6.1).
    pub fn single_thread(&self) -> bool {
        self.driver.single_thread()
    }

    /// Whether [`Op::recv_pooled_max`] ends at its limit: always on epoll; on io_uring where
    /// the kernel takes the limit (Linux 6.17), probed when the ring was made.
    pub fn recv_limits(&self) -> bool {
        self.driver.recv_limits()
    }

    fn submit_pending(&mut self, worker: usize, pending: Pending<K, D>) -> OpId {
        if worker == self.index {
            // Operations posted through the port wait in this worker's queue: started first,
            // they keep their place ahead of this one on the same socket.
            self.take_remote();
            // A slot of this worker's slab, else (all taken) a sequence id that names nothing
            // in flight here (after 2^47 of them, one could: see `take_remote`).
            let id = match self.inflight.reserve(worker_bits(self.index)) {
                Some(id) => id,
                None => loop {
                    let id = self.shared.next_id(worker);
                    if !self.inflight.contains(id) {
                        break id;
                    }
                },
            };
            self.start(id, pending);
            // Gives the slot back if the operation completed at once (nothing to track).
            self.inflight.unreserve(id);
            return OpId::from_raw(id);
        }
        let id = self.shared.next_id(worker);
        if let Err(pending) = self
            .shared
            .send(worker, pending, |pending| Remote::Op(id, pending))
        {
            // The home worker is gone, or this port has none of that index (another port's
            // socket): the operation fails here, and gives its buffer back.
            let e = if worker < self.shared.slots.len() {
                errno(libc::ECANCELED)
            } else {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the socket was associated with another port",
                )
            };
            self.ready.push_back(pending.into_completion(id, Err(e)));
        }
        OpId::from_raw(id)
    }

    /// Posts a packet to worker `worker % workers()` (this one included).
    ///
    /// # Errors
    /// The target worker is gone: the packet comes back in the [`Rejected`].
    pub fn post(
        &mut self,
        worker: usize,
        packet: Packet<K, D>,
    ) -> Result<(), Rejected<Packet<K, D>>> {
        let worker = worker % self.shared.slots.len();
        if worker == self.index {
            // After what was posted to this worker through the port, as `submit`.
            self.take_remote();
            let completion = self.shared.packet(worker, packet);
            self.ready.push_back(completion);
            Ok(())
        } else {
            self.shared
                .send(worker, packet, |p| {
                    Remote::Done(self.shared.packet(worker, p))
                })
                .map_err(|item| Rejected { item })
        }
    }

    /// Cancels one operation; it still completes (with `ECANCELED` unless already finished).
    /// Says whether it was in flight: [`CancelOutcome::NotFound`] is where IOCP's `CancelIoEx`
    /// fails with `ERROR_NOT_FOUND`. An operation of another worker's socket is cancelled
    /// there ([`CancelOutcome::Forwarded`]). Which of the two a receive or an accept whose
    /// input arrives about the time of the cancel gets can differ between the backends: on
    /// io_uring the kernel takes the request at the worker's next wait, after an operation
    /// posted in the same turn, which then finds the input that came meanwhile; on epoll the
    /// cancel takes effect at once. (A timeout ends as it stood when the cancel was asked, on
    /// both: see [`Op::timeout`].)
    pub fn cancel(&mut self, id: OpId) -> CancelOutcome {
        let worker = id_worker(id.get());
        if worker == self.index {
            // An operation posted from another thread may still wait in this worker's queue.
            self.take_remote();
            if self.inflight.contains(id.get()) {
                self.cancel_op_in_driver(id.get());
                CancelOutcome::Requested
            } else {
                CancelOutcome::NotFound
            }
        } else {
            match self.shared.send(worker, id.get(), Remote::Cancel) {
                Ok(()) => CancelOutcome::Forwarded,
                // No such worker, or it is gone with everything it had in flight.
                Err(_) => CancelOutcome::NotFound,
            }
        }
    }

    /// Cancels every operation outstanding on `socket`. (Should the kernel not take the request
    /// at once, it is tried again on the next turn, and then also cancels what was posted on
    /// the socket meanwhile. On io_uring, the operations in the kernel of another handle of the
    /// same socket on this worker, from a duplicated descriptor, are cancelled too, unless the
    /// worker has moved between threads: see [`Worker`].)
    pub fn cancel_all(&mut self, socket: &Handle<K>) {
        if socket.worker() == self.index {
            // Operations posted from other threads first, so that they are cancelled too.
            self.take_remote();
            self.cancel_socket_in_driver(socket);
        } else {
            let _ = self
                .shared
                .send(socket.worker(), socket.clone(), Remote::CancelAll);
        }
    }

    /// Waits up to `timeout` (`Some(ZERO)`: poll; `None`: forever) for the next completion.
    ///
    /// A failed operation is a successful dequeue whose [`Completion::result`] is the error;
    /// [`WaitError::TimedOut`] means only that nothing completed in time.
    ///
    /// # Errors
    /// [`WaitError::TimedOut`], [`WaitError::Shutdown`] once the port is shut down and drained,
    /// or [`WaitError::Io`] when waiting on the kernel fails.
    pub fn dequeue(&mut self, timeout: Option<Duration>) -> Result<Completion<K, D>, WaitError> {
        self.fill(timeout)?;
        self.handed_out += 1;
        let c = self.ready.pop_front().expect("fill leaves a completion");
        if !self.gaps.is_empty() {
            self.close_gap(c.id.get());
        }
        Ok(c)
    }

    /// Like [`Worker::dequeue`], but moves up to `max` completions (at least one) into `out`,
    /// and returns how many. A send that left a gap in its stream (see
    /// [`Op::send`](crate::Op::send)) always heads a batch, so that the caller has it before it
    /// answers anything that completed after it.
    ///
    /// # Errors
    /// As [`Worker::dequeue`].
    pub fn dequeue_batch(
        &mut self,
        out: &mut Vec<Completion<K, D>>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, WaitError> {
        self.fill(timeout)?;
        let mut n = self.ready.len().min(max.max(1));
        if !self.gaps.is_empty() {
            // A send that left a gap heads a batch: the caller must have it before it handles
            // (and sends in answer to) anything after it, as with `dequeue`.
            if let Some(at) = (1..n).find(|&i| self.gaps.contains_key(&self.ready[i].id.get())) {
                n = at;
            }
        }
        let from = out.len();
        out.extend(self.ready.drain(..n));
        // The caller is about to read each completion's key.
        for c in &out[from..] {
            if let Some(h) = &c.handle {
                h.prefetch();
            }
        }
        if !self.gaps.is_empty() {
            for c in &out[from..] {
                self.close_gap(c.id.get());
            }
        }
        self.handed_out += n;
        Ok(n)
    }

    /// Waits until `ready` holds at least one completion.
    fn fill(&mut self, timeout: Option<Duration>) -> Result<(), WaitError> {
        // A timeout too long to represent waits forever.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            self.take_remote();
            self.retry_cancels();
            if !self.events.is_empty() {
                // Left unserved by a panic in the caller's code (see `complete_events`).
                self.complete_events();
            }
            if self.shared.shutdown.load(Ordering::Acquire) && !self.shutting_down {
                // Tried again on the next turn if the request could not be queued.
                self.shutting_down = self.ask_cancel(Cancel::All);
            }
            if !self.ready.is_empty() {
                if self.handed_out >= TURN {
                    // A long backlog: hand the kernel what was submitted meanwhile (the echo
                    // of what was handed out, the buffers it frees) and collect what completed,
                    // behind the backlog, without waiting.
                    self.owed = self.owed.saturating_sub(self.handed_out);
                    self.handed_out = 0;
                    // While a turn of what the last reap brought is still queued, new input
                    // stays in the kernel until that is served: read now, it would wait behind
                    // it in pool buffers, out of the cache by the time it is echoed.
                    let take_input = self.owed < TURN;
                    let turn = if take_input {
                        self.driver.wait(Some(Duration::ZERO), &mut self.events)
                    } else {
                        self.driver.flush(&mut self.events)
                    };
                    // A failure here leaves the backlog to hand out; the next blocking wait
                    // reports one that lasts.
                    if let Err(e) = turn {
                        tracing::debug!("worker {}: submitting during a backlog: {e}", self.index);
                    }
                    self.complete_events();
                    if take_input {
                        self.owed = self.ready.len();
                    }
                }
                return Ok(());
            }
            if self.shutting_down && self.inflight.is_empty() {
                if self.close_mailbox() {
                    return Err(WaitError::Shutdown);
                }
                // Posted meanwhile: taken on the next turn. (Waiting instead could wait
                // forever: the wake-up read is no longer armed, or the sender saw the flag
                // that `close_mailbox` set and wrote no wake-up.)
                continue;
            }
            // All handed out: a burst (thousands of connections accepted in one pass) may have
            // grown the queues far beyond what steady load needs; give that memory back.
            if self.ready.capacity() > QUEUE_KEEP {
                self.ready = VecDeque::new();
            }
            if self.events.is_empty() && self.events.capacity() > QUEUE_KEEP {
                self.events = Vec::new();
            }
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            self.handed_out = 0;
            if let Some(e) = self.faults.as_ref().and_then(|f| f.check_wait()) {
                return Err(WaitError::Io(errno(e)));
            }
            // A cancel not queued yet is asked again on the next turn, which a wait for
            // completions must not put off: the operations it is for may never complete.
            let unsent = !self.unsent_cancels.is_empty()
                || (self.shared.shutdown.load(Ordering::Acquire) && !self.shutting_down);
            let wait = if unsent {
                Some(remaining.map_or(CANCEL_RETRY, |r| r.min(CANCEL_RETRY)))
            } else {
                remaining
            };
            let waited = self.driver.wait(wait, &mut self.events);
            // What was reaped before a failure is still handed out.
            self.complete_events();
            self.owed = self.ready.len();
            waited.map_err(WaitError::Io)?;
            if self.ready.is_empty() && remaining.is_some_and(|r| r.is_zero()) {
                self.take_remote();
                if self.ready.is_empty() {
                    return Err(WaitError::TimedOut);
                }
            }
        }
    }

    fn complete_events(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        let mut served: usize = 0;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // A window at a time (a reap can bring thousands): its records are loaded
            // together, the in-flight slots and then the handles the completions clone, before
            // it is served.
            for window in events.chunks(PREFETCH_WINDOW) {
                for ev in window {
                    self.inflight.prefetch(ev.id);
                }
                for ev in window {
                    if let Some(h) = self.inflight.get(ev.id).and_then(|p| p.handle.as_ref()) {
                        h.prefetch();
                    }
                }
                for &ev in window {
                    served += 1;
                    self.complete_event(ev);
                }
            }
        }));
        if let Err(panic) = outcome {
            // The caller's code panicked (a multishot completion's clone of its per-I/O data):
            // the events after that one are kept for the next turn, or for the drain when the
            // worker is dropped, rather than lost with their records, pool buffers and
            // accepted connections. That one's completion is lost (its bytes, or its
            // connection, closed): its operation is cancelled, so that what it brings next is
            // not taken for what follows (the caller sees it end with `ECANCELED`).
            if let Some(ev) = served.checked_sub(1).map(|i| events[i]) {
                if ev.more {
                    if let Some(p) = self
                        .inflight
                        .get_mut(ev.id)
                        .filter(|p| p.kind == OpKind::RecvPooled)
                    {
                        // Its bytes leave a gap (an accept's connections are each their own).
                        p.flags |= LOST;
                    }
                    self.cancel_op_in_driver(ev.id);
                }
            }
            events.drain(..served);
            self.events = events;
            std::panic::resume_unwind(panic);
        }
        // Keeps the allocation.
        events.clear();
        self.events = events;
    }

    /// Turns one event from the driver into a completion.
    fn complete_event(&mut self, mut ev: Event) {
        if ev.res <= 0 {
            self.carry_ending(&mut ev);
        }
        let pooled = match (ev.buf, &self.pool) {
            (Some(f), Some(pool)) => {
                // SAFETY: the driver reported that the kernel (or its recv) wrote `res`
                // bytes at `off` in buffer `f.bid`, which it still holds; it writes only
                // past them from now on.
                let buf = (ev.res > 0)
                    .then(|| unsafe { pool.buf(f.bid, f.off as usize, ev.res as usize) });
                if f.released {
                    pool.release(f.bid);
                }
                buf
            }
            _ => None,
        };
        if ev.more {
            let Some(p) = self.inflight.get(ev.id) else {
                // A record leaves the table only with its operation's last event, so an
                // intermediate one always finds it (an accept's descriptor would leak).
                debug_assert!(false, "intermediate event of {:#x} without a record", ev.id);
                return;
            };
            // Before the caller's clone, which may panic: a connection accepted is closed then.
            let (result, accepted) = p.outcome(ev.res);
            if p.flags & LOST != 0 {
                // After a gap (see `LOST`): dropped, the buffer and connection with it.
                return;
            }
            let data = match (p.multishot(), self.shared.clone.get()) {
                (true, Some(clone)) => clone(&p.data),
                // Not submitted as multishot: only the last completion is reported (and a
                // connection accepted meanwhile is closed).
                _ => return,
            };
            self.ready.push_back(Completion {
                id: OpId::from_raw(ev.id),
                kind: p.kind,
                result,
                handle: p.handle.clone(),
                data,
                buf: None,
                pooled,
                gathered: Vec::new(),
                accepted,
                more: true,
            });
        } else if ev.res > 0 && self.send_goes_on(ev.id, ev.res as usize) {
            // The rest of the send is in the kernel again: no completion yet.
        } else if (ev.res == -libc::ECANCELED && self.restart_orphaned(ev.id, false))
            || (ev.res == -libc::EINTR && self.restart_orphaned(ev.id, true))
        {
            // In the kernel again, started from this thread: no completion yet.
        } else if let Some(mut p) = self.inflight.remove(ev.id) {
            if ev.res == -libc::EINTR && self.cancel_explains(&p, ev.id) {
                // Interrupted in one of the kernel's threads by the cancel asked of it.
                ev.res = -libc::ECANCELED;
            }
            if p.kind == OpKind::RecvPooled && ev.res == -libc::ENOBUFS {
                self.driver.pool_starved();
            }
            let freed = side(p.kind)
                .zip(p.handle.as_ref())
                .map(|((index, bit), h)| {
                    h.set_busy(bit, false);
                    (h.serial(), index)
                });
            if p.kind == OpKind::Send || p.kind == OpKind::Connect {
                if !self.sends_cancelled.is_empty() {
                    self.sends_cancelled.remove(&ev.id);
                }
                if let Some(h) = p
                    .handle
                    .as_ref()
                    .filter(|_| !self.sockets_cancelled.is_empty())
                {
                    self.sockets_cancelled.remove(&h.serial());
                }
            }
            // A send that failed, or was cancelled after part of it went out, leaves a gap in
            // the stream. (One cancelled before any of it went is only taken out, as a held
            // one is.)
            let gap = (p.kind == OpKind::Send && !p.partial())
                .then(|| {
                    // Out of the kernel now: its body may be read.
                    let left = p.body.as_mut().map_or(0, |b| b.get_mut().unsent_len());
                    let short = left > usize::try_from(ev.res).unwrap_or(0);
                    let taken_out =
                        ev.res == -libc::ECANCELED && !self.sent_before.contains_key(&ev.id);
                    let h = p.handle.as_ref().filter(|h| h.is_stream())?;
                    (short && !taken_out).then(|| h.clone())
                })
                .flatten();
            let mut result = p.result(ev.res);
            let pooled = if p.flags & LOST != 0 && ev.res > 0 {
                // The last bytes of a receive that lost some (see `LOST`): they would follow
                // the gap.
                result = Err(errno(libc::ECANCELED));
                None
            } else {
                pooled
            };
            if let Some(before) = self.sent_before.remove(&ev.id) {
                // The count is the operation's: what went out before this last part, and, should
                // this part have failed (or been cancelled), just that, so that the caller knows
                // which bytes went (a count below what was asked: the rest was not sent).
                result = Ok(before + result.unwrap_or(0));
            }
            let mut c = p.into_completion(ev.id, result);
            if pooled.is_some() {
                c.pooled = pooled;
            }
            self.ready.push_back(c);
            if let Some(h) = gap {
                self.open_gap(ev.id, &h);
            }
            if let Some((serial, index)) = freed.filter(|_| !self.held.is_empty()) {
                self.start_held(serial, index);
            }
        }
    }

    /// The kernel hands the error that ended a connection (a reset, a refusal) to one of its
    /// socket's operations, the first to look; the others find the socket merely shut: a
    /// receive sees the end of the stream, a send `EPIPE`, a connect `ECONNABORTED`. Which one
    /// looks first differs between the backends (epoll tries receives first; io_uring wakes
    /// the operation that began to wait last). So the error is kept on the handle when first seen, and
    /// reported by those others as well, the same on both backends.
    fn carry_ending(&self, ev: &mut Event) {
        let Some(p) = self.inflight.get(ev.id) else {
            return;
        };
        let Some(h) = p.handle.as_ref() else {
            return;
        };
        let on_connection = matches!(
            p.kind,
            OpKind::Recv | OpKind::RecvPooled | OpKind::Send | OpKind::Connect
        );
        if !on_connection || !h.is_stream() || (ev.res < 0 && h.note_ending(-ev.res)) {
            return;
        }
        let found_shut = match p.kind {
            OpKind::Recv | OpKind::RecvPooled => ev.res == 0,
            OpKind::Send => ev.res == -libc::EPIPE,
            OpKind::Connect => ev.res == -libc::ECONNABORTED,
            _ => false,
        };
        if let Some(e) = h.ending().filter(|_| found_shut) {
            ev.res = -e;
        }
    }

    /// Starts again, from this thread, an operation that the kernel cancelled though nobody
    /// asked: on io_uring, the kernel cancels what a thread submitted when that thread exits,
    /// and a worker may have moved on to another thread and live on. Nothing of such an
    /// operation was done (its receive or send was not made), so it starts again as it was: a
    /// receive, a pooled receive, an accept (multishot or not), a send (from where it got to).
    /// Only on io_uring, on a worker that more than one thread has used (`moved`); not one
    /// whose cancel
    /// was asked (of it, of its socket since it went into the kernel, a close, the shutdown);
    /// and not a connect, whose handshake the kernel goes on with: started again, it would
    /// find it in progress and fail with `EALREADY`; it completes with `ECANCELED`. A pooled
    /// receive with a byte limit counts it afresh. (A cancel of every operation of a socket
    /// also reaches those of a duplicate of its descriptor on the same worker, which have
    /// their own handle: on a worker that moved, those are started again.) Whether it started.
    ///
    /// `interrupted`: it ended with `EINTR` instead, interrupted in one of the kernel's own
    /// threads (a send waiting for room, say), by such a cancel or by a stop of the process
    /// (`SIGSTOP`, a freeze): nothing of it was done either, and it starts again on any worker.
    fn restart_orphaned(&mut self, id: u64, interrupted: bool) -> bool {
        if self.shutting_down
            || self.shared.shutdown.load(Ordering::Acquire)
            || !self.driver.cancels_at_thread_exit()
        {
            return false;
        }
        let Some(p) = self.inflight.get_mut(id) else {
            return false;
        };
        let restartable = matches!(
            p.kind,
            OpKind::Recv | OpKind::RecvPooled | OpKind::Accept | OpKind::Send
        );
        if !(self.moved || interrupted) || p.cancel_asked() || !restartable {
            return false;
        }
        let Some(h) = p.handle.as_ref() else {
            return false;
        };
        let target = target_of(Some(h));
        let mut scratch = OpBody::RecvPooled(p.limit);
        let Some(body) = driver_body(&mut p.body, p.kind, &mut scratch) else {
            return false;
        };
        let started = self.driver.start(id, target, body).is_ok();
        if started {
            tracing::debug!(
                "worker {}: operation {id:#x} ({:?}) cancelled by the kernel unasked (the \
                 thread that started it exited): started again",
                self.index,
                p.kind
            );
        }
        started
    }

    /// Whether a cancel asked for accounts for operation `id` (`p`, out of the in-flight table)
    /// ending: of it, of its socket since it started, a close, or the shutdown.
    fn cancel_explains(&self, p: &Pending<K, D>, id: u64) -> bool {
        self.shutting_down
            || self.shared.shutdown.load(Ordering::Acquire)
            || p.cancel_asked()
            || self.sends_cancelled.contains(&id)
            || p.handle
                .as_ref()
                .is_some_and(|h| self.sockets_cancelled.contains(&h.serial()))
    }

    /// A send on a stream that the kernel took only `n` bytes of goes on from there in the same
    /// operation, as a completion port's send does: it completes once all of its bytes are
    /// sent, or it fails or is cancelled part-way. Held sends behind it stay held, so their
    /// bytes cannot go out ahead of its rest. Whether it went on (if not, it completes now with
    /// what it sent: all of it, or the port is shutting down, or its socket was closed, or the
    /// rest could not be started).
    fn send_goes_on(&mut self, id: u64, n: usize) -> bool {
        if self.shutting_down || self.shared.shutdown.load(Ordering::Acquire) {
            return false;
        }
        if self.sends_cancelled.contains(&id) {
            return false;
        }
        let Some(p) = self.inflight.get_mut(id) else {
            return false;
        };
        if p.kind != OpKind::Send
            || p.partial()
            || p.handle
                .as_ref()
                .is_some_and(|h| self.sockets_cancelled.contains(&h.serial()))
        {
            return false;
        }
        let Some(h) = p
            .handle
            .as_ref()
            .filter(|h| h.is_stream() && !h.is_closed())
        else {
            return false;
        };
        let target = target_of(Some(h));
        let Some(body) = p.body.as_mut().map(|b| b.get_mut()) else {
            return false;
        };
        if body.unsent_len() <= n {
            // All of it went.
            return false;
        }
        body.advance(n);
        if self.driver.start(id, target, body).is_err() {
            // It completes with what went; its body as before this part, so that the rest
            // left unsent is seen as a gap (`complete_event`).
            body.rewind(n);
            return false;
        }
        *self.sent_before.entry(id).or_default() += n;
        true
    }

    /// Starts the operations held behind the one that just left the kernel on side `index` of
    /// socket `serial`, in the order posted, until one is in the kernel (those that complete at
    /// once, say with `EBADF` after a close, let the next go).
    fn start_held(&mut self, serial: u64, index: usize) {
        while let Some(queues) = self.held.get_mut(&serial) {
            let next = queues[index].pop_front();
            if queues.iter().all(VecDeque::is_empty) {
                self.held.remove(&serial);
            }
            let Some(id) = next else { return };
            let Some(p) = self.inflight.take(id) else {
                continue;
            };
            let bit = side(p.kind).map_or(0, |(_, bit)| bit);
            let handle = p.handle.clone();
            self.start(id, p);
            // The slot stays with the operation if it is in the kernel or held again.
            self.inflight.unreserve(id);
            if handle.is_some_and(|h| h.busy(bit)) {
                return;
            }
        }
    }

    /// Takes an operation held behind another (see `held`) out of its queue, and completes it
    /// with `ECANCELED`. `false`: it is not held.
    fn cancel_held(&mut self, id: u64) -> bool {
        if self.held.is_empty() {
            return false;
        }
        let Some(serial) = self
            .inflight
            .get(id)
            .and_then(|p| p.handle.as_ref())
            .map(Handle::serial)
        else {
            return false;
        };
        let Some(queues) = self.held.get_mut(&serial) else {
            return false;
        };
        let mut found = false;
        for q in queues.iter_mut() {
            if let Some(at) = q.iter().position(|&held| held == id) {
                q.remove(at);
                found = true;
            }
        }
        if queues.iter().all(VecDeque::is_empty) {
            self.held.remove(&serial);
        }
        if found {
            self.complete_held_as_cancelled(id);
        }
        found
    }

    /// Completes a held operation, which never reached the kernel, with `ECANCELED`.
    fn complete_held_as_cancelled(&mut self, id: u64) {
        if let Some(p) = self.inflight.remove(id) {
            self.ready
                .push_back(p.into_completion(id, Err(errno(libc::ECANCELED))));
        }
    }

    /// Send `id`, just completed, left a gap in the stream of socket `h`: it failed, or its
    /// rest could not be sent. The sends held behind it, and those posted until its completion
    /// is handed out, would put their bytes after the gap: they are cancelled. Once the caller
    /// has it, it knows, and what it sends next goes.
    fn open_gap(&mut self, id: u64, h: &Handle<K>) {
        self.cancel_held_sends(h.serial());
        if !h.busy(SEND_GAP) {
            h.set_busy(SEND_GAP, true);
            self.gaps.insert(id, h.clone());
        }
    }

    /// The completion of operation `id` is being handed out: if it is a send that left a gap,
    /// its socket's sends go again.
    fn close_gap(&mut self, id: u64) {
        if let Some(h) = self.gaps.remove(&id) {
            h.set_busy(SEND_GAP, false);
        }
    }

    /// Completes the sends held on socket `serial` with `ECANCELED`. A connect held among them
    /// stays (it would not follow the gap: it carries no data), as one posted later runs.
    fn cancel_held_sends(&mut self, serial: u64) {
        let Some(queues) = self.held.get_mut(&serial) else {
            return;
        };
        let inflight = &self.inflight;
        let (connects, sends): (VecDeque<u64>, VecDeque<u64>) = std::mem::take(&mut queues[1])
            .into_iter()
            .partition(|&id| inflight.get(id).is_some_and(|p| p.kind == OpKind::Connect));
        queues[1] = connects;
        if queues.iter().all(VecDeque::is_empty) {
            self.held.remove(&serial);
        }
        for id in sends {
            self.complete_held_as_cancelled(id);
        }
    }

    /// Completes every operation held on `socket` with `ECANCELED`: the receives in the order
    /// posted, then the sends. They carry no data, so they may complete before the operation
    /// of their side that is still in the kernel.
    fn cancel_held_of(&mut self, socket: &Handle<K>) {
        let Some(queues) = self.held.remove(&socket.serial()) else {
            return;
        };
        for id in queues.into_iter().flatten() {
            self.complete_held_as_cancelled(id);
        }
    }

    /// Asks the driver to cancel one operation; if it cannot queue the request now, it is
    /// tried again on the next turn.
    fn cancel_op_in_driver(&mut self, id: u64) {
        if self.cancel_held(id) {
            return;
        }
        if let Some(p) = self.inflight.get_mut(id) {
            p.flags |= CANCEL_ASKED_OP;
            if p.kind == OpKind::Send {
                self.sends_cancelled.insert(id);
            }
        }
        if !self.ask_cancel(Cancel::Op(id)) {
            self.unsent_cancels.push(Unsent::Op(id));
        }
    }

    /// Asks the driver to cancel every operation on `socket`, as [`Self::cancel_op_in_driver`].
    fn cancel_socket_in_driver(&mut self, socket: &Handle<K>) {
        if !socket.has_home(&self.shared.slots[self.index].load) {
            // Another port's socket: none of its operations are here, and its state is
            // that port's worker's to change.
            return;
        }
        self.cancel_held_of(socket);
        if socket.busy(SEND_SIDE) {
            self.sockets_cancelled.insert(socket.serial());
        }
        // Counted once the request is queued (its `ECANCELED`s are reaped later): counted at
        // each try, a count of 16 tries would wrap back to what an operation in the kernel
        // saw at its start, and its `ECANCELED` would look unasked.
        if self.ask_cancel(Cancel::Fd(socket.as_raw_fd())) {
            socket.count_cancel();
        } else {
            self.unsent_cancels.push(Unsent::Socket(socket.clone()));
        }
    }

    /// Asks the driver to cancel `what`; `false` if it could not queue the request (nor, with
    /// fault injection, one the faults keep from it).
    fn ask_cancel(&mut self, what: Cancel) -> bool {
        if self.faults.as_ref().is_some_and(|f| f.check_cancel()) {
            return false;
        }
        self.driver.cancel(what)
    }

    /// Tries again the cancels the driver could not queue.
    fn retry_cancels(&mut self) {
        if self.unsent_cancels.is_empty() {
            return;
        }
        // (Handles dropped once every cancel is asked again, as in `take_remote`.)
        let mut asked = Vec::new();
        for what in std::mem::take(&mut self.unsent_cancels) {
            match what {
                Unsent::Op(id) if self.inflight.contains(id) => self.cancel_op_in_driver(id),
                // Completed meanwhile: nothing to cancel.
                Unsent::Op(_) => {}
                // Asked again: it also cancels what was posted on the socket meanwhile (those
                // held, and those in the kernel, whose `ECANCELED` the new count says was asked).
                Unsent::Socket(h) => {
                    self.cancel_socket_in_driver(&h);
                    asked.push(h);
                }
            }
        }
        drop(asked);
    }

    /// Before the worker answers [`WaitError::Shutdown`]: closes its mailbox under the lock,
    /// unless work got in since it was last emptied (`false`: take it first, to fail it with
    /// `ECANCELED`). From then on, work forwarded to it comes back to the sender in a
    /// [`Rejected`], rather than wait in a queue nobody takes from.
    fn close_mailbox(&mut self) -> bool {
        let slot = &self.shared.slots[self.index];
        let q = lock(&slot.queue);
        if q.is_empty() {
            slot.alive.store(false, Ordering::Release);
            true
        } else {
            slot.pending.store(true, Ordering::Release);
            false
        }
    }

    /// Notes the calling thread: `moved` once a second one uses the worker. Every call that can
    /// put operations into the kernel comes through [`Worker::take_remote`], which calls this.
    fn note_thread(&mut self) {
        let me = thread_token();
        if self.thread != me {
            self.moved |= self.thread != 0;
            self.thread = me;
        }
    }

    fn take_remote(&mut self) {
        self.note_thread();
        let slot = &self.shared.slots[self.index];
        // A load first: this runs for every operation a worker posts, and the queue is
        // usually empty.
        if !slot.pending.load(Ordering::Acquire) || !slot.pending.swap(false, Ordering::AcqRel) {
            return;
        }
        let items = std::mem::take(&mut *lock(&slot.queue));
        // The handles of the cancels, dropped once every item is dealt with: one may be a
        // socket's last, and a panic in its key's `drop` must not take the rest of the queue
        // with it.
        let mut cancelled = Vec::new();
        for item in items {
            match item {
                Remote::Op(id, p) if self.inflight.contains(id) => {
                    // The ids of work posted from other threads count on in 47 bits: after
                    // 2^47 of them one could name an operation still in flight here (a
                    // multishot receive armed for months), whose record it must not replace.
                    let e = io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "the operation's id is still in use by one posted 2^47 operations \
                         before it",
                    );
                    self.ready.push_back(p.into_completion(id, Err(e)));
                }
                Remote::Op(id, p) => self.start(id, p),
                Remote::Done(c) => self.ready.push_back(c),
                Remote::Cancel(id) => {
                    if self.inflight.contains(id) {
                        self.cancel_op_in_driver(id);
                    }
                }
                Remote::CancelAll(h) => {
                    self.cancel_socket_in_driver(&h);
                    cancelled.push(h);
                }
            }
        }
        drop(cancelled);
    }

    /// Starts an operation on this worker's ring, or completes it at once when it cannot start.
    fn start(&mut self, id: u64, mut p: Pending<K, D>) {
        if self.shutting_down || self.shared.shutdown.load(Ordering::Acquire) {
            return self
                .ready
                .push_back(p.into_completion(id, Err(errno(libc::ECANCELED))));
        }
        if let Some(h) = p.handle.as_ref() {
            if !h.has_home(&self.shared.slots[self.index].load) {
                let e = io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the socket was associated with another port",
                );
                return self.ready.push_back(p.into_completion(id, Err(e)));
            }
        }
        let target = target_of(p.handle.as_ref());
        let fd = target.fd;
        if p.kind == OpKind::Close {
            // A second close is an operation posted after the first: `EBADF`.
            let res = match &p.handle {
                Some(h) if !h.mark_closed() => Err(errno(libc::EBADF)),
                Some(h) => {
                    self.cancel_socket_in_driver(h);
                    self.driver.closed(target);
                    Ok(0)
                }
                None => Ok(0),
            };
            return self.ready.push_back(p.into_completion(id, res));
        }
        if p.handle.as_ref().is_some_and(Handle::is_closed) {
            return self
                .ready
                .push_back(p.into_completion(id, Err(errno(libc::EBADF))));
        }
        if p.kind == OpKind::Send && p.handle.as_ref().is_some_and(|h| h.busy(SEND_GAP)) {
            // Its bytes would follow the gap a send before it left (see `open_gap`).
            return self
                .ready
                .push_back(p.into_completion(id, Err(errno(libc::ECANCELED))));
        }
        let mut scratch = OpBody::RecvPooled(p.limit);
        let Some(body) = driver_body(&mut p.body, p.kind, &mut scratch) else {
            return self.ready.push_back(p.into_completion(id, Ok(0)));
        };
        if matches!(body, OpBody::Timeout(after, _) if after.is_zero()) {
            // Due as it is posted, on both backends alike: ready for the next dequeue, a poll
            // included (io_uring's own timer would report it only a turn later).
            return self.ready.push_back(p.into_completion(id, Ok(0)));
        }
        if matches!(body, OpBody::RecvPooled(_) | OpBody::AcceptMulti) && p.flags & MULTISHOT == 0 {
            let e = io::Error::new(
                io::ErrorKind::InvalidInput,
                "a multishot operation completes many times: post it with submit_multishot",
            );
            return self.ready.push_back(p.into_completion(id, Err(e)));
        }
        if matches!(body, OpBody::RecvPooled(_)) && self.pool.is_none() {
            let e = io::Error::new(
                io::ErrorKind::InvalidInput,
                "pooled receive on a port without a receive pool (Builder::recv_pool)",
            );
            return self.ready.push_back(p.into_completion(id, Err(e)));
        }
        if matches!(body, OpBody::RecvPooled(_)) && !target.stream {
            let e = io::Error::new(
                io::ErrorKind::InvalidInput,
                "pooled receive on a descriptor that is not a stream socket: receives share \
                 pool buffers, which would cut datagrams short (on a datagram socket, use \
                 Op::recv)",
            );
            return self.ready.push_back(p.into_completion(id, Err(e)));
        }
        if body.offset_past_end() {
            let e = io::Error::new(
                io::ErrorKind::InvalidInput,
                "send offset past the end of the buffer",
            );
            return self.ready.push_back(p.into_completion(id, Err(e)));
        }
        if matches!(body, OpBody::Recv(buf) if buf.len() == buf.capacity()) {
            let e = io::Error::new(
                io::ErrorKind::InvalidInput,
                "receive buffer has no spare capacity",
            );
            return self.ready.push_back(p.into_completion(id, Err(e)));
        }
        let side = side(p.kind).zip(p.handle.as_ref());
        if let Some(((index, bit), h)) = side {
            if h.busy(bit) {
                // Behind the operation in the kernel on this side: started when it completes.
                self.held.entry(h.serial()).or_default()[index].push_back(id);
                self.inflight.insert(id, p);
                return;
            }
        }
        if p.kind == OpKind::Connect {
            // A new connection: what ended an earlier one on the socket is no longer news
            // (once the operations before it, which may still meet that ending, are done).
            if let Some(h) = &p.handle {
                h.clear_ending();
            }
        }
        if let Some(f) = &self.faults {
            // A short send needs a stream and more than a byte to send.
            let short_ok = target.stream && body.unsent_head().len() > 1;
            match f.check(p.kind, short_ok) {
                // As when the kernel fails it.
                Some((Effect::Errno(e), _)) => {
                    return self.fail_start(id, p, Err(errno(e)), target.stream)
                }
                // One byte goes out at once, and the send goes on from there as after any
                // short send (`send_goes_on`).
                Some((Effect::Short, rule)) => match sys::send_one(fd, body.unsent_head()) {
                    Some(Ok(n)) if p.flags & PARTIAL != 0 => {
                        return self.ready.push_back(p.into_completion(id, Ok(n)))
                    }
                    Some(Ok(n)) => {
                        body.advance(n);
                        self.sent_before.insert(id, n);
                    }
                    // Its byte could not go out at once: sent in full, as if no rule fired.
                    _ => f.missed(rule),
                },
                None => {}
            }
        }
        match self.driver.start(id, target, body) {
            Ok(()) => {
                if let Some(h) = &p.handle {
                    p.flags = (p.flags & !CANCELS_SEEN) | (h.cancels() << 3);
                }
                if let Some(((_, bit), h)) = side {
                    h.set_busy(bit, true);
                }
                self.inflight.insert(id, p);
            }
            Err(e) => {
                // It completes with the error, or with a fault's one byte if that went out
                // before.
                let res = self.sent_before.remove(&id).ok_or(e);
                self.fail_start(id, p, res, target.stream);
            }
        }
    }

    /// Completes operation `p`, which could not start, with `res`; a send on a stream (not
    /// `partial`) leaves a gap in it, as when the kernel fails one (see `open_gap`).
    fn fail_start(&mut self, id: u64, p: Pending<K, D>, res: io::Result<usize>, stream: bool) {
        let gap = (p.kind == OpKind::Send && !p.partial() && stream)
            .then(|| p.handle.clone())
            .flatten();
        self.ready.push_back(p.into_completion(id, res));
        if let Some(h) = gap {
            self.open_gap(id, &h);
        }
    }
}

impl<K, D> Worker<K, D> {
    /// For `drop`: cancels everything, including the driver's own wake-up read, and waits (up
    /// to `DRAIN_LIMIT`) for the kernel to give each operation back, collecting their
    /// completions in `given_back`. What is still in `inflight` afterwards was not given back.
    fn drain_for_drop(&mut self, given_back: &mut Vec<Completion<K, D>>) {
        let mut cancelled = self.driver.cancel(Cancel::All);
        let deadline = Instant::now() + DRAIN_LIMIT;
        while !(self.inflight.is_empty() && self.driver.idle()) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if !cancelled {
                cancelled = self.driver.cancel(Cancel::All);
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            if let Err(e) = self.driver.wait(Some(wait), &mut self.events) {
                tracing::warn!(
                    "worker {}: waiting for cancelled operations: {e}",
                    self.index
                );
                break;
            }
            for ev in self.events.drain(..) {
                if let (Some(f), Some(pool)) = (ev.buf, &self.pool) {
                    if f.released {
                        pool.release(f.bid);
                    }
                }
                if !ev.more {
                    if let Some(p) = self.inflight.remove(ev.id) {
                        // Dropping the completion also closes a connection accepted meanwhile.
                        let result = p.result(ev.res);
                        given_back.push(p.into_completion(ev.id, result));
                    }
                } else if let Some(p) = self.inflight.get(ev.id) {
                    // A multishot accept's connection meanwhile: closed.
                    drop(p.outcome(ev.res));
                }
            }
        }
    }
}

impl<K, D> Drop for Worker<K, D> {
    fn drop(&mut self) {
        let slot = &self.shared.slots[self.index];
        // What the caller's types hold (per-I/O data, keys) is dropped only at the end, once
        // the kernel has given everything back or its memory is leaked: a `Drop` of theirs that
        // panics must not cut the wait short and free a buffer the kernel may still write.
        // Refuse further forwarded work; what was queued never reached the kernel.
        let queued = {
            let mut q = lock(&slot.queue);
            slot.alive.store(false, Ordering::Release);
            std::mem::take(&mut *q)
        };
        // Operations held behind others never reached the kernel: nothing to wait for.
        let held: Vec<_> = std::mem::take(&mut self.held)
            .into_values()
            .flatten()
            .flatten()
            .filter_map(|id| self.inflight.remove(id))
            .collect();
        let mut given_back = Vec::new();
        // A panic while waiting (a tracing layer's, or a `Clone` of the caller's per-I/O data
        // for a multishot completion) must not unwind through the fields' drops while the
        // kernel may still write into what they own: it is caught, the memory leaked, and the
        // panic resumed.
        let drained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.drain_for_drop(&mut given_back);
        }));
        let left = self.inflight.len();
        if left > 0 || drained.is_err() {
            for p in self.inflight.drain() {
                std::mem::forget(p);
            }
            self.driver.abandon();
            if let Some(pool) = self.pool.take() {
                std::mem::forget(pool);
            }
        }
        if let Err(panic) = drained {
            std::panic::resume_unwind(panic);
        }
        if left > 0 {
            tracing::error!(
                "worker {}: {left} operations were not given back by the kernel; leaked their \
                 buffers instead of freeing them",
                self.index
            );
        }
        drop(given_back);
        drop(held);
        drop(queued);
    }
}

/// An operation between `submit` and its completion.
struct Pending<K, D> {
    kind: OpKind,
    handle: Option<Handle<K>>,
    body: Option<OpBox>,
    data: D,
    /// [`MULTISHOT`], [`PARTIAL`], [`CANCEL_ASKED_OP`], [`LOST`], and in the bits of [`CANCELS_SEEN`] the
    /// socket's count of cancels ([`Handle::cancels`]) when the operation went into the
    /// kernel: one byte, so that with a small `D` the record fits in three words (an idle
    /// connection's armed receive keeps one).
    flags: u8,
    /// A pooled receive's byte limit ([`Op::recv_pooled_max`]; 0: none). Kept here rather than
    /// in a boxed body: it fits in the record's padding.
    limit: u32,
}

/// `Pending::flags`: submitted as multishot: each intermediate completion gets a clone of the
/// per-I/O data.
const MULTISHOT: u8 = 1;
/// `Pending::flags`: a send that completes with what the kernel takes at once
/// ([`Op::partial`]).
const PARTIAL: u8 = 2;
/// `Pending::flags`: asked to be cancelled ([`Worker::cancel`], [`Port::cancel`]): its
/// `ECANCELED` is delivered, not taken for the kernel's own (see [`Worker::restart_orphaned`]).
const CANCEL_ASKED_OP: u8 = 4;
/// `Pending::flags`: the bits that hold [`Handle::cancels`] as the operation went into the
/// kernel: a cancel of every operation of its socket asked since then (the count moved on)
/// asked for its `ECANCELED` too.
const CANCELS_SEEN: u8 = 0xF << 3;
/// `Pending::flags`: a completion of this pooled receive was lost (the caller's clone of its
/// data panicked), and the receive is being cancelled: its later intermediate completions,
/// whose bytes would follow the gap, are dropped (their buffers released), and a last one
/// that brings bytes ends it with `ECANCELED` instead.
const LOST: u8 = 0x80;

impl<K, D> Pending<K, D> {
    fn multishot(&self) -> bool {
        self.flags & MULTISHOT != 0
    }

    fn partial(&self) -> bool {
        self.flags & PARTIAL != 0
    }

    /// Whether a cancel was asked of the operation since it went into the kernel: of it, of
    /// its socket (the socket's count of cancels moved on), or a close of the socket.
    fn cancel_asked(&self) -> bool {
        self.flags & CANCEL_ASKED_OP != 0
            || self
                .handle
                .as_ref()
                .is_some_and(|h| h.is_closed() || h.cancels() != self.cancels_seen())
    }

    /// The socket's count of cancels when the operation went into the kernel.
    fn cancels_seen(&self) -> u8 {
        (self.flags & CANCELS_SEEN) >> 3
    }

    /// The operation and its per-I/O data as they were posted (for one that never started).
    fn into_parts(self) -> (Op<K>, D) {
        let body = match self.body {
            Some(b) => Some(b.into_inner()),
            // A pooled receive's body was not boxed (see `Shared::record`).
            None if self.kind == OpKind::RecvPooled => Some(OpBody::RecvPooled(self.limit)),
            None => None,
        };
        let op = Op {
            handle: self.handle,
            kind: self.kind,
            body,
            partial: self.flags & PARTIAL != 0,
        };
        (op, self.data)
    }

    /// Turns the driver's raw result into the operation's result.
    fn result(&self, res: i32) -> io::Result<usize> {
        decode_result(self.kind, res)
    }

    /// One intermediate completion's result, with the connection it accepted (an accept's
    /// result is the new descriptor, owned from here: dropping it closes the connection).
    fn outcome(&self, res: i32) -> (io::Result<usize>, Option<TcpStream>) {
        match (self.kind, self.result(res)) {
            (OpKind::Accept, Ok(fd)) => (Ok(0), Some(accepted(fd))),
            (_, result) => (result, None),
        }
    }

    fn into_completion(self, id: u64, mut result: io::Result<usize>) -> Completion<K, D> {
        let mut buf = None;
        let mut pooled = None;
        let mut gathered = Vec::new();
        let mut accepted = None;
        match self.body.map(OpBox::into_inner) {
            Some(OpBody::Recv(mut b)) => {
                if let Ok(n) = result {
                    let n = n.min(b.capacity() - b.len());
                    // SAFETY: the kernel reported writing `n` bytes into the spare capacity
                    // starting at `len`, and `n` is clamped to that capacity.
                    unsafe { b.set_len(b.len() + n) };
                }
                buf = Some(b);
            }
            Some(OpBody::Send(b, _)) => buf = Some(b),
            Some(OpBody::SendPooled(b, _)) => pooled = Some(b),
            Some(OpBody::SendGather(g)) => gathered = g.bufs,
            Some(OpBody::Accept | OpBody::AcceptMulti) => {
                if let Ok(fd) = result {
                    accepted = Some(self::accepted(fd));
                    result = Ok(0);
                }
            }
            _ => {}
        }
        Completion {
            id: OpId::from_raw(id),
            kind: self.kind,
            result,
            handle: self.handle,
            data: self.data,
            buf,
            pooled,
            gathered,
            accepted,
            more: false,
        }
    }
}

/// What [`Worker::cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The operation was in flight on this worker and is being cancelled: it completes with
    /// `ECANCELED`, or with its own result if it finishes first (a send on a stream that part
    /// of went out: with that count; see [`Op::send`](crate::Op::send) for the sends behind
    /// it).
    Requested,
    /// No operation with that id is in flight: it has completed (its completion may still wait
    /// to be dequeued), or the id names none of this port's operations.
    NotFound,
    /// The operation is another worker's, and the request was sent to it: whether it was still
    /// in flight shows in its completion (`ECANCELED` or its own result).
    Forwarded,
}

/// The most completions handed out from a backlog before the worker submits what was posted
/// meanwhile and reaps what completed: a busy worker's operations then wait at most this many
/// completions to reach the kernel, not until the whole backlog has been handed out.
const TURN: usize = 64;

/// Entries the ready queue keeps room for once drained (more after a burst is given back).
const QUEUE_KEEP: usize = 4096;
/// Events whose records are prefetched together before they are served (see
/// `Worker::complete_events`): the server's batch size.
const PREFETCH_WINDOW: usize = 64;

/// Owns the descriptor a successful accept returned.
fn accepted(fd: usize) -> TcpStream {
    // SAFETY: a successful accept's result is a new descriptor that nothing else owns; each
    // result is wrapped exactly once (by the completion it is reported in, or to be closed).
    unsafe { TcpStream::from_raw_fd(fd as i32) }
}

/// An operation's body on the heap, held by a raw pointer so that moving the record (into the
/// in-flight map, and within it when the map grows) never moves or re-borrows the memory the
/// driver handed to the kernel.
struct OpBox(std::ptr::NonNull<OpBody>);

// SAFETY: an `OpBox` owns its `OpBody` like a `Box` does, and `OpBody` is `Send`.
unsafe impl Send for OpBox {}

impl OpBox {
    fn new(body: OpBody) -> Self {
        OpBox(std::ptr::NonNull::from(Box::leak(Box::new(body))))
    }

    fn get_mut(&mut self) -> &mut OpBody {
        // SAFETY: the pointer came from `Box::leak` and is owned by `self`; the borrow is tied
        // to `&mut self`.
        unsafe { self.0.as_mut() }
    }

    fn into_inner(self) -> OpBody {
        let ptr = self.0;
        std::mem::forget(self);
        // SAFETY: the pointer came from `Box::leak`; `self` was forgotten, so it is freed once.
        *unsafe { Box::from_raw(ptr.as_ptr()) }
    }
}

impl Drop for OpBox {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `Box::leak` and is freed only here, once.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

/// Work forwarded to a worker from another thread.
enum Remote<K, D> {
    Op(u64, Pending<K, D>),
    Done(Completion<K, D>),
    Cancel(u64),
    CancelAll(Handle<K>),
}

struct Shared<K, D> {
    slots: Vec<Slot<K, D>>,
    /// `D`'s clone, for the intermediate completions of multishot operations (set by the first
    /// multishot submit: kept here rather than in every operation record).
    clone: std::sync::OnceLock<fn(&D) -> D>,
    next_seq: AtomicU64,
    shutdown: AtomicBool,
    backend: &'static str,
    /// The same, as a [`Backend`].
    kind: Backend,
}

impl<K, D> Shared<K, D> {
    fn least_loaded(&self) -> usize {
        let mut best = (usize::MAX, 0);
        for (i, slot) in self.slots.iter().enumerate() {
            // A worker that has been dropped takes nothing more (its operations would fail).
            if !slot.alive.load(Ordering::Acquire) {
                continue;
            }
            let load = slot.load.load(Ordering::Relaxed);
            if load < best.0 {
                best = (load, i);
            }
        }
        best.1
    }

    /// A new operation id; never 0 (the sequence skips values whose low bits wrap to 0).
    fn next_id(&self, worker: usize) -> u64 {
        loop {
            let id = pack_id(worker, self.next_seq.fetch_add(1, Ordering::Relaxed));
            if id & ((1 << (ID_WORKER_SHIFT - 1)) - 1) != 0 {
                return id;
            }
        }
    }

    fn pending(
        &self,
        worker: usize,
        op: Op<K>,
        data: D,
        clone: Option<fn(&D) -> D>,
    ) -> (u64, Pending<K, D>) {
        (self.next_id(worker), self.record(op, data, clone))
    }

    /// The record of an operation about to be submitted.
    fn record(&self, op: Op<K>, data: D, clone: Option<fn(&D) -> D>) -> Pending<K, D> {
        if let Some(clone) = clone {
            self.clone.get_or_init(|| clone);
        }
        let limit = match op.body {
            Some(OpBody::RecvPooled(limit)) => limit,
            _ => 0,
        };
        Pending {
            kind: op.kind,
            handle: op.handle,
            // A pooled receive hands the kernel no memory of its own: nothing to box.
            body: op
                .body
                .filter(|b| !matches!(b, OpBody::RecvPooled(_)))
                .map(OpBox::new),
            data,
            flags: if clone.is_some() { MULTISHOT } else { 0 }
                | if op.partial { PARTIAL } else { 0 },
            limit,
        }
    }

    fn packet(&self, worker: usize, packet: Packet<K, D>) -> Completion<K, D> {
        Completion {
            id: OpId::from_raw(self.next_id(worker)),
            kind: OpKind::Packet,
            result: Ok(packet.bytes),
            handle: packet.handle,
            data: packet.data,
            buf: None,
            pooled: None,
            gathered: Vec::new(),
            accepted: None,
            more: false,
        }
    }

    /// Queues work for `worker` (as `wrap` makes it into the queue's item, once the worker is
    /// known to be there) and wakes it; gives the work back if the worker is gone.
    fn send<T>(
        &self,
        worker: usize,
        item: T,
        wrap: impl FnOnce(T) -> Remote<K, D>,
    ) -> Result<(), T> {
        // A worker this port does not have (a handle from another port) is as good as gone.
        let Some(slot) = self.slots.get(worker) else {
            return Err(item);
        };
        {
            let mut q = lock(&slot.queue);
            if !slot.alive.load(Ordering::Acquire) {
                return Err(item);
            }
            q.push(wrap(item));
        }
        slot.wake();
        Ok(())
    }
}

/// A worker's mailbox, shared with every thread that forwards work to it.
struct Slot<K, D> {
    queue: Mutex<Vec<Remote<K, D>>>,
    /// Set when the queue may hold work or the port changed state; cleared by the worker.
    pending: AtomicBool,
    alive: AtomicBool,
    /// An eventfd the worker's ring always has a read posted on.
    wake: OwnedFd,
    load: Arc<AtomicUsize>,
}

impl<K, D> Slot<K, D> {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) has no memory arguments; a non-negative return is a new descriptor
        // that only this `OwnedFd` owns.
        let wake = unsafe {
            let fd = libc::eventfd(0, libc::EFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        Ok(Slot {
            queue: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            wake,
            load: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Marks the mailbox and, unless it was already marked, writes the eventfd.
    fn wake(&self) {
        if self.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an eventfd this slot owns.
        let n = unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if n < 0 {
            tracing::warn!("waking a worker failed: {}", io::Error::last_os_error());
        }
    }
}

/// An operation id: the worker that runs it in the top bits, a sequence number below (47 bits:
/// ids with bit 47 set name slots of the worker's in-flight slab, see `inflight`).
fn pack_id(worker: usize, seq: u64) -> u64 {
    worker_bits(worker) | (seq & ((1 << (ID_WORKER_SHIFT - 1)) - 1))
}

/// The worker's part of its operations' ids.
fn worker_bits(worker: usize) -> u64 {
    (worker as u64) << ID_WORKER_SHIFT
}

/// The worker an operation id belongs to.
fn id_worker(id: u64) -> usize {
    (id >> ID_WORKER_SHIFT) as usize
}

/// A driver's result (bytes, or a negated errno) as the operation's result.
fn decode_result(kind: OpKind, res: i32) -> io::Result<usize> {
    match (kind, res) {
        (OpKind::Timeout, r) if r == -libc::ETIME => Ok(0),
        (_, r) if r < 0 => Err(errno(-r)),
        (_, r) => Ok(r as usize),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves only a Vec behind, which is still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Sets or clears `O_NONBLOCK`.
pub(crate) fn set_nonblocking(fd: &OwnedFd, on: bool) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor owned by the caller; no memory is passed.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let new = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        if new != flags && libc::fcntl(raw, libc::F_SETFL, new) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The record every idle connection's armed receive keeps (with a small per-I/O data, as
    /// `ringport serve`'s): its flags share one word with the receive's byte limit.
    #[test]
    fn an_operation_record_stays_within_three_words() {
        assert!(std::mem::size_of::<Pending<u32, u8>>() <= 24);
        assert!(std::mem::size_of::<Option<Pending<u32, u8>>>() <= 24);
    }

    /// A port, its one worker, our end of a connection associated with it, and the peer's end.
    type Faulty = (Port<(), u8>, Worker<(), u8>, Handle<()>, TcpStream);

    /// A connected TCP pair: (our end, the peer's end).
    fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (l.accept().unwrap().0, peer)
    }

    /// A one-worker port on `backend` whose worker injects `faults`, and a connected TCP pair
    /// (our end associated); `None` where the kernel refuses io_uring (the caller skips it).
    fn faulty_pair(backend: Backend, faults: &str) -> Option<Faulty> {
        let built = Port::builder()
            .workers(1)
            .backend(backend)
            .build::<(), u8>();
        let (port, mut workers) = match built {
            Err(e)
                if peer_common::uring_check::refusal_skips()
                    && peer_common::uring_check::names_refusal(&e.to_string()) =>
            {
                println!("SKIPPED for {backend}: {e}");
                return None;
            }
            built => built.unwrap(),
        };
        let mut w = workers.pop().unwrap();
        w.faults = Some(Arc::new(Faults::parse(faults).unwrap()));
        let (ours, peer) = tcp_pair();
        let h = port.associate(ours, ()).unwrap();
        Some((port, w, h, peer))
    }

    /// A cancel the kernel would not queue is asked again while the worker waits, not after a
    /// completion that may never come: an idle receive's cancel, and a shutdown's (its wake-up
    /// taken by a wait before), each kept from the kernel twice, still end the receive and the
    /// worker's wait.
    #[test]
    fn a_cancel_left_unqueued_is_asked_again_without_waiting_on_a_completion() {
        for backend in [Backend::Epoll, Backend::Uring] {
            for shutdown in [false, true] {
                let Some((port, mut w, h, _peer)) = faulty_pair(backend, "cancel=EAGAIN/1*2")
                else {
                    continue;
                };
                let what = format!("{backend}, shutdown {shutdown}");
                let id = w.submit(Op::recv(&h, Vec::with_capacity(8)), 1);
                if shutdown {
                    port.shutdown();
                    // Takes the wake-up, and the shutdown's first cancel fails.
                    assert!(
                        matches!(w.dequeue(Some(Duration::ZERO)), Err(WaitError::TimedOut)),
                        "{what}"
                    );
                } else {
                    assert_eq!(w.cancel(id), CancelOutcome::Requested, "{what}");
                }
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let first = w.dequeue(None);
                    let _ = tx.send(format!(
                        "{:?}",
                        first.map(|c| (c.data, c.result.map_err(|e| e.raw_os_error())))
                    ));
                    port.shutdown();
                    let second = w.dequeue(None);
                    let _ = tx.send(format!("{:?}", second.map(|c| c.data)));
                });
                // Bounds for a hang, not timings: each takes a millisecond or two.
                let first = rx.recv_timeout(Duration::from_secs(20));
                let cancelled = format!(
                    "{:?}",
                    Ok::<_, ()>((1, Err::<(), _>(Some(libc::ECANCELED))))
                );
                assert_eq!(first, Ok(cancelled), "{what}: the cancelled receive");
                let second = rx.recv_timeout(Duration::from_secs(20));
                let shut = format!("{:?}", Err::<u8, _>(WaitError::Shutdown));
                assert_eq!(second, Ok(shut), "{what}: the shutdown");
                drop(h);
            }
        }
    }

    /// An injected receive error does not end the connection, and a failing wait loses
    /// nothing: the receive waiting in the kernel as it failed gets the peer's bytes after it.
    #[test]
    fn injected_wait_and_receive_failures_lose_nothing() {
        use std::io::Write;
        for backend in [Backend::Epoll, Backend::Uring] {
            let Some((_port, mut w, h, mut peer)) =
                faulty_pair(backend, "recv=ECONNRESET/1*1,wait=EIO/1*1")
            else {
                continue;
            };
            w.submit(Op::recv(&h, Vec::with_capacity(8)), 10);
            let c = w.dequeue(Some(Duration::from_secs(10))).unwrap();
            assert_eq!(
                (c.data, c.result.map_err(|e| e.raw_os_error()).err()),
                (10, Some(Some(libc::ECONNRESET))),
                "{backend}"
            );
            assert!(c.buf.is_some(), "{backend}: its buffer comes back");
            // A receive waiting in the kernel as the wait fails: it is still there after.
            w.submit(Op::recv(&h, Vec::with_capacity(16)), 11);
            match w.dequeue(Some(Duration::from_secs(10))) {
                Err(WaitError::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EIO)),
                other => panic!("{backend}: the failing wait: {:?}", other.map(|c| c.data)),
            }
            peer.write_all(b"still here").unwrap();
            let c = w.dequeue(Some(Duration::from_secs(10))).unwrap();
            assert_eq!(c.data, 11);
            assert_eq!(c.buf.as_deref(), Some(&b"still here"[..]), "{backend}");
        }
    }

    /// A `short` fault sends one byte of a send at once: a send then goes on and completes
    /// whole, every byte in order, on both backends; one posted with `Op::partial` completes
    /// with that byte.
    #[test]
    fn a_short_fault_makes_a_whole_send_go_on_and_a_partial_one_stop() {
        use std::io::Read;
        for backend in [Backend::Epoll, Backend::Uring] {
            let Some((_port, mut w, h, mut peer)) = faulty_pair(backend, "send=short") else {
                continue;
            };
            let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
            w.submit(Op::send(&h, data.clone(), 0), 1);
            let c = w.dequeue(Some(Duration::from_secs(10))).unwrap();
            assert_eq!((c.data, c.result.unwrap()), (1, data.len()), "{backend}");
            let mut got = vec![0u8; data.len()];
            peer.read_exact(&mut got).unwrap();
            assert!(got == data, "{backend}: the peer got other bytes");
            w.submit(Op::send(&h, data.clone(), 0).partial(), 2);
            let c = w.dequeue(Some(Duration::from_secs(10))).unwrap();
            assert_eq!((c.data, c.result.unwrap()), (2, 1), "{backend}");
        }
    }

    /// A send that an injected error fails as it leaves the queue behind another acts as one
    /// the kernel fails: the send queued behind it, which would follow the missing bytes, is
    /// cancelled; one posted after its completion was handed out goes.
    #[test]
    fn an_injected_send_error_cancels_the_sends_queued_behind_it() {
        use std::io::Read;
        for backend in [Backend::Epoll, Backend::Uring] {
            // The first send checked goes; the second fails.
            let Some((port, mut w, h, mut peer)) = faulty_pair(backend, "send=ECONNRESET/2*1")
            else {
                continue;
            };
            // Larger than the socket buffers: the sends behind it are queued.
            let first: Vec<u8> = (0..(32u32 << 20)).map(|i| (i % 251) as u8).collect();
            w.submit(Op::send(&h, first.clone(), 0), 1);
            w.submit(Op::send(&h, b"second".to_vec(), 0), 2);
            w.submit(Op::send(&h, b"third".to_vec(), 0), 3);
            let mut reader = peer.try_clone().unwrap();
            let len = first.len();
            let reading = std::thread::spawn(move || {
                let mut got = vec![0u8; len];
                reader.read_exact(&mut got).map(|()| got)
            });
            let mut results = Vec::new();
            while results.len() < 3 {
                let c = w.dequeue(Some(Duration::from_secs(10))).unwrap();
                let n = c.result.as_ref().map_err(|e| e.raw_os_error());
                results.push((c.data, n.copied()));
            }
            assert_eq!(
                results,
                [
                    (1, Ok(len)),
                    (2, Err(Some(libc::ECONNRESET))),
                    (3, Err(Some(libc::ECANCELED)))
                ],
                "{backend}"
            );
            assert!(reading.join().unwrap().unwrap() == first, "{backend}");
            w.submit(Op::send(&h, b"fourth".to_vec(), 0), 4);
            let c = w.dequeue(Some(Duration::from_secs(10))).unwrap();
            assert_eq!((c.data, c.result.as_ref().ok()), (4, Some(&6)), "{backend}");
            drop((c, h, w, port));
            let mut rest = Vec::new();
            peer.read_to_end(&mut rest).unwrap();
            assert_eq!(rest, b"fourth", "{backend}");
        }
    }

    /// Per-I/O data whose clone panics for one value, as a caller's might.
    #[derive(Debug)]
    struct Fussy(u8);

    impl Clone for Fussy {
        fn clone(&self) -> Self {
            assert_ne!(self.0, 1, "Fussy(1) is not cloned");
            Fussy(self.0)
        }
    }

    /// A panic in the caller's clone of a multishot completion's per-I/O data loses none of
    /// the other events reaped with it: the next dequeue brings the other connection's data.
    /// The operation whose completion was lost is cancelled.
    #[test]
    fn a_panicking_clone_loses_no_other_completion_of_its_batch() {
        let (port, mut workers) = Port::builder()
            .workers(1)
            .backend(Backend::Epoll)
            .recv_pool(4096, 8)
            .build::<(), Fussy>()
            .unwrap();
        let mut w = workers.pop().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peers = Vec::new();
        for tag in [1, 2] {
            let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (ours, _) = l.accept().unwrap();
            let h = port.associate(ours, ()).unwrap();
            w.submit_multishot(Op::recv_pooled(&h), Fussy(tag));
            peers.push(peer);
        }
        assert!(matches!(
            w.dequeue(Some(Duration::ZERO)),
            Err(WaitError::TimedOut)
        ));
        // Both arrive before the next wait, so that one reap brings both: 1's first.
        for peer in &mut peers {
            std::io::Write::write_all(peer, b"data").unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            w.dequeue(Some(Duration::from_secs(10)))
        }));
        assert!(panicked.is_err(), "Fussy(1)'s clone panics");
        let c = w.dequeue(Some(Duration::from_secs(10))).unwrap();
        assert_eq!((c.data.0, c.result.unwrap()), (2, 4));
        // The receive whose completion was lost ends, rather than going on past the bytes
        // that completion held.
        std::io::Write::write_all(&mut peers[0], b"more").unwrap();
        let c = w.dequeue(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(c.data.0, 1);
        assert!(!c.more && c.is_cancelled(), "{c:?}");
    }

    /// On epoll, which cancels nothing when a thread exits, an `ECANCELED` is never taken for
    /// the kernel's own and started again: not even on a worker that moved between threads
    /// after sixteen cancels of its socket, which bring a socket's count of them round.
    #[test]
    fn epoll_never_undoes_a_cancel() {
        let (port, mut workers) = Port::builder()
            .workers(1)
            .backend(Backend::Epoll)
            .build::<(), u8>()
            .unwrap();
        let w = workers.pop().unwrap();
        // Used from a second thread, then this one: a worker that moved.
        let mut w = std::thread::spawn(move || {
            let mut w = w;
            assert!(matches!(
                w.dequeue(Some(Duration::ZERO)),
                Err(WaitError::TimedOut)
            ));
            w
        })
        .join()
        .unwrap();
        let (ours, _peer) = tcp_pair();
        let h = port.associate(ours, ()).unwrap();
        w.submit(Op::recv(&h, Vec::with_capacity(8)), 1);
        for _ in 0..16 {
            w.cancel_all(&h);
        }
        let c = w.dequeue(Some(Duration::from_secs(10))).unwrap();
        assert!(c.is_cancelled(), "{:?}", c.result);
    }

    /// What `built` built, or `None` (saying `SKIPPED`) where io_uring was refused and the
    /// tests may skip it.
    #[allow(clippy::type_complexity)]
    fn built_or_skipped<K, D>(
        backend: Backend,
        built: io::Result<(Port<K, D>, Vec<Worker<K, D>>)>,
    ) -> Option<(Port<K, D>, Vec<Worker<K, D>>)> {
        match built {
            Err(e)
                if backend == Backend::Uring
                    && peer_common::uring_check::refusal_skips()
                    && peer_common::uring_check::names_refusal(&e.to_string()) =>
            {
                println!("SKIPPED (io_uring): {e}");
                None
            }
            b => Some(b.unwrap()),
        }
    }

    /// A key whose `drop` panics (when it was made to).
    struct PanicsOnDrop(bool);

    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            assert!(!self.0, "the key's drop panics");
        }
    }

    /// A cancel from another thread whose handle is the socket's last: the key's `drop`, run
    /// by the worker as it takes its mailbox, panics, and what was queued behind the cancel is
    /// still delivered.
    #[test]
    fn a_key_that_panics_when_dropped_loses_nothing_queued_behind_it() {
        for backend in [Backend::Epoll, Backend::Uring] {
            let Some((port, mut workers)) =
                built_or_skipped(backend, Port::builder().workers(1).backend(backend).build())
            else {
                continue;
            };
            let mut w = workers.pop().unwrap();
            let (ours, _peer) = tcp_pair();
            let h = port.associate(ours, PanicsOnDrop(true)).unwrap();
            port.cancel_all(&h);
            drop(h);
            assert!(port.post(0, Packet::new(7)).is_ok());
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                w.dequeue(Some(Duration::from_secs(10)))
            }));
            assert!(panicked.is_err(), "{backend}: the key's drop panics");
            let c = w
                .dequeue(Some(Duration::from_secs(10)))
                .unwrap_or_else(|e| panic!("{backend}: the packet posted after it: {e}"));
            assert_eq!(c.data, 7, "{backend}");
        }
    }

    /// Per-I/O data whose clone panics the first time only (of all its values).
    #[derive(Debug)]
    struct PanicsOnce(u8);

    static PANICKED_ONCE: AtomicBool = AtomicBool::new(false);

    impl Clone for PanicsOnce {
        fn clone(&self) -> Self {
            assert!(
                PANICKED_ONCE.swap(true, Ordering::SeqCst),
                "the first clone panics"
            );
            PanicsOnce(self.0)
        }
    }

    /// The completions of a multishot receive that come after the one lost to a panic in the
    /// caller's clone (already reaped with it, or arriving before the cancel takes effect) are
    /// dropped, not handed out: their bytes would follow the gap. The receive ends cancelled.
    #[test]
    fn completions_after_one_lost_to_a_panicking_clone_are_dropped() {
        let cases = [Backend::Epoll, Backend::Uring].map(|b| [(b, false), (b, true)]);
        // With a byte limit (12), the receive's last completion brings the last bytes.
        for (backend, limited) in cases.into_iter().flatten() {
            let built = Port::builder()
                .workers(1)
                .backend(backend)
                .recv_pool(4, 8)
                .build::<(), PanicsOnce>();
            let Some((port, mut workers)) = built_or_skipped(backend, built) else {
                continue;
            };
            PANICKED_ONCE.store(false, Ordering::SeqCst);
            let mut w = workers.pop().unwrap();
            let (ours, mut peer) = tcp_pair();
            let h = port.associate(ours, ()).unwrap();
            let op = if limited {
                Op::recv_pooled_max(&h, std::num::NonZeroU32::new(12).unwrap())
            } else {
                Op::recv_pooled(&h)
            };
            w.submit_multishot(op, PanicsOnce(1));
            assert!(matches!(
                w.dequeue(Some(Duration::ZERO)),
                Err(WaitError::TimedOut)
            ));
            // Three 4-byte pool buffers' worth, before the worker waits again.
            std::io::Write::write_all(&mut peer, b"aaaabbbbcccc").unwrap();
            std::thread::sleep(Duration::from_millis(100));
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                w.dequeue(Some(Duration::from_secs(10)))
            }));
            assert!(panicked.is_err(), "{backend}: the first clone panics");
            let c = w.dequeue(Some(Duration::from_secs(10))).unwrap();
            assert!(
                !c.more && c.is_cancelled(),
                "{backend} (limited: {limited}): the receive ends, nothing after the gap: {c:?}"
            );
        }
    }

    /// A cancel of every operation of another port's socket, asked of this port, changes
    /// nothing of that socket's state (which is its own worker's to change).
    #[test]
    fn cancelling_another_ports_socket_leaves_it_alone() {
        let build = || {
            Port::builder()
                .workers(1)
                .backend(Backend::Epoll)
                .build::<(), u8>()
                .unwrap()
        };
        let (_ours, mut ours_w) = build();
        let (theirs, _theirs_w) = build();
        let (s, _peer) = tcp_pair();
        let h = theirs.associate(s, ()).unwrap();
        ours_w[0].cancel_all(&h);
        assert_eq!(h.cancels(), 0);
    }

    /// An operation posted from another thread whose id has come round to that of one still
    /// in flight (after 2^47 such ids) completes at once with an error, and the one in flight
    /// keeps its record: its completion still comes, with its own per-I/O data.
    #[test]
    fn a_posted_operation_whose_id_came_round_leaves_the_one_in_flight_alone() {
        let (port, mut workers) = Port::builder()
            .workers(1)
            .backend(Backend::Epoll)
            .build::<(), u8>()
            .unwrap();
        let mut w = workers.pop().unwrap();
        let (ours, mut peer) = tcp_pair();
        let h = port.associate(ours, ()).unwrap();
        let seq = port.shared.next_seq.load(Ordering::Relaxed);
        let first = port
            .submit(Op::recv(&h, Vec::with_capacity(16)), 1)
            .unwrap();
        assert!(matches!(
            w.dequeue(Some(Duration::ZERO)),
            Err(WaitError::TimedOut)
        ));
        port.shared
            .next_seq
            .store(seq + (1 << 47), Ordering::Relaxed);
        let second = port
            .submit(Op::recv(&h, Vec::with_capacity(16)), 2)
            .unwrap();
        assert_eq!(first, second, "the id came round");
        let c = w.dequeue(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(c.data, 2);
        assert_eq!(
            c.result.unwrap_err().kind(),
            io::ErrorKind::AddrInUse,
            "the second is refused"
        );
        std::io::Write::write_all(&mut peer, b"hi").unwrap();
        let c = w.dequeue(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(
            (c.data, c.result.unwrap()),
            (1, 2),
            "the first completes as its own"
        );
    }

    /// A single-issuer worker dropped on another thread than the one that waited on it, with
    /// nothing in flight, frees its receive pool: only what may still be in the kernel is
    /// leaked.
    #[test]
    fn a_single_thread_worker_dropped_elsewhere_with_nothing_in_flight_frees_its_pool() {
        use peer_common::uring_check;
        let built = Port::builder()
            .workers(1)
            .backend(Backend::Uring)
            .single_thread_workers(true)
            .recv_pool(4096, 8)
            .build::<(), ()>();
        let (_port, mut workers) = match built {
            Err(e)
                if uring_check::refusal_skips() && uring_check::names_refusal(&e.to_string()) =>
            {
                println!("SKIPPED: {e}");
                return;
            }
            built => built.unwrap(),
        };
        let worker = workers.pop().unwrap();
        if !worker.single_thread() && uring_check::refusal_skips() {
            println!("SKIPPED: no single-issuer rings (Linux 6.1)");
            return;
        }
        let pool = Arc::downgrade(worker.pool.as_ref().expect("a pool"));
        let mut worker = std::thread::spawn(move || {
            let mut worker = worker;
            assert!(matches!(
                worker.dequeue(Some(Duration::from_millis(1))),
                Err(WaitError::TimedOut)
            ));
            worker
        })
        .join()
        .unwrap();
        // Bound to the other thread now: a wait from here fails.
        assert!(worker.dequeue(Some(Duration::from_millis(1))).is_err());
        drop(worker);
        assert!(pool.upgrade().is_none(), "the pool was leaked");
    }

    /// Every idle connection's armed receive has one of these records in its worker's slab: the
    /// receive limit fits in its padding (with per-I/O data of a byte, as `ringport serve`'s).
    /// An operation refused before it started comes back as it was built: kind, handle and
    /// body (buffer bytes, send offset, receive limit).
    #[test]
    fn records_give_back_the_operation_they_were_made_from() {
        let (port, _workers) = Port::builder()
            .workers(1)
            .backend(Backend::Epoll)
            .build::<u8, u8>()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let h = port.associate(listener, 3).unwrap();
        let back = |op: Op<u8>| {
            let (op, data) = port.shared.record(op, 9, None).into_parts();
            assert_eq!(data, 9);
            assert!(op.handle.as_ref().is_none_or(|k| Handle::ptr_eq(k, &h)));
            (op.kind, op.body)
        };
        let mut buf = Vec::with_capacity(32);
        buf.extend_from_slice(b"abc");
        assert!(matches!(
            back(Op::recv(&h, buf)),
            (OpKind::Recv, Some(OpBody::Recv(b))) if b == b"abc" && b.capacity() >= 32
        ));
        assert!(matches!(
            back(Op::send(&h, b"hello".to_vec(), 2)),
            (OpKind::Send, Some(OpBody::Send(b, 2))) if b == b"hello"
        ));
        let limit = std::num::NonZeroU32::new(4096).unwrap();
        assert!(matches!(
            back(Op::recv_pooled_max(&h, limit)),
            (OpKind::RecvPooled, Some(OpBody::RecvPooled(4096)))
        ));
        assert!(matches!(
            back(Op::recv_pooled(&h)),
            (OpKind::RecvPooled, Some(OpBody::RecvPooled(0)))
        ));
        assert!(matches!(
            back(Op::timeout(Duration::from_millis(7))),
            (OpKind::Timeout, Some(OpBody::Timeout(d, _))) if d == Duration::from_millis(7)
        ));
        assert!(matches!(
            back(Op::accept_multishot(&h)),
            (OpKind::Accept, Some(OpBody::AcceptMulti))
        ));
        assert!(matches!(
            back(Op::connect(&h, addr)),
            (OpKind::Connect, Some(OpBody::Connect(a))) if a.as_socket() == Some(addr)
        ));
        assert!(matches!(back(Op::close(&h)), (OpKind::Close, None)));
    }

    #[test]
    fn operation_records_stay_small() {
        assert!(std::mem::size_of::<Pending<u64, u8>>() <= 24);
    }

    proptest! {
        /// The worker packed into an id comes back out, whatever the sequence number, and
        /// different sequence numbers (below the wrap) give different ids.
        #[test]
        fn ids_carry_their_worker(worker in 0usize..(1 << 16), seq in any::<u64>(), other in any::<u64>()) {
            let id = pack_id(worker, seq);
            prop_assert_eq!(id_worker(id), worker);
            // Sequence ids keep 47 bits: those with bit 47 set name slab slots.
            let mask = (1u64 << (ID_WORKER_SHIFT - 1)) - 1;
            prop_assert_eq!(pack_id(worker, other) == id, other & mask == seq & mask);
            prop_assert!(!crate::inflight::is_local(id & !(0xffff << ID_WORKER_SHIFT)));
        }

        /// Non-negative results are byte counts; negative ones are the errno, except a timeout's
        /// expiry, which is its success.
        #[test]
        fn results_decode(res in any::<i32>(), timeout in any::<bool>()) {
            let kind = if timeout { OpKind::Timeout } else { OpKind::Recv };
            match decode_result(kind, res) {
                Ok(n) => prop_assert!(res >= 0 && n == res as usize || timeout && res == -libc::ETIME && n == 0),
                Err(e) => {
                    prop_assert!(res < 0);
                    prop_assert_eq!(e.raw_os_error(), Some(-res));
                }
            }
        }
    }
}
