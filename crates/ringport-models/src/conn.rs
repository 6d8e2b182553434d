//! What the four readiness models (`select`, `sigio`, `poll`, `epoll`) share: the echo state of
//! one non-blocking connection, the accepting half, a rate limit for warnings, and the
//! bookkeeping of the two edge-triggered loops (`epoll`, `sigio`): [`turn`],
//! [`drain_all`], [`wait_timeout`] and [`turn_pending`].
//!
//! The contract between a readiness loop and a [`Conn`]:
//!
//! * The loop records what the kernel reported ([`Conn::readable`], [`Conn::writable`]);
//!   [`Conn::drive`] clears a flag only when a call on the socket returned `EAGAIN`. A flag that
//!   is wrongly set costs one `EAGAIN`; a flag that is wrongly clear would lose the connection,
//!   so when in doubt the loop sets it.
//! * [`Conn::drive`] makes progress until the socket would block, and returns the [`Step`]
//!   that says what the connection now waits for. Level-triggered loops (`select`, `poll`) turn
//!   that into the next wait's interest; edge-triggered ones (`epoll`, `sigio`) register both
//!   directions once and only need [`Step::Yield`], which means "more may be readable, drive me
//!   again after the others had their turn".
//! * While a connection has unsent bytes it does not read (backpressure): a peer that sends
//!   without reading makes the server hold at most one read's worth ([`SCRATCH`]) for it.
//! * Once the server stops ([`Conn::drain`]), a connection goes on reading and echoing until
//!   it is idle: nothing left to send, nothing unread in the socket (`FIONREAD`), no input
//!   for [`DRAIN_QUIET`], and all of the echo taken by the peer (`SIOCOUTQ`, looked at again
//!   every [`UNACKED_CHECK`]). While it waits for that, [`Conn::quiet_until`] says until
//!   when; the loop must then drive it again even if the kernel reported nothing, and
//!   [`Conn::drive`] returns [`Step::Close`].

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use tracing::{debug, error, warn};

use crate::sys::{self, AcceptError};
use crate::{Stats, DRAIN_QUIET, UNACKED_CHECK};

/// The size of one read. One buffer of this size serves every connection of a loop; a
/// connection holds bytes of its own only while the peer is not reading its echo.
pub(crate) const SCRATCH: usize = crate::READ_SIZE;

/// Reads one connection may do in one turn before the loop serves the others.
const READS_PER_TURN: usize = 16;

/// How long accepting pauses after the process ran out of descriptors or memory.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a connection waits for after [`Conn::drive`].
#[derive(Debug)]
pub(crate) enum Step {
    /// For the socket to become readable; while draining, at most until
    /// [`Conn::quiet_until`].
    Read,
    /// For the socket to become writable (it has unsent bytes and reads nothing meanwhile).
    Write,
    /// Nothing: it used its turn and may have more to read.
    Yield,
    /// To be closed, for this reason.
    Close(Closing),
}

/// Why a connection is closed.
#[derive(Debug)]
pub(crate) enum Closing {
    /// The peer closed its side and everything it sent was echoed: close with a FIN.
    Peer,
    /// The server is stopping, and everything the peer had sent was read and echoed: close
    /// with a FIN.
    Drained,
    /// The socket failed (reset, broken pipe, ...): just close it.
    Failed(io::Error),
}

/// One connection of a readiness loop.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: TcpStream,
    /// Received bytes not yet echoed, and how many of them are out. Empty (no allocation)
    /// unless the peer is slow to read.
    unsent: Vec<u8>,
    sent: usize,
    /// What the kernel last said about the socket (see the module docs).
    pub(crate) readable: bool,
    pub(crate) writable: bool,
    /// The server is stopping: close as soon as the connection is idle.
    draining: bool,
    /// Draining and idle: when to close unless input comes first.
    quiet_until: Option<Instant>,
    /// On the edge-triggered loops' `ready` queue (at most once: a busy peer gets one turn
    /// per pass, like the others).
    pub(crate) queued: bool,
}

impl Conn {
    /// A connection just accepted (non-blocking). Both flags start set: a client may have sent
    /// its request before the socket was added to any wait, and an edge-triggered mechanism
    /// would never report data that arrived before it was watching.
    pub(crate) fn new(stream: TcpStream) -> Conn {
        debug!("socket {} connected", stream.as_raw_fd());
        Conn {
            stream,
            unsent: Vec::new(),
            sent: 0,
            readable: true,
            writable: true,
            draining: false,
            quiet_until: None,
            queued: false,
        }
    }

    /// The socket's descriptor.
    pub(crate) fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Whether some received bytes are not echoed yet.
    pub(crate) fn has_unsent(&self) -> bool {
        self.sent < self.unsent.len()
    }

    /// The server is stopping: from now on the connection echoes what the peer has sent so
    /// far, and asks to be closed ([`Closing::Drained`]) once it is idle (see the module docs).
    pub(crate) fn drain(&mut self) {
        self.draining = true;
    }

    /// While draining, idle, and waiting for input (see the module docs): when to drive the
    /// connection again, which then closes it unless input came.
    pub(crate) fn quiet_until(&self) -> Option<Instant> {
        self.quiet_until
    }

    /// Echoes as much as the socket allows without blocking; adds the bytes sent to `bytes`.
    pub(crate) fn drive(&mut self, scratch: &mut [u8], bytes: &mut u64) -> Step {
        let mut reads = 0;
        loop {
            if let Some(step) = self.flush(bytes) {
                return step;
            }
            // Nothing to send. When stopping, ask the kernel whether anything is left to read
            // whenever the connection would wait or yield: `readable` only says "maybe".
            if self.draining && (!self.readable || reads == READS_PER_TURN) {
                match sys::unread(&self.stream) {
                    Ok(0) => {
                        // Idle; what the peer sent before the stop may still be on its way.
                        let now = Instant::now();
                        let until = *self.quiet_until.get_or_insert(now + DRAIN_QUIET);
                        if now < until {
                            return Step::Read;
                        }
                        // Not while the peer has not taken all of the echo: should it send
                        // anything after the close, the reset would drop the rest.
                        match sys::unacked(&self.stream) {
                            Ok(0) => return Step::Close(Closing::Drained),
                            Ok(_) => {
                                self.quiet_until = Some(now + UNACKED_CHECK);
                                return Step::Read;
                            }
                            Err(e) => return Step::Close(Closing::Failed(e)),
                        }
                    }
                    Ok(_) => self.readable = true,
                    Err(e) => return Step::Close(Closing::Failed(e)),
                }
            }
            if !self.readable {
                return Step::Read;
            }
            if reads == READS_PER_TURN {
                return Step::Yield;
            }
            reads += 1;
            let n = match (&self.stream).read(scratch) {
                Ok(0) => return Step::Close(Closing::Peer),
                Ok(n) => {
                    self.quiet_until = None;
                    n
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Step::Close(Closing::Failed(e)),
            };
            // Send straight from the scratch buffer; keep only what the socket did not take.
            let mut sent = 0;
            if self.writable {
                match write_some(&self.stream, &scratch[..n]) {
                    Ok(k) => sent = k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                    Err(e) => return Step::Close(Closing::Failed(e)),
                }
            }
            *bytes += sent as u64;
            if sent < n {
                self.unsent.extend_from_slice(&scratch[sent..n]);
                self.sent = 0;
            }
        }
    }

    /// Sends the unsent bytes. `None` when all are out; otherwise the step to return.
    fn flush(&mut self, bytes: &mut u64) -> Option<Step> {
        while self.has_unsent() {
            if !self.writable {
                return Some(Step::Write);
            }
            match write_some(&self.stream, &self.unsent[self.sent..]) {
                Ok(k) => {
                    self.sent += k;
                    *bytes += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    return Some(Step::Write);
                }
                Err(e) => return Some(Step::Close(Closing::Failed(e))),
            }
        }
        if !self.unsent.is_empty() {
            // Give the memory back: an idle connection holds no buffer.
            self.unsent = Vec::new();
            self.sent = 0;
        }
        None
    }

    /// Closes the connection: with a FIN unless it failed.
    pub(crate) fn close(self, why: Closing) {
        let fd = self.fd();
        match why {
            Closing::Failed(e) => {
                debug!("closing socket {fd}: {e}");
                drop(self.stream);
            }
            Closing::Peer | Closing::Drained => {
                debug!("closing socket {fd}");
                sys::close_gracefully(self.stream);
            }
        }
    }

    /// Closes the connection at the drain deadline, with a FIN after whatever did get out.
    pub(crate) fn close_unfinished(self) {
        let unsent = self.unsent.len() - self.sent;
        debug!(
            "closing socket {}: drain timeout, {unsent} bytes unsent",
            self.fd()
        );
        sys::close_gracefully(self.stream);
    }
}

/// One `write` that may send less than asked; `EINTR` is retried.
fn write_some(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        // `TcpStream::write` sends with `MSG_NOSIGNAL`: a reset peer is an `EPIPE`, not a
        // `SIGPIPE` that would kill the process.
        match (&*stream).write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => return Ok(k),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The accepting half of a loop: the listener, and the pause after running out of resources.
#[derive(Debug)]
pub(crate) struct Acceptor {
    /// The model's name, for the logs.
    model: &'static str,
    listener: std::net::TcpListener,
    nonblocking: bool,
    paused_until: Option<Instant>,
    warn: RateLimit,
    /// Connections accepted in the current turn (see [`ACCEPT_TURN`]).
    taken: usize,
    /// The last turn ended at [`ACCEPT_TURN`], with connections perhaps still waiting.
    cut_short: bool,
}

/// The error a model reports for its listener's failure: the accept's, saying so.
pub(crate) fn accept_failed(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("accept: {e}"))
}

/// Connections one turn of a loop accepts at most before it serves those it holds: a flood of
/// connects (that close at once, say) cannot keep it from its connections.
pub(crate) const ACCEPT_TURN: usize = 64;

impl Acceptor {
    /// Makes the listener non-blocking; accepted sockets are non-blocking if `nonblocking`.
    pub(crate) fn new(
        model: &'static str,
        listener: std::net::TcpListener,
        nonblocking: bool,
    ) -> io::Result<Acceptor> {
        listener.set_nonblocking(true)?;
        Ok(Acceptor {
            model,
            listener,
            nonblocking,
            paused_until: None,
            warn: RateLimit::new(),
            taken: 0,
            cut_short: false,
        })
    }

    /// The listener's descriptor.
    pub(crate) fn fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Until when accepting is paused, if it is.
    pub(crate) fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    /// Whether accepting is paused at `now` (the pause ends by itself when it expires).
    pub(crate) fn paused(&mut self, now: Instant) -> bool {
        match self.paused_until {
            Some(t) if now < t => true,
            Some(_) => {
                self.paused_until = None;
                false
            }
            None => false,
        }
    }

    /// Accepts one connection. `Ok(None)`: nothing to accept now, accepting is paused (see
    /// [`Acceptor::paused_until`]), or this turn took [`ACCEPT_TURN`] connections (see
    /// [`Acceptor::cut_short`]; the next call begins a new turn). An error means the listener
    /// is unusable.
    pub(crate) fn accept(&mut self) -> io::Result<Option<TcpStream>> {
        if self.taken == ACCEPT_TURN {
            self.taken = 0;
            self.cut_short = true;
            return Ok(None);
        }
        self.cut_short = false;
        let accepted = self.accept_one()?;
        match accepted {
            Some(_) => self.taken += 1,
            None => self.taken = 0,
        }
        Ok(accepted)
    }

    /// [`Acceptor::accept`] for a loop that serves its connections on after its listener
    /// fails: the error is logged and kept in `failed`, and the loop, seeing it, drains its
    /// connections as on a stop at its next turn, and then reports it.
    pub(crate) fn accept_or_fail(&mut self, failed: &mut Option<io::Error>) -> Option<TcpStream> {
        match self.accept() {
            Ok(stream) => stream,
            Err(e) => {
                error!(
                    "{}: accept: {e}; stopping, the connections are drained",
                    self.model
                );
                failed.get_or_insert_with(|| accept_failed(&e));
                None
            }
        }
    }

    /// Whether the last turn ended because it took [`ACCEPT_TURN`] connections: more may wait,
    /// and an edge-triggered loop, which gets no new edge for them, must come back for them
    /// without waiting.
    pub(crate) fn cut_short(&self) -> bool {
        self.cut_short
    }

    /// Accepts one connection (see [`Acceptor::accept`]).
    ///
    /// Linux takes the new descriptor before it looks at the backlog, so at the descriptor
    /// limit `accept` fails with `EMFILE` even when nothing is waiting: that failure counts
    /// (a warning, a pause) only when a connection is in fact waiting; otherwise it is the
    /// empty backlog it stands for.
    ///
    /// The failures the man page says to retry (a connection's own network error, which takes
    /// it off the backlog) are retried, but not for ever: [`ACCEPT_TURN`] of them in a row
    /// pause accepting, as a failure that does not go away (`EPERM` from a security policy,
    /// `EOPNOTSUPP` on a socket that cannot accept) would otherwise keep the loop here.
    fn accept_one(&mut self) -> io::Result<Option<TcpStream>> {
        let mut transient = 0;
        loop {
            if self.paused(Instant::now()) {
                return Ok(None);
            }
            let err = match sys::accept(self.fd(), self.nonblocking) {
                Ok(stream) => return Ok(Some(stream)),
                Err(e) => e,
            };
            match sys::classify_accept_error(err.raw_os_error().unwrap_or(0)) {
                AcceptError::Empty => return Ok(None),
                AcceptError::Transient => {
                    transient += 1;
                    if transient < ACCEPT_TURN {
                        continue;
                    }
                    if let Some(suppressed) = self.warn.check() {
                        warn!(
                            suppressed,
                            "{}: accept failed {transient} times in a row ({err}); pausing \
                             accepts for {ACCEPT_BACKOFF:?}",
                            self.model
                        );
                    }
                    self.paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return Ok(None);
                }
                AcceptError::Exhausted if !self.has_waiting() => return Ok(None),
                AcceptError::Exhausted => {
                    if let Some(suppressed) = self.warn.check() {
                        warn!(
                            suppressed,
                            "{}: accept: {err}; pausing accepts for {ACCEPT_BACKOFF:?}", self.model
                        );
                    }
                    self.paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return Ok(None);
                }
                AcceptError::Fatal => return Err(err),
            }
        }
    }

    /// Whether a connection waits in the listener's backlog (asked without waiting; when the
    /// kernel cannot say, as if one did).
    fn has_waiting(&self) -> bool {
        sys::has_waiting(self.fd())
    }
}

/// At most one warning a second for a repeated condition, with the count of those suppressed.
#[derive(Debug)]
pub(crate) struct RateLimit {
    next: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    const INTERVAL: Duration = Duration::from_secs(1);

    pub(crate) fn new() -> RateLimit {
        RateLimit {
            next: None,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log now, `n` occurrences were not logged since the last time. `None`: don't.
    pub(crate) fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.next.is_some_and(|next| now < next) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + Self::INTERVAL);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Edge-triggered loops (`epoll`, `sigio`): drives the connection on `fd` (if it is still
/// open): queues it on `ready` if it yielded, closes it if it is done.
pub(crate) fn turn(
    conns: &mut HashMap<RawFd, Conn>,
    ready: &mut VecDeque<RawFd>,
    fd: RawFd,
    scratch: &mut [u8],
    stats: &mut Stats,
) {
    let Some(c) = conns.get_mut(&fd) else { return };
    match c.drive(scratch, &mut stats.bytes) {
        Step::Read | Step::Write => {}
        Step::Yield => queue(c, ready, fd),
        Step::Close(why) => {
            if let Some(c) = conns.remove(&fd) {
                c.close(why);
            }
        }
    }
}

/// Puts the connection on `fd` on the `ready` queue, unless it is on it already.
pub(crate) fn queue(c: &mut Conn, ready: &mut VecDeque<RawFd>, fd: RawFd) {
    if !std::mem::replace(&mut c.queued, true) {
        ready.push_back(fd);
    }
}

/// Edge-triggered loops, once the server stops: tells every connection to drain, and drives
/// it once (see [`turn`]).
pub(crate) fn drain_all(
    conns: &mut HashMap<RawFd, Conn>,
    ready: &mut VecDeque<RawFd>,
    scratch: &mut [u8],
    stats: &mut Stats,
) {
    let fds: Vec<RawFd> = conns.keys().copied().collect();
    for fd in fds {
        if let Some(c) = conns.get_mut(&fd) {
            c.drain();
        }
        turn(conns, ready, fd, scratch, stats);
    }
}

/// Edge-triggered loops, while draining: whether the loop is over, because every connection
/// finished or the drain `deadline` passed (then the rest are closed, their echo unfinished).
pub(crate) fn drain_over(
    model: &str,
    deadline: Option<Instant>,
    now: Instant,
    conns: &mut HashMap<RawFd, Conn>,
) -> bool {
    let Some(deadline) = deadline else {
        return false;
    };
    if conns.is_empty() {
        return true;
    }
    if now >= deadline {
        warn!(
            "{model}: drain timeout, closing {} connections",
            conns.len()
        );
        conns.drain().for_each(|(_, c)| c.close_unfinished());
        return true;
    }
    false
}

/// Edge-triggered loops: how long the next wait may last (`None`: no limit). No wait at all
/// while connections are queued on `ready` or the last accept turn was cut short (see
/// [`Acceptor::cut_short`]); otherwise until the drain `deadline`, the end of an
/// accept pause, or (while draining: only then, since it is a scan) the first quiet period.
pub(crate) fn wait_timeout(
    now: Instant,
    conns: &HashMap<RawFd, Conn>,
    ready: &VecDeque<RawFd>,
    acceptor: Option<&Acceptor>,
    deadline: Option<Instant>,
) -> Option<Duration> {
    if !ready.is_empty() || acceptor.is_some_and(Acceptor::cut_short) {
        return Some(Duration::ZERO);
    }
    let paused = acceptor.and_then(Acceptor::paused_until);
    let quiet = deadline.and_then(|_| conns.values().filter_map(Conn::quiet_until).min());
    sys::until(now, [deadline, paused, quiet])
}

/// Edge-triggered loops, after a wait and its events: drives each connection on `ready` once
/// (those that yielded before the wait, and those that yielded while their events were handled,
/// which so get a second turn in this pass; those these turns queue again wait for the next
/// pass), then, while `draining`, those whose quiet period is over (driven without an event,
/// they close).
pub(crate) fn turn_pending(
    conns: &mut HashMap<RawFd, Conn>,
    ready: &mut VecDeque<RawFd>,
    draining: bool,
    scratch: &mut [u8],
    stats: &mut Stats,
) {
    for _ in 0..ready.len() {
        let Some(fd) = ready.pop_front() else { break };
        if let Some(c) = conns.get_mut(&fd) {
            c.queued = false;
        }
        turn(conns, ready, fd, scratch, stats);
    }
    if draining {
        for fd in quiet_over(conns) {
            turn(conns, ready, fd, scratch, stats);
        }
    }
}

/// The draining connections whose quiet period is over.
fn quiet_over(conns: &HashMap<RawFd, Conn>) -> Vec<RawFd> {
    let now = Instant::now();
    conns
        .iter()
        .filter(|(_, c)| c.quiet_until().is_some_and(|t| t <= now))
        .map(|(&fd, _)| fd)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::{TcpListener, TcpStream};

    use super::{queue, Acceptor, Conn, ACCEPT_TURN};

    /// A turn takes at most `ACCEPT_TURN` connections and says it was cut short; the next
    /// takes the rest and ends at the empty backlog.
    #[test]
    fn a_turn_accepts_at_most_its_share() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut a = Acceptor::new("test", l, true).unwrap();
        // Connected (in the backlog) before any accept: std's listen backlog is 128.
        let clients: Vec<TcpStream> = (0..ACCEPT_TURN + 10)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let mut turn = || {
            let mut n = 0;
            while let Some(_stream) = a.accept().unwrap() {
                n += 1;
            }
            (n, a.cut_short())
        };
        assert_eq!(turn(), (ACCEPT_TURN, true));
        assert_eq!(turn(), (10, false));
        assert_eq!(turn(), (0, false));
        drop(clients);
    }

    /// A connection queued again before its turn (a new edge, or a signal-queue overflow that
    /// queues every connection) stays on the queue once: a busy peer gets one turn per pass.
    #[test]
    fn a_connection_is_queued_once_until_its_turn() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let mut c = Conn::new(s);
        let mut ready = VecDeque::new();
        queue(&mut c, &mut ready, 7);
        queue(&mut c, &mut ready, 7);
        assert_eq!(ready, [7]);
        // Its turn: off the queue, and it may be queued again.
        ready.pop_front();
        c.queued = false;
        queue(&mut c, &mut ready, 7);
        assert_eq!(ready, [7]);
    }
}
