//! `blocking`: blocking sockets, a thread per connection.
//!
//! Each connection's thread runs the simplest echo there is: `read`, then a blocking `write`
//! until all it read is out, again, until the peer closes. The kernel does the backpressure: a
//! thread blocked in `write` reads nothing.
//!
//! A thread blocked in `accept` or `read` cannot be told to stop, so neither waits without end.
//! The acceptor `poll`s the listener together with the [`Stop`]'s descriptor. A connection's
//! thread makes plain blocking reads, one call per read as in the plain blocking echo, but with
//! a receive timeout ([`STOP_CHECK`], `SO_RCVTIMEO`): a read that times out looks at the stop
//! and reads again. (Waking a blocked `read` with `shutdown(Read)` instead would throw away what
//! the peer had sent; reading without waiting and then `poll`ing on the socket and the stop
//! would cost two more calls for every message that finds the socket empty.) That wake-up is
//! what an idle connection costs beyond its thread: about 8 µs of CPU each time on the 2-core
//! machine, so the check is seldom (once a second: 18,000 idle connections cost a seventh of a
//! core; every 100 ms, they cost more than the one core the benchmark gives the server, and a
//! connection that waits about that long between messages paid it on many of them).
//!
//! Once stopped, a thread goes on echoing until its connection is idle: all it read is sent,
//! nothing is left to read (`FIONREAD` is 0), and no input came for [`DRAIN_QUIET`] (it waits
//! for that in `poll` on its socket alone, after a read that timed out and, once stopped, after
//! each echo too, so that a peer that pauses for [`DRAIN_QUIET`] but never for [`STOP_CHECK`]
//! is closed as the other models close it). Then it closes the connection with a FIN. The
//! acceptor closes the listener and waits for the threads until the drain deadline, then shuts
//! down both sides of the connections still open, which fails their writes and ends their
//! reads. Then it joins every thread.
//!
//! The limit is threads: each costs a stack ([`STACK_SIZE`]) and a kernel task. A connection
//! whose thread cannot be spawned is closed at once, counted in
//! [`Stats::refused`](crate::Stats::refused), and reported by a rate-limited warning.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::conn::{accept_failed, Acceptor, RateLimit};
use crate::sys;
use crate::{Config, Stats, Stop, DRAIN_QUIET, READ_SIZE};

/// How long a connection's blocking read waits before it looks at the stop and reads again:
/// how late a thread with an idle connection sees the server stop.
const STOP_CHECK: Duration = Duration::from_secs(1);

/// A connection thread's stack: the echo needs little, its buffer is on the heap.
const STACK_SIZE: usize = 256 * 1024;

/// What the acceptor and the connection threads share.
struct Shared {
    /// The open connections, so that the acceptor can shut them down when stopping.
    conns: Mutex<HashMap<u64, Arc<TcpStream>>>,
    /// Notified when a connection leaves `conns`.
    closed: Condvar,
    bytes: AtomicU64,
    /// The server's own stop, which the connection threads watch: triggered once the acceptor
    /// ends, on the caller's stop or when the listener fails (which must not stop other
    /// servers that share the caller's).
    stop: Stop,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Arc<TcpStream>>> {
        // A thread that panicked while holding the lock left the map consistent (every
        // critical section is a single insert, remove or iteration).
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) fn serve(listener: TcpListener, config: &Config, stop: &Stop) -> io::Result<Stats> {
    // Accepted sockets are blocking; only the listener is not (see the module docs).
    let mut acceptor = Acceptor::new("blocking", listener, false)?;
    let shared = Arc::new(Shared {
        conns: Mutex::new(HashMap::new()),
        closed: Condvar::new(),
        bytes: AtomicU64::new(0),
        stop: Stop::new()?,
    });
    let mut stats = Stats::default();
    let mut threads = Vec::new();
    let result = accept_loop(&mut acceptor, stop, &shared, &mut stats, &mut threads);
    // Stopped, or the listener failed: either way the connection threads drain.
    shared.stop.trigger();
    drop(acceptor);
    drain(&shared, config);
    for t in threads {
        if t.join().is_err() {
            warn!("blocking: a connection thread panicked");
        }
    }
    stats.bytes = shared.bytes.load(Ordering::Relaxed);
    result.map(|()| stats)
}

/// Accepts and spawns until the caller's `stop` (or a listener error).
fn accept_loop(
    acceptor: &mut Acceptor,
    stop: &Stop,
    shared: &Arc<Shared>,
    stats: &mut Stats,
    threads: &mut Vec<JoinHandle<()>>,
) -> io::Result<()> {
    let mut refusals = RateLimit::new();
    let mut next_id = 0u64;
    loop {
        if stop.is_triggered() {
            return Ok(());
        }
        let now = Instant::now();
        let listener_fd = if acceptor.paused(now) {
            -1
        } else {
            acceptor.fd()
        };
        let mut fds = [
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        match sys::poll(&mut fds, sys::until(now, [acceptor.paused_until()])) {
            Ok(_) => {}
            // The connections' threads go on; the acceptor waits again.
            Err(e) if sys::short_of_memory(&e) => continue,
            Err(e) => return Err(e),
        }
        if fds[1].revents == 0 {
            continue;
        }
        while let Some(stream) = acceptor.accept().map_err(|e| accept_failed(&e))? {
            let fd = stream.as_raw_fd();
            debug!("socket {fd} connected");
            let stream = Arc::new(stream);
            let id = next_id;
            next_id += 1;
            shared.conns().insert(id, Arc::clone(&stream));
            let thread_shared = Arc::clone(shared);
            let spawned = thread::Builder::new()
                .name(format!("echo-{fd}"))
                .stack_size(STACK_SIZE)
                .spawn(move || connection(id, stream, &thread_shared));
            match spawned {
                Ok(t) => {
                    stats.connections += 1;
                    threads.push(t);
                }
                Err(e) => {
                    // The closure, and its reference to the socket, is gone: this closes it.
                    shared.conns().remove(&id);
                    stats.refused += 1;
                    if let Some(suppressed) = refusals.check() {
                        warn!(suppressed, "blocking: refusing socket {fd}: no thread: {e}");
                    }
                }
            }
        }
        // Join the threads that are done, so that finished ones do not pile up.
        if threads.iter().any(JoinHandle::is_finished) {
            let (done, running) = threads
                .drain(..)
                .partition::<Vec<_>, _>(JoinHandle::is_finished);
            *threads = running;
            for t in done {
                if t.join().is_err() {
                    warn!("blocking: a connection thread panicked");
                }
            }
        }
    }
}

/// A connection's thread.
fn connection(id: u64, stream: Arc<TcpStream>, shared: &Shared) {
    let fd = stream.as_raw_fd();
    match echo(&stream, shared) {
        Ok(()) => {
            debug!("closing socket {fd}");
            sys::finish(&stream);
        }
        Err(e) => debug!("closing socket {fd}: {e}"),
    }
    shared.conns().remove(&id);
    shared.closed.notify_all();
    // The last reference: this closes the socket.
    drop(stream);
}

/// Echoes until the peer closes, or, once the server stops, until the connection is idle.
fn echo(stream: &TcpStream, shared: &Shared) -> io::Result<()> {
    let mut buf = vec![0u8; READ_SIZE];
    let mut stream = stream;
    stream.set_read_timeout(Some(STOP_CHECK))?;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            // No input for `STOP_CHECK`.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if idle_once_stopped(stream, shared)? {
                    return Ok(());
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut sent = 0;
        while sent < n {
            match stream.write(&buf[sent..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    sent += k;
                    shared.bytes.fetch_add(k as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        // Input that keeps coming more often than `STOP_CHECK` never lets a read time out:
        // once stopped, each echo is followed by the same look for a pause.
        if idle_once_stopped(stream, shared)? {
            return Ok(());
        }
    }
}

/// Whether the server is stopping and `stream` is done with: everything read is echoed (the
/// caller's part), no more input came for [`DRAIN_QUIET`], and the peer has taken all of the
/// echo.
fn idle_once_stopped(stream: &TcpStream, shared: &Shared) -> io::Result<bool> {
    Ok(shared.stop.is_triggered()
        && !wait_for_input(stream, None, Some(DRAIN_QUIET))?
        && sys::unread(stream)? == 0
        && sys::unacked(stream)? == 0)
}

/// Blocks until `stream` has input (or an error, or end-of-file), the stop (if given) is
/// triggered, or the timeout (if given) expires. Returns whether `stream` is ready (or may be:
/// a wait the kernel had no memory for says so).
fn wait_for_input(
    stream: &TcpStream,
    stop: Option<&Stop>,
    timeout: Option<Duration>,
) -> io::Result<bool> {
    let pollfd = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // A negative descriptor is ignored by `poll`.
    let mut fds = [
        pollfd(stream.as_raw_fd()),
        pollfd(stop.map_or(-1, AsRawFd::as_raw_fd)),
    ];
    match sys::poll(&mut fds, timeout) {
        Ok(_) => Ok(fds[0].revents != 0),
        // Short of memory for the wait, which passes: as if input came (the caller reads, and
        // waits again), rather than fail the connection.
        Err(e) if sys::short_of_memory(&e) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Waits for the connections to finish until the drain deadline, then shuts down those still
/// open. (The threads see the stop themselves.)
fn drain(shared: &Shared, config: &Config) {
    let deadline = crate::later(Instant::now(), config.drain_timeout);
    let mut conns = shared.conns();
    info!("blocking: stopping, draining {} connections", conns.len());
    while !conns.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            warn!(
                "blocking: drain timeout, closing {} connections",
                conns.len()
            );
            for stream in conns.values() {
                // Fails a thread blocked in `write` with EPIPE.
                let _ = stream.shutdown(Shutdown::Both);
            }
            return;
        }
        conns = match shared.closed.wait_timeout(conns, left) {
            Ok((guard, _)) => guard,
            Err(e) => e.into_inner().0,
        };
    }
}
