//! `uring`: one thread, one io_uring: overlapped I/O with completion routines.
//!
//! Nothing waits for readiness: the thread hands operations to the kernel, which performs the
//! transfer, and reacts to their completions, each tagged with its `user_data` (the overlapped
//! structure's role): a connection's slot number, or one of the constants below. Each
//! connection owns one buffer and has exactly one operation in flight at any time, a receive
//! into the buffer or a send of what the receive brought (re-posted after a short send), so
//! bytes go back in order and an unsent echo stops the reading. The listener has one multishot
//! accept (one request, a completion per connection: a pool of `AcceptEx` in one), re-armed
//! when the kernel ends it. The stop is a poll request on the [`Stop`]'s descriptor, the
//! accept pause and the drain deadline are timeout requests: the thread only ever waits in
//! `io_uring_enter`.
//!
//! The stop cancels the accept (its last completion closes the listener) and every pending
//! receive: a connection waiting for input is idle. From then on every receive is linked to a
//! timeout ([`DRAIN_QUIET`]): input the peer sent before the stop may still be on its way (see
//! the crate docs). A receive cancelled by the stop, or an echo that is out, posts such a
//! receive; when one is cancelled by its timeout, the connection is closed with a FIN unless
//! `FIONREAD` says input came after all (then it gets another receive, which takes that input
//! at once). So everything a peer sent before the stop is echoed, and input that arrived just
//! as a receive was cancelled is not dropped. The drain deadline cancels whatever is still in
//! flight.
//!
//! Memory safety rests on one rule: a buffer the kernel may use is neither touched nor freed.
//! A connection leaves the table only when its operation has completed ([`Conn::op`] is
//! `None`); to end one early it is cancelled, and its completion awaited. A buffer is a
//! `Box<[u8]>`, so moving the connection (the table grows) does not move the bytes.
//!
//! Limits: a full submission ring is submitted to make room; where the kernel refuses that
//! submission for now (`EAGAIN`: short of memory; `EBUSY`: completions to reap first), the
//! entries wait in a backlog of the server's own, in order, and go to the ring after the next
//! reap, so a passing shortage neither closes a connection nor stops the server. A full
//! completion ring is not an error, since the kernel keeps the overflow (`IORING_FEAT_NODROP`,
//! Linux 5.5) until it is reaped. Multishot accept needs Linux 5.19: on an older kernel the
//! model refuses to start.

use std::collections::VecDeque;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tracing::{debug, error, info, warn};

use crate::conn::{accept_failed, RateLimit, ACCEPT_BACKOFF, ACCEPT_TURN};
use crate::sys::{self, AcceptError};
use crate::{Config, Stats, Stop, DRAIN_QUIET, READ_SIZE};

const STOP: u64 = u64::MAX;
const ACCEPT: u64 = u64::MAX - 1;
const ACCEPT_RETRY: u64 = u64::MAX - 2;
const DEADLINE: u64 = u64::MAX - 3;
/// The completion of a cancel request itself (its target completes on its own).
const CANCEL: u64 = u64::MAX - 4;
/// The completion of a receive's linked timeout (the receive completes on its own).
const QUIET: u64 = u64::MAX - 5;

/// Submission queue entries.
const ENTRIES: u32 = 256;
/// Completion queue entries (16 bytes each; the kernel clamps to its maximum). Every
/// connection has an operation in flight, and with thousands of busy connections thousands
/// complete between two reaps: a completion queue smaller than that overflows, and the kernel
/// then allocates and later copies an entry for each completion that did not fit, which
/// doubled the model's CPU per message at 10,000 connections.
const CQ_ENTRIES: u32 = 32768;

/// Serves on a thread of its own, which alone uses the ring: the kernel interrupts every
/// thread that used a ring when the ring is torn down, which would make the caller's next
/// blocking call with a timeout fail with `EINTR`.
pub(crate) fn serve(listener: TcpListener, config: &Config, stop: &Stop) -> io::Result<Stats> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("ringport-uring-model".into())
            .spawn_scoped(s, || serve_here(listener, config, stop))
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start the serving thread: {e}")))?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn serve_here(listener: TcpListener, config: &Config, stop: &Stop) -> io::Result<Stats> {
    let ring = IoUring::builder()
        .setup_cqsize(CQ_ENTRIES)
        .setup_clamp()
        .build(ENTRIES)
        .map_err(|e| io::Error::new(e.kind(), format!("io_uring: {e}")))?;
    check_kernel(&ring)?;
    let mut server = Server {
        ring,
        conns: Vec::new(),
        free: Vec::new(),
        live: 0,
        listener: Some(listener),
        accept: Accept::Off,
        stopping: false,
        deadline_passed: false,
        stats: Stats::default(),
        accept_warnings: RateLimit::new(),
        accept_failures: 0,
        failed: None,
        backoff: Box::new(timespec(ACCEPT_BACKOFF)),
        drain: Box::new(timespec(config.drain_timeout.min(crate::FAR))),
        quiet: Box::new(timespec(DRAIN_QUIET)),
        backlog: VecDeque::new(),
    };
    server.run(stop)
}

/// Refuses, at the start rather than at the first accept, a kernel without multishot accept
/// (Linux 5.19). That is a flag of the accept opcode, which a probe does not list; the socket
/// opcode came in the same release, so its presence stands for it.
fn check_kernel(ring: &IoUring) -> io::Result<()> {
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| io::Error::new(e.kind(), format!("io_uring probe: {e}")))?;
    if probe.is_supported(opcode::Socket::CODE) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the uring model needs multishot accept (Linux 5.19 or later)",
        ))
    }
}

/// The state of the listener's accept request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accept {
    /// A multishot accept is in flight.
    Armed,
    /// Paused after running out of descriptors; an `ACCEPT_RETRY` timeout is in flight.
    Backoff,
    /// Nothing in flight.
    Off,
}

/// The one operation a connection has in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Recv,
    /// A receive while stopping, linked to a [`DRAIN_QUIET`] timeout.
    QuietRecv,
    Send,
}

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    buf: Box<[u8]>,
    /// `buf[..filled]` came from the last receive; `buf[..sent]` of it is echoed.
    filled: usize,
    sent: usize,
    op: Option<Op>,
}

struct Server {
    ring: IoUring,
    /// The connections by slot (a connection's operations carry its slot as `user_data`).
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    live: usize,
    listener: Option<TcpListener>,
    accept: Accept,
    stopping: bool,
    deadline_passed: bool,
    stats: Stats,
    accept_warnings: RateLimit,
    /// Accepts that failed in a row with an error the man page says to retry.
    accept_failures: usize,
    /// The listener's failure, reported once the connections are drained.
    failed: Option<io::Error>,
    /// Timeout lengths; the kernel reads them when their requests are submitted, so they live
    /// (boxed, at a fixed address) as long as the server.
    backoff: Box<types::Timespec>,
    drain: Box<types::Timespec>,
    quiet: Box<types::Timespec>,
    /// Entries the kernel could not take for now, in the order queued, each group (a linked
    /// pair) whole; they go to the ring before anything queued after them (see `push`).
    backlog: VecDeque<Vec<squeue::Entry>>,
}

impl Server {
    fn run(&mut self, stop: &Stop) -> io::Result<Stats> {
        self.arm_stop(stop)?;
        self.arm_accept()?;

        let mut completions: Vec<(u64, i32, u32)> = Vec::with_capacity(2 * ENTRIES as usize);
        while !(self.stopping && self.live == 0 && self.accept == Accept::Off) {
            self.feed_backlog();
            // With entries still waiting for room, submit without waiting: the next turn moves
            // them to the ring, where otherwise they would wait for a completion that may
            // never come (every connection idle).
            let wait = usize::from(self.backlog.is_empty());
            match self.ring.submit_and_wait(wait) {
                Ok(_) => {}
                // EBUSY: completions are waiting to be reaped; reap them below.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                // The kernel could not allocate for a request for now: reap, and try again
                // shortly (completions free what it needs).
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                Err(e) => return Err(e),
            }
            completions.clear();
            completions.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
            );
            for (i, &(user_data, res, flags)) in completions.iter().enumerate() {
                let handled = match user_data {
                    STOP => self.on_stop(stop),
                    ACCEPT => self.on_accept(res, flags),
                    ACCEPT_RETRY => self.on_accept_retry(),
                    DEADLINE => self.on_deadline(),
                    CANCEL | QUIET => Ok(()),
                    slot => self.on_conn(slot as usize, res),
                };
                if let Err(e) = handled {
                    close_accepted(&completions[i + 1..]);
                    return Err(e);
                }
            }
        }
        // Still in flight: the stop's poll, if the server never stopped (it did), and the
        // drain timeout if the connections finished first; neither points to our memory, and
        // dropping the ring cancels them.
        self.failed.take().map_or(Ok(self.stats), Err)
    }

    /// Queues entries, all together (a linked pair must not be split by a submission),
    /// submitting the queue first if they do not fit.
    ///
    /// # Safety
    ///
    /// Every buffer the entries point to stays valid, and is not used by anything else, until
    /// its completion has been reaped (for a timeout: until it has been submitted).
    /// Where the kernel will not take a submission for now (`EAGAIN`, `EBUSY`), they join the
    /// backlog, which `run` feeds to the ring after each reap (a handler cannot reap).
    unsafe fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        while self.backlog.is_empty() {
            // SAFETY: the caller's promise is the one `push_multiple` requires.
            if unsafe { self.ring.submission().push_multiple(entries) }.is_ok() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => break,
                Err(e) => return Err(e),
            }
        }
        self.backlog.push_back(entries.to_vec());
        Ok(())
    }

    /// Moves what the backlog holds to the ring, in order, as far as there is room.
    fn feed_backlog(&mut self) {
        while let Some(group) = self.backlog.front() {
            // SAFETY: each group was queued through `push`, whose callers promised what
            // `push_multiple` requires; they keep that promise until the completion is reaped,
            // which cannot come before the entry is submitted.
            if unsafe { self.ring.submission().push_multiple(group) }.is_err() {
                return;
            }
            self.backlog.pop_front();
        }
    }

    fn cancel(&mut self, user_data: u64) -> io::Result<()> {
        // Only a cancel that fails reports (the operation it cancels reports either way): a
        // stop with many connections would otherwise post two completions for each, past what
        // the completion queue holds.
        let cancel = opcode::AsyncCancel::new(user_data)
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(CANCEL);
        // SAFETY: a cancel request points to no memory of ours.
        unsafe { self.push(&[cancel]) }
    }

    fn arm_stop(&mut self, stop: &Stop) -> io::Result<()> {
        let poll = opcode::PollAdd::new(types::Fd(stop.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(STOP);
        // SAFETY: a poll request points to no memory of ours.
        unsafe { self.push(&[poll]) }
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        let Some(listener) = &self.listener else {
            return Ok(());
        };
        let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(ACCEPT);
        // SAFETY: a multishot accept points to no memory of ours (no peer address).
        unsafe { self.push(&[accept])? };
        self.accept = Accept::Armed;
        Ok(())
    }

    fn on_stop(&mut self, stop: &Stop) -> io::Result<()> {
        if self.stopping {
            return Ok(());
        }
        if !stop.is_triggered() {
            // Cannot happen (the flag is set before the eventfd is written); wait again.
            return self.arm_stop(stop);
        }
        self.begin_stop()
    }

    /// Stops accepting and starts the drain: on the stop, or when the listener failed.
    fn begin_stop(&mut self) -> io::Result<()> {
        if self.stopping {
            return Ok(());
        }
        info!("uring: stopping, draining {} connections", self.live);
        self.stopping = true;
        match self.accept {
            // Its last completion (ECANCELED) closes the listener: closing it now would not
            // stop the accept, which holds a reference to it.
            Accept::Armed => self.cancel(ACCEPT)?,
            Accept::Backoff | Accept::Off => {
                self.accept = Accept::Off;
                self.listener = None;
            }
        }
        let deadline = opcode::Timeout::new(&*self.drain)
            .build()
            .user_data(DEADLINE);
        // SAFETY: `self.drain` is boxed and lives as long as the server.
        unsafe { self.push(&[deadline])? };
        // Receives are cancelled: a connection waiting for input is idle (a receive that
        // completes with data anyway is echoed). Sends go on until the deadline.
        for slot in 0..self.conns.len() {
            if self.conns[slot]
                .as_ref()
                .is_some_and(|c| c.op == Some(Op::Recv))
            {
                self.cancel(slot as u64)?;
            }
        }
        Ok(())
    }

    fn on_deadline(&mut self) -> io::Result<()> {
        if self.live == 0 {
            return Ok(());
        }
        warn!("uring: drain timeout, closing {} connections", self.live);
        self.deadline_passed = true;
        for slot in 0..self.conns.len() {
            if self.conns[slot].as_ref().is_some_and(|c| c.op.is_some()) {
                self.cancel(slot as u64)?;
            }
        }
        Ok(())
    }

    fn on_accept(&mut self, res: i32, flags: u32) -> io::Result<()> {
        let more = cqueue::more(flags);
        if !more {
            self.accept = Accept::Off;
        }
        if res >= 0 {
            self.accept_failures = 0;
            // SAFETY: a successful accept completion is a new descriptor that nothing else owns.
            let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(res) });
            sys::prepare(&stream);
            // One accepted while stopping (before the cancel took effect) is served like the
            // others: whatever its peer sent is echoed before the drain closes it.
            self.add(stream)?;
        } else if !(self.stopping && -res == libc::ECANCELED) {
            let err = io::Error::from_raw_os_error(-res);
            match sys::classify_accept_error(-res) {
                AcceptError::Empty => {}
                // Retried, but not for ever: a failure that does not go away (`EPERM` from a
                // security policy, `EOPNOTSUPP` on a socket that cannot accept) would have the
                // accept armed again and failing at once, round after round.
                AcceptError::Transient => {
                    self.accept_failures += 1;
                    // (While the multishot accept goes on, it is not armed again.)
                    if self.accept_failures >= ACCEPT_TURN && !more {
                        self.accept_failures = 0;
                        if let Some(suppressed) = self.accept_warnings.check() {
                            warn!(
                                suppressed,
                                "uring: accept failed {ACCEPT_TURN} times in a row ({err}); \
                                 pausing accepts for {ACCEPT_BACKOFF:?}"
                            );
                        }
                        self.back_off_accepts(more)?;
                    }
                }
                AcceptError::Exhausted => {
                    // io_uring takes the new descriptor before it looks at the backlog: out of
                    // them, the accept fails with nobody connecting. Paused either way (armed
                    // again at once, it would fail at once), but worth a warning only when a
                    // connection waits.
                    let waiting = self
                        .listener
                        .as_ref()
                        .is_some_and(|l| sys::has_waiting(l.as_raw_fd()));
                    if !waiting {
                        debug!("uring: accept: {err} with no connection waiting; pausing accepts");
                    } else if let Some(suppressed) = self.accept_warnings.check() {
                        warn!(
                            suppressed,
                            "uring: accept: {err}; pausing accepts for {ACCEPT_BACKOFF:?}"
                        );
                    }
                    self.back_off_accepts(more)?;
                }
                AcceptError::Fatal => {
                    // The connections are drained as on a stop, and the error reported then.
                    error!("uring: accept: {err}; stopping, the connections are drained");
                    self.failed.get_or_insert_with(|| accept_failed(&err));
                    self.begin_stop()?;
                }
            }
        }
        if self.accept == Accept::Off {
            if self.stopping {
                self.listener = None;
            } else {
                self.arm_accept()?;
            }
        }
        Ok(())
    }

    /// Arms the accept again only after [`ACCEPT_BACKOFF`], once the multishot accept has
    /// ended (`more` false); stopping, the accept stays off and the listener closes.
    fn back_off_accepts(&mut self, more: bool) -> io::Result<()> {
        if !more && !self.stopping {
            let retry = opcode::Timeout::new(&*self.backoff)
                .build()
                .user_data(ACCEPT_RETRY);
            // SAFETY: `self.backoff` is boxed and lives as long as the server.
            unsafe { self.push(&[retry])? };
            self.accept = Accept::Backoff;
        }
        Ok(())
    }

    fn on_accept_retry(&mut self) -> io::Result<()> {
        if self.accept == Accept::Backoff && !self.stopping {
            self.accept = Accept::Off;
            self.arm_accept()?;
        }
        Ok(())
    }

    /// Takes a new connection and posts its first receive.
    fn add(&mut self, stream: TcpStream) -> io::Result<()> {
        debug!("socket {} connected", stream.as_raw_fd());
        self.stats.connections += 1;
        let conn = Conn {
            stream,
            buf: vec![0u8; READ_SIZE].into_boxed_slice(),
            filled: 0,
            sent: 0,
            op: None,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.conns[slot] = Some(conn);
                slot
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        self.live += 1;
        self.post_recv(slot)
    }

    /// Posts a receive; while stopping, one that gives up after [`DRAIN_QUIET`]. One the ring
    /// will not take closes the connection (see [`Server::or_close`]).
    fn post_recv(&mut self, slot: usize) -> io::Result<()> {
        let queued = self.queue_recv(slot);
        self.or_close(slot, queued, "receive")
    }

    /// Posts a send of what the connection holds, as [`Server::post_recv`].
    fn post_send(&mut self, slot: usize) -> io::Result<()> {
        let queued = self.queue_send(slot);
        self.or_close(slot, queued, "send")
    }

    /// Closes the connection in `slot` when its operation could not be queued (the kernel
    /// refused the submission for a reason that does not pass): that one connection, not the
    /// server. Nothing of it is in flight then, since neither the ring nor the backlog took
    /// any of the entries.
    fn or_close(&mut self, slot: usize, queued: io::Result<()>, what: &str) -> io::Result<()> {
        if let Err(e) = queued {
            if let Some(c) = self.conns[slot].as_mut() {
                c.op = None;
                warn!(
                    "uring: cannot queue a {what} for socket {}: {e}; closing it",
                    c.stream.as_raw_fd()
                );
            }
            self.close(slot, Some(e));
        }
        Ok(())
    }

    fn queue_recv(&mut self, slot: usize) -> io::Result<()> {
        let c = self.conns[slot].as_mut().expect("a live slot");
        c.filled = 0;
        c.sent = 0;
        let recv = opcode::Recv::new(
            types::Fd(c.stream.as_raw_fd()),
            c.buf.as_mut_ptr(),
            c.buf.len() as u32,
        )
        .build()
        .user_data(slot as u64);
        if !self.stopping {
            c.op = Some(Op::Recv);
            // SAFETY: `c.buf` is a heap allocation owned by the connection, which stays in the
            // table (and nothing touches the buffer) until this receive's completion clears
            // `op`.
            return unsafe { self.push(&[recv]) };
        }
        c.op = Some(Op::QuietRecv);
        let timeout = opcode::LinkTimeout::new(&*self.quiet)
            .build()
            .user_data(QUIET);
        // SAFETY: the receive's buffer as above; `self.quiet` is boxed and lives as long as
        // the server.
        unsafe { self.push(&[recv.flags(squeue::Flags::IO_LINK), timeout]) }
    }

    fn queue_send(&mut self, slot: usize) -> io::Result<()> {
        let c = self.conns[slot].as_mut().expect("a live slot");
        let rest = &c.buf[c.sent..c.filled];
        let send = opcode::Send::new(
            types::Fd(c.stream.as_raw_fd()),
            rest.as_ptr(),
            rest.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(slot as u64);
        c.op = Some(Op::Send);
        // SAFETY: as for the receive: the buffer stays put, unchanged, until the completion.
        unsafe { self.push(&[send]) }
    }

    fn on_conn(&mut self, slot: usize, res: i32) -> io::Result<()> {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            warn!("uring: completion for unknown slot {slot}");
            return Ok(());
        };
        let op = c.op.take();
        let error = || io::Error::from_raw_os_error(-res);
        match op {
            Some(Op::Recv | Op::QuietRecv) if res > 0 => {
                if self.deadline_passed {
                    self.close(slot, Some(error_unsent()));
                    return Ok(());
                }
                c.filled = res as usize;
                c.sent = 0;
                self.post_send(slot)
            }
            // The peer closed.
            Some(Op::Recv | Op::QuietRecv) if res == 0 => {
                self.close(slot, None);
                Ok(())
            }
            // Cancelled by the stop, by its timeout, or by the deadline: nothing was received.
            // (`EINTR`: a receive the kernel had handed to a worker thread of its own, where it
            // blocked, is cancelled by interrupting it.)
            Some(recv @ (Op::Recv | Op::QuietRecv))
                if self.stopping && matches!(-res, libc::ECANCELED | libc::EINTR) =>
            {
                self.on_idle(slot, recv == Op::QuietRecv)
            }
            Some(Op::Send) if res > 0 => {
                c.sent += res as usize;
                self.stats.bytes += res as u64;
                if c.sent < c.filled {
                    if self.deadline_passed {
                        self.close(slot, Some(error_unsent()));
                        return Ok(());
                    }
                    self.post_send(slot)
                } else if self.stopping {
                    self.on_idle(slot, false)
                } else {
                    self.post_recv(slot)
                }
            }
            Some(Op::Send) if res == 0 => {
                self.close(slot, Some(io::ErrorKind::WriteZero.into()));
                Ok(())
            }
            Some(_) => {
                let e = if self.deadline_passed && -res == libc::ECANCELED {
                    error_unsent()
                } else {
                    error()
                };
                self.close(slot, Some(e));
                Ok(())
            }
            // Cannot happen (each operation completes once); were it to, a connection left
            // with nothing in flight would never end, and neither would a drain.
            None => {
                warn!(
                    "uring: completion for socket {} with nothing in flight; closing it",
                    c.stream.as_raw_fd()
                );
                self.close(
                    slot,
                    Some(io::Error::other("a completion with nothing in flight")),
                );
                Ok(())
            }
        }
    }

    /// A connection of a stopping server has nothing in flight and nothing to send. Unless
    /// it has `waited` for input in vain (its receive timed out), it gets a receive that
    /// waits for [`DRAIN_QUIET`]; if it has, it is closed with a FIN, unless input came just
    /// then (`FIONREAD`): another receive takes it; or unless the peer has not taken all of
    /// the echo yet (`SIOCOUTQ`: closed, the connection would be reset should the peer send
    /// anything more, and the rest dropped): another receive waits.
    fn on_idle(&mut self, slot: usize, waited: bool) -> io::Result<()> {
        if !waited && !self.deadline_passed {
            return self.post_recv(slot);
        }
        let c = self.conns[slot].as_ref().expect("a live slot");
        match sys::unread(&c.stream) {
            Ok(0) if self.deadline_passed => self.close(slot, None),
            Ok(0) => match sys::unacked(&c.stream) {
                Ok(0) => self.close(slot, None),
                Ok(_) => return self.post_recv(slot),
                Err(e) => self.close(slot, Some(e)),
            },
            Ok(_) if self.deadline_passed => self.close(slot, Some(error_unsent())),
            Ok(_) => return self.post_recv(slot),
            Err(e) => self.close(slot, Some(e)),
        }
        Ok(())
    }

    /// Closes a connection whose operation has completed: with a FIN unless it failed (a
    /// connection cut at the drain deadline gets its FIN too).
    fn close(&mut self, slot: usize, error: Option<io::Error>) {
        let c = self.conns[slot].take().expect("a live slot");
        debug_assert!(
            c.op.is_none(),
            "closing a connection with an operation in flight"
        );
        self.free.push(slot);
        self.live -= 1;
        let fd = c.stream.as_raw_fd();
        match error {
            None => {
                debug!("closing socket {fd}");
                sys::close_gracefully(c.stream);
            }
            Some(e) if self.deadline_passed => {
                debug!("closing socket {fd}: {e}");
                sys::close_gracefully(c.stream);
            }
            Some(e) => {
                debug!("closing socket {fd}: {e}");
                drop(c.stream);
            }
        }
    }
}

/// Closes the connections accepted in `completions`, which are left unserved: the server
/// failed (its connections are dropped when it is).
fn close_accepted(completions: &[(u64, i32, u32)]) {
    for &(user_data, res, _) in completions {
        if user_data == ACCEPT && res >= 0 {
            // SAFETY: a successful accept completion is a new descriptor that nothing else
            // owns; it was not handled, so nothing took it.
            drop(unsafe { OwnedFd::from_raw_fd(res) });
        }
    }
}

impl Drop for Server {
    /// Only reached with connections left when `run` failed in the kernel (a submission
    /// refused, a wait that failed): their operations may still be in the kernel, which would
    /// write into freed memory, so their buffers are leaked, never freed. Then the ring is
    /// dropped, which cancels them.
    fn drop(&mut self) {
        for c in self.conns.iter_mut().flatten() {
            if c.op.is_some() {
                warn!(
                    "uring: leaking the buffer of socket {}: its operation is still in flight",
                    c.stream.as_raw_fd()
                );
                Box::leak(std::mem::take(&mut c.buf));
            }
        }
    }
}

fn error_unsent() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "drain timeout, echo unsent")
}

fn timespec(d: Duration) -> types::Timespec {
    types::Timespec::new()
        .sec(d.as_secs())
        .nsec(d.subsec_nanos())
}
