//! The chapter's "I/O model consideration", measured: the same RFC 862 TCP echo server written
//! in each I/O model the Winsock chapter compares, one small module per model.
//!
//! Each module is written the way that model is meant to be used, not as a straw man, so that
//! a comparison measures the model, not the code.
//!
//! # The models
//!
//! | [`Model`] | Winsock model | Linux mechanism | the limit, and what happens at it |
//! |---|---|---|---|
//! | [`Blocking`](Model::Blocking) | blocking sockets, a thread per connection | blocking `read`/`write`; one thread accepts, one thread per connection | threads (memory): a connection whose thread cannot be spawned is closed at once and counted in [`Stats::refused`] |
//! | [`Select`](Model::Select) | `select` | `select(2)`, one thread, the sets rebuilt before every wait | `FD_SETSIZE` (1024): a connection whose descriptor is `>= 1024` is closed at once (it is never put in an `fd_set`), counted in [`Stats::refused`] and logged (rate-limited) |
//! | [`Sigio`](Model::Sigio) | `WSAAsyncSelect` (window messages) | signal-driven I/O, one thread: each socket raises a realtime signal aimed at that thread (`O_ASYNC`, `F_SETOWN_EX`, `F_SETSIG`), taken with `sigtimedwait(2)` | the realtime signal queue (`RLIMIT_SIGPENDING`): on overflow the kernel raises `SIGIO` instead, and the thread tries every socket (logged, rate-limited) |
//! | [`Poll`](Model::Poll) | `WSAEventSelect` (without its 64-handle limit) | `poll(2)`, one thread, one `pollfd` array kept in step with the connections | descriptors only; every wait costs O(connections) |
//! | [`Epoll`](Model::Epoll) | `WSAEventSelect`, with the kernel keeping the interest list | edge-triggered `epoll(7)`, one thread, each socket registered once | descriptors and `max_user_watches` (a socket the kernel will not watch is closed and counted in [`Stats::refused`]); a wait costs O(ready sockets) |
//! | [`Uring`](Model::Uring) | overlapped I/O with completion routines | io_uring, one thread: one receive or send in flight per connection, multishot accept (Linux 5.19) | a full submission ring is submitted to make room; a full completion ring is kept by the kernel (`IORING_FEAT_NODROP`) |
//!
//! The completion port with a pool of workers, the chapter's last model, is ringport's own
//! server (`ringport serve`).
//!
//! Every model runs out of descriptors eventually (`EMFILE`); then it pauses accepting for
//! 100 ms instead of spinning on the backlog, and logs a (rate-limited) warning.
//!
//! # Semantics, the same in every model
//!
//! * Byte-exact, in-order echo, for any payload size; short sends are resumed.
//! * Backpressure: while a connection has unsent bytes it does not read, so a peer that sends
//!   without reading makes the server hold at most one read's worth for it. Every model reads
//!   at most 8192 bytes at a time (the book's receive buffer), so that the models differ only
//!   in how they wait.
//! * The peer closes (or half-closes) its side: everything it sent is echoed, then the server
//!   closes with a FIN. An error on a connection closes that connection only.
//! * [`Stop::trigger`] stops the server gracefully: it stops accepting (closes the listener),
//!   and goes on reading and echoing on every open connection until that connection is idle:
//!   nothing left to send, nothing unread in its socket (`ioctl(FIONREAD)` is 0, asked whenever
//!   the connection would wait for input), no input for a short quiet period (250 ms, see
//!   below), and the peer has acknowledged all of the echo (`ioctl(SIOCOUTQ)` is 0: closed
//!   before, the connection would be reset should the peer send anything more, and the echo
//!   still in the kernel dropped). So everything a peer sent before the stop comes back
//!   (backpressure still holds: a connection with unsent bytes reads nothing). Then the connection is closed with a FIN
//!   (`shutdown(Write)`, then `close`). Connections still busy after [`Config::drain_timeout`]
//!   are closed anyway (with a FIN after whatever did get out). Then the server joins its
//!   threads and returns the [`Stats`].
//!
//!   Why the quiet period: a socket with nothing unread does not mean that the peer has nothing
//!   more on the way. A peer that wrote more than the server's receive window holds the rest
//!   in its own send buffer, and sends it only when the server's window update reaches it; on
//!   loopback that next data was measured arriving from microseconds to milliseconds after the
//!   server had read its socket empty. Closing at that moment would reset the connection and
//!   lose echo the peer was owed.
//!
//! Logging goes through `tracing`: `socket N connected` and `closing socket N` at debug level,
//! refusals and resource exhaustion as rate-limited warnings.
//!
//! # Example
//!
//! ```
//! use std::io::{Read, Write};
//! use std::net::{TcpListener, TcpStream};
//! use ringport_models::{serve, Config, Model, Stop};
//!
//! fn main() -> std::io::Result<()> {
//!     let listener = TcpListener::bind("127.0.0.1:0")?;
//!     let addr = listener.local_addr()?;
//!     let model: Model = "epoll".parse()?;
//!     let stop = Stop::new()?;
//!     let server = {
//!         let stop = stop.clone();
//!         std::thread::spawn(move || serve(model, listener, &Config::default(), &stop))
//!     };
//!
//!     let mut client = TcpStream::connect(addr)?;
//!     client.write_all(b"A test message from client")?;
//!     let mut echo = [0u8; 26];
//!     client.read_exact(&mut echo)?;
//!     assert_eq!(&echo, b"A test message from client");
//!
//!     stop.trigger();
//!     let stats = server.join().expect("the server thread")?;
//!     assert_eq!((stats.connections, stats.bytes), (1, 26));
//!     Ok(())
//! }
//! ```

#![deny(missing_docs)]

use std::fmt;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod conn;
mod sys;

/// The most any model reads in one call: the book's receive buffer.
const READ_SIZE: usize = 8192;

/// After the stop, how long an idle connection (nothing to send, nothing unread) waits for
/// more input before it is closed: input the peer sent before the stop may still be on its way
/// (see the crate docs). Far above the gaps measured on loopback, far below any drain timeout
/// worth setting.
const DRAIN_QUIET: Duration = Duration::from_millis(250);

/// While stopping, how often an idle connection whose peer has not taken all of its echo is
/// looked at again (it is closed once the peer has).
const UNACKED_CHECK: Duration = Duration::from_millis(20);

mod blocking;
mod epoll;
mod poll;
mod select;
mod sigio;
mod uring;

/// An I/O model: which module serves the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Model {
    /// Blocking sockets, a thread per connection.
    Blocking,
    /// One thread, `select(2)`; at most `FD_SETSIZE` (1024) descriptors.
    Select,
    /// One thread, signal-driven I/O (`O_ASYNC` + `F_SETSIG`): the `WSAAsyncSelect` of Linux.
    Sigio,
    /// One thread, `poll(2)`.
    Poll,
    /// One thread, edge-triggered `epoll(7)`.
    Epoll,
    /// One thread, io_uring: overlapped I/O with completion callbacks.
    Uring,
}

impl Model {
    /// Every model, in the chapter's order.
    pub const ALL: [Model; 6] = [
        Model::Blocking,
        Model::Select,
        Model::Sigio,
        Model::Poll,
        Model::Epoll,
        Model::Uring,
    ];

    /// The model's name, as parsed by [`FromStr`] and shown by [`Display`](fmt::Display).
    pub fn name(self) -> &'static str {
        match self {
            Model::Blocking => "blocking",
            Model::Select => "select",
            Model::Sigio => "sigio",
            Model::Poll => "poll",
            Model::Epoll => "epoll",
            Model::Uring => "uring",
        }
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Model {
    type Err = ParseModelError;

    fn from_str(s: &str) -> Result<Model, ParseModelError> {
        Model::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| ParseModelError { name: s.to_owned() })
    }
}

/// A name that is not one of [`Model::ALL`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParseModelError {
    /// The name that was given.
    pub name: String,
}

impl fmt::Display for ParseModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown I/O model `{}` (expected one of:", self.name)?;
        for (i, m) in Model::ALL.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(f, "{sep}{m}")?;
        }
        f.write_str(")")
    }
}

impl std::error::Error for ParseModelError {}

impl From<ParseModelError> for io::Error {
    fn from(e: ParseModelError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

/// Tells a running [`serve`] to stop; clones share the same state.
///
/// Once triggered it stays triggered, and its descriptor ([`Stop::as_fd`]) stays readable: an
/// eventfd that is written once and never read, so any number of event loops can wait on it
/// alongside their sockets (`select`, `poll`, `epoll`, or an io_uring poll) and all of them
/// wake.
#[derive(Debug, Clone)]
pub struct Stop {
    inner: Arc<StopInner>,
}

#[derive(Debug)]
struct StopInner {
    triggered: AtomicBool,
    fd: OwnedFd,
}

impl Stop {
    /// A stop that is not triggered.
    ///
    /// # Errors
    ///
    /// Creating the eventfd failed (out of descriptors).
    pub fn new() -> io::Result<Stop> {
        Ok(Stop {
            inner: Arc::new(StopInner {
                triggered: AtomicBool::new(false),
                fd: sys::eventfd()?,
            }),
        })
    }

    /// Triggers the stop; later calls do nothing. Callable from any thread (not from a signal
    /// handler).
    pub fn trigger(&self) {
        if !self.inner.triggered.swap(true, Ordering::SeqCst) {
            sys::eventfd_signal(self.inner.fd.as_raw_fd());
        }
    }

    /// Whether [`Stop::trigger`] was called.
    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::SeqCst)
    }
}

impl AsFd for Stop {
    /// The eventfd, readable once the stop is triggered. Wait on it; don't read it.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

impl AsRawFd for Stop {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.fd.as_raw_fd()
    }
}

/// A wait longer than this is as good as forever (a drain timeout of `1e19` seconds): one
/// year, which `Instant` and the kernel's timespec can both hold.
pub(crate) const FAR: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// `now + d`, or a year from now when that cannot be represented.
pub(crate) fn later(now: std::time::Instant, d: std::time::Duration) -> std::time::Instant {
    now.checked_add(d).unwrap_or(now + FAR)
}

/// How [`serve`] behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// After the stop, how long to keep echoing what the peers had sent before closing the
    /// remaining connections anyway.
    pub drain_timeout: Duration,
}

impl Default for Config {
    /// A 5 second drain.
    fn default() -> Config {
        Config {
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Totals of one [`serve`] run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections served (accepted and not refused).
    pub connections: u64,
    /// Bytes echoed (handed to the kernel by a successful send).
    pub bytes: u64,
    /// Connections accepted and closed at once because the model could not take them
    /// (`select`: descriptor `>= FD_SETSIZE`; `blocking`: no thread; `epoll`, `sigio`: the
    /// kernel would not watch the socket).
    pub refused: u64,
}

/// Runs the echo server in `model` on `listener` until `stop` is triggered, then drains and
/// returns the totals (see the crate docs for the semantics).
///
/// # Errors
///
/// Setting up the model failed (for [`Model::Uring`]: io_uring is unavailable, e.g. disabled
/// by `kernel.io_uring_disabled` or a seccomp profile; for [`Model::Select`]: the listener or
/// the stop's descriptor is `>= FD_SETSIZE`), or the listener failed with an error that is not
/// about one connection (`accept: ...`): then the server stops as on `stop` (which is left
/// alone: other servers may share it), drains its connections, and returns the error after. Errors on single connections close those
/// connections and are not returned.
pub fn serve(
    model: Model,
    listener: TcpListener,
    config: &Config,
    stop: &Stop,
) -> io::Result<Stats> {
    match listener.local_addr() {
        Ok(addr) => tracing::info!("{model} echo server on {addr}"),
        Err(_) => tracing::info!("{model} echo server"),
    }
    // Inherited by the connections it accepts from now on, so urgent data stays in their
    // stream from the first byte (each connection is set up again as accepted, for those
    // already queued: see `sys::prepare`).
    let _ = socket2::SockRef::from(&listener).set_out_of_band_inline(true);
    let stats = match model {
        Model::Blocking => blocking::serve(listener, config, stop),
        Model::Select => select::serve(listener, config, stop),
        Model::Sigio => sigio::serve(listener, config, stop),
        Model::Poll => poll::serve(listener, config, stop),
        Model::Epoll => epoll::serve(listener, config, stop),
        Model::Uring => uring::serve(listener, config, stop),
    }?;
    tracing::info!(
        connections = stats.connections,
        bytes = stats.bytes,
        refused = stats.refused,
        "{model} echo server stopped"
    );
    Ok(stats)
}
