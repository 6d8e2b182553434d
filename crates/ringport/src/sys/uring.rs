//! The io_uring backend: one ring per worker; every operation is one SQE whose `user_data` is the
//! operation's id, and every CQE is one [`Event`].

use std::alloc::{self, Layout};
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::{Cancel, Driver, Event, Filled, OpBody, Target};
use crate::op::IdHasher;
use crate::pool::{Circulation, Pool};

/// The buffer group id of the worker's receive pool.
const POOL_GROUP: u16 = 0;
/// A buffer group no ring registers, for the receive-limit probe.
const PROBE_GROUP: u16 = u16::MAX;

/// The buffer ring flag for incremental consumption (`include/uapi/linux/io_uring.h`).
const IOU_PBUF_RING_INC: u16 = 2;

/// Buffers put in the ring when it is created, and the least it is topped up to.
const RING_START: usize = 64;

/// A provided-buffer ring registered with the kernel: the kernel takes buffers at its head, we
/// give them at its tail.
///
/// When asked for ([`Builder::recv_pool_incremental`](crate::Builder::recv_pool_incremental))
/// and the kernel supports it (`IOU_PBUF_RING_INC`, Linux 6.12), buffers are consumed
/// incrementally: each receive takes only the bytes it got, from where the previous one stopped,
/// and the buffer leaves the ring when it is full (its completion lacks `IORING_CQE_F_BUF_MORE`).
/// Small messages then share a buffer instead of taking one each.
///
/// The ring holds only part of the pool: as many buffers as recent demand needed (`target`,
/// doubled at a top-up when a receive found the ring empty since the last), topped up before
/// each wait (and before a submission made to free the submission queue) from the buffers
/// returned most recently. A lightly loaded server thus keeps reusing a few warm
/// buffers instead of cycling through, and paging in, the whole pool.
struct BufRing {
    pool: Arc<Pool>,
    entries: *mut types::BufRingEntry,
    layout: Layout,
    mask: u16,
    tail: u16,
    /// Buffers in the ring: given and not yet taken by a completion.
    in_ring: usize,
    /// How many buffers the ring is kept at.
    target: usize,
    /// A pooled receive found the ring empty since the last top-up.
    starved: bool,
    /// Free buffers outside the ring, the most recently returned last.
    spare: Vec<u16>,
    /// Keeps the buffers in the ring and in user hands within the pool's working set.
    circulation: Circulation,
    /// With incremental consumption: per buffer, the bytes the kernel has filled so far.
    filled: Option<Vec<u32>>,
}

/// A buffer ring's entry as the kernel lays it out (`struct io_uring_buf`); in the ring's first
/// entry, `resv` is the ring's tail.
#[repr(C)]
struct RingBuf {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const _: () = assert!(std::mem::size_of::<RingBuf>() == std::mem::size_of::<types::BufRingEntry>());

impl BufRing {
    /// Puts buffers back in the ring for the kernel to use.
    fn give(&mut self, bids: &[u16]) {
        for &bid in bids {
            self.pool.hold(bid);
            let len = u32::try_from(self.pool.size()).unwrap_or(u32::MAX);
            // SAFETY: the index is masked into the ring's `mask + 1` entries, each laid out as
            // `RingBuf`; the entry at the tail is not one the kernel reads until the tail is
            // published below. The fields are written through the raw pointer, never a
            // reference to the whole entry: entry 0's last field is the tail the kernel reads.
            unsafe {
                let e = self
                    .entries
                    .cast::<RingBuf>()
                    .add(usize::from(self.tail & self.mask));
                (&raw mut (*e).addr).write(self.pool.addr(bid) as u64);
                (&raw mut (*e).len).write(len);
                (&raw mut (*e).bid).write(bid);
            }
            self.tail = self.tail.wrapping_add(1);
        }
        // SAFETY: `entries` is the ring's first entry, whose reserved field is the shared tail;
        // publishing it with release ordering makes the entries written above visible first.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Tops the ring up to `target` from the spare buffers, the most recently returned first,
    /// as far as the pool's working set allows.
    fn recycle(&mut self) {
        if std::mem::take(&mut self.starved) {
            // Once per top-up, however many receives found the ring empty meanwhile: a burst
            // of them would otherwise take the target to the whole pool at once.
            self.target = (self.target * 2).min(usize::from(self.pool.count()));
        }
        let from = self.spare.len();
        self.pool.take_returned(&mut self.spare);
        for &bid in &self.spare[from..] {
            self.circulation.back(bid);
        }
        let want = self
            .target
            .saturating_sub(self.in_ring)
            .min(self.circulation.room(self.spare.len()));
        if want > 0 {
            let from = self.spare.len() - want;
            let bids = self.spare.split_off(from);
            self.give(&bids);
            self.in_ring += want;
        }
    }

    /// A receive found the ring empty: keep more buffers in it from the next top-up on.
    fn starved(&mut self) {
        self.starved = true;
    }

    /// Where a completion with buffer `bid` put its `res` bytes, and whether the buffer left
    /// the ring with it.
    ///
    /// With incremental buffers the place is the sum of the buffer's earlier completions, so
    /// this needs the kernel to post the completions that take from one buffer in the order
    /// it filled it, whichever receives they belong to. Linux flushes its deferred completions
    /// (such as a multishot receive's last one, which carries data when its byte limit ends
    /// it) before a multishot operation posts another (Linux 6.15, commit 687b2bae0eff,
    /// "io_uring: ensure deferred completions are flushed for multishot", marked for the
    /// stable kernels from 6.1), and byte limits are passed only from Linux 6.17. Without that
    /// commit, a receive whose next completion could not be posted (its last one then carries
    /// data) might be posted after a later receive's from the same buffer, and the two would be
    /// given each other's place in it. The slices stay within the buffer whatever the sum
    /// (`Pool::buf`).
    fn filled(&mut self, bid: u16, res: i32, flags: u32) -> Filled {
        let Some(filled) = &mut self.filled else {
            self.circulation.lent(bid);
            return Filled {
                bid,
                off: 0,
                released: true,
            };
        };
        let at = &mut filled[usize::from(bid)];
        let off = *at;
        // Only a completion that consumed bytes can have finished the buffer. (Some kernels
        // clear BUF_MORE on an empty completion without taking the buffer off the ring: keeping
        // it is the safe reading.)
        let released = res > 0 && !cqueue::buffer_more(flags);
        if released {
            *at = 0;
            self.circulation.lent(bid);
        } else if res > 0 {
            *at += res as u32;
        }
        Filled { bid, off, released }
    }
}

/// The fewest completion-queue entries a ring gets (16 bytes each; the kernel clamps to its
/// maximum).
const MIN_CQ_ENTRIES: u32 = 32768;

/// `user_data` of the internal read on the worker's eventfd (the cross-thread wake-up).
const WAKE: u64 = u64::MAX;
/// `user_data` of internal cancel requests; their own CQEs are not reported.
const CANCEL: u64 = u64::MAX - 1;
/// `user_data` of the feature probe made when a ring is created.
const PROBE: u64 = u64::MAX - 2;

/// The opcodes this backend needs; checked once when a ring is created.
const REQUIRED: [(u8, &str); 8] = [
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
    (opcode::SendMsg::CODE, "SENDMSG"),
    (opcode::Timeout::CODE, "TIMEOUT"),
    (opcode::AsyncCancel2::CODE, "ASYNC_CANCEL"),
    (opcode::Read::CODE, "READ"),
];

pub(crate) struct Uring {
    ring: IoUring,
    /// The wake-up read completed since the last wait: other threads queued work.
    woken: bool,
    /// The eventfd that other threads write to wake this worker.
    wake_fd: RawFd,
    /// Target of the read on `wake_fd`: a heap allocation (from `Box::into_raw`, never read),
    /// which the kernel may write while `wake_armed`; freed in `Drop` unless it is.
    wake_buf: *mut u64,
    wake_armed: bool,
    /// Set once everything was cancelled for good: no more wake-up reads.
    quiescing: bool,
    /// Events reaped while making room in a full submission queue.
    stash: Vec<Event>,
    bufs: Option<BufRing>,
    /// Set when the kernel may still write memory we hold: leak instead of freeing.
    abandoned: bool,
    /// The kernel ends a multishot receive at a byte limit (`optlen`, Linux 6.17).
    recv_limits: bool,
    /// The kernel has multishot receives (Linux 6.0), which pooled receives are.
    recv_multishot: bool,
    /// Created disabled, as a single-issuer ring with deferred task work: the first thread
    /// that enters the kernel with it (to wait, or to flush a full submission queue) enables
    /// it and is its only driver from then on.
    disabled: bool,
    /// Made single-issuer with deferred task work.
    single: bool,
    /// The timeouts in the kernel, by id: when each is due, and, once a cancel was asked, how
    /// it ends (see [`Timer`]).
    timers: HashMap<u64, Timer, BuildHasherDefault<IdHasher>>,
    /// A buffer ring the kernel refused to unregister (see `Drop`): freed after `ring`, whose
    /// descriptor's close tears the registration down, as fields drop in declaration order.
    unregistered_late: Option<LateBufRing>,
}

/// The memory of a buffer ring still registered with a ring being dropped, and the pool its
/// entries point into; freed when dropped.
struct LateBufRing {
    entries: *mut types::BufRingEntry,
    layout: Layout,
    _pool: Arc<Pool>,
}

impl Drop for LateBufRing {
    fn drop(&mut self) {
        // SAFETY: dropped only as a field of `Uring` declared after its `IoUring`, whose
        // descriptor is closed by then, so no request can be submitted to pick a buffer from
        // this ring, and none was left (`Uring::drop` leaks the ring instead when one may be);
        // the kernel reads a buffer ring's entries only to pick a buffer, not to tear it down.
        unsafe { alloc::dealloc(self.entries.cast(), self.layout) };
    }
}

// SAFETY: the raw pointers (the buffer ring's, the wake-up read's buffer) refer to memory owned
// by this driver (and the pool it holds); it moves between threads together with the driver and
// is used by one thread at a time.
unsafe impl Send for Uring {}

impl Uring {
    /// Creates a ring of `entries` submission slots that wakes up when `wake_fd` is written.
    ///
    /// # Errors
    /// The kernel's refusal (`EPERM` under a seccomp filter or `kernel.io_uring_disabled`,
    /// `ENOSYS` on old kernels, `ENOMEM` under a low `RLIMIT_MEMLOCK`), or `Unsupported` when an
    /// opcode or feature this backend needs is missing.
    pub(crate) fn new(entries: u32, wake_fd: RawFd, deferred: bool) -> io::Result<Self> {
        // With `deferred` (`Builder::single_thread_workers`): a single-issuer ring whose task
        // work (the kernel's part of completing an operation, such as running a multishot
        // receive once data arrived) waits for the worker's next wait and is then run in one
        // batch; created disabled, so that the worker's own thread enables it and becomes its
        // only driver (Linux 6.1). Otherwise, or where the kernel lacks that: cooperative task
        // work (no interrupt of the worker for each completion), else the plain ring.
        // A roomy completion queue: when it is full, the kernel ends multishot operations (a
        // receive's next data then waits until it is posted again), and a busy worker with
        // thousands of connections can see that many completions between two reaps.
        let cq = entries.saturating_mul(8).max(MIN_CQ_ENTRIES);
        let single = || {
            IoUring::builder()
                .setup_cqsize(cq)
                .setup_clamp()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .setup_r_disabled()
                .build(entries)
        };
        let shared = || match IoUring::builder()
            .setup_cqsize(cq)
            .setup_clamp()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(entries)
        {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
                .setup_cqsize(cq)
                .setup_clamp()
                .build(entries),
            other => other,
        };
        // Created by a thread of its own: the kernel counts the thread that creates a ring
        // among the ring's users, and when the ring is torn down it sends each user task work,
        // as a signal, which makes that thread's next blocking call with a timeout (a socket
        // read with `SO_RCVTIMEO`) fail with `EINTR` (seen on Linux 6.18). A thread that builds
        // a port and later drops it is then left alone; a thread that waits on a worker is such
        // a user all the same. The kernel probes run there too, for the same reason.
        let create = || match deferred.then(single) {
            Some(Ok(ring)) => Ok((ring, true)),
            Some(Err(e)) if e.raw_os_error() != Some(libc::EINVAL) => Err(e),
            _ => shared().map(|ring| (ring, false)),
        };
        let ((ring, disabled), (recv_multishot, recv_limits)) =
            on_own_thread(|| Ok((create()?, kernel_support()?)))?;
        if !ring.params().is_feature_ext_arg() || !ring.params().is_feature_nodrop() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks EXT_ARG or NODROP (Linux 5.19 or later is needed)",
            ));
        }
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in REQUIRED {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring opcode {name} is not supported by this kernel"),
                ));
            }
        }
        Ok(Uring {
            recv_multishot,
            recv_limits,
            disabled,
            single: disabled,
            unregistered_late: None,
            ring,
            woken: false,
            wake_fd,
            wake_buf: Box::into_raw(Box::new(0)),
            wake_armed: false,
            quiescing: false,
            stash: Vec::new(),
            timers: HashMap::default(),
            bufs: None,
            abandoned: false,
        })
    }

    /// Enables a ring created disabled, from the thread that will drive it from now on.
    fn enable(&mut self) -> io::Result<()> {
        if self.disabled {
            self.ring.submitter().register_enable_rings()?;
            self.disabled = false;
        }
        Ok(())
    }

    /// Queues one SQE, making room first when the submission queue is full.
    ///
    /// # Safety
    /// Every pointer in `sqe` must stay valid until its CQE is reaped.
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        let mut short_of_memory = 0;
        loop {
            // SAFETY: the caller guarantees that what `sqe` points to outlives the operation.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            // Entering the kernel: from the thread that drives the ring from now on.
            self.enable()?;
            // The receives among what is submitted now find the ring topped up, as at a wait.
            if let Some(b) = &mut self.bufs {
                b.recycle();
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The kernel could not allocate for a request for now: let completions free
                // some, for a while, before giving up.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && short_of_memory < 1000 => {
                    short_of_memory += 1;
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => return Err(e),
            }
            // Reaping frees completion slots, which a kernel short of them needs before it
            // takes more submissions.
            let mut stash = std::mem::take(&mut self.stash);
            self.reap(&mut stash);
            self.stash = stash;
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        if self.wake_armed || self.quiescing {
            return Ok(());
        }
        let sqe = opcode::Read::new(types::Fd(self.wake_fd), self.wake_buf.cast(), 8)
            .build()
            .user_data(WAKE);
        // SAFETY: `wake_buf` is a heap allocation owned by `self`; while `wake_armed` is set,
        // `Drop` leaks it instead of freeing it. (The kernel holds its own reference to the
        // eventfd's file while the read is pending.)
        unsafe { self.push(&sqe)? };
        self.wake_armed = true;
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Event>) {
        let mut taken = 0;
        for cqe in self.ring.completion() {
            match cqe.user_data() {
                WAKE => {
                    // Remembered even when reaped while making room in the submission queue:
                    // the next wait must not block, or the queued work would wait with it.
                    self.wake_armed = false;
                    self.woken = true;
                }
                CANCEL => {}
                id => {
                    let mut res = cqe.result();
                    if !self.timers.is_empty() {
                        if let Some(Timer { ends: Some(e), .. }) = self.timers.remove(&id) {
                            if res == -libc::ETIME || res == -libc::ECANCELED {
                                res = -e;
                            }
                        }
                    }
                    let flags = cqe.flags();
                    let buf = match (cqueue::buffer_select(flags), &mut self.bufs) {
                        (Some(bid), Some(b)) => Some(b.filled(bid, res, flags)),
                        _ => None,
                    };
                    taken += usize::from(buf.is_some_and(|f| f.released));
                    out.push(Event {
                        id,
                        res,
                        more: cqueue::more(flags),
                        buf,
                    });
                }
            }
        }
        if let Some(b) = &mut self.bufs {
            b.in_ring = b.in_ring.saturating_sub(taken);
        }
    }
}

/// A timeout in the kernel.
struct Timer {
    /// When it is due, on the monotonic clock (`None`: never, too far to represent).
    due: Option<Duration>,
    /// How it ends, once a cancel was asked (`ETIME`: it was due; `ECANCELED`).
    ends: Option<i32>,
}

/// Whether this process reads the monotonic clock as the kernel's timers do: not in a time
/// namespace with an offset for it (`/proc/self/timens_offsets`, Linux 5.6).
fn monotonic_is_the_kernels() -> bool {
    static SAME: OnceLock<bool> = OnceLock::new();
    *SAME.get_or_init(|| {
        std::fs::read_to_string("/proc/self/timens_offsets")
            .map_or(true, |offsets| no_monotonic_offset(&offsets))
    })
}

/// Whether `timens_offsets` (lines of a clock's name, seconds and nanoseconds) moves the
/// monotonic clock by nothing.
fn no_monotonic_offset(timens_offsets: &str) -> bool {
    timens_offsets.lines().all(|line| {
        let mut words = line.split_whitespace();
        words.next() != Some("monotonic") || words.all(|w| w == "0")
    })
}

/// The monotonic clock's time (`CLOCK_MONOTONIC`, the clock of `Instant` and of the kernel's
/// absolute timeouts).
fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live local that clock_gettime writes.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// What an `io_uring_enter` returned, with the outcomes that only end it early taken as done:
/// the wait timed out, a signal came, or the kernel was short of completion slots or memory
/// (what was not submitted stays queued for the next enter).
fn entered(res: io::Result<usize>) -> io::Result<()> {
    let early = |e: &io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
        )
    };
    match res {
        Err(e) if !early(&e) => Err(e),
        _ => Ok(()),
    }
}

/// The longest single wait: the port's loop waits again for what is left of a longer one.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// The timespec of a wait of `t`, at most [`MAX_WAIT`]: the kernel adds a wait to the current
/// time without saturating, so one of centuries would wrap into the past and end at once, and
/// the worker would spin until its deadline.
fn wait_timespec(t: Duration) -> types::Timespec {
    let t = capped_wait(t);
    types::Timespec::new()
        .sec(t.as_secs())
        .nsec(t.subsec_nanos())
}

fn capped_wait(t: Duration) -> Duration {
    t.min(MAX_WAIT)
}

/// A send of `bytes` (its SQE points into them).
fn send_sqe(fd: types::Fd, bytes: &[u8]) -> squeue::Entry {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    opcode::Send::new(fd, bytes.as_ptr(), len)
        .flags(libc::MSG_NOSIGNAL)
        .build()
}

/// What the kernel supports beyond the opcodes: whether it takes multishot receives, and
/// whether those take a byte limit. The same for every ring of the process, so probed once.
///
/// The probes run on a plain ring of their own (a ring created disabled takes no submission
/// until its driver enables it), and are to run on the thread that creates the rings, not the
/// one that builds the port: a thread that submits to a ring is one of its users, whom the
/// kernel interrupts when the ring is torn down (see `Uring::new`).
///
/// # Errors
/// A kernel that cannot cancel by "any" (see [`probe_cancel_any`]), or a probe that could not
/// run (no ring, no socket pair).
fn kernel_support() -> io::Result<(bool, bool)> {
    static SUPPORT: OnceLock<(bool, bool)> = OnceLock::new();
    if let Some(&known) = SUPPORT.get() {
        return Ok(known);
    }
    let mut ring = IoUring::builder().build(8)?;
    probe_cancel_any(&mut ring)?;
    let mut probe = |limit| {
        probe_multishot_recv(&mut ring, limit)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring multishot receive probe: {e}")))
    };
    let multishot = probe(0)?;
    let probed = (multishot, multishot && probe(1)?);
    Ok(*SUPPORT.get_or_init(|| probed))
}

/// Runs `f` on a thread of its own and returns what it returned (see `Uring::new` for why).
fn on_own_thread<T: Send>(f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("ringport-setup".into())
            .spawn_scoped(scope, f)?
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("an io_uring setup thread panicked")))
    })
}

/// Checks, on a new ring, that cancellation by "any" works (Linux 5.19): shutdown, close and
/// drop rely on it. A ring with nothing in flight answers `ENOENT`.
fn probe_cancel_any(ring: &mut IoUring) -> io::Result<()> {
    let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::any())
        .build()
        .user_data(PROBE);
    // SAFETY: a cancel request points at no memory.
    unsafe { ring.submission().push(&sqe) }
        .map_err(|_| io::Error::other("io_uring: no room for the cancel probe"))?;
    loop {
        match ring.submit_and_wait(1) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
            Ok(_) => break,
        }
    }
    let res = ring
        .completion()
        .find(|c| c.user_data() == PROBE)
        .map_or(-libc::EINVAL, |c| c.result());
    if res == -libc::ENOENT || res >= 0 {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "io_uring cannot cancel by \"any\" ({}); Linux 5.19 or later is needed",
                io::Error::from_raw_os_error(-res)
            ),
        ))
    }
}

/// The byte offset of `optlen` in a 64-byte SQE (a union with `file_index`, after
/// `personality`).
const SQE_OPTLEN: usize = 44;

/// `sqe` with its `optlen` field set: for a multishot receive, the bytes after which the kernel
/// ends it. The `io-uring` crate has no setter for it.
fn with_optlen(sqe: squeue::Entry, optlen: u32) -> squeue::Entry {
    const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around the kernel's 64-byte `io_uring_sqe`
    // (checked above), which has no padding, so every byte is initialized and any bytes make a
    // valid value; bytes 44..48 are the `optlen` / `file_index` / `splice_fd_in` union.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute(sqe) };
    raw[SQE_OPTLEN..SQE_OPTLEN + 4].copy_from_slice(&optlen.to_ne_bytes());
    // SAFETY: as above: the bytes of an SQE, back into the type that holds them.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

/// Whether the kernel takes a multishot receive (Linux 6.0) with a byte limit of `limit` (0: no
/// limit; a limit needs Linux 6.17). A receive from a socket with a byte waiting, into a buffer
/// group that does not exist: a kernel that knows the request fails it for want of a buffer
/// (`ENOBUFS`); one that does not refuses it (`EINVAL`: an unknown flag, or a field that must be
/// zero). Either way it completes while being submitted.
///
/// # Errors
/// No socket pair for the probe (out of descriptors), or the submission failed.
fn probe_multishot_recv(ring: &mut IoUring, limit: u32) -> io::Result<bool> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    (&theirs).write_all(b"x")?;
    let sqe = with_optlen(
        opcode::RecvMulti::new(types::Fd(ours.as_raw_fd()), PROBE_GROUP).build(),
        limit,
    )
    .user_data(PROBE);
    // SAFETY: the receive selects its buffer from a group that does not exist, so the kernel
    // is handed no memory.
    unsafe { ring.submission().push(&sqe) }
        .map_err(|_| io::Error::other("no room in the submission queue"))?;
    // On an error the caller drops the ring, and with it a request that may still be queued.
    loop {
        match ring.submit_and_wait(1) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
            Ok(_) => break,
        }
    }
    let res = ring
        .completion()
        .find(|c| c.user_data() == PROBE)
        .map_or(-libc::EINVAL, |c| c.result());
    Ok(res == -libc::ENOBUFS)
}

impl Driver for Uring {
    fn cancels_at_thread_exit(&self) -> bool {
        true
    }

    fn start(&mut self, id: u64, target: Target, body: &mut OpBody) -> io::Result<()> {
        let fd = types::Fd(target.fd);
        let sqe = match body {
            OpBody::Accept => opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(libc::SOCK_CLOEXEC)
                .build(),
            OpBody::AcceptMulti => opcode::AcceptMulti::new(fd)
                .flags(libc::SOCK_CLOEXEC)
                .build(),
            OpBody::Connect(addr) => {
                opcode::Connect::new(fd, addr.as_ptr().cast(), addr.len()).build()
            }
            OpBody::Recv(buf) => {
                let spare = buf.spare_capacity_mut();
                let len = u32::try_from(spare.len()).unwrap_or(u32::MAX);
                opcode::Recv::new(fd, spare.as_mut_ptr().cast(), len).build()
            }
            OpBody::Send(..) | OpBody::SendPooled(..) => send_sqe(fd, body.unsent_head()),
            OpBody::Timeout(after, ts) => {
                // Due `after` from now, as on epoll: an absolute time on the monotonic clock,
                // not a relative one, which the kernel would count from when it takes the
                // request (the worker's next wait). Relative in a time namespace that moves
                // the monotonic clock, whose offset the kernel leaves out of io_uring's
                // absolute timeouts.
                let due = monotonic_now().checked_add(*after);
                let (at, flags) = if monotonic_is_the_kernels() {
                    (due.unwrap_or(Duration::MAX), types::TimeoutFlags::ABS)
                } else {
                    (*after, types::TimeoutFlags::empty())
                };
                *ts = types::Timespec::new()
                    .sec(at.as_secs().min(i64::MAX as u64))
                    .nsec(at.subsec_nanos());
                let sqe = opcode::Timeout::new(ts).flags(flags).build();
                // SAFETY: `ts` is in the body that the port keeps boxed, untouched, until this
                // id's event has been reaped.
                unsafe { self.push(&sqe.user_data(id))? };
                self.timers.insert(id, Timer { due, ends: None });
                return Ok(());
            }
            OpBody::RecvPooled(limit) => {
                let sqe = opcode::RecvMulti::new(fd, POOL_GROUP).build();
                match *limit {
                    limit if limit > 0 && self.recv_limits => with_optlen(sqe, limit),
                    _ => sqe,
                }
            }
            // One buffer: a plain send, which the kernel sets up with less work.
            OpBody::SendGather(g) if g.bufs.len() <= 1 => send_sqe(fd, g.first()),
            OpBody::SendGather(g) => opcode::SendMsg::new(fd, g.prepare())
                .flags(libc::MSG_NOSIGNAL as u32)
                .build(),
        };
        // SAFETY: the port keeps `body` (the buffer, address, timespec, or message header and
        // iovecs that the SQE points into) boxed in its in-flight table, untouched, until this
        // id's event has been reaped.
        unsafe { self.push(&sqe.user_data(id)) }
    }

    fn cancel(&mut self, what: Cancel) -> bool {
        let all = matches!(what, Cancel::All);
        // A timeout ends as it stood when the cancel was asked, whenever the kernel gets to
        // the request: expired if it was due, else cancelled.
        let now = monotonic_now();
        let decide = |t: &mut Timer| {
            t.ends.get_or_insert(if t.due.is_some_and(|d| d <= now) {
                libc::ETIME
            } else {
                libc::ECANCELED
            });
        };
        match what {
            Cancel::Op(id) => self.timers.get_mut(&id).into_iter().for_each(decide),
            Cancel::All => self.timers.values_mut().for_each(decide),
            Cancel::Fd(_) => {}
        }
        let builder = match what {
            Cancel::Op(id) => types::CancelBuilder::user_data(id),
            Cancel::Fd(fd) => types::CancelBuilder::fd(types::Fd(fd)).all(),
            Cancel::All => types::CancelBuilder::any(),
        };
        let sqe = opcode::AsyncCancel2::new(builder).build().user_data(CANCEL);
        // SAFETY: a cancel request points at no memory.
        match unsafe { self.push(&sqe) } {
            Ok(()) => {
                // Once everything is being cancelled, the wake-up read is not armed again
                // (only after the request is queued: until then a post must still wake us).
                self.quiescing |= all;
                true
            }
            Err(e) => {
                tracing::warn!("io_uring: could not queue a cancel request: {e}");
                false
            }
        }
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()> {
        self.enable()?;
        self.arm_wake()?;
        if let Some(b) = &mut self.bufs {
            b.recycle();
        }
        out.append(&mut self.stash);
        let ready = !out.is_empty() || self.woken || !self.ring.completion().is_empty();
        self.woken = false;
        let res = match timeout {
            _ if ready => self.ring.submit(),
            Some(t) if t.is_zero() => self.ring.submit(),
            Some(t) => {
                let ts = wait_timespec(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        // A wait that the kernel, short of memory, ended at once: a pause before the port's
        // loop comes back, rather than a spin until memory is freed.
        let short_of_memory = !ready
            && !timeout.is_some_and(|t| t.is_zero())
            && matches!(&res, Err(e) if e.raw_os_error() == Some(libc::EAGAIN));
        entered(res)?;
        if short_of_memory {
            std::thread::sleep(Duration::from_micros(100));
        }
        // Buffers reaped now leave the ring as of now; those held long enough are parked.
        if let Some(b) = &mut self.bufs {
            b.circulation.tick();
        }
        self.reap(out);
        // The read reset the eventfd's counter; re-arm it for the next post.
        self.arm_wake()?;
        self.woken = false;
        Ok(())
    }

    fn flush(&mut self, out: &mut Vec<Event>) -> io::Result<()> {
        let (queued, overflow) = {
            let sq = self.ring.submission();
            (sq.len(), sq.cq_overflow())
        };
        if !self.single || self.disabled || overflow {
            return self.wait(Some(Duration::ZERO), out);
        }
        if let Some(b) = &mut self.bufs {
            b.recycle();
        }
        out.append(&mut self.stash);
        if queued > 0 {
            // SAFETY: the kernel takes the queued submissions, whose pointers `push`'s callers
            // keep valid until their completions are reaped; their tail was published when
            // `push` dropped its view of the queue. No flags (so no GETEVENTS: deferred task
            // work stays queued) and no argument (a null pointer, read by the kernel only with
            // EXT_ARG).
            let res = unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(queued as u32, 0, 0, None)
            };
            entered(res)?;
        }
        if let Some(b) = &mut self.bufs {
            b.circulation.tick();
        }
        self.reap(out);
        self.arm_wake()
    }

    fn set_pool(&mut self, pool: Arc<Pool>, incremental: bool) -> io::Result<()> {
        if !self.recv_multishot {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel has no multishot receives (Linux 6.0), which a receive pool needs",
            ));
        }
        // `Pool::new` keeps the count within 1..=32768, the most a buffer ring holds.
        let entries = u16::try_from(u32::from(pool.count()).next_power_of_two())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "receive pool too large"))?;
        let bytes = usize::from(entries) * std::mem::size_of::<types::BufRingEntry>();
        // The kernel wants the ring to start on a page: 4 KiB, or 16 or 64 KiB on some arm64
        // kernels (`EINVAL` otherwise).
        // SAFETY: sysconf only reads a system constant.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        let layout = Layout::from_size_align(bytes, page)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size; zeroed memory is a valid empty ring.
        let ring = unsafe { alloc::alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
        if ring.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let register = |flags: u16| {
            // SAFETY: `ring` is a page-aligned allocation of `entries` entries that stays alive
            // until `Drop`, which leaks it if an operation was not given back (and otherwise
            // frees it, no request being left that could pick a buffer from it).
            unsafe {
                self.ring.submitter().register_buf_ring_with_flags(
                    ring as u64,
                    entries,
                    POOL_GROUP,
                    flags,
                )
            }
        };
        // Incremental consumption if asked for and the kernel knows it (Linux 6.12), else
        // whole buffers.
        let registered = match incremental.then(|| register(IOU_PBUF_RING_INC)) {
            Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => register(0).map(|()| false),
            Some(r) => r.map(|()| true),
            None => register(0).map(|()| false),
        };
        let incremental = match registered {
            Ok(incremental) => incremental,
            Err(e) => {
                // SAFETY: allocated above with this layout, never shared with the kernel.
                unsafe { alloc::dealloc(ring.cast(), layout) };
                return Err(e);
            }
        };
        let count = pool.count();
        let mut bufs = BufRing {
            entries: ring,
            layout,
            mask: entries - 1,
            tail: 0,
            in_ring: 0,
            target: RING_START.min(usize::from(count)),
            starved: false,
            // Popped from the end: buffer 0 first.
            spare: (0..count).rev().collect(),
            filled: incremental.then(|| vec![0; usize::from(count)]),
            circulation: Circulation::new(&pool),
            pool,
        };
        bufs.recycle();
        self.bufs = Some(bufs);
        Ok(())
    }

    fn pool_incremental(&self) -> bool {
        self.bufs.as_ref().is_some_and(|b| b.filled.is_some())
    }

    fn pool_starved(&mut self) {
        if let Some(b) = &mut self.bufs {
            b.starved();
        }
    }

    fn pool_parked(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.circulation.parked())
    }

    fn single_thread(&self) -> bool {
        self.single
    }

    fn recv_limits(&self) -> bool {
        self.recv_limits
    }

    fn abandon(&mut self) {
        self.abandoned = true;
    }

    fn idle(&self) -> bool {
        !self.wake_armed
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if let Some(b) = self.bufs.take() {
            if self.abandoned {
                // The kernel may still pick buffers from this ring: never free it.
                std::mem::forget(b);
            } else if let Err(e) = self.ring.submitter().unregister_buf_ring(POOL_GROUP) {
                // Refused (`EEXIST`) when a single-issuer ring is dropped on another thread
                // than its own. No request is left to read it, but the kernel keeps its address
                // until the ring's descriptor closes: freed after that.
                tracing::debug!("io_uring: unregistering the buffer ring: {e}");
                self.unregistered_late = Some(LateBufRing {
                    entries: b.entries,
                    layout: b.layout,
                    _pool: b.pool,
                });
            } else {
                // SAFETY: the ring is no longer registered, so the kernel holds no pointer to
                // it.
                unsafe { alloc::dealloc(b.entries.cast(), b.layout) };
            }
        }
        // While the read is armed, the kernel may still complete it into this buffer as the
        // ring is torn down: eight bytes leaked once per worker are the price of never freeing
        // it early.
        if !self.wake_armed {
            // SAFETY: `wake_buf` came from `Box::into_raw` and is freed only here, once; no
            // read is armed, so the kernel holds no pointer to it.
            drop(unsafe { Box::from_raw(self.wake_buf) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::PARK_AFTER;

    /// A ring for `pool`, kept at `target` buffers, that no kernel ever sees; free it with
    /// [`free_unregistered`].
    fn unregistered(pool: &Arc<Pool>, target: usize) -> BufRing {
        let count = usize::from(pool.count()).next_power_of_two();
        let layout =
            Layout::from_size_align(count * std::mem::size_of::<types::BufRingEntry>(), 4096)
                .unwrap();
        // SAFETY: a non-zero size; zeroed memory is a valid empty ring, never registered with
        // a kernel here.
        let entries = unsafe { alloc::alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
        assert!(!entries.is_null());
        BufRing {
            entries,
            layout,
            mask: u16::try_from(count - 1).unwrap(),
            tail: 0,
            in_ring: 0,
            target,
            starved: false,
            spare: (0..pool.count()).rev().collect(),
            circulation: Circulation::manual(pool),
            filled: None,
            pool: Arc::clone(pool),
        }
    }

    fn free_unregistered(b: BufRing) {
        // SAFETY: allocated by `unregistered` with this layout; no kernel ever saw it.
        unsafe { alloc::dealloc(b.entries.cast(), b.layout) };
    }

    /// The ring is topped up within the pool's working set: two buffers of four, then one
    /// while a slice holds the other, then two again once that one is parked.
    #[test]
    fn the_ring_holds_no_more_than_the_working_set_allows() {
        let pool = Pool::new(16, 4, 2).unwrap();
        let mut b = unregistered(&pool, 4);
        b.recycle();
        assert_eq!(b.in_ring, 2, "the working set, not the target");
        // A receive takes the first buffer given (buffer 1: the spare list is popped from its
        // end) and a slice holds it.
        let f = b.filled(1, 16, 0);
        assert!(f.released);
        b.in_ring -= 1;
        // SAFETY: the ring above holds the buffer, and no kernel writes it: these are its
        // bytes as a receive would leave them, and the slice covers only them.
        let slice = unsafe {
            std::ptr::write_bytes(pool.addr(1), 0x5a, 16);
            pool.buf(1, 0, 16)
        };
        pool.release(1);
        b.recycle();
        assert_eq!(b.in_ring, 1, "one in user hands, one in the ring");
        b.circulation.tick_at(PARK_AFTER.as_millis() as u64);
        b.recycle();
        assert_eq!(
            b.in_ring, 2,
            "the held buffer is parked: another takes its place"
        );
        drop(slice);
        free_unregistered(b);
    }

    /// With incremental consumption a buffer's completions follow one another in it: each
    /// starts where the one before ended; an empty one moves nothing and, with or without
    /// `BUF_MORE`, leaves the buffer in the ring; the first that consumed bytes without
    /// `BUF_MORE` takes it off the ring, and its next use starts at 0.
    #[test]
    fn incremental_completions_follow_one_another_in_a_buffer() {
        const BUF_MORE: u32 = 1 << 4;
        assert!(cqueue::buffer_more(BUF_MORE));
        let pool = Pool::new(4096, 4, 4).unwrap();
        let mut b = unregistered(&pool, 4);
        b.filled = Some(vec![0; 4]);
        b.recycle();
        let at = |f: Filled| (f.bid, f.off, f.released);
        assert_eq!(at(b.filled(2, 100, BUF_MORE)), (2, 0, false));
        assert_eq!(at(b.filled(2, 50, BUF_MORE)), (2, 100, false));
        assert_eq!(
            at(b.filled(2, 0, 0)),
            (2, 150, false),
            "an empty completion"
        );
        assert_eq!(at(b.filled(2, 0, BUF_MORE)), (2, 150, false));
        // Another buffer's completions do not move this one's offset.
        assert_eq!(at(b.filled(3, 10, BUF_MORE)), (3, 0, false));
        assert_eq!(at(b.filled(2, 4096 - 150, 0)), (2, 150, true));
        assert_eq!(at(b.filled(2, 7, BUF_MORE)), (2, 0, false), "used again");
        assert_eq!(at(b.filled(3, 5, BUF_MORE)), (3, 10, false));
        free_unregistered(b);
    }

    /// However many receives found the ring empty between two top-ups, the ring's target
    /// doubles once at the next.
    #[test]
    fn a_burst_of_starved_receives_doubles_the_target_once() {
        let pool = Pool::new(16, 1024, 1024).unwrap();
        let mut b = unregistered(&pool, 4);
        b.recycle();
        assert_eq!(b.in_ring, 4);
        for _ in 0..10 {
            b.starved();
        }
        assert_eq!(b.target, 4, "changed before the top-up");
        b.recycle();
        assert_eq!(b.target, 8);
        assert_eq!(b.in_ring, 8);
        b.recycle();
        assert_eq!(b.target, 8, "doubled again without a starved receive");
        free_unregistered(b);
    }

    /// A time namespace's offset for the monotonic clock is seen in `timens_offsets`.
    #[test]
    fn a_time_namespace_that_moves_the_monotonic_clock_is_seen() {
        use super::no_monotonic_offset;
        assert!(no_monotonic_offset("monotonic 0 0\nboottime 0 0\n"));
        assert!(no_monotonic_offset(""));
        assert!(no_monotonic_offset("boottime 86400 0\n"));
        assert!(!no_monotonic_offset("monotonic 86400 0\nboottime 0 0\n"));
        assert!(!no_monotonic_offset("monotonic 0 5\n"));
    }

    /// A wait of centuries (still a valid `Instant` away) is cut to one the kernel can add to
    /// its clock; shorter ones are left alone.
    #[test]
    fn waits_are_capped_below_the_kernels_clock_range() {
        assert_eq!(capped_wait(Duration::from_secs(1 << 34)), MAX_WAIT);
        assert_eq!(capped_wait(Duration::MAX), MAX_WAIT);
        let short = Duration::from_millis(1500);
        assert_eq!(capped_wait(short), short);
        // The kernel's limit is about 292 years (`KTIME_SEC_MAX`), less the clock's own value.
        assert!(MAX_WAIT < Duration::from_secs(100 * 365 * 24 * 3600));
    }
}
