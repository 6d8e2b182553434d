//! What the peer echo servers (`peer-tokio`, `peer-monoio`, `peer-compio`) share, so that each
//! peer's `main.rs` holds only its runtime's serving code.
//!
//! - [`Cli`]: the command line every peer takes, `[--listen ADDR] [--workers N] [--buffer
//!   BYTES]`, with [`parse_args`] behind it.
//! - [`AcceptErrors`]: what a peer does when an accept fails (a spare descriptor, a pause, a
//!   log line at most once a second), so that running out of descriptors does not spin a core.
//! - [`serve_thread_per_core`]: the startup of the thread-per-core peers, a thread per worker, each
//!   with its own runtime and listener.
//! - `echo_check` and `echo_tests!` (feature `testing`): the echo checks every peer's
//!   `tests/echo.rs` runs, so that all three are held to literally the same code.
//! - `uring_check` (feature `testing`): the io_uring test policy every crate of the workspace
//!   follows (when a kernel's refusal skips a test).

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::process::{self, ExitCode};
use std::sync::mpsc;
use std::thread;

#[cfg(feature = "testing")]
pub mod echo_check;
#[cfg(feature = "testing")]
pub mod uring_check;

/// Where a peer listens without `--listen`.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)),
    5150,
);

/// Each connection's receive buffer without `--buffer`: the book's 8 KiB, a size echo servers
/// commonly use. (`ringport serve` receives into 64 KiB pool buffers that connections share, and
/// sends what piled up in one gathering send: `--buffer 65536` gives a peer reads of that size,
/// at 64 KiB of memory per connection.)
pub const DEFAULT_BUFFER: usize = 8 * 1024;

/// The smallest and largest `--buffer`.
pub const BUFFER_RANGE: std::ops::RangeInclusive<usize> = 512..=16 << 20;

/// What `--workers` accepts: as many threads as `ringport serve --workers` allows.
pub const WORKERS_RANGE: std::ops::RangeInclusive<usize> = 1..=1024;

/// A peer's command line, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Args {
    /// `--listen ADDR`: the address to listen on (port 0 picks one); [`DEFAULT_LISTEN`] without it.
    pub listen: SocketAddr,
    /// `--workers N`: how many threads serve, in [`WORKERS_RANGE`]; 1 without it.
    pub workers: usize,
    /// `--buffer BYTES`: each connection's receive buffer, in [`BUFFER_RANGE`];
    /// [`DEFAULT_BUFFER`] without it.
    pub buffer: usize,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            listen: DEFAULT_LISTEN,
            workers: 1,
            buffer: DEFAULT_BUFFER,
        }
    }
}

/// Parses the arguments after the program name; `Ok(None)` asks for the usage text (`-h`,
/// `--help`), `Err` is the message for a bad command line.
///
/// Flags take their value as the next argument or inline (`--workers=4`); a later one overrides
/// an earlier one.
pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Option<Args>, String> {
    let mut parsed = Args::default();
    let args = args
        .into_iter()
        .map(|arg| {
            arg.into_string()
                .map_err(|arg| format!("argument {arg:?} is not UTF-8"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        if !["--listen", "--workers", "--buffer"].contains(&flag.as_str()) {
            return Err(format!("unknown argument '{flag}'"));
        }
        let value = match inline {
            Some(value) => value,
            None => args.next().ok_or_else(|| format!("{flag} needs a value"))?,
        };
        if flag == "--listen" {
            parsed.listen = value.parse().map_err(|_| {
                format!("--listen: '{value}' is not an address like 127.0.0.1:5150")
            })?;
        } else if flag == "--buffer" {
            parsed.buffer = in_range(&flag, &value, "a size in bytes", &BUFFER_RANGE)?;
        } else {
            parsed.workers = in_range(&flag, &value, "a thread count", &WORKERS_RANGE)?;
        }
    }
    Ok(Some(parsed))
}

/// `value` of `flag` as a number in `range`, or an error naming the flag, the value and the
/// range (`what`: what the number is).
fn in_range(
    flag: &str,
    value: &str,
    what: &str,
    range: &std::ops::RangeInclusive<usize>,
) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(format!(
            "{flag}: '{value}' is not {what} from {} to {}",
            range.start(),
            range.end()
        )),
    }
}

/// A peer's command-line interface: its name and what its `--workers` counts.
#[derive(Debug, Clone, Copy)]
pub struct Cli {
    /// The program's name, which starts its messages, e.g. `peer-tokio`.
    pub name: &'static str,
    /// What `--workers N` sets, for the usage text, e.g. `tokio worker threads`.
    pub workers: &'static str,
}

impl Cli {
    /// The usage text, without a final newline.
    pub fn usage(&self) -> String {
        format!(
            "usage: {} [--listen ADDR] [--workers N] [--buffer BYTES]\n  \
             --listen ADDR   address to listen on (default {DEFAULT_LISTEN}; port 0 picks one)\n  \
             --workers N     {} (default 1)\n  \
             --buffer BYTES  receive buffer per connection (default {DEFAULT_BUFFER})",
            self.name, self.workers
        )
    }

    /// The process's command line, parsed; with `-h` or `--help`, prints the usage on stdout and
    /// exits 0; when the command line is bad, [exits 2](Cli::usage_exit).
    pub fn args(&self) -> Args {
        match parse_args(std::env::args_os().skip(1)) {
            Ok(Some(args)) => args,
            Ok(None) => {
                println!("{}", self.usage());
                process::exit(0)
            }
            Err(message) => self.usage_exit(&message),
        }
    }

    /// Prints `NAME: MESSAGE` and the usage on stderr, then exits with status 2.
    pub fn usage_exit(&self, message: &str) -> ! {
        eprintln!("{}: {message}\n{}", self.name, self.usage());
        process::exit(2)
    }
}

/// Where a thread-per-core worker reports, once, that it is listening (and on which address) or
/// why it cannot: [`serve_thread_per_core`] waits for that before it starts the next worker.
#[derive(Debug)]
pub struct Bound(mpsc::Sender<io::Result<SocketAddr>>);

impl Bound {
    /// Reports that the worker cannot serve: `what: error`, of the error's kind.
    pub fn fail(self, what: impl fmt::Display, error: io::Error) {
        let error = io::Error::new(error.kind(), format!("{what}: {error}"));
        // The receiver is gone only if the server is already failing; nothing to add then.
        let _ = self.0.send(Err(error));
    }

    /// Reports the outcome of binding a listener to `addr`: on success the address it got (from
    /// `local_addr`), and the listener comes back to be served; on failure the error, prefixed
    /// with `addr`, and `None`.
    pub fn listening<L>(
        self,
        addr: SocketAddr,
        listener: io::Result<L>,
        local_addr: impl FnOnce(&L) -> io::Result<SocketAddr>,
    ) -> Option<L> {
        match listener {
            Ok(listener) => {
                let _ = self.0.send(local_addr(&listener));
                Some(listener)
            }
            Err(e) => {
                self.fail(addr, e);
                None
            }
        }
    }
}

/// The listen backlog of every peer's listener: `ringport serve`'s, so that no server's
/// connections wait on SYN retransmits where another's are queued (tokio's `bind` would use
/// 128, monoio's and compio's 1024).
pub const BACKLOG: i32 = 4096;

/// The kernel interface the peer's runtime drives, once a worker has said (see
/// [`report_backend`]).
static BACKEND: std::sync::Mutex<Option<&'static str>> = std::sync::Mutex::new(None);

/// Says which kernel interface the peer's runtime drives (`io_uring`, `epoll`): the listening
/// line then ends in `backend=NAME`, which the bench harness shows next to the peer. Every
/// worker says; should two say different things (one fell back), the line says `mixed`.
pub fn report_backend(name: &'static str) {
    let mut backend = BACKEND
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *backend = match *backend {
        None => Some(name),
        Some(said) if said == name => Some(said),
        Some(_) => Some("mixed"),
    };
}

/// Runs a thread-per-core server: `workers` threads named `NAME-ID`, each running
/// `worker(id, addr, bound)` with its own runtime and its own `SO_REUSEPORT` listener on `addr`.
///
/// The workers start one at a time: each reports its bound address (or the error that prevented
/// it) through `bound` before the next starts, so that with port 0 the first one picks the port and the
/// rest join it. Once all are listening, prints `listening on ADDR` on stderr and waits for them.
///
/// Workers serve until the process is killed, so this returns only on failure: a worker that could
/// not start (said on stderr) or one that returned (panicked, and said so).
pub fn serve_thread_per_core<W>(name: &str, args: Args, worker: W) -> ExitCode
where
    W: Fn(usize, SocketAddr, Bound) + Clone + Send + 'static,
{
    let mut addr = args.listen;
    if addr.port() != 0 {
        // The workers' `SO_REUSEPORT` would also let them join another process listening on
        // this address (a leftover instance), the kernel splitting the connections between the
        // two: a plain bind first finds such a one.
        if let Err(e) = std::net::TcpListener::bind(addr) {
            eprintln!("{name}: {addr}: {e}");
            return ExitCode::FAILURE;
        }
    }
    // Each worker says here when it ends, however it ends (a panic included).
    let (ended_tx, ended_rx) = mpsc::channel();
    for id in 0..args.workers {
        let (bound_tx, bound_rx) = mpsc::channel();
        let worker = worker.clone();
        let ended = Ended(id, ended_tx.clone());
        let spawned = thread::Builder::new()
            .name(format!("{name}-{id}"))
            .spawn(move || {
                let _ended = ended;
                worker(id, addr, Bound(bound_tx));
            });
        if let Err(e) = spawned {
            eprintln!("{name}: cannot start worker thread {id}: {e}");
            return ExitCode::FAILURE;
        }
        match bound_rx.recv() {
            Ok(Ok(bound)) => addr = bound,
            Ok(Err(e)) => {
                eprintln!("{name}: worker {id}: {e}");
                return ExitCode::FAILURE;
            }
            Err(mpsc::RecvError) => {
                eprintln!("{name}: worker {id} died while starting");
                return ExitCode::FAILURE;
            }
        }
    }
    let backend = *BACKEND
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match backend {
        Some(backend) => eprintln!("listening on {addr} backend={backend}"),
        None => eprintln!("listening on {addr}"),
    }
    // Workers serve until the process is killed; one that ends has panicked (and said so). The
    // process ends with it, rather than serve on with a worker fewer than it was asked for.
    if let Ok(id) = ended_rx.recv() {
        eprintln!("{name}: worker {id} stopped serving");
    }
    ExitCode::FAILURE
}

/// Held by a worker thread: tells the main thread which worker ended, when it does.
struct Ended(usize, mpsc::Sender<usize>);

impl Drop for Ended {
    fn drop(&mut self) {
        let _ = self.1.send(self.0);
    }
}

/// A peer's accept loop after a failed accept: what to do next, and whether to log it.
///
/// An accept that fails for want of a resource fails again at once, while the connection
/// waits in the backlog (and on io_uring, with none waiting): retried as it is, it would spin a
/// core and fill stderr. Out of descriptors (`EMFILE`, `ENFILE`), the loop frees the spare
/// descriptor it holds for that and accepts again ([`AcceptAction::UseSpare`]); the connection
/// is kept when the spare can be had back after it, closed when not (so a client sees its
/// connection refused, not a server hanging). Another resource short (`ENOBUFS`, `ENOMEM`)
/// pauses the worker thread, 10 ms after the first failure in a row and twice as long after
/// each next one, up to 100 ms (a thread-per-core runtime serves nothing else meanwhile). A connection the client gave up on (`ECONNABORTED`) or a
/// signal (`EINTR`) is retried at once. One line is logged per second at most, with the count
/// of the failures it stands for.
///
/// None of this uses a runtime's timer: enabling one costs tokio and monoio CPU time on every
/// turn of their event loops, which would skew a benchmark of them.
#[derive(Debug)]
pub struct AcceptErrors {
    in_a_row: u32,
    unlogged: u64,
    last_log: Option<std::time::Instant>,
    /// A descriptor held to be freed when the process runs out of them.
    spare: Option<std::fs::File>,
}

/// What an accept loop does after [`AcceptErrors::failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptAction {
    /// Accept again now.
    Retry,
    /// The spare descriptor was freed: accept again, then call [`AcceptErrors::take_spare_back`]
    /// with what came, and serve the connection only if that says so.
    UseSpare,
    /// Sleep this long (the thread, and with it the connections a thread-per-core runtime
    /// serves on it: no runtime timer), then accept again.
    Pause(std::time::Duration),
}

impl Default for AcceptErrors {
    fn default() -> Self {
        Self::new()
    }
}

/// `EMFILE` and `ENFILE` (Linux).
const OUT_OF_DESCRIPTORS: [i32; 2] = [24, 23];

impl AcceptErrors {
    /// The first pause, and the longest.
    pub const FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);
    pub const LONGEST_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

    pub fn new() -> Self {
        AcceptErrors {
            in_a_row: 0,
            unlogged: 0,
            last_log: None,
            spare: std::fs::File::open("/dev/null").ok(),
        }
    }

    /// An accept succeeded: the next failure pauses the shortest time again.
    pub fn accepted(&mut self) {
        self.in_a_row = 0;
    }

    /// An accept failed with `e` at `now`: logs it (named `name`) unless a line went out less
    /// than a second ago, and says what to do next.
    pub fn failed(&mut self, name: &str, e: &io::Error, now: std::time::Instant) -> AcceptAction {
        self.unlogged += 1;
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1))
        {
            let more = match self.unlogged {
                1 => String::new(),
                n => format!(" ({n} failures since the last line)"),
            };
            eprintln!("{name}: accept: {e}{more}");
            self.last_log = Some(now);
            self.unlogged = 0;
        }
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
        ) {
            return AcceptAction::Retry;
        }
        if e.raw_os_error()
            .is_some_and(|n| OUT_OF_DESCRIPTORS.contains(&n))
        {
            if self.spare.is_none() {
                // A close may have finished since the spare could not be had back (monoio
                // closes a dropped stream asynchronously).
                self.spare = std::fs::File::open("/dev/null").ok();
            }
            if self.spare.take().is_some() {
                return AcceptAction::UseSpare;
            }
        }
        let pause = Self::FIRST_PAUSE * (1u32 << self.in_a_row.min(7));
        self.in_a_row = self.in_a_row.saturating_add(1);
        AcceptAction::Pause(pause.min(Self::LONGEST_PAUSE))
    }

    /// After [`AcceptAction::UseSpare`]: takes a spare descriptor again, and says whether the
    /// connection accepted with the freed one (`accepted`) can be kept. When there is no room
    /// for both, the connection is closed here with `close_now`, which must close it before it
    /// returns (a runtime that closes a dropped stream later, as monoio does, passes
    /// [`close_now`]), and the spare taken in its place.
    pub fn take_spare_back<S>(
        &mut self,
        accepted: Option<S>,
        close_now: impl FnOnce(S),
    ) -> Option<S> {
        self.spare = std::fs::File::open("/dev/null").ok();
        match accepted {
            Some(conn) if self.spare.is_some() => Some(conn),
            Some(conn) => {
                close_now(conn);
                self.spare = std::fs::File::open("/dev/null").ok();
                None
            }
            None => None,
        }
    }
}

/// Closes `conn`'s descriptor before returning (where dropping it would leave the close to the
/// runtime's next turn).
pub fn close_now<S: std::os::fd::IntoRawFd>(conn: S) {
    // SAFETY: `into_raw_fd` hands over the descriptor and its ownership: nothing else closes it.
    drop(unsafe {
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(conn.into_raw_fd())
    });
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    #[test]
    fn accept_failures_use_the_spare_or_pause_longer_in_a_row() {
        let mut a = super::AcceptErrors::new();
        let t = Instant::now();
        let emfile = io::Error::from_raw_os_error(24);
        assert_eq!(a.failed("test", &emfile, t), super::AcceptAction::UseSpare);
        // With room for one, the connection is kept (not closed) and the spare is back.
        let closed = std::cell::Cell::new(false);
        let kept = a.take_spare_back(Some("conn"), |_| closed.set(true));
        assert_eq!((kept, closed.get()), (Some("conn"), false));
        // Out of descriptors again: the spare again (taken back meanwhile if it was not).
        assert_eq!(a.failed("test", &emfile, t), super::AcceptAction::UseSpare);
        assert_eq!(a.failed("test", &emfile, t), super::AcceptAction::UseSpare);
        // Another resource short: pauses, longer each time in a row, then capped.
        let nobufs = io::Error::from_raw_os_error(105);
        let pauses: Vec<_> = (0..10).map(|_| a.failed("test", &nobufs, t)).collect();
        let ms = |n| super::AcceptAction::Pause(Duration::from_millis(n));
        assert_eq!(pauses[..4], [ms(10), ms(20), ms(40), ms(80)]);
        assert_eq!(pauses[9], ms(100), "capped");
        a.accepted();
        assert_eq!(
            a.failed("test", &nobufs, t),
            ms(10),
            "after an accept, short again"
        );
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(a.failed("test", &aborted, t), super::AcceptAction::Retry);
    }
    use super::*;

    /// Workers that agree name their backend; one that differs (fell back) makes it `mixed`,
    /// whichever spoke first. (The only test of the process-wide record.)
    #[test]
    fn a_worker_that_fell_back_makes_the_backend_mixed() {
        let said = || *BACKEND.lock().unwrap();
        report_backend("io_uring");
        report_backend("io_uring");
        assert_eq!(said(), Some("io_uring"));
        report_backend("epoll");
        assert_eq!(said(), Some("mixed"));
        report_backend("io_uring");
        assert_eq!(said(), Some("mixed"));
    }

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn defaults() {
        let args = parse(&[]).unwrap().unwrap();
        assert_eq!(args.listen, "127.0.0.1:5150".parse().unwrap());
        assert_eq!(args.workers, 1);
        assert_eq!(args.buffer, DEFAULT_BUFFER);
    }

    #[test]
    fn values_separate_or_inline() {
        let want = Args {
            listen: "[::1]:0".parse().unwrap(),
            workers: 4,
            buffer: 65536,
        };
        let separate = parse(&["--listen", "[::1]:0", "--workers", "4", "--buffer", "65536"]);
        assert_eq!(separate, Ok(Some(want)));
        let inline = parse(&["--listen=[::1]:0", "--workers=4", "--buffer=65536"]);
        assert_eq!(inline, Ok(Some(want)));
        assert_eq!(
            parse(&["--workers", "2", "--workers", "4"])
                .unwrap()
                .unwrap()
                .workers,
            4
        );
    }

    #[test]
    fn help_asks_for_usage() {
        assert_eq!(parse(&["-h"]), Ok(None));
        assert_eq!(parse(&["--workers", "2", "--help"]), Ok(None));
    }

    #[test]
    fn bad_command_lines_say_why() {
        let cases: [(&[&str], &str); 9] = [
            (
                &["--buffer", "511"],
                "--buffer: '511' is not a size in bytes from 512 to 16777216",
            ),
            (
                &["--buffer=64k"],
                "--buffer: '64k' is not a size in bytes from 512 to 16777216",
            ),
            (
                &["--workers", "0"],
                "--workers: '0' is not a thread count from 1 to 1024",
            ),
            (
                &["--workers", "18446744073709551615"],
                "--workers: '18446744073709551615' is not a thread count from 1 to 1024",
            ),
            (
                &["--workers=many"],
                "--workers: 'many' is not a thread count from 1 to 1024",
            ),
            (
                &["--listen", "nowhere"],
                "--listen: 'nowhere' is not an address like 127.0.0.1:5150",
            ),
            (&["--listen"], "--listen needs a value"),
            (&["--no-such-flag"], "unknown argument '--no-such-flag'"),
            (&["-w=2"], "unknown argument '-w=2'"),
        ];
        for (args, message) in cases {
            assert_eq!(parse(args), Err(message.to_owned()), "{args:?}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_argument_is_an_error() {
        use std::os::unix::ffi::OsStringExt;
        let args = [OsString::from("--listen"), OsString::from_vec(vec![0xff])];
        let err = parse_args(args).unwrap_err();
        assert!(err.ends_with("is not UTF-8"), "{err}");
    }

    #[test]
    fn usage_names_the_peer_and_its_workers() {
        let cli = Cli {
            name: "peer-tokio",
            workers: "tokio worker threads",
        };
        assert_eq!(
            cli.usage(),
            "usage: peer-tokio [--listen ADDR] [--workers N] [--buffer BYTES]
  --listen ADDR   address to listen on (default 127.0.0.1:5150; port 0 picks one)
  --workers N     tokio worker threads (default 1)
  --buffer BYTES  receive buffer per connection (default 8192)"
        );
    }
}
