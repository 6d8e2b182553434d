//! The backends behind the port.
//!
//! Every backend supplies a [`Driver`]: it starts operations described by an [`OpBody`], cancels
//! them, and reports each one's result exactly once as an [`Event`] (`id`, `res`: a byte count or
//! a negated errno, the io_uring CQE convention). The port above the driver owns every operation
//! record and keeps it, with its buffer, at a stable address until the driver has reported it;
//! that is the whole memory-safety contract between the two layers:
//!
//! * [`Driver::start`] may keep raw pointers into the `OpBody` it is given, until it reports that
//!   operation's [`Event`].
//! * A started operation is reported exactly once, whether it succeeds, fails or is cancelled.
//! * [`Driver::wait`] submits whatever was queued, then waits for events, a wake-up of the
//!   port's waker, or the timeout, whichever comes first.
//! * Dropping a driver with operations still started is allowed only after the port has given
//!   up on them and leaked their records (see `Worker`'s `Drop`).

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use crate::op::IdHasher;
use crate::pool::{Pool, PoolBuf};

pub(crate) mod epoll;
pub(crate) mod uring;

/// What an operation does, and the memory it hands to the kernel. Lives in a `Box` owned by the
/// port's in-flight table from `start` until its event is reported (except a pooled receive's,
/// which points at nothing and is not kept). Kept small (the larger bodies are boxed
/// themselves).
#[derive(Debug)]
pub(crate) enum OpBody {
    /// Accept one connection on a listening socket.
    Accept,
    /// Accept connections, again and again; reports [`Event::more`] while it stays armed.
    AcceptMulti,
    /// Connect a stream socket to this address.
    Connect(Box<socket2::SockAddr>),
    /// Receive into the spare capacity of the buffer (`len..capacity`).
    Recv(Vec<u8>),
    /// Send `buf[offset..]`.
    Send(Vec<u8>, usize),
    /// Receive, again and again, each time into a buffer the driver takes from the worker's
    /// pool; reports [`Event::more`] while it stays armed. Ends after data once this many bytes
    /// have come (0: no limit).
    RecvPooled(u32),
    /// Send `buf[offset..]` of a pool buffer.
    SendPooled(PoolBuf, usize),
    /// Send several pool buffers in order with one gathering send.
    SendGather(Box<Gather>),
    /// Complete after this long (the io_uring backend points the kernel at the timespec).
    Timeout(Duration, io_uring::types::Timespec),
}

impl OpBody {
    /// What a send has yet to send from its (first) buffer; empty for other operations.
    pub(crate) fn unsent_head(&self) -> &[u8] {
        match self {
            OpBody::Send(buf, offset) => buf.get(*offset..).unwrap_or_default(),
            OpBody::SendPooled(buf, offset) => buf.get(*offset..).unwrap_or_default(),
            OpBody::SendGather(g) => g.first(),
            _ => &[],
        }
    }

    /// How many bytes a send has yet to send, all its buffers together; 0 for other operations.
    pub(crate) fn unsent_len(&self) -> usize {
        match self {
            OpBody::Send(..) | OpBody::SendPooled(..) => self.unsent_head().len(),
            OpBody::SendGather(g) => g.unsent().map(<[u8]>::len).sum(),
            _ => 0,
        }
    }

    /// Counts `n` more bytes of a send as sent.
    pub(crate) fn advance(&mut self, n: usize) {
        match self {
            OpBody::Send(_, offset) | OpBody::SendPooled(_, offset) => *offset += n,
            OpBody::SendGather(g) => g.offset += n,
            _ => {}
        }
    }

    /// Undoes [`OpBody::advance`] by `n` bytes.
    pub(crate) fn rewind(&mut self, n: usize) {
        match self {
            OpBody::Send(_, offset) | OpBody::SendPooled(_, offset) => *offset -= n,
            OpBody::SendGather(g) => g.offset -= n,
            _ => {}
        }
    }

    /// A send whose offset lies past the end of its (first) buffer.
    pub(crate) fn offset_past_end(&self) -> bool {
        match self {
            OpBody::Send(buf, offset) => *offset > buf.len(),
            OpBody::SendPooled(buf, offset) => *offset > buf.len(),
            OpBody::SendGather(g) => g.offset > g.bufs.first().map_or(0, |b| b.len()),
            _ => false,
        }
    }
}

/// The buffers of a gathering send, and the `iovec`s and message header that describe them to
/// the kernel. Kept in the operation's boxed body, so the pointers stay valid until the
/// operation is reported.
#[derive(Debug)]
pub(crate) struct Gather {
    pub(crate) bufs: Vec<PoolBuf>,
    /// Where to start: an offset into the first buffer when posted, then, as the kernel takes
    /// part of the bytes, into the buffers laid end to end.
    pub(crate) offset: usize,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

// SAFETY: the raw pointers in `iov` and `msg` point only into `bufs` and `iov`, which this
// value owns; they move between threads together.
unsafe impl Send for Gather {}

impl Gather {
    pub(crate) fn new(bufs: Vec<PoolBuf>, offset: usize) -> Self {
        Gather {
            bufs,
            offset,
            iov: Vec::new(),
            // SAFETY: a zeroed `msghdr` is a valid empty header (null pointers, no lengths).
            msg: unsafe { std::mem::zeroed() },
        }
    }

    /// The unsent bytes, a buffer at a time (empty ones left out).
    fn unsent(&self) -> impl Iterator<Item = &[u8]> {
        let mut skip = self.offset;
        self.bufs.iter().filter_map(move |b| {
            let bytes: &[u8] = b;
            let from = skip.min(bytes.len());
            skip -= from;
            Some(&bytes[from..]).filter(|rest| !rest.is_empty())
        })
    }

    /// The unsent bytes of the first buffer that has any (all of them when there is one
    /// buffer); empty when all are sent.
    pub(crate) fn first(&self) -> &[u8] {
        self.unsent().next().unwrap_or_default()
    }

    /// Describes the unsent bytes as `iovec`s (at most `UIO_MAXIOV`: beyond, the kernel takes
    /// part, and the port sends the rest after it)
    /// and returns the message header for `sendmsg`. The header and what it points to stay
    /// valid while `self` is neither changed nor dropped.
    pub(crate) fn prepare(&mut self) -> *const libc::msghdr {
        const UIO_MAXIOV: usize = 1024;
        let mut iov = std::mem::take(&mut self.iov);
        iov.clear();
        iov.extend(self.unsent().take(UIO_MAXIOV).map(|rest| libc::iovec {
            iov_base: rest.as_ptr().cast_mut().cast(),
            iov_len: rest.len(),
        }));
        self.iov = iov;
        // SAFETY: as in `new`.
        self.msg = unsafe { std::mem::zeroed() };
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len() as _;
        &raw const self.msg
    }
}

/// One finished operation (or one result of a multishot one): its id and its result (`>= 0`
/// bytes or a new descriptor, `< 0` errno).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Event {
    pub(crate) id: u64,
    pub(crate) res: i32,
    /// The operation stays armed and will report again (multishot).
    pub(crate) more: bool,
    /// The pool buffer the data was received into.
    pub(crate) buf: Option<Filled>,
}

impl Event {
    pub(crate) fn done(id: u64, res: i32) -> Event {
        Event {
            id,
            res,
            more: false,
            buf: None,
        }
    }
}

/// Where a pooled receive put its bytes: at `off` in pool buffer `bid`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Filled {
    pub(crate) bid: u16,
    pub(crate) off: u32,
    /// The driver lets go of the buffer with this event (it is full, or the backend does not
    /// fill buffers incrementally): see [`Pool::release`].
    pub(crate) released: bool,
}

/// The socket an operation is on: its descriptor, and the serial number of the handle that
/// holds it (descriptor numbers are reused after a close; serials are not).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    pub(crate) fd: RawFd,
    pub(crate) serial: u64,
    /// A stream socket (the handle asks `SO_TYPE` once and remembers).
    pub(crate) stream: bool,
    /// A TCP socket: a read that gets less than it asked for has emptied the socket. (Not so
    /// for every stream: a Unix socket's read stops at a message that carries descriptors,
    /// an SCTP socket's at each message.)
    pub(crate) tcp: bool,
}

/// What to cancel.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cancel {
    /// The operation with this id.
    Op(u64),
    /// Every operation on this descriptor.
    Fd(RawFd),
    /// Every operation of this driver.
    All,
}

/// The contract of a backend (see the module docs).
pub(crate) trait Driver: Send {
    /// Starts the operation `id` on `target` (`fd == -1` for none). On `Err` nothing was
    /// started and no event will be reported. The body of a pooled receive
    /// ([`OpBody::RecvPooled`], which hands the kernel no memory) is a temporary: keep no
    /// pointer to it.
    fn start(&mut self, id: u64, target: Target, body: &mut OpBody) -> io::Result<()>;

    /// Asks for cancellation; the cancelled operations still report an event (`-ECANCELED`
    /// unless they had already finished). Returns `false` when the request could not be
    /// queued (io_uring: the submission failed); it may be asked again.
    fn cancel(&mut self, what: Cancel) -> bool;

    /// Whether the kernel cancels what a thread started when that thread exits (io_uring): an
    /// `ECANCELED` nobody asked for can come only from such a driver.
    fn cancels_at_thread_exit(&self) -> bool {
        false
    }

    /// The socket `target` was closed with `Op::close` (its operations cancelled, none to
    /// come): forget it. epoll takes it out of its set, where it would otherwise stay, under its
    /// old descriptor number, while another descriptor of the same socket is open. (A handle
    /// dropped without a close leaves that to the kernel, which drops the entry with the
    /// socket's last descriptor.)
    fn closed(&mut self, _target: Target) {}

    /// Submits queued work and waits up to `timeout` (`None`: forever) for at least one event
    /// or a wake-up; appends the events to `out`.
    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()>;

    /// Called between completions handed out from a backlog that holds at least a turn's worth
    /// of work: submits what was started meanwhile and appends to `out`, without waiting, what
    /// completed without taking in new input. epoll: operations that finished when they were
    /// started or were cancelled, and timers due; io_uring with deferred task work: what
    /// completed inline as it was submitted (a send with room), the rest (timeouts, cancels,
    /// receives, sends that waited for room) waiting for the next `wait`. Other drivers wait
    /// with a zero timeout.
    fn flush(&mut self, out: &mut Vec<Event>) -> io::Result<()> {
        self.wait(Some(Duration::ZERO), out)
    }

    /// Gives the driver the worker's receive pool, before any operation starts.
    fn set_pool(&mut self, pool: Arc<Pool>, incremental: bool) -> io::Result<()>;

    /// Whether pool buffers are filled incrementally (see [`Filled`]).
    fn pool_incremental(&self) -> bool;

    /// A pooled receive ended with `ENOBUFS`: the pool had no buffer ready for it. (Other
    /// operations can fail with `ENOBUFS` too, for reasons of their own.)
    fn pool_starved(&mut self) {}

    /// Pool buffers held in user hands long enough to count as parked rather than
    /// circulating (see [`Circulation`](crate::pool::Circulation)).
    fn pool_parked(&self) -> usize;

    /// Whether the driver is tied to the thread that first waits on it (see
    /// `Builder::single_thread_workers`).
    fn single_thread(&self) -> bool {
        false
    }

    /// Whether a pooled receive's byte limit ([`OpBody::RecvPooled`]) is kept.
    fn recv_limits(&self) -> bool;

    /// Called when operations were leaked because the kernel did not give them back: the
    /// driver must then leak whatever the kernel may still write (its pool, rings).
    fn abandon(&mut self);

    /// Whether the driver has no internal operation of its own left in the kernel (checked
    /// after `Cancel::All` before the driver is dropped).
    fn idle(&self) -> bool;

    /// The backend's name, as shown in logs.
    fn name(&self) -> &'static str;
}

/// Asks the CPU to start loading the cache line that holds `p`, so that a later read finds it
/// there. With many connections, each one's records are out of the cache by the time it is
/// served again; started for a whole batch before it is processed, those loads overlap instead
/// of each stalling in turn. A hint only: nothing is read, and any address will do. It does
/// nothing on other architectures than x86_64.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing the program sees and never faults, whatever the
    // address; SSE, which it needs, is part of every x86_64 target.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Whether `fd` is a stream socket (`SO_TYPE`), and whether a TCP one (`SO_PROTOCOL`).
pub(crate) fn socket_kind(fd: RawFd) -> (bool, bool) {
    let stream = socket_option(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM);
    let tcp = stream && socket_option(fd, libc::SO_PROTOCOL) == Some(libc::IPPROTO_TCP);
    (stream, tcp)
}

/// An integer option of socket `fd` at `SOL_SOCKET` level; `None` when it cannot be read.
fn socket_option(fd: RawFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one c_int into `value` and its size into `len`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(value)
}

/// Sends at most one byte of `bytes` at once, for fault injection's short sends. `None` when
/// that would block or `bytes` has at most one byte: the send then goes ahead normally.
pub(crate) fn send_one(fd: RawFd, bytes: &[u8]) -> Option<io::Result<usize>> {
    if bytes.len() <= 1 {
        return None;
    }
    // SAFETY: send reads one initialized byte from `bytes`.
    let r = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    match r {
        1 => Some(Ok(1)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    /// A connection's armed receive holds one body for its whole life: keep it small.
    #[test]
    fn operation_bodies_stay_small() {
        assert!(std::mem::size_of::<super::OpBody>() <= 40);
    }

    /// Hash tables pick buckets by the low bits and match on the top seven: sequential ids
    /// must vary in both.
    #[test]
    fn id_hasher_spreads_sequential_ids() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let b = BuildHasherDefault::<super::IdHasher>::default();
        let hashes: Vec<u64> = (0..1024u64).map(|i| b.hash_one(i)).collect();
        let top: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        let low: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 1023).collect();
        assert!(top.len() > 100, "{} distinct top-7-bit values", top.len());
        assert!(low.len() > 600, "{} distinct low-10-bit values", low.len());
    }
}
