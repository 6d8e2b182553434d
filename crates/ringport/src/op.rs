//! Operations (the overlapped requests) and their completions.

use std::fmt;
use std::hash::Hasher;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use crate::handle::Handle;
use crate::pool::PoolBuf;
use crate::sys::{Gather, OpBody};

/// Identifies one posted operation, for [`Worker::cancel`](crate::Worker::cancel) and to match
/// a completion with what was posted. Unique among a port's operations in flight; once an
/// operation has completed, its id may in time (after many later operations) be given to
/// another, as an `OVERLAPPED` address is reused on Windows: cancel only operations whose last
/// completion has not been dequeued. An id means something only to the port that gave it: the
/// ports of a process number their operations alike, so given to another port's cancel it can
/// name one of that port's operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(NonZeroU64);

impl OpId {
    /// Wraps an id made by the port (never 0).
    pub(crate) fn from_raw(id: u64) -> OpId {
        debug_assert_ne!(id, 0, "operation ids are never 0");
        OpId(NonZeroU64::new(id).unwrap_or(NonZeroU64::MIN))
    }

    /// The id as a number (never 0, so an `Option<OpId>` takes no more room than an id).
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

/// A [`Hasher`] for maps keyed by [`OpId::get`] or other unique integer ids (connection
/// numbers, counters): cheaper than the default SipHash, which guards against keys chosen by an
/// adversary, a risk ids handed out by the program do not carry. Use it as
/// `HashMap<u64, V, BuildHasherDefault<IdHasher>>`.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // Spread sequential ids over the whole word (hash tables use the top bits too).
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// What kind of operation a completion is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OpKind {
    /// [`Op::accept`] or [`Op::accept_multishot`]: on success, [`Completion::accepted`] holds
    /// the new connection.
    Accept,
    /// [`Op::connect`]: a refusal (or another error that ended the handshake) is reported
    /// as such even where another operation on the socket saw it first.
    Connect,
    /// [`Op::recv`]: the byte count was appended to the buffer; `0` means the peer closed.
    /// A connection that ended in an error (a reset, a refusal, a timeout) reports that error,
    /// not `0`, even where another operation on the socket saw it first (the kernel hands it
    /// to one operation only). (On a socket with `IP_RECVERR` set, where an ICMP error such as
    /// `EHOSTUNREACH` reaches an operation without ending the connection, the end of that
    /// connection's stream reports the error too.)
    Recv,
    /// [`Op::send`], [`Op::send_pooled`] or [`Op::send_pooled_gather`]: on a stream, the byte
    /// count is all that was asked unless the send failed or was cancelled (by a cancel, a
    /// close or the port's shutdown) after part of it went, or was posted with
    /// [`Op::partial`]: check it against what was asked.
    Send,
    /// [`Op::recv_pooled`]: each completion carries [`Completion::pooled`]; `0` means the peer
    /// closed (an error that ended the connection is reported as for [`OpKind::Recv`]); `ENOBUFS` means no buffer was free (post it again, see [`Op::recv_pooled`]).
    RecvPooled,
    /// [`Op::close`].
    Close,
    /// [`Op::timeout`]: `Ok(0)` when it expired.
    Timeout,
    /// A packet posted with [`Port::post`](crate::Port::post) or
    /// [`Worker::post`](crate::Worker::post).
    Packet,
}

/// An operation to post: built without side effects, then handed to
/// [`Worker::submit`](crate::Worker::submit) or [`Port::submit`](crate::Port::submit) together
/// with its per-I/O data. An operation owns its buffer until it completes; the buffer comes back
/// in the [`Completion`], on success and on error alike.
#[must_use = "an operation does nothing until it is submitted"]
pub struct Op<K> {
    pub(crate) handle: Option<Handle<K>>,
    pub(crate) kind: OpKind,
    pub(crate) body: Option<OpBody>,
    /// A send that may complete with part of its bytes ([`Op::partial`]).
    pub(crate) partial: bool,
}

impl<K> Op<K> {
    fn new(handle: Option<&Handle<K>>, kind: OpKind, body: Option<OpBody>) -> Self {
        Op {
            handle: handle.cloned(),
            kind,
            body,
            partial: false,
        }
    }

    /// Lets a send complete with the part the kernel takes at once, as `send(2)` does, instead
    /// of going on until all of it has gone out: the rest is the caller's to send. Only for a
    /// caller that keeps one send in flight per socket, as a send posted meanwhile would go out
    /// ahead of the rest. What it saves is the port sending the rest on its own, when the caller
    /// would rather send it together with what came in since (as `ringport serve`'s gathering
    /// sends do), and the wait for the last byte before the buffers come back. No effect on
    /// other operations.
    pub fn partial(mut self) -> Self {
        self.partial = true;
        self
    }

    /// Accept one connection on a listening socket. Post several to keep a pool of pending
    /// accepts (the `AcceptEx` pattern).
    pub fn accept(listener: &Handle<K>) -> Self {
        Op::new(Some(listener), OpKind::Accept, Some(OpBody::Accept))
    }

    /// Accept every connection that arrives, each in a completion of its own with
    /// [`Completion::more`] set, until an error or a cancel ends it (a last completion without
    /// `more`, which may itself carry a connection). Post it with
    /// [`Worker::submit_multishot`](crate::Worker::submit_multishot). Unlike a pool of single
    /// accepts, which takes as many connections per turn of the worker's loop as it has
    /// accepts posted, it takes all that are waiting. On epoll, single accepts posted on the
    /// same listener wait behind it.
    pub fn accept_multishot(listener: &Handle<K>) -> Self {
        Op::new(Some(listener), OpKind::Accept, Some(OpBody::AcceptMulti))
    }

    /// Connect a stream socket to `addr`. One posted while an earlier connect's handshake is
    /// still under way (that one cancelled, say) fails with `EALREADY`, as `connect(2)` does;
    /// such a socket is best closed.
    pub fn connect(socket: &Handle<K>, addr: SocketAddr) -> Self {
        let addr = socket2::SockAddr::from(addr);
        Op::new(
            Some(socket),
            OpKind::Connect,
            Some(OpBody::Connect(Box::new(addr))),
        )
    }

    /// Receive into the spare capacity of `buf` (`buf.len()..buf.capacity()`); the bytes
    /// received are appended to `buf`. A buffer without spare capacity completes at once with
    /// `InvalidInput` (a zero-length receive could not be told apart from the peer closing).
    pub fn recv(socket: &Handle<K>, buf: Vec<u8>) -> Self {
        Op::new(Some(socket), OpKind::Recv, Some(OpBody::Recv(buf)))
    }

    /// Send `buf[offset..]`. On a stream socket it completes once all of it has gone out, as
    /// a completion port's send does: where the kernel takes only part, the port sends the
    /// rest in the same operation, before any later send on the socket (unless posted with
    /// [`Op::partial`]). Cancelled after part of it went, it completes with the count that
    /// went out (`Ok`, less than asked: the rest was not sent); should the kernel fail it
    /// part-way, with that count too, or with the error if none of it went. Either way its
    /// bytes are not all in the stream: the socket's sends queued behind it, and any posted
    /// before its completion is dequeued, complete with `ECANCELED`, as their bytes would
    /// follow the gap (a connect queued among them still runs); what the caller sends once it has that completion goes. (Cancelled
    /// before any of it went, it is only taken out, as a send still queued is.) An `offset`
    /// past the end of `buf` completes at once with `InvalidInput`.
    pub fn send(socket: &Handle<K>, buf: Vec<u8>, offset: usize) -> Self {
        Op::new(Some(socket), OpKind::Send, Some(OpBody::Send(buf, offset)))
    }

    /// Receive whenever data arrives, each time into a buffer of the worker's receive pool
    /// ([`Builder::recv_pool`](crate::Builder::recv_pool)), until the peer closes, an error, a
    /// cancel, or the pool runs dry (`ENOBUFS`). Post it with
    /// [`Worker::submit_multishot`](crate::Worker::submit_multishot). A connection waiting for
    /// input holds no buffer. For stream sockets only: receives share pool buffers (each gets
    /// the room left in the current one), which would cut datagrams short, so on any other
    /// socket it completes at once with `InvalidInput`.
    ///
    /// Its last completion (`more` false) can carry data too: on io_uring the kernel ends a
    /// multishot receive that way when it could not post another completion. Whatever ended it
    /// with data or with `ENOBUFS`, post it again to go on receiving (the crate docs say when
    /// `ENOBUFS` comes while the pool still has buffers). A receive posted on the same handle
    /// while it is armed waits until it ends, on both backends: post one or the other.
    pub fn recv_pooled(socket: &Handle<K>) -> Self {
        Op::new(
            Some(socket),
            OpKind::RecvPooled,
            Some(OpBody::RecvPooled(0)),
        )
    }

    /// [`Op::recv_pooled`] that also ends, with a last completion that carries data, once it
    /// has delivered `max` bytes: backpressure that needs no cancel in time. Without it, input
    /// keeps coming into the pool until a cancel reaches the kernel, which can be megabytes from
    /// a fast sender. The last completion may take it past `max` by up to one pool buffer; post
    /// it again to go on receiving. `max` counts up to 2^31 - 1, the kernel's bound; larger
    /// values count as that.
    ///
    /// The epoll backend always keeps the limit. On io_uring the kernel does
    /// (`IORING_RECV_MULTISHOT` with `optlen`, Linux 6.17) where
    /// [`Worker::recv_limits`](crate::Worker::recv_limits) says so; elsewhere this is
    /// [`Op::recv_pooled`].
    pub fn recv_pooled_max(socket: &Handle<K>, max: NonZeroU32) -> Self {
        Op::new(
            Some(socket),
            OpKind::RecvPooled,
            Some(OpBody::RecvPooled(max.get().min(i32::MAX as u32))),
        )
    }

    /// Send `buf[offset..]` of a pool buffer; the buffer comes back in
    /// [`Completion::pooled`]. An `offset` past the end completes at once with `InvalidInput`.
    pub fn send_pooled(socket: &Handle<K>, buf: PoolBuf, offset: usize) -> Self {
        Op::new(
            Some(socket),
            OpKind::Send,
            Some(OpBody::SendPooled(buf, offset)),
        )
    }

    /// Send several pool buffers in order with one gathering send (`sendmsg`, like `WSASend`
    /// with several `WSABUF`s), starting `offset` bytes into the first. The byte count covers
    /// them all and, as for [`Op::send`], falls short only if the send fails or is cancelled
    /// part-way (or was posted with [`Op::partial`]); the buffers come back, in order, in
    /// [`Completion::gathered`] (and the `Vec`, to be reused for the next send). With one
    /// buffer it sends as [`Op::send_pooled`] does (the buffer still comes back in
    /// [`Completion::gathered`]); past 1024 buffers (the kernel's `UIO_MAXIOV`) the
    /// rest goes in further `sendmsg` calls (with [`Op::partial`], it completes after the
    /// first, its count saying how far that got). An
    /// `offset` past the end of the first buffer completes at once with `InvalidInput`.
    pub fn send_pooled_gather(socket: &Handle<K>, bufs: Vec<PoolBuf>, offset: usize) -> Self {
        Op::new(
            Some(socket),
            OpKind::Send,
            Some(OpBody::SendGather(Box::new(Gather::new(bufs, offset)))),
        )
    }

    /// Close: cancel every operation still outstanding on the socket (each completes with
    /// `ECANCELED`, unless it ended first: one that had finished keeps its result, and a send
    /// part-way out completes `Ok` with the count that went, as for
    /// [`Port::cancel`](crate::Port::cancel)), refuse new ones, a second close included (`EBADF`), and release the
    /// descriptor (FIN) once the last [`Handle`] clone is dropped and every operation holding
    /// one has completed.
    pub fn close(socket: &Handle<K>) -> Self {
        Op::new(Some(socket), OpKind::Close, None)
    }

    /// Complete `after` from when its worker starts it (not from the worker's next wait: at
    /// once when posted on that worker; when the worker takes it from its queue when posted
    /// from another thread), with `Ok(0)`;
    /// `ECANCELED` when cancelled first. A cancel asked once it is due finds it expired
    /// (`Ok(0)`), and one asked before cancels it, however late the worker's next wait comes
    /// (the shutdown's too). A timeout too long for the kernel to represent never fires.
    pub fn timeout(after: Duration) -> Self {
        // The kernel's seconds are signed: more would be read as a negative time.
        let secs = after.as_secs().min(i64::MAX as u64);
        let ts = io_uring::types::Timespec::new()
            .sec(secs)
            .nsec(after.subsec_nanos());
        Op::new(None, OpKind::Timeout, Some(OpBody::Timeout(after, ts)))
    }

    /// The kind of this operation.
    pub fn kind(&self) -> OpKind {
        self.kind
    }
}

impl<K> fmt::Debug for Op<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Op").field("kind", &self.kind).finish()
    }
}

/// A packet for [`Port::post`](crate::Port::post): the `PostQueuedCompletionStatus` analog. It is
/// dequeued as a [`Completion`] of kind [`OpKind::Packet`] with `result == Ok(bytes)`.
pub struct Packet<K, D> {
    /// Reported as the completion's byte count.
    pub bytes: usize,
    /// Reported as the completion's key, if any.
    pub handle: Option<Handle<K>>,
    /// Reported as the completion's per-I/O data.
    pub data: D,
}

impl<K, D> Packet<K, D> {
    /// A packet carrying only `data`.
    pub fn new(data: D) -> Self {
        Packet {
            bytes: 0,
            handle: None,
            data,
        }
    }
}

/// One dequeued completion: what `GetQueuedCompletionStatus` returns.
#[must_use = "a completion carries the operation's buffer and per-I/O data"]
pub struct Completion<K, D> {
    /// The operation this completes.
    pub id: OpId,
    /// What kind of operation it was.
    pub kind: OpKind,
    /// Bytes transferred, or the operation's error (`raw_os_error()` is the errno).
    pub result: io::Result<usize>,
    /// The socket and its completion key (`None` for timeouts and key-less packets).
    pub handle: Option<Handle<K>>,
    /// The per-I/O data given when the operation was posted.
    pub data: D,
    /// The buffer of a receive or send, given back on success and on error.
    pub buf: Option<Vec<u8>>,
    /// The pool buffer of a pooled receive (the data received) or of a pooled send.
    pub pooled: Option<PoolBuf>,
    /// The pool buffers of a gathering send ([`Op::send_pooled_gather`]), in order.
    pub gathered: Vec<PoolBuf>,
    /// For a successful accept: the new connection, not yet associated with the port.
    pub accepted: Option<TcpStream>,
    /// A multishot operation that stays armed: more completions will follow.
    pub more: bool,
}

impl<K, D> Completion<K, D> {
    /// The completion key, if the operation was on a socket.
    pub fn key(&self) -> Option<&K> {
        self.handle.as_ref().map(Handle::key)
    }

    /// Whether the operation was cancelled (`ECANCELED`).
    pub fn is_cancelled(&self) -> bool {
        matches!(&self.result, Err(e) if e.raw_os_error() == Some(libc::ECANCELED))
    }
}

impl<K, D> fmt::Debug for Completion<K, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completion")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("result", &self.result)
            .field("buf_len", &self.buf.as_ref().map(Vec::len))
            .field("accepted", &self.accepted)
            .finish_non_exhaustive()
    }
}
