//! `ringport`: the RFC 862 echo server and its client, built on the ringport completion port.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

mod client;
mod echo_queue;
mod serve;
mod slab;
mod udp;

/// A completion-port TCP echo server (RFC 862) and client for Linux.
#[derive(Debug, Parser)]
#[command(name = "ringport", version, about, propagate_version = true)]
struct Cli {
    /// More logging: -v for one line per connection event, -vv for every completion.
    /// RUST_LOG, when set, takes precedence.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the echo server: every byte received is sent back, in order.
    // A negative number is read as a flag's value, so that the error names the flag.
    #[command(allow_negative_numbers = true)]
    Serve(ServeArgs),
    /// Run the echo client: the book's client by default, or a verifying load generator.
    #[command(allow_negative_numbers = true)]
    Client(ClientArgs),
    /// Benchmarks: `models` (the chapter's I/O models compared), `peers` (ringport against
    /// tokio, monoio and compio), `scaling` (workers 1..8). `ringport bench MODE --help` lists
    /// each mode's options.
    Bench(BenchArgs),
}

/// Options of `ringport bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: BenchMode,
}

/// The benchmark modes. Each takes its own options, listed by `ringport bench MODE --help`.
#[derive(Debug, Subcommand)]
pub enum BenchMode {
    /// The chapter's I/O models (blocking, select, sigio, poll, epoll, uring) against the
    /// completion port.
    #[command(disable_help_flag = true)]
    Models(ModeArgs),
    /// ringport serve (io_uring and epoll) against tokio, monoio and compio echo servers.
    #[command(disable_help_flag = true)]
    Peers(ModeArgs),
    /// Every peers server with 1, 2, 4 and 8 worker threads.
    #[command(disable_help_flag = true)]
    Scaling(ModeArgs),
}

/// The options of one benchmark mode, passed through to it.
#[derive(Debug, Args)]
pub struct ModeArgs {
    /// The mode's own options (e.g. --quick; --help lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Options of `ringport serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (IPv4 or IPv6).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:5150",
        value_parser = parse_listen,
        help = "Address to listen on (IPv4 or IPv6, e.g. [::1]:5150)"
    )]
    pub listen: SocketAddr,

    /// Worker threads, each with its own ring [default: the number of available cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,

    #[command(flatten)]
    pub backend: BackendArg,

    /// I/O model: completion-port (ringport's port, N workers), or, to compare with the
    /// chapter's other models, one of blocking (thread per connection), select, sigio
    /// (signal-driven), poll, epoll, uring (io_uring on one thread).
    #[arg(long, value_name = "NAME", default_value = "completion-port",
          value_parser = ["completion-port", "blocking", "select", "sigio", "poll", "epoll", "uring"])]
    pub model: String,

    /// Close connections that have neither received nor sent anything for this long, in
    /// seconds (slowloris protection; 0: off; else at least 0.01) [default: off].
    #[arg(long, value_name = "SECS", value_parser = parse_period)]
    pub idle_timeout: Option<Duration>,

    /// Probe a connection once nothing has been received on it for SECS seconds (TCP
    /// keepalive: up to three probes, 10 s apart or SECS apart if shorter), and close it when
    /// the peer does not answer: a peer that vanished without a FIN or a reset (a crash, a cut
    /// link) does not hold its connection forever (0: off; at most 32767).
    #[arg(long, value_name = "SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u32).range(0..=32767))]
    pub keepalive: u32,

    /// Connections open at once; more are closed as soon as they are accepted, counted, and
    /// logged at most once a second (0: no limit).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_connections: usize,

    /// Receive-buffer space a connection may hold with echo waiting to be sent (counted as the
    /// whole pool buffers its input is in, at least 1 KiB per segment; at least one pool buffer,
    /// at most an eighth of --pool-size) before the server stops reading from it: a peer that
    /// sends without reading cannot make the server buffer more.
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub conn_buffer: usize,

    /// Do not end each armed receive after --conn-buffer bytes. By default receives end there
    /// (epoll; io_uring on Linux 6.17+), so a peer that sends and never reads gets at most
    /// about twice --conn-buffer into the pool; without that, whatever arrives before the
    /// pause reaches the kernel (a few MiB from a fast sender). For comparison.
    #[arg(long)]
    pub no_strict_conn_buffer: bool,

    /// The default (receives end after --conn-buffer bytes); accepted for scripts written
    /// when it was not.
    #[arg(long, hide = true, conflicts_with = "no_strict_conn_buffer")]
    pub strict_conn_buffer: bool,

    /// Bytes of receive buffers in each worker's pool, 1 MiB to 256 MiB: they bound what a
    /// worker holds in total; connections waiting for input hold none, and pages are touched
    /// only as load needs them. Under pressure, connections take turns.
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 20,
          value_parser = clap::value_parser!(u64).range(1 << 20..=256 << 20))]
    pub pool_size: u64,

    /// Bytes of each worker's pool that circulate at once (0: the whole pool): the bytes
    /// between a receive and the send that echoes them, kept small enough to stay in the
    /// cache. Pool buffers held for 20 ms (by peers that stopped reading, say) do not count,
    /// so the whole pool stays available to them.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20,
          value_parser = clap::value_parser!(u64).range(0..=256 << 20))]
    pub pool_working_set: u64,

    /// Use 8 KiB pool buffers, and on io_uring give each receive a whole one (as io_uring does
    /// before Linux 6.12), instead of filling 64 KiB buffers incrementally (small messages
    /// sharing one); epoll still fills its 8 KiB buffers incrementally. For comparison.
    #[arg(long)]
    pub pool_whole_buffers: bool,

    /// Also echo UDP datagrams (RFC 862), on the same address as --listen. Off by default: UDP
    /// echo can be abused as a reflection amplifier.
    #[arg(long)]
    pub udp: bool,

    /// UDP: datagrams per second echoed to one source address; the rest are dropped and
    /// counted (0: no limit).
    #[arg(long, value_name = "N", default_value_t = 100, requires = "udp")]
    pub udp_rate: u32,

    /// UDP: datagrams per second echoed in all, whatever their sources; the rest are dropped
    /// and counted (0: no limit). Sources can be spoofed by the thousand, each with its own
    /// --udp-rate: this bounds what the server sends at whoever they name.
    #[arg(long, value_name = "N", default_value_t = 10_000, requires = "udp")]
    pub udp_rate_total: u32,

    /// Log one line of statistics every SECS seconds: connections open and accepted, bytes
    /// echoed and the rate, receive-pool buffers in use, counts of refused and closed
    /// connections and of waits for a pool buffer, and with --udp the datagrams echoed and
    /// not answered (0: off; else at least 0.01) [default: off].
    #[arg(long, value_name = "SECS", value_parser = parse_period)]
    pub stats: Option<Duration>,

    /// On SIGINT/SIGTERM, how long to keep echoing what was already received before closing
    /// the remaining connections, in seconds (e.g. 5, 0.5).
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs)]
    pub drain_timeout: Duration,
}

/// The `--backend` option, shared by `serve` and `client`.
#[derive(Debug, Args)]
pub struct BackendArg {
    /// Completion backend: auto (io_uring, or epoll where io_uring is refused), uring or epoll
    /// [default: RINGPORT_BACKEND where it is set and not empty, else auto].
    #[arg(
        long = "backend",
        value_name = "NAME",
        default_value = "auto",
        hide_default_value = true,
        value_parser = parse_backend
    )]
    pub get: ringport::Backend,
}

/// Options of `ringport client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Address of the echo server: IP:PORT, or HOST:PORT (a name is resolved once, its IPv4
    /// addresses first, as `ringport serve` listens on IPv4 by default).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5150", value_parser = parse_server)]
    pub connect: SocketAddr,

    /// Book mode: how many times to send the message.
    #[arg(long, value_name = "N", default_value_t = client::book::DEFAULT_COUNT,
          conflicts_with_all = LOAD_FLAGS, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,

    /// Book mode: the message to send (not empty).
    #[arg(
        long,
        value_name = "TEXT",
        default_value = "A test message from client",
        conflicts_with_all = LOAD_FLAGS,
        value_parser = clap::builder::NonEmptyStringValueParser::new()
    )]
    pub message: String,

    /// Book mode: read no echo while sending; at the end, read and check what comes back
    /// until the server closes.
    #[arg(long, conflicts_with_all = LOAD_FLAGS)]
    pub send_only: bool,

    /// Load mode: concurrent connections [default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub connections: Option<u32>,

    /// Load mode: bytes per message, random and verified [default: 64].
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(1..=64 << 20))]
    pub size: Option<u32>,

    /// Load mode: messages per connection [default: 1000 unless --duration is given].
    #[arg(long, value_name = "M", conflicts_with = "duration",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: Option<u64>,

    /// Load mode: measure for this many seconds (after --warmup) once every connection is
    /// open, then wait for the last echoes (verified, not counted; what has not come back
    /// 10 s after the deadline is an error).
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs)]
    pub duration: Option<Duration>,

    /// Load mode: with --duration, send for this many seconds before the measured window
    /// opens (echoes that come back before it opens are verified, not counted; the window
    /// counts the echoes that come back in it) [default: 0].
    #[arg(long, value_name = "SECS", value_parser = parse_secs, requires = "duration")]
    pub warmup: Option<Duration>,

    /// Load mode: messages in flight per connection [default: 1].
    #[arg(long, value_name = "D", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub pipeline: Option<u32>,

    /// Load mode: worker threads, never more than --connections [default: the number of
    /// available cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,

    #[command(flatten)]
    pub backend: BackendArg,

    /// Load mode: print the summary as one line of JSON.
    #[arg(long)]
    pub json: bool,

    /// Give up this many seconds after starting, whatever the server does: what has not come
    /// back by then is an error (each unfinished connection, in load mode). Without it the
    /// client gives up only when nothing at all comes for 30 s (book mode: 10 s for each read
    /// or write), or 10 s after --duration's deadline.
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs)]
    pub timeout: Option<Duration>,

    /// Load mode: print `ringport client: window open` and `ringport client: window closed` on
    /// stderr when the measured window starts and ends (with --messages, closed once every
    /// connection is done), for sampling the server around it.
    #[arg(long)]
    pub mark_window: bool,
}

/// The flags that make `ringport client` a load generator (the book's flags conflict with them).
const LOAD_FLAGS: [&str; 9] = [
    "connections",
    "size",
    "messages",
    "duration",
    "warmup",
    "pipeline",
    "workers",
    "json",
    "mark_window",
];

impl ClientArgs {
    /// Whether any load-generator flag was given.
    fn is_load(&self) -> bool {
        self.workers.is_some()
            || self.connections.is_some()
            || self.size.is_some()
            || self.messages.is_some()
            || self.duration.is_some()
            || self.warmup.is_some()
            || self.pipeline.is_some()
            || self.json
            || self.mark_window
    }
}

fn parse_backend(s: &str) -> Result<ringport::Backend, String> {
    s.parse()
}

/// The backend `RINGPORT_BACKEND` names, for a `subcommand` that uses one and was given no
/// `--backend`: `None` where it is unset or empty; a value it cannot use exits 2, naming it.
fn env_backend(subcommand: &str) -> Option<ringport::Backend> {
    let value = std::env::var_os("RINGPORT_BACKEND")?;
    if value.is_empty() {
        return None;
    }
    let parsed = value
        .to_str()
        .ok_or_else(|| "not valid UTF-8".to_owned())
        .and_then(|v| v.parse::<ringport::Backend>());
    match parsed {
        Ok(backend) => Some(backend),
        Err(e) => usage_error(
            subcommand,
            ErrorKind::InvalidValue,
            format!(
                "RINGPORT_BACKEND={} in the environment: {e}",
                value.to_string_lossy()
            ),
        ),
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let trimmed = s.trim();
    let secs: f64 = trimmed
        .strip_suffix('s')
        .unwrap_or(trimmed)
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    let d =
        Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is not a valid duration"))?;
    if secs > 0.0 && d.is_zero() {
        // Would round to 0, which some flags read as "off".
        return Err(format!("`{s}` is shorter than a nanosecond"));
    }
    Ok(d)
}

/// An address to listen on: an IP address and a port. A host name is refused, saying so (it
/// could name several addresses, or none of this machine's).
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    const FORM: &str = "IP:PORT, e.g. 127.0.0.1:5150, [::1]:5150, or [::]:5150 for every address";
    s.parse::<SocketAddr>().map_err(|_| {
        let bracketed = s.starts_with('[') && s.ends_with(']');
        match s.rsplit_once(':') {
            None => format!("`{s}` has no port ({FORM})"),
            _ if bracketed || s.parse::<std::net::IpAddr>().is_ok() => {
                format!("`{s}` has no port ({FORM})")
            }
            // Letters in it, and no colon: a name, not a malformed address.
            Some((host, port))
                if port.parse::<u16>().is_ok()
                    && !host.contains([':', '['])
                    && host.chars().any(|c| c.is_ascii_alphabetic()) =>
            {
                format!(
                    "`{s}`: `{host}` is not an IP address; a host name is not taken here ({FORM})"
                )
            }
            Some(_) => format!("`{s}` is not an IP address and port ({FORM})"),
        }
    })
}

/// `--connect`: an address, or a host name and port resolved to its first IPv4 address (or,
/// with none, its first address).
fn parse_server(s: &str) -> Result<SocketAddr, String> {
    let addr = resolve_server(s)?;
    if addr.port() == 0 {
        return Err(format!(
            "`{s}`: port 0 names no server (give the port it listens on)"
        ));
    }
    Ok(addr)
}

fn resolve_server(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !s.contains(':') {
        return Err(format!("`{s}` has no port (HOST:PORT or IP:PORT)"));
    }
    if s.starts_with(':') {
        return Err(format!("`{s}` has no host (HOST:PORT or IP:PORT)"));
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(s)
        .map_err(|e| format!("`{s}`: cannot resolve: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("`{s}`: the name has no address"))
}

/// The shortest period `--stats` and `--idle-timeout` take (the idle sweep's own period).
const MIN_PERIOD: Duration = Duration::from_millis(10);

/// [`parse_secs`] for a period: 0 (off), or at least [`MIN_PERIOD`], so that a typo such as
/// `1e-9` cannot make the server log or sweep without pause.
fn parse_period(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if !d.is_zero() && d < MIN_PERIOD {
        return Err(format!(
            "must be 0 (off) or at least {} seconds",
            MIN_PERIOD.as_secs_f64()
        ));
    }
    Ok(d)
}

/// [`parse_secs`], above zero.
fn parse_positive_secs(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d.is_zero() {
        return Err("must be above 0 seconds".to_owned());
    }
    Ok(d)
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) => tracing_subscriber::EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            to_stderr(&format!(
                "ringport: RUST_LOG `{spec}` is not a valid filter ({e}); using `{default}`\n"
            ));
            tracing_subscriber::EnvFilter::new(default)
        }),
        Err(_) => tracing_subscriber::EnvFilter::new(default),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A log reader that went away must not make logging panic (the subscriber would report
        // its write error with `eprintln!`, which panics on a closed pipe).
        .log_internal_errors(false)
        .init();
}

/// `t + d`, or a year after `t` when that cannot be represented (a duration flag of `1e19`
/// seconds): the run ends long before.
pub(crate) fn later(t: std::time::Instant, d: Duration) -> std::time::Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(365 * 24 * 3600))
}

/// Writes `text` to standard output (a report or summary, the run's result), without the
/// panic of `print!` should that fail: the error names the output and why (a full disk, say),
/// so that a run whose result was lost does not exit 0. A reader that has gone away (a closed
/// pipe, `EPIPE`) no longer wants it: that is not an error.
pub(crate) fn to_stdout(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("writing output: {}", client::errors::describe(&e)))
        }
        _ => Ok(()),
    }
}

/// Writes `text` to standard error. A log reader that has gone away is no reason to panic, nor
/// is there anywhere left to say so: what cannot be written is dropped.
pub(crate) fn to_stderr(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Raises the soft descriptor limit to the hard one: each connection is a descriptor.
fn raise_nofile_limit() {
    let Some(mut lim) = nofile() else { return };
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the local struct passed by pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// The descriptors this process may open (`RLIMIT_NOFILE`'s soft limit), if it can tell.
pub(crate) fn nofile_limit() -> Option<u64> {
    nofile().map(|lim| lim.rlim_cur)
}

fn nofile() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the local struct passed by pointer.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

/// The `serve` flags that only the completion-port server reads: the chapter's other models
/// (`--model`) take `--listen`, `--keepalive` and `--drain-timeout` only.
const PORT_ONLY_FLAGS: [&str; 13] = [
    "workers",
    "idle_timeout",
    "max_connections",
    "conn_buffer",
    "no_strict_conn_buffer",
    "strict_conn_buffer",
    "pool_size",
    "pool_working_set",
    "pool_whole_buffers",
    "udp",
    "udp_rate",
    "udp_rate_total",
    "stats",
];

/// Exits 2 with `message` and `subcommand`'s usage, as clap does for its own errors.
fn usage_error(subcommand: &str, kind: ErrorKind, message: String) -> ! {
    let mut cli = Cli::command();
    cli.build();
    match cli.find_subcommand_mut(subcommand) {
        Some(sub) => sub.error(kind, message).exit(),
        None => cli.error(kind, message).exit(),
    }
}

/// Checks what clap cannot say in attributes: values that do not go together, and a flag given
/// on the command line that the chosen mode would ignore. Exits 2 with the usage, as clap does
/// for its own errors.
fn check_flags(matches: &ArgMatches) {
    let conflict = |subcommand: &str, message: String| {
        usage_error(subcommand, ErrorKind::ArgumentConflict, message)
    };
    if let Some(("client", client)) = matches.subcommand() {
        // One send carries up to `--pipeline` messages: keep that buffer reasonable.
        let size = client.get_one::<u32>("size").copied().unwrap_or(64);
        let pipeline = client.get_one::<u32>("pipeline").copied().unwrap_or(1);
        if u64::from(size) * u64::from(pipeline) > 1 << 30 {
            usage_error(
                "client",
                ErrorKind::ValueValidation,
                format!(
                    "--size {size} x --pipeline {pipeline}: more than 1 GiB in flight per \
                     connection"
                ),
            );
        }
        // A duration's load runs until its window closes: a `--timeout` that comes first (it
        // counts from the start, before the connections open) would fail every run.
        let secs = |id: &str| client.get_one::<Duration>(id).copied();
        if let (Some(limit), Some(duration)) = (secs("timeout"), secs("duration")) {
            let warmup = secs("warmup").unwrap_or(Duration::ZERO);
            if limit <= warmup.saturating_add(duration) {
                usage_error(
                    "client",
                    ErrorKind::ArgumentConflict,
                    format!(
                        "--timeout {} s would end the load before --warmup {} s and --duration \
                         {} s are over (it counts from the start, the connections' opening \
                         included): give it more than that, or drop it",
                        limit.as_secs_f64(),
                        warmup.as_secs_f64(),
                        duration.as_secs_f64()
                    ),
                );
            }
        }
        // `--backend` makes the client the load generator (clap cannot say so itself: from
        // `RINGPORT_BACKEND` it does not), which has no use for the book's flags.
        let given = |id: &str| client.value_source(id) == Some(ValueSource::CommandLine);
        if given("get") {
            if let Some(flag) = ["count", "message", "send_only"]
                .into_iter()
                .find(|id| given(id))
            {
                let flag = flag.replace('_', "-");
                conflict(
                    "client",
                    format!(
                        "--{flag} is the book client's, and --backend makes this the load \
                         generator: they do not mix"
                    ),
                );
            }
        }
        return;
    }
    let Some(("serve", serve)) = matches.subcommand() else {
        return;
    };
    let given = |id: &str| serve.value_source(id) == Some(ValueSource::CommandLine);
    let model = serve.get_one::<String>("model").map_or("", String::as_str);
    if model == "completion-port" {
        return;
    }
    // The `--backend` flag's id is its field's name.
    let backend = given("get").then_some("backend");
    if let Some(flag) = PORT_ONLY_FLAGS
        .iter()
        .copied()
        .find(|id| given(id))
        .or(backend)
    {
        let flag = flag.replace('_', "-");
        conflict(
            "serve",
            format!(
                "--{flag} is not used by --model {model}: the chapter's other models take only \
                 --listen, --keepalive and --drain-timeout"
            ),
        );
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    check_flags(&matches);
    // `--backend` on the command line (not from `RINGPORT_BACKEND`) picks the load generator:
    // the book's client uses plain sockets.
    let backend_flag = |sub: &str| {
        matches
            .subcommand_matches(sub)
            .is_some_and(|m| m.value_source("get") == Some(ValueSource::CommandLine))
    };
    let backend_given = backend_flag("client");
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // `RINGPORT_BACKEND` stands in for `--backend` where a backend is used: the
    // completion-port server and the load generator (not the other models, nor the book's
    // client).
    let backend_from_env = |sub: &str| {
        if backend_flag(sub) {
            None
        } else {
            env_backend(sub)
        }
    };
    match &mut cli.command {
        Command::Serve(args) if args.model == "completion-port" => {
            if let Some(b) = backend_from_env("serve") {
                args.backend.get = b;
            }
        }
        Command::Client(args) if args.is_load() => {
            if let Some(b) = backend_from_env("client") {
                args.backend.get = b;
            }
        }
        _ => {}
    }
    init_logging(cli.verbose);
    raise_nofile_limit();
    let result = match cli.command {
        Command::Serve(args) => serve::run(&args),
        Command::Client(args) if args.is_load() || backend_given => client::load::run(&args),
        Command::Client(args) => client::run_book(&args),
        Command::Bench(args) => {
            let prog = "ringport bench";
            let code = match &args.mode {
                BenchMode::Models(m) => ringport_bench::models_main(prog, &m.args),
                BenchMode::Peers(m) => ringport_bench::peers_main(prog, &m.args),
                BenchMode::Scaling(m) => ringport_bench::scaling_main(prog, &m.args),
            };
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            to_stderr(&format!("ringport: {e}\n"));
            ExitCode::FAILURE
        }
    }
}
