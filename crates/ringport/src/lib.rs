//! ringport: a completion port for TCP on Linux, in the model of Windows I/O completion ports.
//!
//! # The model
//!
//! * [`Port::associate`] ties a socket to the port with a *completion key* of your own type `K`
//!   (the per-handle data) and gives back a [`Handle`].
//! * [`Worker::submit`] (or, from any thread, [`Port::submit`]) posts an overlapped [`Op`]:
//!   accept, connect, recv, send, close or timeout, with *per-I/O data* of your own type `D`.
//!   It returns at once. The operation owns its buffer until it completes; the buffer comes
//!   back in the [`Completion`], on success and on error alike, so a buffer the kernel may still
//!   write is never reachable from safe code. Several operations may be outstanding on one
//!   socket; its receives run one at a time in the order posted, and so do its sends (a
//!   connect counts as one): the port starts the next only once the one before it completes,
//!   on both backends, so the bytes come in and go out in the order the operations were
//!   posted, whether through the port or the worker. (The order is kept per [`Handle`]: two
//!   handles of one socket, associated from duplicated descriptors, run side by side; on
//!   io_uring, though, closing one, or cancelling all of its operations, also cancels the
//!   other's operations in the kernel on the same worker: the kernel matches the socket, not
//!   the descriptor; on a worker that has moved between threads, those are started again,
//!   see [`Worker`].) Accepts on a listener run side by side too. A send on a stream completes
//!   once all of its bytes have gone out, as a completion port's does: where the kernel takes
//!   only part, the port sends the rest before the socket's next send, so several sends
//!   posted together go out whole and in order. One that fails, or is cancelled after part of
//!   it went, completes with the error or the count that went out, and leaves a gap in the
//!   stream: the socket's sends queued behind it, and those posted until its completion is
//!   dequeued, complete with `ECANCELED` (theirs would follow the gap); once the caller has
//!   it, it decides (send the rest again, or close). A send cancelled before any of it went is
//!   only taken out, as a queued one is. ([`Op::partial`] lets a send complete with the
//!   kernel's part instead, for a caller that keeps one send in flight per socket.)
//! * Worker threads call [`Worker::dequeue`] (`GetQueuedCompletionStatus`) or
//!   [`Worker::dequeue_batch`] with a timeout (`Some(ZERO)` polls, `None` waits forever) and get
//!   the byte count or the errno, the key (via [`Completion::handle`]), and the per-I/O data. A
//!   timeout ([`WaitError::TimedOut`]) is not a failed operation (a completion whose `result` is
//!   `Err`).
//! * [`Port::post`] sends a custom [`Packet`] to a worker from any thread
//!   (`PostQueuedCompletionStatus`).
//! * An operation or packet posted to a worker that is already gone comes back to the caller:
//!   in a [`Rejected`] from [`Port::submit`] and [`Port::post`], or as a completion with
//!   `ECANCELED` (buffer included) from [`Worker::submit`]. (Dropping a worker drops the work
//!   posted to it that it had not taken: see [`Worker`].)
//! * [`Worker::cancel`] cancels one operation, [`Worker::cancel_all`] every operation of a socket
//!   (`CancelIoEx`); cancelled operations still complete, with `ECANCELED`.
//! * [`Port::shutdown`] cancels everything in flight; each worker delivers those completions
//!   (with `ECANCELED`, or the result of what ended first, such as a send's count that went
//!   part-way), then reports [`WaitError::Shutdown`]. Dropping a [`Worker`] cancels and *waits
//!   for* its operations before their memory is freed (and leaks rather than frees, should the
//!   kernel never give one back).
//!
//! # Threads
//!
//! A port has `n` workers (default: one per available core); give each [`Worker`] to a thread.
//! Each worker owns one io_uring instance (or one epoll instance): a ring's submission queue
//! wants a single issuer, and one ring per worker needs no lock. A [`Worker`] may move between
//! threads, but is used by one at a time.
//! Every [`Handle`] has a *home* worker, chosen when it is associated: the worker with the fewest
//! live handles at that moment ([`Port::associate`]), or one you name
//! ([`Port::associate_with`]). A listener's accepted connections are therefore spread evenly
//! when the accepting code associates each one with [`Port::associate`]: placement is decided
//! by load, not by the kernel's `SO_REUSEPORT` hash.
//!
//! All operations on a socket run on its home worker's ring, and that worker alone dequeues
//! their completions, so per-connection state needs no locks when it is only touched from
//! completions. An operation posted from another thread or worker is forwarded: it is put in
//! the home worker's mailbox and the worker is woken through an eventfd on which its ring
//! always has a read outstanding. Posted packets travel the same way.
//!
//! # Backends
//!
//! Both backends produce the same completions through the same API, but for the known
//! differences below; [`Port::backend`] says which one runs. [`Builder::backend`] chooses: [`Backend::Auto`] (the default) probes io_uring when
//! the port is built (ring creation, the `EXT_ARG` and `NODROP` features, and every opcode the
//! port uses) and falls back to epoll when it is refused, logging the reason once.
//!
//! | backend | kernel | how | known differences |
//! |---|---|---|---|
//! | `io_uring` | Linux 5.19+ (`EXT_ARG`, `NODROP`, `ASYNC_CANCEL` by fd and "any") | one ring per worker; an operation's SQEs carry its [`OpId`] as `user_data` (a send on a stream that the kernel takes in parts is sent on in further SQEs; a multishot operation completes once per CQE); sockets are kept in blocking mode (the ring waits on them) | the kernel owns an operation's buffer until its last CQE: cancellation and shutdown wait for it; an accept takes `RLIMIT_NOFILE` as it is when posted, and with no descriptor free under it fails with `EMFILE` at once, a connection waiting or not; in a time namespace that moves the monotonic clock, a timeout counts from the worker's next wait, not from its start |
//! | `epoll` | any Linux | one epoll instance per worker; each socket registered once, edge-triggered for both directions, until its close (no `epoll_ctl` per message); per socket, one queue of operations per direction, run in posting order until `EAGAIN` (a pooled receive that fills less than a buffer ends the turn: the next arrival raises a new edge); timeouts from a timer heap; sockets are put in non-blocking mode | an operation that can finish at once does so inside `submit` (its completion is still queued, never skipped), unless it waits behind another on its socket; cancellation is immediate; with no descriptor free, the accepts on a listener fail with `EMFILE` when a connection comes, every one then posted; timeouts and waits count whole milliseconds; a socket is registered when its first operation starts, which fails with `ENOSPC` (`fs.epoll.max_user_watches`) or `ENOMEM` should that registration fail |
//!
//! Where io_uring is refused: Docker's default seccomp profile (`EPERM`), the sysctl
//! `kernel.io_uring_disabled` (Linux 6.6+), kernels older than the features above (`ENOSYS`,
//! `EINVAL`, missing opcodes; a port with a receive pool also needs multishot receives, Linux
//! 6.0), or memory the kernel will not give the ring (`ENOMEM`). The
//! environment variable named by [`FAULT_URING_SETUP_ENV`] makes the probe fail on purpose, to
//! test the fallback.
//!
//! # Example: the book's echo server
//!
//! One receive buffer per connection, as in the book (`examples/echo.rs`; `ringport serve` uses
//! pooled receives instead, so that idle connections hold no buffer):
//!
//! ```no_run
#![doc = include_str!("../examples/echo.rs")]
//! ```
//!
//! # Receive pools and multishot receives
//!
//! [`Builder::recv_pool`] gives each worker a pool of buffers; [`Op::recv_pooled`], posted once
//! with [`Worker::submit_multishot`], then completes every time data arrives, each time with a
//! [`PoolBuf`] taken from the pool when the data arrived. A connection waiting for input holds
//! no buffer, which is what lets one process hold tens of thousands of idle connections.
//! Buffers can be filled incrementally (always on epoll; on io_uring with
//! [`Builder::recv_pool_incremental`], Linux 6.12, else whole buffers): each receive, whatever
//! its socket, goes on where the previous one stopped, so small messages share a buffer instead
//! of taking, and paging in, one each. A
//! [`PoolBuf`] is a slice of a buffer; it can be echoed as it is with [`Op::send_pooled`], and
//! the buffer goes back to the pool once it is full and all its slices are dropped (without
//! incremental filling, once its one slice is dropped).
//! Buffers that piled up while a send was in flight go out together with
//! [`Op::send_pooled_gather`]: one `sendmsg` for all of them instead of one send each, which is
//! what keeps large messages and streams cheap (`BENCHMARKS.md`).
//! When no buffer is free the receive ends with `ENOBUFS`: at once when posted then, else when
//! the socket next has something to report (data, the peer's FIN or an error, which wait in the
//! socket for the receive posted next); post it again once [`Worker::pool_available`] is
//! non-zero. On io_uring the kernel picks buffers from a ring that
//! holds only part of the pool, as much as recent demand needed, topped up before each wait
//! with the buffers returned most recently (epoll likewise reuses the most recent first), so a
//! lightly loaded worker keeps touching the same few pages of a large pool. That ring can run
//! dry between two waits while the pool still has buffers (a sudden burst, more so with whole
//! buffers), so on io_uring `ENOBUFS` can come with [`Worker::pool_available`] above zero: post
//! the receive again at once then.
//!
//! Where every connection keeps more in flight than the pool holds, a worker would lend out all
//! of its buffers and cycle through them, the bytes between a receive and its echo spanning the
//! whole pool: past the cache, for a large one. [`Builder::recv_pool_working_set`] bounds the
//! buffers in circulation; those held for 20 ms count as parked instead, so the whole pool
//! stays available to connections that hold on to their bytes.
//!
//! A multishot receive takes in whatever arrives until it ends; cancelling it takes effect only
//! once the cancel reaches the kernel, by when a fast sender may have filled megabytes of the
//! pool. [`Op::recv_pooled_max`] ends by itself after a given number of bytes, which bounds
//! what a connection can take before the application has seen it (epoll always; io_uring from
//! Linux 6.17, see [`Worker::recv_limits`]).
//!
//! # Backlogs
//!
//! A worker that falls behind (thousands of connections with data at once) hands its
//! completions out in order, and every 64 of them it gives the kernel what was posted meanwhile
//! (the echo of what it handed out). New input is taken in only once most of what the previous
//! reap brought has been handed out: read earlier, it would wait behind that backlog in pool
//! buffers, long enough to leave the cache before it is echoed, and a worker that keeps falling
//! behind would take input in faster than it serves it, until its pool ran dry. Until then the
//! input waits in the kernel's socket buffers. This holds on epoll, and on io_uring with
//! [`Builder::single_thread_workers`], whose deferred task work (the kernel's part of most
//! operations) runs only when the worker asks for completions; other io_uring rings take input
//! in as it arrives. Meanwhile a worker collects what completes without new input: on epoll,
//! operations that finish at once, cancellations and timers; on io_uring, sends that find room
//! as they are submitted. Its other completions (timeouts, cancellations, sends that waited for
//! room) come with the next input, so they wait at most as long as the backlog that was there
//! before them. Completions the worker queues for itself meanwhile (posted packets) go behind
//! the backlog and count in the next one: they do not hold input back for longer.
//!
//! # Porting from Windows
//!
//! [`porting_from_iocp`] maps each IOCP call (`CreateIoCompletionPort`, `AcceptEx`, `WSARecv`,
//! `GetQueuedCompletionStatus`, `PostQueuedCompletionStatus`, `CancelIoEx`, ...) to its
//! counterpart here, and lists what changes a program's structure.
//!
//! # Fault injection
//!
//! Setting [`FAULTS_ENV`] makes chosen operations fail with chosen errors (or sends short),
//! so that an application's error paths can be tested against a real port.

#![deny(missing_docs)]

mod fault;
mod handle;
mod inflight;
mod op;
mod pool;
mod port;
mod sys;

#[doc = include_str!("../docs/porting-from-iocp.md")]
pub mod porting_from_iocp {}

pub use fault::FAULTS_ENV;
pub use handle::Handle;
pub use op::{Completion, IdHasher, Op, OpId, OpKind, Packet};
pub use pool::PoolBuf;
pub use port::{
    Backend, Builder, CancelOutcome, Port, Rejected, WaitError, Worker, FAULT_URING_SETUP_ENV,
};
