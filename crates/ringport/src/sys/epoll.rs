//! The epoll backend: the same completions, produced from readiness.
//!
//! One epoll instance per worker. A socket is registered once, edge-triggered for both
//! directions, the first time an operation is started on it, and stays registered until an
//! [`Op::close`](crate::Op::close) (or the close of its last descriptor): no `epoll_ctl` per
//! message. Each socket has two queues of operations in posting order, one per
//! direction (accept and receive read; connect and send write). A started operation is tried at
//! once when it is first in its queue; otherwise, and after `EAGAIN`, it waits for the next edge,
//! at which the queue is run in order until an operation would block again. A finished operation
//! becomes an [`Event`] with the same `res` an io_uring CQE would carry.
//!
//! Nothing here hands memory to the kernel beyond the duration of one system call, so the
//! driver is idle at any time and cancellation is immediate.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use std::sync::Arc;

use super::{Cancel, Driver, Event, Filled, IdHasher, OpBody, Target};
use crate::pool::{Circulation, Pool};

/// `epoll_event.u64` of the worker's eventfd.
const WAKE: u64 = u64::MAX;
/// Readiness events taken per `epoll_wait`.
const EVENTS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Read,
    Write,
}

/// An operation waiting for readiness. `body` points into the port's boxed operation record,
/// which stays put until this driver reports the operation's event (a pooled receive has no
/// such record: the port passes it a temporary body, which is not kept).
struct Waiting {
    fd: RawFd,
    side: Side,
    /// The operation's body; for a pooled receive, whose body is not kept, no pointer but the
    /// bytes it may still deliver before it ends (0: no limit; see [`Waiting::left`]). One
    /// field for both keeps the record at 16 bytes: every idle connection has one.
    body: *mut OpBody,
    pooled: bool,
    /// A connect whose `connect(2)` returned `EINPROGRESS`.
    connecting: bool,
}

#[derive(Default)]
struct FdState {
    /// The handle this registration belongs to; a different serial on the same descriptor
    /// number means the old socket was closed and the number reused.
    serial: u64,
    registered: bool,
    /// A TCP socket: a short read there means it was empty (not so for datagrams, nor for
    /// every stream: see `Target::tcp`).
    tcp: bool,
    read: OpQueue,
    write: OpQueue,
}

/// One direction's operations on a descriptor, in posting order. Most descriptors have at most
/// one per direction (a connection's armed receive, its send in flight): that one is kept
/// inline, and a deque is allocated only while more wait behind it.
#[derive(Default)]
struct OpQueue {
    /// The first operation's id; 0 when the queue is empty (ids are never 0).
    first: u64,
    /// The operations behind the first; `Some` only while non-empty. Boxed: one pointer in
    /// every descriptor's state rather than a whole deque.
    #[allow(clippy::box_collection)]
    rest: Option<Box<VecDeque<u64>>>,
}

impl OpQueue {
    fn front(&self) -> Option<u64> {
        (self.first != 0).then_some(self.first)
    }

    fn is_empty(&self) -> bool {
        self.first == 0
    }

    fn push_back(&mut self, id: u64) {
        debug_assert_ne!(id, 0);
        if self.first == 0 {
            self.first = id;
        } else {
            self.rest.get_or_insert_default().push_back(id);
        }
    }

    fn pop_front(&mut self) {
        self.first = match &mut self.rest {
            Some(rest) => {
                let next = rest.pop_front().unwrap_or(0);
                if rest.is_empty() {
                    self.rest = None;
                }
                next
            }
            None => 0,
        };
    }

    fn remove(&mut self, id: u64) {
        if self.first == id {
            self.pop_front();
        } else if let Some(rest) = &mut self.rest {
            rest.retain(|&x| x != id);
            if rest.is_empty() {
                self.rest = None;
            }
        }
    }

    fn clear(&mut self) {
        *self = OpQueue::default();
    }

    fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.front()
            .into_iter()
            .chain(self.rest.iter().flat_map(|r| r.iter().copied()))
    }
}

/// The operations waiting, by id. A worker's own operations have slab ids (see `inflight`),
/// whose slot numbers are dense: those are kept in a vector indexed by the slot, with no hash
/// table's headroom (every idle connection has its armed receive here). Operations forwarded
/// from other threads carry sequence ids and go to a map.
#[derive(Default)]
struct OpTable {
    slots: Vec<Option<(u64, Waiting)>>,
    map: HashMap<u64, Waiting, BuildHasherDefault<IdHasher>>,
}

impl OpTable {
    fn insert(&mut self, id: u64, op: Waiting) {
        match crate::inflight::slot_index(id) {
            Some(i) => {
                if i >= self.slots.len() {
                    self.slots.resize_with(i + 1, || None);
                }
                debug_assert!(self.slots[i].is_none(), "slot of {id:#x} still waiting");
                self.slots[i] = Some((id, op));
            }
            None => {
                self.map.insert(id, op);
            }
        }
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Waiting> {
        match crate::inflight::slot_index(id) {
            Some(i) => match self.slots.get_mut(i) {
                Some(Some((held, op))) if *held == id => Some(op),
                _ => None,
            },
            None => self.map.get_mut(&id),
        }
    }

    fn remove(&mut self, id: u64) -> Option<Waiting> {
        match crate::inflight::slot_index(id) {
            Some(i) => match self.slots.get_mut(i) {
                Some(slot) if slot.as_ref().is_some_and(|(held, _)| *held == id) => {
                    slot.take().map(|(_, op)| op)
                }
                _ => None,
            },
            None => self.map.remove(&id),
        }
    }

    /// Starts loading the record of a slab id's operation (see `sys::prefetch`).
    fn prefetch(&self, id: u64) {
        if let Some(slot) = crate::inflight::slot_index(id).and_then(|i| self.slots.get(i)) {
            crate::sys::prefetch(slot);
        }
    }

    fn ids(&self) -> Vec<u64> {
        self.slots
            .iter()
            .filter_map(|s| s.as_ref().map(|(id, _)| *id))
            .chain(self.map.keys().copied())
            .collect()
    }
}

pub(crate) struct Epoll {
    epfd: OwnedFd,
    wake_fd: RawFd,
    /// Indexed by descriptor number.
    fds: Vec<FdState>,
    ops: OpTable,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    /// The deadline of each timeout still pending. A heap entry counts only while it matches:
    /// a cancelled timeout's entry stays in the heap until its time, and its id may by then
    /// name another operation.
    deadlines: HashMap<u64, Instant, BuildHasherDefault<IdHasher>>,
    /// Events produced outside `wait` (immediate results, cancellations).
    done: Vec<Event>,
    buf: Vec<libc::epoll_event>,
    pool: Option<PoolState>,
}

/// The worker's receive pool, the buffers in it that are free, and the one being filled.
///
/// Buffers are filled incrementally, as the io_uring backend's are: each receive goes on where
/// the previous one stopped, whatever the socket, and the buffer is let go of once full.
struct PoolState {
    pool: Arc<Pool>,
    free: Vec<u16>,
    /// The buffer receives go into, and how many bytes of it are filled.
    current: Option<(u16, u32)>,
    /// Keeps the buffers being filled and in user hands within the pool's working set.
    circulation: Circulation,
}

impl PoolState {
    /// The buffer to receive into and where: the current one, else a free one, the most
    /// recently returned (they are collected before each wait), so that a lightly loaded
    /// worker keeps reusing a few warm buffers instead of paging in the whole pool.
    fn current(&mut self) -> Option<(u16, u32)> {
        if self.current.is_none() {
            if self.free.is_empty() || self.circulation.room(self.free.len()) == 0 {
                // Buffers dropped since the last wait are free, and no longer circulate.
                self.collect();
            }
            if self.circulation.room(self.free.len()) == 0 {
                return None;
            }
            let bid = self.free.pop()?;
            self.pool.hold(bid);
            self.current = Some((bid, 0));
        }
        self.current
    }

    /// Takes back the buffers dropped since the last call.
    fn collect(&mut self) {
        let from = self.free.len();
        self.pool.take_returned(&mut self.free);
        for &bid in &self.free[from..] {
            self.circulation.back(bid);
        }
    }
}

/// What one attempt at an operation did.
enum Outcome {
    /// It would block: wait for the next edge.
    Blocked,
    /// It finished with this result.
    Done(i32),
    /// A multishot operation got a result and stays armed: a receive, data into a pool buffer
    /// (`short`: less than it asked for); an accept, a connection.
    More {
        res: i32,
        buf: Option<Filled>,
        short: bool,
    },
}

// SAFETY: the raw `OpBody` pointers refer to heap records owned by the same `Worker` that owns
// this driver; both move between threads together and are only used by the owning thread.
unsafe impl Send for Epoll {}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl Epoll {
    pub(crate) fn new(wake_fd: RawFd) -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new descriptor
        // owned only by the `OwnedFd`.
        let epfd = unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: WAKE,
        };
        // SAFETY: `ev` is a live local; both descriptors are open.
        cvt(unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, wake_fd, &mut ev) })?;
        Ok(Epoll {
            epfd,
            wake_fd,
            fds: Vec::new(),
            ops: OpTable::default(),
            timers: BinaryHeap::new(),
            deadlines: HashMap::default(),
            done: Vec::new(),
            buf: Vec::with_capacity(EVENTS),
            pool: None,
        })
    }

    fn register(&mut self, target: Target) -> io::Result<()> {
        let Ok(index) = usize::try_from(target.fd) else {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        };
        if index >= self.fds.len() {
            self.fds.resize_with(index + 1, FdState::default);
        }
        let state = &mut self.fds[index];
        if state.registered && state.serial == target.serial {
            return Ok(());
        }
        // Not registered for this socket until the kernel says so: should the call below
        // fail, the next operation on the socket tries again.
        state.registered = false;
        state.serial = target.serial;
        state.tcp = target.tcp;
        state.read.clear();
        state.write.clear();
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN
                | libc::EPOLLPRI
                | libc::EPOLLOUT
                | libc::EPOLLRDHUP
                | libc::EPOLLET) as u32,
            u64: target.fd as u64,
        };
        // SAFETY: `ev` is a live local; `target.fd` is an open descriptor held by a handle.
        let add = unsafe {
            libc::epoll_ctl(
                self.epfd.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                target.fd,
                &mut ev,
            )
        };
        if add < 0 {
            if last_errno() != libc::EEXIST {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: as above.
            cvt(unsafe {
                libc::epoll_ctl(
                    self.epfd.as_raw_fd(),
                    libc::EPOLL_CTL_MOD,
                    target.fd,
                    &mut ev,
                )
            })?;
        }
        state.registered = true;
        Ok(())
    }

    /// `register`, with the error an operation on the descriptor reports: `EPERM`, for a
    /// descriptor that cannot be watched, is a regular file or the like, not a socket, which
    /// io_uring's socket operations report as `ENOTSOCK`.
    fn watch(&mut self, target: Target) -> io::Result<()> {
        self.register(target).map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) => io::Error::from_raw_os_error(libc::ENOTSOCK),
            _ => e,
        })
    }

    /// Runs one queue of a descriptor in order until an operation would block. With
    /// `short_read_drains`, a pooled receive that got less than a whole buffer also stops: the
    /// socket was empty then, and data arriving later raises a new edge. (Not when the peer's
    /// FIN, an error or urgent data was signalled: see `READ_TO_END`.) This saves the receive
    /// that would only say `EAGAIN`.
    fn run(&mut self, fd: RawFd, side: Side, short_read_drains: bool) {
        loop {
            let Some(state) = fd_state(&mut self.fds, fd) else {
                return;
            };
            let short_read_drains = short_read_drains && state.tcp;
            let queue = match side {
                Side::Read => &mut state.read,
                Side::Write => &mut state.write,
            };
            let Some(id) = queue.front() else { return };
            let Some(op) = self.ops.get_mut(id) else {
                queue.pop_front();
                continue;
            };
            match attempt(op, self.pool.as_mut()) {
                Outcome::Done(res) => {
                    queue.pop_front();
                    self.ops.remove(id);
                    self.done.push(Event::done(id, res));
                }
                Outcome::More { res, buf, short } => {
                    // A pooled receive with a limit ends with the data that reaches it.
                    let ended = op.pooled && op.left() > 0 && {
                        let left = op.left().saturating_sub(res.unsigned_abs());
                        op.set_left(left);
                        left == 0
                    };
                    self.done.push(Event {
                        id,
                        res,
                        more: !ended,
                        buf,
                    });
                    if ended {
                        queue.pop_front();
                        self.ops.remove(id);
                    } else if short_read_drains && short {
                        return;
                    }
                }
                Outcome::Blocked => return,
            }
        }
    }

    /// Starts loading what serving the batch of events in `buf` reads first: each
    /// descriptor's state, then the record of the operation at the front of the queue that
    /// `wait` serves first.
    fn prefetch_batch(&self) {
        // The wake-up's token, `WAKE`, names no descriptor's state.
        let state =
            |ev: &libc::epoll_event| usize::try_from(ev.u64).ok().and_then(|i| self.fds.get(i));
        for state in self.buf.iter().filter_map(state) {
            crate::sys::prefetch(state);
        }
        for ev in &self.buf {
            let Some(state) = state(ev) else { continue };
            let queue = if wakes_reader(ev.events) {
                &state.read
            } else {
                &state.write
            };
            if let Some(id) = queue.front() {
                self.ops.prefetch(id);
            }
        }
    }

    fn cancel_op(&mut self, id: u64) {
        if let Some(op) = self.ops.remove(id) {
            let mut res = -libc::ECANCELED;
            if let Some(at) = self.deadlines.remove(&id) {
                // Due already: it has expired, as the kernel's timer has on io_uring, where
                // the cancel finds nothing.
                if at <= Instant::now() {
                    res = -libc::ETIME;
                }
                self.forget_cancelled_timers();
            }
            if let Some(state) = fd_state(&mut self.fds, op.fd) {
                let queue = match op.side {
                    Side::Read => &mut state.read,
                    Side::Write => &mut state.write,
                };
                queue.remove(id);
            }
            self.done.push(Event::done(id, res));
        }
    }

    /// A cancelled timer stays in the heap until it reaches the top: drops them all once they
    /// outnumber the live ones, so that timeouts posted and cancelled (one per request, say)
    /// hold memory only while they are live, as on io_uring.
    fn forget_cancelled_timers(&mut self) {
        if self.timers.len() > 2 * self.deadlines.len() + 64 {
            let deadlines = &self.deadlines;
            self.timers
                .retain(|&Reverse((at, id))| deadlines.get(&id) == Some(&at));
        }
    }

    /// Fires the timers due and hands over every event finished since the last turn.
    fn hand_over(&mut self, out: &mut Vec<Event>) {
        self.fire_timers();
        if out.is_empty() {
            // Hands over the allocation too: after a burst the port gives it back.
            std::mem::swap(out, &mut self.done);
        } else {
            out.append(&mut self.done);
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if self.deadlines.get(&id) == Some(&at) {
                self.deadlines.remove(&id);
                self.ops.remove(id);
                self.done.push(Event::done(id, -libc::ETIME));
            }
        }
    }

    fn next_timer(&mut self) -> Option<Instant> {
        // Drop cancelled timers from the top so they do not shorten the wait.
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if self.deadlines.get(&id) == Some(&at) {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }
}

impl Waiting {
    /// A pooled receive's remaining byte limit (0: none).
    fn left(&self) -> u32 {
        debug_assert!(self.pooled);
        u32::try_from(self.body.addr()).unwrap_or(u32::MAX)
    }

    fn set_left(&mut self, left: u32) {
        debug_assert!(self.pooled);
        self.body = std::ptr::without_provenance_mut(left as usize);
    }
}

/// Readiness bits that say a descriptor's peer closed or it failed: a reader then reads on to
/// the end (see `Epoll::run`).
const CLOSING: u32 = (libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32;

/// Readiness bits after which a reader reads on until the socket is empty instead of taking a
/// short read as its end: the peer closed or the socket failed (`CLOSING`), or TCP urgent data
/// came (`EPOLLPRI`), at whose mark a read stops short with more data behind it, which brings
/// no further edge.
const READ_TO_END: u32 = CLOSING | libc::EPOLLPRI as u32;

/// Whether a readiness event is served on the descriptor's read queue (first, when both are).
fn wakes_reader(events: u32) -> bool {
    events & (libc::EPOLLIN as u32 | READ_TO_END) != 0
}

/// Tries the operation once.
fn attempt(op: &mut Waiting, pool: Option<&mut PoolState>) -> Outcome {
    if op.pooled {
        return recv_pooled(op.fd, pool);
    }
    // SAFETY: `op.body` (not a pooled receive, so a pointer) points into the port's boxed
    // record of this operation, which lives, unmoved and not otherwise borrowed, until the
    // driver reports the operation.
    let body = unsafe { &mut *op.body };
    let r = match body {
        OpBody::RecvPooled(_) => return recv_pooled(op.fd, pool),
        OpBody::Send(..) | OpBody::SendPooled(..) => send_now(op.fd, body.unsent_head()),
        OpBody::SendGather(g) if g.bufs.len() <= 1 => send_now(op.fd, g.first()),
        OpBody::SendGather(g) => {
            let msg = g.prepare();
            // SAFETY: `msg` describes initialized bytes of the buffers `g` owns, and stays valid
            // for the call.
            unsafe { libc::sendmsg(op.fd, msg, libc::MSG_NOSIGNAL) as i32 }
        }
        OpBody::Accept => accept_now(op.fd),
        OpBody::AcceptMulti => {
            let r = accept_now(op.fd);
            if r >= 0 {
                return Outcome::More {
                    res: r,
                    buf: None,
                    short: false,
                };
            }
            r
        }
        OpBody::Recv(buf) => {
            let spare = buf.spare_capacity_mut();
            // SAFETY: recv writes at most `spare.len()` bytes into the buffer's spare capacity.
            unsafe { libc::recv(op.fd, spare.as_mut_ptr().cast(), spare.len(), 0) as i32 }
        }
        OpBody::Connect(addr) => {
            // The first call starts the handshake. Once it is under way (`connecting`), asking
            // again says how it went, as io_uring's connect does: `EALREADY` while it goes on, 0
            // (or `EISCONN`) once connected, else its error. (Not `SO_ERROR`: a receive on the
            // same socket may have taken the error already, and the connect would then wait for
            // an edge that never comes; asked again, the kernel says `ECONNABORTED`.)
            // SAFETY: connect reads `addr.len()` bytes of the address owned by the record.
            let r = unsafe { libc::connect(op.fd, addr.as_ptr().cast(), addr.len()) };
            if r < 0 {
                match last_errno() {
                    libc::EINPROGRESS => {
                        op.connecting = true;
                        return Outcome::Blocked;
                    }
                    // This operation's handshake goes on. (One under way before it began, as
                    // after a cancelled connect, ends it with `EALREADY`, as on io_uring.)
                    libc::EALREADY if op.connecting => return Outcome::Blocked,
                    libc::EISCONN if op.connecting => return Outcome::Done(0),
                    _ => {}
                }
            }
            r
        }
        OpBody::Timeout(..) => return Outcome::Blocked,
    };
    if r >= 0 {
        return Outcome::Done(r);
    }
    match last_errno() {
        libc::EAGAIN => Outcome::Blocked,
        libc::EINTR => attempt(op, pool),
        e => Outcome::Done(-e),
    }
}

/// One `accept4(2)`: the new descriptor, or -1 with `errno` set.
fn accept_now(fd: RawFd) -> i32 {
    // SAFETY: accept4 with null address arguments writes no memory of ours.
    unsafe {
        libc::accept4(
            fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    }
}

/// One `send(2)` of `bytes`: the byte count, or -1 with `errno` set.
fn send_now(fd: RawFd, bytes: &[u8]) -> i32 {
    // SAFETY: send reads `bytes.len()` initialized bytes from `bytes`.
    unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) as i32 }
}

/// One receive into a free pool buffer. Without a free buffer the operation ends with
/// `ENOBUFS`, as io_uring's multishot receive does.
fn recv_pooled(fd: RawFd, pool: Option<&mut PoolState>) -> Outcome {
    let Some(pool) = pool else {
        return Outcome::Done(-libc::EINVAL);
    };
    let Some((bid, off)) = pool.current() else {
        return no_buffer(fd);
    };
    let room = pool.pool.size() - off as usize;
    loop {
        // SAFETY: the driver holds buffer `bid`: `PoolBuf`s exist only for its first `off`
        // bytes, so nothing else reads or writes the rest, where recv writes at most `room`
        // bytes.
        let r = unsafe { libc::recv(fd, pool.pool.addr(bid).add(off as usize).cast(), room, 0) };
        if r > 0 {
            let n = r as usize;
            let full = n >= room;
            // A full buffer is let go of with this event (the port releases it once it has
            // taken its slice).
            pool.current = (!full).then_some((bid, off + n as u32));
            if full {
                pool.circulation.lent(bid);
            }
            return Outcome::More {
                res: r as i32,
                buf: Some(Filled {
                    bid,
                    off,
                    released: full,
                }),
                short: n < room,
            };
        }
        let e = if r == 0 { 0 } else { last_errno() };
        if e == libc::EINTR {
            continue;
        }
        return match e {
            0 => Outcome::Done(0),
            libc::EAGAIN => Outcome::Blocked,
            e => Outcome::Done(-e),
        };
    }
}

/// An armed pooled receive found the pool empty. Like io_uring's, which picks a buffer before
/// it reads, it ends with `ENOBUFS` once the socket has anything to report (data, the peer's
/// FIN or an error); with nothing, it stays armed for the next edge. A zero-timeout `poll`
/// asks, rather than a peek, which would take a pending error away from the receive posted
/// next. (Posted with the pool empty, it ends at once: see `Epoll::start`.)
fn no_buffer(fd: RawFd) -> Outcome {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    loop {
        // SAFETY: poll reads and writes the one live `pollfd` it is given.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        return match r {
            0 => Outcome::Blocked,
            1.. => Outcome::Done(-libc::ENOBUFS),
            _ if last_errno() == libc::EINTR => continue,
            _ => Outcome::Done(-last_errno()),
        };
    }
}

/// The state of descriptor `fd`, if it was ever registered.
fn fd_state(fds: &mut [FdState], fd: RawFd) -> Option<&mut FdState> {
    fds.get_mut(usize::try_from(fd).ok()?)
}

impl Driver for Epoll {
    fn start(&mut self, id: u64, target: Target, body: &mut OpBody) -> io::Result<()> {
        if let OpBody::Timeout(after, _) = body {
            // A timeout too long to represent never fires.
            if let Some(at) = Instant::now().checked_add(*after) {
                self.timers.push(Reverse((at, id)));
                self.deadlines.insert(id, at);
            }
            self.ops.insert(
                id,
                Waiting {
                    fd: -1,
                    side: Side::Read,
                    body,
                    pooled: false,
                    connecting: false,
                },
            );
            return Ok(());
        }
        let side = match body {
            OpBody::Accept | OpBody::AcceptMulti | OpBody::Recv(_) | OpBody::RecvPooled(_) => {
                Side::Read
            }
            _ => Side::Write,
        };
        let limit = match body {
            OpBody::RecvPooled(limit) => Some(*limit),
            _ => None,
        };
        let pooled = limit.is_some();
        let multishot = pooled || matches!(body, OpBody::AcceptMulti);
        let connect = matches!(body, OpBody::Connect(_));
        let mut op = Waiting {
            fd: target.fd,
            side,
            body: match limit {
                Some(limit) => std::ptr::without_provenance_mut(limit as usize),
                None => body,
            },
            pooled,
            connecting: false,
        };
        let first = fd_state(&mut self.fds, target.fd).is_none_or(|s| {
            s.serial != target.serial
                || match side {
                    Side::Read => s.read.is_empty(),
                    Side::Write => s.write.is_empty(),
                }
        });
        if connect {
            // Watched before it is issued: once the handshake is under way, a failure to watch
            // the socket could no longer be reported as the connect's own failure.
            self.watch(target)?;
        }
        if first && !multishot {
            // Alone in its queue: try it now.
            if let Outcome::Done(res) = attempt(&mut op, self.pool.as_mut()) {
                self.done.push(Event::done(id, res));
                return Ok(());
            }
        }
        if pooled && self.pool.as_mut().is_some_and(|p| p.current().is_none()) {
            // Posted with every pool buffer taken: as on io_uring, whose receive takes its
            // buffer first, it ends at once, data or not.
            self.done.push(Event::done(id, -libc::ENOBUFS));
            return Ok(());
        }
        self.watch(target)?;
        let state = fd_state(&mut self.fds, target.fd).expect("registered above");
        match side {
            Side::Read => state.read.push_back(id),
            Side::Write => state.write.push_back(id),
        }
        self.ops.insert(id, op);
        if multishot {
            // A multishot operation takes what is already there at once (to the end: an edge
            // may have passed while it was not armed), then on each edge.
            self.run(target.fd, side, false);
        }
        Ok(())
    }

    fn closed(&mut self, target: Target) {
        let Some(state) = usize::try_from(target.fd)
            .ok()
            .and_then(|i| self.fds.get_mut(i))
            .filter(|s| s.registered && s.serial == target.serial)
        else {
            return;
        };
        state.registered = false;
        // SAFETY: `target.fd` is open (the close's handle holds it); `EPOLL_CTL_DEL` reads no
        // event. A failure leaves the entry to go with the socket, as it would have.
        unsafe {
            libc::epoll_ctl(
                self.epfd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                target.fd,
                std::ptr::null_mut(),
            )
        };
    }

    fn cancel(&mut self, what: Cancel) -> bool {
        match what {
            Cancel::Op(id) => self.cancel_op(id),
            Cancel::Fd(fd) => {
                let ids: Vec<u64> = self
                    .fds
                    .get(usize::try_from(fd).unwrap_or(usize::MAX))
                    .map(|s| s.read.ids().chain(s.write.ids()).collect())
                    .unwrap_or_default();
                for id in ids {
                    self.cancel_op(id);
                }
            }
            Cancel::All => {
                let ids = self.ops.ids();
                for id in ids {
                    self.cancel_op(id);
                }
            }
        }
        true
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()> {
        let now = Instant::now();
        let mut deadline = timeout.and_then(|t| now.checked_add(t));
        if let Some(t) = self.next_timer() {
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        }
        let ms = if !self.done.is_empty() {
            0
        } else {
            match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(now);
                    // Round up, so a timer never fires early and the loop never spins.
                    i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
                }
            }
        };
        if let Some(p) = &mut self.pool {
            p.collect();
        }
        self.buf.clear();
        // SAFETY: epoll_wait writes at most `capacity` events into the vector's spare capacity.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd.as_raw_fd(),
                self.buf.as_mut_ptr(),
                self.buf.capacity() as i32,
                ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        } else {
            // SAFETY: the kernel initialized the first `n` entries.
            unsafe { self.buf.set_len(n as usize) };
        }
        // Buffers filled now leave the driver as of now; those held long enough are parked.
        if let Some(p) = &mut self.pool {
            p.circulation.tick();
        }
        self.prefetch_batch();
        for i in 0..self.buf.len() {
            let (data, events) = (self.buf[i].u64, self.buf[i].events);
            if data == WAKE {
                let mut count = 0u64;
                // SAFETY: reads 8 bytes into a live local; the eventfd is readable (level
                // triggered), so this does not block.
                unsafe {
                    libc::read(self.wake_fd, std::ptr::from_mut(&mut count).cast(), 8);
                }
                continue;
            }
            let fd = data as RawFd;
            if wakes_reader(events) {
                self.run(fd, Side::Read, events & READ_TO_END == 0);
            }
            if events & (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                self.run(fd, Side::Write, false);
            }
        }
        self.hand_over(out);
        Ok(())
    }

    fn flush(&mut self, out: &mut Vec<Event>) -> io::Result<()> {
        // What `wait` does each turn, short of reading readiness.
        if let Some(p) = &mut self.pool {
            p.collect();
            p.circulation.tick();
        }
        self.hand_over(out);
        Ok(())
    }

    fn set_pool(&mut self, pool: Arc<Pool>, _incremental: bool) -> io::Result<()> {
        let free = (0..pool.count()).rev().collect();
        self.pool = Some(PoolState {
            circulation: Circulation::new(&pool),
            pool,
            free,
            current: None,
        });
        Ok(())
    }

    fn pool_incremental(&self) -> bool {
        true
    }

    fn pool_parked(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.circulation.parked())
    }

    fn recv_limits(&self) -> bool {
        true
    }

    fn abandon(&mut self) {}

    fn idle(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "epoll"
    }
}

#[cfg(test)]
mod tests {
    use super::{OpTable, PoolState, Side, Waiting};
    use crate::inflight::Inflight;
    use crate::pool::{Circulation, Pool, PARK_AFTER};
    use std::sync::Arc;

    /// With a working set of one buffer of three, a second buffer is taken only once the
    /// first, still held, is parked.
    #[test]
    fn buffers_beyond_the_working_set_wait_until_one_is_parked() {
        let pool = Pool::new(16, 3, 1).unwrap();
        let mut p = PoolState {
            circulation: Circulation::manual(&pool),
            free: (0..3).rev().collect(),
            current: None,
            pool: Arc::clone(&pool),
        };
        let (bid, _) = p.current().expect("a buffer within the working set");
        // Filled and let go of, as `recv_pooled` does, with a slice still holding it.
        p.current = None;
        p.circulation.lent(bid);
        // SAFETY: the driver state above holds the buffer, and nothing else writes it: these
        // are its bytes as a receive would leave them, and the slice covers only them.
        let slice = unsafe {
            std::ptr::write_bytes(pool.addr(bid), 0x5a, 16);
            pool.buf(bid, 0, 16)
        };
        pool.release(bid);
        assert_eq!(p.current(), None, "the working set is out");
        p.circulation.tick_at(PARK_AFTER.as_millis() as u64);
        let (next, _) = p
            .current()
            .expect("the held buffer is parked: room for another");
        assert_ne!(next, bid);
        drop(slice);
    }

    fn waiting(fd: i32) -> Waiting {
        Waiting {
            fd,
            side: Side::Read,
            body: std::ptr::null_mut(),
            pooled: true,
            connecting: false,
        }
    }

    /// A driver, and the socket that stands in for its wake-up descriptor (kept open with it).
    fn epoll() -> (std::net::UdpSocket, super::Epoll) {
        use std::os::fd::AsRawFd;
        let wake = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let ep = super::Epoll::new(wake.as_raw_fd()).unwrap();
        (wake, ep)
    }

    /// The descriptors this epoll instance watches (`tfd` in its `/proc/self/fdinfo`).
    fn watched(ep: &super::Epoll) -> Vec<i32> {
        use std::os::fd::AsRawFd;
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", ep.epfd.as_raw_fd())).unwrap();
        info.lines()
            .filter_map(|l| l.strip_prefix("tfd:"))
            .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
            .collect()
    }

    /// A closed socket leaves the epoll set, though another descriptor of it stays open (the
    /// kernel drops the entry only when the socket itself goes): its events would otherwise go
    /// on arriving under the closed descriptor's number, which a new socket may take.
    #[test]
    fn a_closed_socket_leaves_the_set_while_a_duplicate_stays_open() {
        use crate::sys::{Driver, OpBody, Target};
        use std::os::fd::AsRawFd;
        let (_wake, mut ep) = epoll();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_nonblocking(true).unwrap();
        let duplicate = sock.try_clone().unwrap();
        let target = Target {
            fd: sock.as_raw_fd(),
            serial: 1,
            stream: false,
            tcp: false,
        };
        let mut body = OpBody::Recv(Vec::with_capacity(16));
        ep.start(1, target, &mut body).unwrap();
        assert!(
            watched(&ep).contains(&target.fd),
            "registered by its receive"
        );
        assert!(ep.cancel(crate::sys::Cancel::Fd(target.fd)));
        ep.closed(target);
        assert!(
            !watched(&ep).contains(&target.fd),
            "still watched once closed"
        );
        drop((sock, duplicate, body));
    }

    /// A descriptor number registered for one socket and then reused by another whose
    /// registration fails is not taken as registered: the next operation on the new socket
    /// registers it again rather than wait for readiness epoll was never asked to report.
    #[test]
    fn a_failed_registration_is_tried_again() {
        use std::os::fd::AsRawFd;
        let (_wake, mut ep) = epoll();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = sock.as_raw_fd();
        let target = |serial| crate::sys::Target {
            fd,
            serial,
            stream: false,
            tcp: false,
        };
        ep.register(target(1)).unwrap();
        assert!(ep.fds[fd as usize].registered);
        // The socket closes and its number goes to a regular file, which epoll refuses.
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        // SAFETY: dup2 closes the socket's descriptor and makes `fd` a copy of the file's;
        // `sock` is forgotten below so that its descriptor number is closed once (by `OwnedFd`).
        assert_eq!(unsafe { libc::dup2(file.as_raw_fd(), fd) }, fd);
        std::mem::forget(sock);
        // SAFETY: `fd` is open (the dup2 above) and owned by nothing else.
        let _owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        assert_eq!(
            ep.register(target(2)).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        assert!(!ep.fds[fd as usize].registered, "taken as registered");
        assert!(ep.register(target(2)).is_err(), "not tried again");
    }

    /// A connect on a socket epoll will not watch fails without starting its handshake: begun,
    /// the handshake would go on after the connect had reported its failure.
    #[test]
    fn a_connect_that_cannot_be_watched_is_not_issued() {
        use crate::sys::{Driver, OpBody, Target};
        use std::os::fd::AsRawFd;
        let (_wake, mut ep) = epoll();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM.nonblocking(),
            None,
        )
        .unwrap();
        let fd = sock.as_raw_fd();
        // Already in this epoll set with `EPOLLEXCLUSIVE`, which no `EPOLL_CTL_MOD` may change:
        // the registration the connect needs fails (`EINVAL`).
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
            u64: 0,
        };
        // SAFETY: `ev` is a live local; both descriptors are open.
        let added =
            unsafe { libc::epoll_ctl(ep.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        assert_eq!(added, 0);
        let target = Target {
            fd,
            serial: 1,
            stream: true,
            tcp: true,
        };
        let addr = socket2::SockAddr::from(listener.local_addr().unwrap());
        let mut body = OpBody::Connect(Box::new(addr));
        let err = ep.start(1, target, &mut body).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert!(ep.done.is_empty(), "a completion as well as the error");
        assert_eq!(
            listener.accept().map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::WouldBlock),
            "the handshake was started"
        );
        assert_eq!(
            sock.peer_addr().map_err(|e| e.raw_os_error()).err(),
            Some(Some(libc::ENOTCONN))
        );
        // Whether or not the handshake would have finished by now: the socket never left
        // `TCP_CLOSE` (a connect issued would have made it `SYN_SENT` at once).
        // SAFETY: all-zero bytes are a valid `tcp_info` (plain integers).
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `info`, a live local, and the new
        // length into `len`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        const TCP_CLOSE: u8 = 7;
        assert_eq!(info.tcpi_state, TCP_CLOSE, "the connect was issued");
    }

    /// Timeouts posted and cancelled one after another (a timeout per request) do not pile up
    /// in the timer heap.
    #[test]
    fn cancelled_timeouts_do_not_pile_up() {
        use crate::sys::{Cancel, Driver, OpBody, Target};
        let (_wake, mut ep) = epoll();
        let target = Target {
            fd: -1,
            serial: 0,
            stream: false,
            tcp: false,
        };
        let after = std::time::Duration::from_secs(600);
        let mut live = OpBody::Timeout(after, io_uring::types::Timespec::new().sec(600));
        ep.start(1, target, &mut live).unwrap();
        for id in 2..10_000u64 {
            let mut body = OpBody::Timeout(after, io_uring::types::Timespec::new().sec(600));
            ep.start(id, target, &mut body).unwrap();
            ep.cancel(Cancel::Op(id));
        }
        assert!(
            ep.timers.len() <= 2 * ep.deadlines.len() + 64,
            "{}",
            ep.timers.len()
        );
        assert_eq!(
            ep.next_timer(),
            ep.deadlines.get(&1).copied(),
            "the live one stays"
        );
    }

    /// The read queue is served (and prefetched) for input, the peer's FIN, a hang-up or an
    /// error; the write queue alone for room to send.
    #[test]
    fn which_readiness_wakes_the_reader() {
        use super::wakes_reader;
        for bits in [
            libc::EPOLLIN,
            libc::EPOLLRDHUP,
            libc::EPOLLHUP,
            libc::EPOLLERR,
            libc::EPOLLIN | libc::EPOLLOUT,
        ] {
            assert!(wakes_reader(bits as u32), "{bits:#x}");
        }
        assert!(!wakes_reader(libc::EPOLLOUT as u32));
        assert!(!wakes_reader(0));
    }

    /// Every idle connection keeps its armed receive here: one slot of the vector, no more.
    #[test]
    fn op_table_slots_stay_small() {
        assert!(std::mem::size_of::<Option<(u64, Waiting)>>() <= 24);
        assert!(std::mem::size_of::<super::FdState>() <= 48);
    }

    #[test]
    fn op_table_finds_by_full_id_only() {
        let mut ids = Inflight::<()>::new();
        let mut t = OpTable::default();
        let a = ids.reserve(0).unwrap();
        ids.insert(a, ());
        t.insert(a, waiting(7));
        let seq = 12345; // a sequence id (forwarded from another thread)
        t.insert(seq, waiting(8));
        assert_eq!(t.get_mut(a).map(|w| w.fd), Some(7));
        assert_eq!(t.get_mut(seq).map(|w| w.fd), Some(8));
        let mut all = t.ids();
        all.sort_unstable();
        assert_eq!(all, {
            let mut v = vec![a, seq];
            v.sort_unstable();
            v
        });

        // Once removed, the slot goes to a new id; the old one finds nothing.
        assert_eq!(t.remove(a).map(|w| w.fd), Some(7));
        assert!(t.remove(a).is_none());
        ids.remove(a);
        let b = ids.reserve(0).unwrap();
        assert_eq!(
            crate::inflight::slot_index(b),
            crate::inflight::slot_index(a),
            "the slot is reused"
        );
        t.insert(b, waiting(9));
        assert!(t.get_mut(a).is_none(), "a stale id finds nothing");
        assert!(t.remove(a).is_none(), "a stale id removes nothing");
        assert_eq!(t.remove(b).map(|w| w.fd), Some(9));
        assert_eq!(t.remove(seq).map(|w| w.fd), Some(8));
        assert!(t.ids().is_empty());
    }
}
