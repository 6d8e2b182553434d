//! `ringport serve`: the book's completion-port echo server.
//!
//! The listener lives on worker 0, which keeps a multishot accept armed on it: every
//! connection waiting is taken in one turn of the worker's loop, however busy. Each accepted
//! connection is associated with the least-loaded worker and handed to it with a posted packet;
//! from then on only that worker touches the connection, so its state needs no lock.
//!
//! Each connection has one pooled multishot receive armed: an idle connection holds no buffer.
//! What arrives is queued and echoed from the same buffer, one send at a time and in arrival
//! order (a short send is re-posted from where it stopped), and the slice is dropped when it has
//! been sent (a buffer goes back to the pool once it is full and all its slices are dropped).
//! When a connection holds more than `--conn-buffer` (its peer is not reading), its receive is
//! cancelled until the queue has half drained: backpressure.
//! The pool bounds what a worker buffers in total; a receive that finds the pool empty ends with
//! `ENOBUFS` and is re-armed when buffers come back. A send or receive that fails because the
//! kernel could not allocate memory is tried again after a pause, the connection keeping what
//! it holds; only failures in a row past a limit close it.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringport::{Completion, Handle, IdHasher, Op, OpId, Packet, PoolBuf, Port, WaitError, Worker};
use tracing::{debug, error, info, trace, warn};

use crate::client::errors::describe;
use crate::echo_queue::EchoQueue;
use crate::slab::Slab;
use crate::ServeArgs;

mod stats;

/// Receive pool buffer size where receives share buffers (each going on where the previous one
/// stopped): several times a typical receive, so that a buffer-sized batch of input rarely
/// straddles two buffers and completes in two parts (BENCHMARKS.md, H).
const SHARED_BUFFER: usize = 64 * 1024;
/// Receive pool buffer size where each receive takes a whole buffer (io_uring before Linux 6.12,
/// or --pool-whole-buffers): the book's 8 KiB.
const WHOLE_BUFFER: usize = 8192;
/// What each slice of input a connection holds counts for at least, against --conn-buffer: a
/// peer trickling 1-byte segments cannot make the server keep a long list of them.
const SLICE_CHARGE: usize = 1024;
/// Pause before accepting again after running out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Completions taken per wait.
const BATCH: usize = 64;
/// How soon receives still waiting for a buffer get another turn while buffers are free.
const REARM_AGAIN: Duration = Duration::from_millis(1);
/// How long the receive pool may stay dry, with connections waiting for it, before the paused
/// connection holding the most of it (its peer sends and does not read) is closed.
const POOL_GRACE: Duration = Duration::from_millis(500);
/// How often the worker looks for room in the pool while connections wait for a buffer and
/// nothing completes: buffers held long enough leave the pool's working set
/// (`Builder::recv_pool_working_set`) as time passes, without a completion to say so.
const POOL_RECHECK: Duration = Duration::from_millis(20);
/// While the pool stays dry after such a close, how soon the next (the closed connection's
/// buffers come back once its send in flight has been cancelled).
const HOG_AGAIN: Duration = Duration::from_millis(50);
/// How long the echo of a connection that is not paused must have stood still, with the pool
/// dry, before it may be closed for holding the pool: longer than for a paused one, whose peer
/// has already sent past the bound.
const UNPAUSED_GRACE: Duration = Duration::from_secs(2);
/// How long a connection may wait for a pool buffer before those that receive give it their
/// turn (see `Server::received`); until then it waits for buffers to come back.
const YIELD_AFTER: Duration = Duration::from_millis(100);
/// How soon after being re-armed from the queue a connection that finds no buffer again still
/// counts as waiting since it first did, in milliseconds (a lost race for a freed buffer comes
/// within a turn or two).
const REARM_CARRY_MS: u64 = 20;
/// The most buffers one gathering send takes (512 KiB).
const MAX_GATHER: usize = 64;
/// Buffer lists, and echo queues, kept for reuse.
const SPARE_LISTS: usize = 256;
/// After the drain timeout, how long to wait for the forced closes to complete.
const FORCE_GRACE: Duration = Duration::from_secs(1);
/// Draining: how long a connection must stay quiet, with an empty socket, before its FIN.
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// Draining: how often connections are looked at again.
const DRAIN_TICK: Duration = Duration::from_millis(20);
/// At most one warning per this long about refused connections.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);
/// A send or receive that failed for want of memory is tried again after this, doubled for
/// each failure in a row ...
const RETRY_FIRST: Duration = Duration::from_millis(5);
/// ... up to this many failures in a row (about 1.3 s in all), after which the connection is
/// closed.
const RETRY_LIMIT: u8 = 8;
/// How often the connections due a retry are looked for, while any are.
const RETRY_TICK: Duration = Duration::from_millis(5);

/// The completion key: which socket this is. For a connection, its id in its home worker's
/// table, set when the worker adopts it (only that worker reads it); [`Key::LISTENER`] for the
/// listener. (One word: every connection's handle holds one.)
#[derive(Debug)]
pub struct Key(AtomicU64);

impl Key {
    const LISTENER: u64 = u64::MAX;
    /// A connection not adopted yet (no table id is this large).
    const UNADOPTED: u64 = u64::MAX - 1;

    fn listener() -> Self {
        Key(AtomicU64::new(Self::LISTENER))
    }

    fn conn() -> Self {
        Key(AtomicU64::new(Self::UNADOPTED))
    }

    fn is_listener(&self) -> bool {
        self.0.load(Ordering::Relaxed) == Self::LISTENER
    }

    /// The connection's id in its home worker's table; `None` for the listener and for a
    /// connection not adopted yet.
    fn conn_id(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed))
            .filter(|&id| id != Self::LISTENER && id != Self::UNADOPTED)
    }
}

/// The per-I/O data.
#[derive(Debug, Clone)]
pub enum Io {
    Accept,
    /// A pause before re-posting an accept.
    AcceptBackoff,
    /// A new connection for its home worker (a posted packet).
    Adopt,
    /// Start draining (a posted packet).
    Drain,
    /// The listener's worker has closed the listener and hands over no more connections (a
    /// posted packet, after every `Adopt` it posted).
    HandedOver,
    /// The idle-timeout sweep.
    Sweep,
    /// Time to log the refusals not logged yet.
    RefusalLog,
    /// Another try for sends and receives that failed for want of memory.
    Retry,
    /// A look at every connection while draining.
    DrainTick,
    /// Another turn for receives still waiting for a buffer.
    Rearm,
    Recv,
    /// Echoing the buffers the connection's queue took.
    Send,
    Close,
}

/// The server's limits, from the command line.
#[derive(Debug, Clone, Copy)]
struct Limits {
    drain_timeout: Duration,
    idle_timeout: Option<Duration>,
    max_connections: usize,
    conn_buffer: usize,
    /// Every receive ends after `conn_buffer` bytes (unless `--no-strict-conn-buffer`).
    strict: bool,
    /// The size of a receive pool buffer.
    pool_buffer: usize,
    /// Buffers in a worker's pool.
    pool_buffers: usize,
}

struct Conn {
    handle: Handle<Key>,
    /// The armed pooled receive, if any.
    recv: Option<OpId>,
    /// Received and not yet echoed, in order; allocated only while something is queued or
    /// being sent, so an idle connection holds none.
    out: Option<Box<EchoQueue<PoolBuf>>>,
    /// The receive was cancelled because `pending` reached the bound.
    paused: bool,
    /// A cancel of the armed receive was requested (draining).
    cancelling: bool,
    /// Draining: since when the connection has had nothing to echo and received nothing, in
    /// milliseconds since the server started, plus one; 0 while it has not been quiet.
    quiet_since: u64,
    /// The peer closed its side: close once everything is echoed.
    eof: bool,
    /// Listed in `Server::to_send`.
    to_send: bool,
    /// Its receive is being cancelled to let connections waiting for a buffer go first.
    yielding: bool,
    /// Waiting in `Server::starved` for a buffer.
    starved: bool,
    /// When it last received or sent, in milliseconds since the server started (a plain number
    /// keeps the record small: every connection has one).
    last_active: u64,
    /// Sends and receives that failed for want of memory, to be tried again.
    retry: Retry,
    /// Its echo waits for the receive armed again after one that ended with input left in
    /// the socket (see `received`).
    hold: bool,
}

/// A connection's operations waiting to be tried again after failing for want of memory (the
/// kernel could not allocate, which passes), and how many failures in a row there were. One
/// byte: every connection has one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Retry(u8);

impl Retry {
    const SEND: u8 = 0x80;
    const RECV: u8 = 0x40;
    const COUNT: u8 = 0x0f;

    /// Failures in a row.
    fn failures(self) -> u8 {
        self.0 & Self::COUNT
    }

    /// Notes one more failure of `op` (`SEND` or `RECV`): `false` once there have been
    /// `RETRY_LIMIT` in a row, when it is time to give up.
    fn failed(&mut self, op: u8) -> bool {
        let n = self.failures() + 1;
        if n > RETRY_LIMIT {
            return false;
        }
        self.0 = (self.0 & !Self::COUNT) | op | n;
        true
    }

    /// Whether `op` waits for its retry.
    fn waits(self, op: u8) -> bool {
        self.0 & op != 0
    }

    /// Whether anything waits for a retry.
    fn pending(self) -> bool {
        self.0 & (Self::SEND | Self::RECV) != 0
    }

    /// Takes what waits, for its retry now; the count of failures stays.
    fn take(&mut self) -> u8 {
        let ops = self.0 & (Self::SEND | Self::RECV);
        self.0 &= Self::COUNT;
        ops
    }

    /// Something went through: the count starts again.
    fn succeeded(&mut self) {
        self.0 &= !Self::COUNT;
    }

    /// How long to wait after the latest failure.
    fn delay(self) -> Duration {
        RETRY_FIRST * (1u32 << self.failures().saturating_sub(1).min(RETRY_LIMIT))
    }
}

/// Counters shared by the workers, for the exit summary, `--max-connections` and `--stats`.
#[derive(Default)]
struct Totals {
    /// One per worker with `--stats`, else none.
    gauges: Box<[stats::Gauge]>,
    connections: AtomicU64,
    bytes: AtomicU64,
    refused: AtomicU64,
    idle_closed: AtomicU64,
    /// Closed for holding the pool while their peers read nothing and others waited.
    hogs_closed: AtomicU64,
    /// Sends and receives tried again after failing for want of memory.
    retried: AtomicU64,
    /// Closed because a send or receive failed for want of a resource (descriptors, memory,
    /// buffers).
    resource_closed: AtomicU64,
    /// Connections open right now.
    live: AtomicUsize,
    /// The UDP echo's, with `--udp`.
    udp: Option<Arc<crate::udp::UdpCounters>>,
}

impl Totals {
    fn new(workers: usize, udp: Option<Arc<crate::udp::UdpCounters>>) -> Self {
        Totals {
            gauges: (0..workers).map(|_| stats::Gauge::default()).collect(),
            udp,
            ..Totals::default()
        }
    }
}

pub fn run(args: &ServeArgs) -> Result<ExitCode, String> {
    let model = match args.model.as_str() {
        "completion-port" => None,
        name => Some(
            name.parse::<ringport_models::Model>()
                .map_err(|e| format!("--model {name}: {e} (or completion-port)"))?,
        ),
    };
    let mut listener = bind(args.listen, args.keepalive)
        .map_err(|e| format!("{}: {}", args.listen, describe(&e)))?;
    if let Some(model) = model {
        return run_model(model, listener, args);
    }
    let udp_socket = if args.udp {
        Some(bind_udp_beside(&mut listener, args.listen, args.keepalive)?)
    } else {
        None
    };
    let local = listener
        .local_addr()
        .map_err(|e| format!("{}: {}", args.listen, describe(&e)))?;
    // Signals are caught from here on: none can kill the server once it says it listens.
    let signals = signal_hook::iterator::Signals::new(stop_signals())
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let workers = args.workers.map_or(0, usize::from);
    let pool_size = usize::try_from(args.pool_size).unwrap_or(usize::MAX);
    // At least 16 buffers: --pool-size is at least 1 MiB.
    let buffers = |size: usize| u16::try_from((pool_size / size).clamp(16, 32768)).unwrap_or(32768);
    let working_set = match usize::try_from(args.pool_working_set).unwrap_or(usize::MAX) {
        0 => usize::MAX,
        bytes => bytes,
    };
    let circulating = |size: usize| u16::try_from((working_set / size).max(1)).unwrap_or(u16::MAX);
    let build = |size: usize, shared: bool| {
        Port::builder()
            .workers(workers)
            .backend(args.backend.get)
            // Each worker lives on its own thread (below).
            .single_thread_workers(true)
            .recv_pool(size, buffers(size))
            .recv_pool_working_set(circulating(size))
            .recv_pool_incremental(shared)
            .build::<Key, Io>()
            .map_err(|e| port_error(&e, args.workers.map(usize::from)))
    };
    // Shared buffers where the backend fills them incrementally, else whole 8 KiB ones.
    let (port, workers, pool_buffer) = if args.pool_whole_buffers {
        let (port, workers) = build(WHOLE_BUFFER, false)?;
        (port, workers, WHOLE_BUFFER)
    } else {
        let (port, workers) = build(SHARED_BUFFER, true)?;
        if workers.first().is_some_and(|w| w.pool_shares_buffers()) {
            (port, workers, SHARED_BUFFER)
        } else {
            drop((port, workers));
            let (port, workers) = build(WHOLE_BUFFER, false)?;
            (port, workers, WHOLE_BUFFER)
        }
    };
    // epoll fills buffers incrementally whatever their size.
    let shared = workers.first().is_some_and(|w| w.pool_shares_buffers());
    let listener = port
        .associate_with(0, listener, Key::listener())
        .map_err(|e| format!("{local}: {}", describe(&e)))?;
    let limits = Limits {
        drain_timeout: args.drain_timeout,
        idle_timeout: args.idle_timeout.filter(|d| !d.is_zero()),
        max_connections: args.max_connections,
        // A connection may hold at most an eighth of its worker's pool, however small the
        // segments its peer sends (counted as the whole buffers they keep back).
        conn_buffer: args
            .conn_buffer
            .min(usize::from(buffers(pool_buffer)) * pool_buffer / 8)
            .max(pool_buffer),
        strict: !args.no_strict_conn_buffer,
        pool_buffer,
        pool_buffers: usize::from(buffers(pool_buffer)),
    };
    if limits.conn_buffer != args.conn_buffer {
        info!(
            "--conn-buffer {}: using {} (at least one pool buffer, at most an eighth of a \
             worker's pool)",
            args.conn_buffer, limits.conn_buffer
        );
    }
    let udp = match udp_socket {
        Some(socket) => Some(
            crate::udp::start(socket, args.udp_rate, args.udp_rate_total)
                .map_err(|e| format!("{local} (UDP): {}", describe(&e)))?,
        ),
        None => None,
    };
    info!(
        "listening on {local} backend={} workers={} pool={}x{}KiB ({}, {} circulating)",
        port.backend(),
        port.workers(),
        buffers(pool_buffer),
        pool_buffer / 1024,
        if shared {
            "filled incrementally"
        } else {
            "a whole buffer per receive"
        },
        circulating(pool_buffer).min(buffers(pool_buffer)),
    );

    let signal_port = port.clone();
    let stop_udp = udp.as_ref().map(crate::udp::Udp::stopper);
    on_signals(signals, move || {
        // The drain answers no new datagram either: stopped first, at once.
        if let Some(stop) = &stop_udp {
            stop();
        }
        drain_every_worker(&signal_port);
        if stop_udp.is_some() {
            info!("UDP echo stopped");
        }
    })?;

    let every = args.stats.filter(|d| !d.is_zero());
    let totals = Arc::new(Totals::new(
        if every.is_some() { workers.len() } else { 0 },
        udp.as_ref().map(crate::udp::Udp::counters),
    ));
    let stats = every
        .map(|every| {
            let pool_total = workers.len() * usize::from(buffers(pool_buffer));
            stats::Stats::start(every, Arc::clone(&totals), pool_total)
        })
        .transpose()?;
    let mut threads = Vec::new();
    // The workers start serving once every one of them is running: should a thread fail to
    // start, none has taken a connection (or been handed one) by then.
    let gate = Arc::new((std::sync::RwLock::new(()), AtomicBool::new(false)));
    let closed = gate
        .0
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for worker in workers {
        let listener = listener.clone();
        let totals = Arc::clone(&totals);
        let gate = Arc::clone(&gate);
        let spawned = std::thread::Builder::new()
            .name(format!("worker-{}", worker.index()))
            .spawn(move || {
                drop(
                    gate.0
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                if !gate.1.load(Ordering::Acquire) {
                    return Ok(());
                }
                let _guard = DrainOnPanic(worker.port());
                Server::new(worker, listener, limits, totals).run()
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                drop(closed);
                for t in threads {
                    let _ = t.join();
                }
                // Nothing was served: stop what runs beside the workers before saying so.
                if let Some(stats) = stats {
                    stats.stop();
                }
                if let Some(udp) = udp {
                    let _ = udp.stop();
                }
                return Err(format!(
                    "--workers {}: cannot start a worker thread: {e}",
                    port.workers()
                ));
            }
        }
    }
    gate.1.store(true, Ordering::Release);
    drop(closed);
    drop(listener);
    let mut failed = false;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                crate::to_stderr(&format!("ringport: worker failed: {e}\n"));
                failed = true;
            }
            Err(_) => failed = true,
        }
    }
    if let Some(stats) = stats {
        stats.stop();
    }
    let mut summary = format!(
        "ringport: served {} connections, echoed {} bytes",
        totals.connections.load(Ordering::Relaxed),
        totals.bytes.load(Ordering::Relaxed)
    );
    let refused = totals.refused.load(Ordering::Relaxed);
    if refused > 0 {
        summary.push_str(&format!(", refused {refused} over --max-connections"));
    }
    let idle = totals.idle_closed.load(Ordering::Relaxed);
    if idle > 0 {
        summary.push_str(&format!(", closed {idle} idle"));
    }
    let hogs = totals.hogs_closed.load(Ordering::Relaxed);
    if hogs > 0 {
        summary.push_str(&format!(
            ", closed {hogs} that held the receive pool without reading their echo"
        ));
    }
    let retried = totals.retried.load(Ordering::Relaxed);
    if retried > 0 {
        summary.push_str(&format!(
            ", tried {retried} sends or receives again after the system ran short of memory"
        ));
    }
    let short = totals.resource_closed.load(Ordering::Relaxed);
    if short > 0 {
        summary.push_str(&format!(
            ", closed {short} whose sends or receives failed for want of a resource (memory, \
             descriptors, buffers)"
        ));
    }
    if let Some(udp) = udp {
        let s = match udp.stop() {
            Ok(s) => s,
            Err((s, panic)) => {
                crate::to_stderr(&format!("ringport: the UDP echo failed: {panic}\n"));
                failed = true;
                s
            }
        };
        summary.push_str(&format!(
            ", UDP: echoed {} datagrams, dropped {} over the rate limit and {} from service \
             ports (below 1024) or this server's own port",
            s.echoed, s.limited, s.from_service_ports
        ));
        if s.to_groups > 0 {
            summary.push_str(&format!(
                ", {} sent to a broadcast or multicast address (not answered)",
                s.to_groups
            ));
        }
        if s.failed > 0 {
            summary.push_str(&format!(", {} receives or echoes failed", s.failed));
        }
        if s.unanswered > 0 {
            summary.push_str(&format!(
                ", {} received or waiting when the echo stopped (not answered)",
                s.unanswered
            ));
        }
    }
    crate::to_stdout(&format!("{summary}\n"))?;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Held by each worker thread: should the worker panic, every worker is told to drain, so that
/// the server exits (with status 1, from the failed join) rather than serve on without it.
struct DrainOnPanic(Port<Key, Io>);

impl Drop for Server {
    /// Adds this worker's counts to the exit summary's totals, however the worker ended.
    fn drop(&mut self) {
        self.totals
            .connections
            .fetch_add(self.connections, Ordering::Relaxed);
        self.totals.bytes.fetch_add(self.bytes, Ordering::Relaxed);
    }
}

impl Drop for DrainOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            drain_every_worker(&self.0);
        }
    }
}

/// Tells every worker to drain, as SIGTERM does (a worker gone already is skipped).
fn drain_every_worker(port: &Port<Key, Io>) {
    for w in 0..port.workers() {
        let _ = port.post(w, Packet::new(Io::Drain));
    }
}

/// Serves with one of the chapter's other I/O models (`--model`).
fn run_model(
    model: ringport_models::Model,
    listener: TcpListener,
    args: &ServeArgs,
) -> Result<ExitCode, String> {
    let local = listener
        .local_addr()
        .map_err(|e| format!("{}: {}", args.listen, describe(&e)))?;
    let signals = signal_hook::iterator::Signals::new(stop_signals())
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let stop = ringport_models::Stop::new().map_err(|e| format!("cannot start: {e}"))?;
    let trigger = stop.clone();
    on_signals(signals, move || trigger.trigger())?;
    info!("listening on {local} model={model} workers=1");
    let config = ringport_models::Config {
        drain_timeout: args.drain_timeout,
    };
    let stats = ringport_models::serve(model, listener, &config, &stop)
        .map_err(|e| format!("{local}: {model}: {}", describe(&e)))?;
    let mut summary = format!(
        "ringport: served {} connections, echoed {} bytes",
        stats.connections, stats.bytes
    );
    if stats.refused > 0 {
        summary.push_str(&format!(", refused {} ({model} limits)", stats.refused));
    }
    crate::to_stdout(&format!("{summary}\n"))?;
    Ok(ExitCode::SUCCESS)
}

/// The signals that start the drain: SIGINT, SIGTERM, and SIGHUP (a closed terminal) unless
/// the server was started with it ignored (`nohup`), which it then stays.
pub(crate) fn stop_signals() -> Vec<libc::c_int> {
    let mut signals = vec![libc::SIGINT, libc::SIGTERM];
    if !ignored(libc::SIGHUP) {
        signals.push(libc::SIGHUP);
    }
    signals
}

/// Whether `sig`'s disposition is "ignore" (as inherited across `exec`).
fn ignored(sig: libc::c_int) -> bool {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null new action only reads the current one into `old`, a live, writable
    // `sigaction` the call fills in.
    let rc = unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) };
    // SAFETY: zeroed is a valid `sigaction` (plain integers and a mask), and on success the
    // kernel wrote the current action into it.
    rc == 0 && unsafe { old.assume_init() }.sa_sigaction == libc::SIG_IGN
}

/// Runs `drain` on the first stop signal; a second one exits at once, with status 128 + its
/// number (130 for SIGINT, 143 for SIGTERM).
fn on_signals(
    signals: signal_hook::iterator::Signals,
    drain: impl FnOnce() + Send + 'static,
) -> Result<(), String> {
    on_stop_signals(signals, "the drain", move |sig| {
        // Started before it is logged: stopping is what the signal asks for at once.
        drain();
        info!("signal {sig}: draining (stopped accepting; a second signal exits at once)");
    })
}

/// Runs `first` with the number of the first of `signals` (see [`stop_signals`]); a second
/// one exits at once, with status 128 + its number, saying it cut `during` short.
pub(crate) fn on_stop_signals(
    mut signals: signal_hook::iterator::Signals,
    during: &'static str,
    first: impl FnOnce(i32) + Send + 'static,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut forever = signals.forever();
            if let Some(sig) = forever.next() {
                first(sig);
            }
            if let Some(sig) = forever.next() {
                crate::to_stderr(&format!(
                    "ringport: signal {sig} during {during}: exiting now\n"
                ));
                std::process::exit(128 + sig);
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the signal thread: {e}"))
}

/// Names why the port could not start with `workers` workers (`None`: the default, one per
/// core), and what to do about it.
pub fn port_error(e: &io::Error, workers: Option<usize>) -> String {
    let workers = workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let mut msg = format!(
        "cannot start the completion port with {workers} worker(s) (--workers): {}",
        describe(e)
    );
    if msg.contains("io_uring is not available") {
        msg.push_str(" (run with --backend auto or --backend epoll)");
    }
    // (A refused ring keeps only the kind of its error: ENOMEM's.)
    if matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    ) || e.kind() == io::ErrorKind::OutOfMemory
    {
        msg.push_str(
            " (each worker takes descriptors and memory of its own: lower --workers, or raise \
             the limit)",
        );
    }
    msg
}

/// The UDP echo's socket, on the TCP listener's address and port. With `--listen` (`listen`)
/// on port 0 the port the kernel chose for TCP may be taken for UDP: then both are bound
/// again, on another port (a few tries).
fn bind_udp_beside(
    listener: &mut TcpListener,
    listen: SocketAddr,
    keepalive: u32,
) -> Result<std::net::UdpSocket, String> {
    const TRIES: usize = 16;
    let mut tries = 1;
    loop {
        let local = listener
            .local_addr()
            .map_err(|e| format!("{listen}: {}", describe(&e)))?;
        match crate::udp::bind(local) {
            Ok(socket) => return Ok(socket),
            Err(e)
                if e.kind() == io::ErrorKind::AddrInUse && listen.port() == 0 && tries < TRIES =>
            {
                debug!(
                    "{local} (UDP): {}; binding both on another port",
                    describe(&e)
                );
                // Bound before the old one is closed, so that the kernel picks another port.
                *listener =
                    bind(listen, keepalive).map_err(|e| format!("{listen}: {}", describe(&e)))?;
                tries += 1;
            }
            Err(e) => return Err(format!("{local} (UDP): {}", describe(&e))),
        }
    }
}

/// The listening socket. Its keepalive settings (`keepalive` seconds idle, 0: off) pass to
/// every connection it accepts, at no cost per connection, and so does `SO_OOBINLINE`: TCP
/// urgent data stays in the stream, so it is echoed like the rest (without it the kernel takes
/// the urgent byte out, and no receive sees it). Set on the listener, it holds from the
/// connection's first byte: set on a connection once accepted, an urgent byte that came
/// before would be lost to a second one.
fn bind(addr: SocketAddr, keepalive: u32) -> io::Result<TcpListener> {
    let socket = socket_for(addr, socket2::Type::STREAM)?;
    socket.set_reuse_address(true)?;
    if let Err(e) = socket.set_out_of_band_inline(true) {
        warn!(
            "cannot keep urgent data inline (SO_OOBINLINE): {e}; an urgent byte from a peer \
             would not be echoed"
        );
    }
    if keepalive > 0 {
        let idle = Duration::from_secs(u64::from(keepalive));
        let probes = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(idle.min(Duration::from_secs(10)))
            .with_retries(3);
        socket
            .set_tcp_keepalive(&probes)
            .map_err(|e| io::Error::new(e.kind(), format!("--keepalive {keepalive}: {e}")))?;
    }
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// A close-on-exec socket of type `ty` for binding to `addr` (its options set, not yet bound).
/// On `[::]` it takes IPv4 as well, whatever the system's default (`net.ipv6.bindv6only`)
/// says, as a wildcard address promises every address of the host.
pub(crate) fn socket_for(addr: SocketAddr, ty: socket2::Type) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), ty.cloexec(), None)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    Ok(socket)
}

/// One worker's share of the server.
struct Server {
    worker: Worker<Key, Io>,
    port: Port<Key, Io>,
    listener: Option<Handle<Key>>,
    /// The worker that accepts (the listener's home).
    listener_worker: usize,
    /// Accepts (or accept back-offs) outstanding, on the listener's worker.
    accepts: usize,
    /// Another worker: the listener's worker may still hand this one connections (until it
    /// says it is done, `Io::HandedOver`). The listener's worker: the others are still to be
    /// told so.
    handing_over: bool,
    /// This worker's connections, by the id in their key.
    conns: Slab<Conn>,
    /// The time when the current batch of completions was dequeued.
    now: Instant,
    /// When this worker started (connections' times count from it).
    start: Instant,
    /// Connections whose pooled receive ended for want of a buffer (or yielded its turn), to
    /// re-arm, oldest first. May hold ids no longer waiting; `waiting` counts those that are.
    starved: VecDeque<(u64, u64)>,
    waiting: usize,
    /// The bytes a receive has brought lately (a moving average, over about 16 receives).
    recv_size: usize,
    /// Connections re-armed from `starved` that have not received since, with when they
    /// started waiting: one that finds no buffer again waits on from then, not from scratch
    /// (else one that keeps losing the race for a freed buffer would never seem to wait long).
    /// Each entry: (wait began, re-armed at), in the server's milliseconds.
    rearmed: HashMap<u64, (u64, u64), BuildHasherDefault<IdHasher>>,
    /// A timer is pending to give waiting receives another turn.
    rearm_timer: bool,
    /// A drain tick is pending (one chain of them at a time).
    drain_ticking: bool,
    /// While connections wait for the pool: when to close a pool hog if the pool is dry.
    hog_check: Option<Instant>,
    /// Whether a connection was already closed, with a warning, for holding the pool.
    hog_warned: bool,
    /// Connections with buffers queued since the last send was posted: after a batch of
    /// completions, each posts one send that gathers all it has queued.
    to_send: Vec<u64>,
    /// Emptied buffer lists of completed sends, reused for the next ones.
    spare: Vec<Vec<PoolBuf>>,
    /// Echo queues of connections that went idle, reused for the next ones that receive (kept
    /// boxed, as connections hold them, so reuse allocates nothing).
    #[allow(clippy::vec_box)]
    spare_queues: Vec<Box<EchoQueue<PoolBuf>>>,
    limits: Limits,
    totals: Arc<Totals>,
    /// Set once draining; past it, remaining connections are closed.
    deadline: Option<Instant>,
    forced: bool,
    connections: u64,
    bytes: u64,
    /// Times a connection began to wait for a pool buffer (for `--stats`).
    buffer_waits: u64,
    /// Whether the current run of accept failures was already logged.
    accept_failing: bool,
    /// Whether a connection was already closed, with a warning, for want of a resource.
    resource_warned: bool,
    /// Refusals since the last warning, and when that was.
    refusals: (u64, Option<Instant>),
    /// The timer that logs the refusals held back by the rate limit.
    refusal_timer: Option<OpId>,
    /// The idle-timeout sweep's pending timer.
    sweep: Option<OpId>,
    /// Connections due to try a send or receive again (when, in milliseconds since the worker
    /// started, and which); may hold ids closed meanwhile.
    retries: Vec<(u64, u64)>,
    /// A `RETRY_TICK` timer is pending.
    retry_timer: bool,
    /// Whether a retry was already logged with a warning.
    retry_warned: bool,
}

impl Server {
    fn new(
        worker: Worker<Key, Io>,
        listener: Handle<Key>,
        limits: Limits,
        totals: Arc<Totals>,
    ) -> Self {
        let listener_worker = listener.worker();
        let owns_listener = listener_worker == worker.index();
        Server {
            port: worker.port(),
            worker,
            listener_worker,
            listener: owns_listener.then_some(listener),
            accepts: 0,
            handing_over: true,
            conns: Slab::new(),
            now: Instant::now(),
            start: Instant::now(),
            starved: VecDeque::new(),
            waiting: 0,
            recv_size: WHOLE_BUFFER,
            rearmed: HashMap::default(),
            rearm_timer: false,
            drain_ticking: false,
            hog_check: None,
            hog_warned: false,
            to_send: Vec::new(),
            spare: Vec::new(),
            spare_queues: Vec::new(),
            limits,
            totals,
            deadline: None,
            forced: false,
            connections: 0,
            bytes: 0,
            buffer_waits: 0,
            accept_failing: false,
            resource_warned: false,
            refusals: (0, None),
            refusal_timer: None,
            sweep: None,
            retries: Vec::new(),
            retry_timer: false,
            retry_warned: false,
        }
    }

    fn run(mut self) -> io::Result<()> {
        // `--stats` reads the pool as free until the first batch says otherwise.
        self.publish();
        self.post_accept();
        if let Some(idle) = self.limits.idle_timeout {
            // Kept, so that a drain can cancel it.
            self.sweep = Some(
                self.worker
                    .submit(Op::timeout(sweep_period(idle)), Io::Sweep),
            );
        }
        let mut batch = Vec::with_capacity(BATCH);
        let result = loop {
            if self.finished() {
                break Ok(());
            }
            let mut timeout = self
                .deadline
                .map(|d| d.saturating_duration_since(Instant::now()));
            if self.waiting > 0 {
                // Wake to see whether the pool is still dry (nothing else may complete), and
                // whether buffers held long enough to be parked have made room (the pool
                // counts them as the worker waits, not as a completion).
                let check = self
                    .hog_check
                    .map_or(POOL_GRACE, |at| {
                        at.saturating_duration_since(Instant::now())
                    })
                    .min(POOL_RECHECK);
                timeout = Some(timeout.map_or(check, |t| t.min(check)));
            }
            match self.worker.dequeue_batch(&mut batch, BATCH, timeout) {
                Ok(_) => {
                    self.now = Instant::now();
                    self.prefetch(&batch);
                    for c in batch.drain(..) {
                        self.complete(c);
                    }
                    self.post_sends();
                    self.rearm_starved();
                    self.publish();
                    self.tell_handed_over(false);
                }
                Err(WaitError::TimedOut) => {
                    self.now = Instant::now();
                    self.rearm_starved();
                }
                Err(e) => {
                    // A worker that cannot wait for completions is lost, with its connections
                    // (closed as it is dropped); the others finish what they hold and the
                    // server exits with status 1, rather than serve on without this worker.
                    error!(
                        "worker {}: {e}: closing its connections, draining the others, and \
                         exiting with status 1",
                        self.worker.index()
                    );
                    drain_every_worker(&self.port);
                    if let Some(l) = self.listener.take() {
                        self.worker.submit(Op::close(&l), Io::Close);
                    }
                    self.close_all("worker failed");
                    break Err(io::Error::from(e));
                }
            }
            self.close_pool_hog();
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                if self.forced {
                    // The forced closes did not all complete in time: give up waiting.
                    break Ok(());
                }
                self.force_close();
            }
        };
        self.tell_handed_over(true);
        // Completions of operations cut short by the closes still say what went out.
        let until = Instant::now() + FORCE_GRACE;
        loop {
            // Wait only while operations are in flight; otherwise take what is ready.
            let wait = if self.worker.in_flight() > 0 {
                until.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            match self.worker.dequeue(Some(wait)) {
                Ok(c) => {
                    self.complete(c);
                    self.post_sends();
                }
                Err(_) => break,
            }
        }
        self.flush_refusals();
        // The worker's counts join the totals when `self` is dropped (by a panic too).
        result
    }

    /// Publishes this worker's counters for `--stats` (when on).
    fn publish(&self) {
        if let Some(g) = self.totals.gauges.get(self.worker.index()) {
            g.publish(
                self.connections,
                self.bytes,
                self.worker.pool_in_use(),
                self.buffer_waits,
            );
        }
    }

    fn finished(&self) -> bool {
        let more_may_come = self.handing_over && !self.owns_listener();
        self.deadline.is_some() && self.conns.is_empty() && self.accepts == 0 && !more_may_come
    }

    /// Whether this worker accepts the server's connections (and hands them to the others).
    fn owns_listener(&self) -> bool {
        self.listener_worker == self.worker.index()
    }

    /// The listener's worker, once its drain has closed the listener and every accept has
    /// completed (or as it stops for good): tells the other workers that no more connections
    /// come, after every one it handed over, so that they can finish.
    fn tell_handed_over(&mut self, stopping: bool) {
        if !self.owns_listener() || !self.handing_over {
            return;
        }
        let accepting_done = self.deadline.is_some() && self.accepts == 0;
        if !(stopping || accepting_done) {
            return;
        }
        self.handing_over = false;
        for w in (0..self.port.workers()).filter(|&w| w != self.worker.index()) {
            // A worker gone already needs no telling.
            let _ = self.port.post(w, Packet::new(Io::HandedOver));
        }
    }

    /// Reads what serving a batch reads first, and discards it: the connections' records
    /// (see `Slab::touch`), the buffer lists of completed sends, and then the echo queues of
    /// the connections that have one. With thousands of connections these are out of the cache
    /// by the time a connection is served again; read together, their cache misses overlap
    /// instead of each stalling in turn.
    fn prefetch(&self, batch: &[Completion<Key, Io>]) {
        for c in batch {
            if let Some(id) = conn_id(c) {
                self.conns.touch(id);
            }
            if let Some(b) = c.gathered.first() {
                std::hint::black_box(b.len());
            }
        }
        let conns = batch.iter().filter_map(conn_id);
        for out in conns.filter_map(|id| self.conns.get(id)?.out.as_ref()) {
            std::hint::black_box((out.held(), out.pending()));
        }
    }

    fn complete(&mut self, c: Completion<Key, Io>) {
        trace!(?c, "completion");
        match c.data {
            Io::Accept => self.accepted(c),
            Io::AcceptBackoff => {
                self.accepts -= 1;
                self.post_accept();
            }
            Io::Adopt => self.adopt(c),
            Io::Drain => self.drain(),
            Io::HandedOver => self.handing_over = false,
            // Cancelled by the drain, which has its own way of closing quiet connections.
            Io::Sweep if c.is_cancelled() || self.deadline.is_some() => {}
            Io::Sweep => self.sweep(),
            Io::RefusalLog => {
                self.refusal_timer = None;
                self.flush_refusals();
            }
            Io::DrainTick => {
                self.drain_ticking = false;
                self.drain_tick();
            }
            Io::Retry => self.retry_due(),
            Io::Rearm => self.rearm_timer = false,
            Io::Recv => self.received(c),
            Io::Send => self.sent(c),
            Io::Close => {}
        }
    }

    /// Arms the listener's multishot accept: it takes every connection waiting, each turn.
    fn post_accept(&mut self) {
        if let (Some(l), None) = (&self.listener, self.deadline) {
            self.worker
                .submit_multishot(Op::accept_multishot(l), Io::Accept);
            self.accepts += 1;
        }
    }

    fn accepted(&mut self, c: Completion<Key, Io>) {
        if !c.more {
            self.accepts -= 1;
        }
        match c.result {
            Ok(_) => {
                if self.accept_failing {
                    info!("accepting again");
                    self.accept_failing = false;
                }
                if let Some(stream) = c.accepted {
                    self.hand_out(stream);
                }
                if !c.more {
                    self.post_accept();
                }
            }
            // Draining: the listener is closing. (A cancel at any other time was not ours:
            // the accept is posted again below.)
            Err(_) if self.deadline.is_some() => {}
            Err(e) => {
                // Out of descriptors or memory, or a connection aborted before it was accepted:
                // keep serving the others; pause when the cause is a resource.
                if is_resource(&e) {
                    if self.accept_failing {
                        debug!("accept: {}; again in 100 ms", describe(&e));
                    } else {
                        warn!("accept: {}; retrying every 100 ms", describe(&e));
                        self.accept_failing = true;
                    }
                    self.worker
                        .submit(Op::timeout(ACCEPT_BACKOFF), Io::AcceptBackoff);
                    self.accepts += 1;
                } else {
                    debug!("accept: {}", describe(&e));
                    self.post_accept();
                }
            }
        }
    }

    fn hand_out(&mut self, stream: std::net::TcpStream) {
        if self.deadline.is_some() {
            return; // Draining: the connection is closed at once.
        }
        let max = self.limits.max_connections;
        if max > 0 && self.totals.live.load(Ordering::Relaxed) >= max {
            self.refuse(stream);
            return;
        }
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        match self.port.associate(stream, Key::conn()) {
            Ok(h) => {
                self.totals.live.fetch_add(1, Ordering::Relaxed);
                let home = h.worker();
                let packet = Packet {
                    bytes: 0,
                    handle: Some(h),
                    data: Io::Adopt,
                };
                if let Err(e) = self.worker.post(home, packet) {
                    self.totals.live.fetch_sub(1, Ordering::Relaxed);
                    warn!("socket {fd}: cannot hand to worker {home}: {e}");
                }
            }
            Err(e) => warn!("socket {fd}: cannot associate: {}", describe(&e)),
        }
    }

    /// Closes a connection over `--max-connections` at once, and says so at a bounded rate.
    fn refuse(&mut self, stream: std::net::TcpStream) {
        drop(stream);
        self.totals.refused.fetch_add(1, Ordering::Relaxed);
        self.refusals.0 += 1;
        let now = Instant::now();
        if self.refusal_timer.is_some() {
            // Logged with the others when the pending timer fires.
        } else if self
            .refusals
            .1
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_EVERY)
        {
            self.flush_refusals();
        } else {
            // Logged once the second is up, even if no other refusal comes.
            let timer = self
                .worker
                .submit(Op::timeout(REFUSAL_LOG_EVERY), Io::RefusalLog);
            self.refusal_timer = Some(timer);
        }
    }

    fn flush_refusals(&mut self) {
        if self.refusals.0 > 0 {
            warn!(
                "refused {} connections over --max-connections {}",
                self.refusals.0, self.limits.max_connections
            );
            self.refusals.0 = 0;
            self.refusals.1 = Some(Instant::now());
        }
    }

    fn adopt(&mut self, c: Completion<Key, Io>) {
        let Some(handle) = c.handle else { return };
        if handle.key().is_listener() {
            return;
        }
        let fd = handle.as_raw_fd();
        if self.forced {
            // Handed over as the others were closed: closed with them, and counted.
            debug!("closing socket {fd}, handed over after the drain timed out");
            self.connections += 1;
            self.totals.live.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        // Accepted before the drain began (by another worker, say): served like the others,
        // so what its peer sent is echoed before the drain closes it with a FIN.
        debug!("socket {fd} connected");
        self.connections += 1;
        let mut conn = Conn {
            handle: handle.clone(),
            recv: None,
            out: None,
            paused: false,
            cancelling: false,
            quiet_since: 0,
            eof: false,
            to_send: false,
            yielding: false,
            starved: false,
            last_active: self.millis(self.now),
            retry: Retry::default(),
            hold: false,
        };
        self.arm(&mut conn);
        let alone = self.conns.is_empty();
        let id = self.conns.insert(conn);
        handle.key().0.store(id, Ordering::Relaxed);
        if self.deadline.is_some() && alone {
            // The drain's ticks stop with the last connection: they look at this one until it
            // is done.
            self.tick_drain();
        }
    }

    /// Arms the connection's pooled receive.
    ///
    /// It ends by itself after more than `--conn-buffer` bytes
    /// (where the backend keeps the limit), which puts the connection over its bound unless
    /// some of its echo went out meanwhile. A peer that sends without reading is armed only
    /// while it holds at most its bound, and then takes in at most the bound and one pool buffer
    /// more, which may touch two buffers more than their bytes: about twice its bound and two
    /// pool buffers (640 KiB at the defaults) before the pause takes effect, where without the
    /// limit its input keeps coming until the cancel reaches the kernel. (With whole buffers per
    /// receive, tiny segments each take a buffer while the limit counts bytes: there the pause's
    /// cancel still does most of the work.) `--no-strict-conn-buffer` arms receives without
    /// the limit. The limit's ends used to cost p99 latency under pipelined load, until the
    /// echo held for input left at an end (`received`; BENCHMARKS.md, I).
    fn arm(&mut self, conn: &mut Conn) {
        self.done_waiting(conn);
        // Armed again after it ended with input left (a wait for a pool buffer, a yield, a
        // retry for want of memory) or a pause: busy, whatever its last completion's age. The
        // idle sweep must not find it stale before its next receive completes.
        conn.last_active = self.millis(self.now);
        let op = if self.limits.strict {
            let max = u32::try_from(self.limits.conn_buffer + 1).unwrap_or(u32::MAX);
            Op::recv_pooled_max(
                &conn.handle,
                NonZeroU32::new(max).unwrap_or(NonZeroU32::MAX),
            )
        } else {
            Op::recv_pooled(&conn.handle)
        };
        conn.recv = Some(self.worker.submit_multishot(op, Io::Recv));
    }

    fn received(&mut self, c: Completion<Key, Io>) {
        let Some(id) = conn_id(&c) else { return };
        let Some(mut conn) = self.conns.take(id) else {
            // Closed meanwhile (its close already said how much echo it left): what came in
            // after that goes unanswered.
            if let (Some(buf), Some(h)) = (&c.pooled, &c.handle) {
                debug!(
                    "socket {}: {} bytes received after its close, not echoed",
                    h.as_raw_fd(),
                    buf.len()
                );
            }
            return;
        };
        if std::mem::take(&mut conn.hold) && !matches!(c.result, Ok(n) if n > 0) {
            // What was held goes out now (with input, it goes out with that input, below).
            self.wants_send(id, &mut conn);
        }
        if !c.more {
            conn.recv = None;
            conn.cancelling = false;
            conn.yielding = false;
        }
        match c.result {
            Ok(n) if n > 0 => {
                trace!("socket {}: received {n} bytes", conn.handle.as_raw_fd());
                self.recv_size = self.recv_size - self.recv_size / 16 + n / 16;
                if !self.rearmed.is_empty() {
                    self.rearmed.remove(&id);
                }
                conn.last_active = self.millis(self.now);
                conn.quiet_since = 0;
                conn.retry.succeeded();
                if let Some(buf) = c.pooled {
                    let spare = &mut self.spare_queues;
                    conn.out
                        .get_or_insert_with(|| {
                            spare.pop().unwrap_or_else(|| Box::new(EchoQueue::new()))
                        })
                        .push(buf);
                    self.wants_send(id, &mut conn);
                }
                if self.held_bytes(&conn) > self.limits.conn_buffer && !conn.paused {
                    // The peer is not reading: stop receiving until the echo drains.
                    conn.paused = true;
                    if let Some(op) = conn.recv {
                        self.worker.cancel(op);
                    }
                }
                if conn.recv.is_none() && !conn.paused && self.deadline.is_none() {
                    // The receive ended after data: it reached its limit (`arm`), found no
                    // buffer for more, or found no room in the completion queue (io_uring ends
                    // a multishot receive when its completion overflows). Armed again at once
                    // unless more connections wait for a buffer than there are free (then it
                    // waits its turn, as an armed receive yields its turn below): a receive
                    // ending at its limit is routine.
                    if self.free_receives() > self.waiting {
                        // Input left in the socket (the receive ended where its pool buffer
                        // filled up, in the middle of what the peer sent) is taken by the new
                        // receive, whose completion comes behind every other connection's
                        // already queued. Echoing what came so far now would split the peer's
                        // batch across two rounds, and a peer that answers each echo then keeps
                        // sending in two halves, a round behind, for good (p99 latency doubled
                        // at 1000c 512B p16 on a warmed server; BENCHMARKS.md, I). So the echo
                        // waits for that completion and goes out with it.
                        conn.hold = conn.handle.readable_bytes().is_ok_and(|n| n > 0);
                        if conn.hold {
                            debug!(
                                "socket {}: receive ended with input left; echo held for it",
                                conn.handle.as_raw_fd()
                            );
                        }
                        self.arm(&mut conn);
                    } else {
                        self.wait_for_buffer(id, &mut conn);
                    }
                } else if self.waiting > self.free_receives()
                    && !conn.paused
                    && self.deadline.is_none()
                    && self.longest_wait((id, conn.starved)) >= YIELD_AFTER.as_millis() as u64
                {
                    // More connections wait for a buffer than there are free, and one has
                    // waited `YIELD_AFTER`: this one had its turn. An armed receive takes pool
                    // space whenever data comes, so without this the same connections could
                    // keep the pool to themselves while the others starve. Only after a wait:
                    // a yield costs a cancel and a re-arm, and yielding whenever many waited
                    // (after a burst at 10,000 connections) made every receive yield, which
                    // kept the worker too busy to catch up (BENCHMARKS.md, K).
                    self.yield_turn(&mut conn);
                }
            }
            Ok(_) => conn.eof = true,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                // The pool ran dry: re-armed when buffers come back (a paused connection once
                // its echo has drained, by `sent`).
                if conn.paused && self.held_bytes(&conn) <= self.limits.conn_buffer / 2 {
                    conn.paused = false;
                }
                if !conn.paused {
                    self.wait_for_buffer(id, &mut conn);
                }
                return self.keep(id, conn);
            }
            Err(_) if c.is_cancelled() => {
                // A yield, a pause, the drain, or a cancel from elsewhere (fault injection):
                // whatever is not paused or ending waits for its next turn.
                if !conn.paused && !conn.eof && self.deadline.is_none() {
                    self.wait_for_buffer(id, &mut conn);
                }
                self.maybe_resume(id, &mut conn);
            }
            Err(e) if !c.more && self.retry_later(&mut conn, id, Retry::RECV, "receive", &e) => {}
            Err(e) => return self.close_failed(id, conn, "receive", &e),
        }
        self.settle(id, conn);
    }

    /// Cancels the connection's armed receive and queues it behind those waiting for a buffer.
    fn yield_turn(&mut self, conn: &mut Conn) {
        if let (Some(op), false) = (conn.recv, conn.yielding) {
            conn.yielding = true;
            self.worker.cancel(op);
        }
    }

    /// Decides, after an event, whether a connection goes on or is closed: it closes once it
    /// has nothing left to echo and its peer closed, or, while draining, once no input is left.
    /// A receive still armed is cancelled first, so that data it already took is not lost.
    fn settle(&mut self, id: u64, mut conn: Conn) {
        if !self.idle(&conn) {
            return self.keep(id, conn);
        }
        if conn.eof {
            return self.close_conn(id, conn, "peer closed");
        }
        if self.deadline.is_some() {
            // A peer may still hold bytes it wrote before the signal in its own send buffer,
            // sent only once our window opens: an empty socket is final only after a quiet
            // spell, or closing would reset the connection and lose that echo. Nor is it final
            // while the peer has not taken all of the echo: should it send anything more after
            // the close, the reset would drop the echo still in the kernel.
            let now = self.millis(Instant::now()) + 1;
            if conn.quiet_since == 0 {
                conn.quiet_since = now;
            }
            let quiet = now.saturating_sub(conn.quiet_since) >= DRAIN_QUIET.as_millis() as u64
                && conn.handle.unacked_bytes().map_or(true, |n| n == 0);
            match conn.recv {
                Some(op) => {
                    if quiet && !conn.cancelling {
                        conn.cancelling = true;
                        self.worker.cancel(op);
                    }
                }
                None if quiet && self.nothing_waiting(&conn) => {
                    return self.close_conn(id, conn, "draining");
                }
                // Its retry arms it, after the pause.
                None if conn.retry.waits(Retry::RECV) => {}
                // Waiting for a pool buffer: armed when one is free (arming it here would
                // only fail again, and end its wait, which the pool's holders are closed by).
                None if conn.starved => {}
                // Take what comes; the drain tick looks again.
                None => self.arm(&mut conn),
            }
        }
        self.keep(id, conn)
    }

    /// While draining, looks at every connection again (for the quiet spell to end).
    fn drain_tick(&mut self) {
        for id in self.conns.ids() {
            if let Some(conn) = self.conns.take(id) {
                self.settle(id, conn);
            }
        }
        if !self.conns.is_empty() && !self.forced {
            self.tick_drain();
        }
    }

    /// Posts the drain's next tick, unless one is pending.
    fn tick_drain(&mut self) {
        if !std::mem::replace(&mut self.drain_ticking, true) {
            self.worker.submit(Op::timeout(DRAIN_TICK), Io::DrainTick);
        }
    }

    /// Lists the connection for a send after this batch of completions, unless it is listed
    /// (or its send waits for a retry, which lists it then).
    fn wants_send(&mut self, id: u64, conn: &mut Conn) {
        if !conn.to_send && !conn.retry.waits(Retry::SEND) {
            conn.to_send = true;
            self.to_send.push(id);
        }
    }

    /// Posts, for each listed connection with no send in flight, one send of everything it
    /// has queued (up to `MAX_GATHER` buffers).
    fn post_sends(&mut self) {
        let Server {
            worker,
            conns,
            to_send,
            spare,
            ..
        } = self;
        for id in to_send.drain(..) {
            let Some(conn) = conns.get_mut(id) else {
                continue; // Closed meanwhile.
            };
            conn.to_send = false;
            if conn.retry.waits(Retry::SEND) || conn.hold {
                // Listed before its send failed (it waits for the retry), or its echo waits for
                // the rest of its input (`received`).
                continue;
            }
            let Some(out) = &mut conn.out else { continue };
            let mut bufs = spare.pop().unwrap_or_default();
            match out.take(MAX_GATHER, &mut bufs) {
                Some(offset) => {
                    // One send in flight per connection, and what was not sent goes out with
                    // what came in since (`sent`): the kernel's part is all it waits for.
                    worker.submit(
                        Op::send_pooled_gather(&conn.handle, bufs, offset).partial(),
                        Io::Send,
                    );
                }
                None => spare.push(bufs),
            }
        }
    }

    fn sent(&mut self, mut c: Completion<Key, Io>) {
        let Some(id) = conn_id(&c) else { return };
        if let Ok(n) = c.result {
            // Counted even when the connection was closed meanwhile: the bytes went out.
            self.bytes += n as u64;
        }
        let Some(mut conn) = self.conns.take(id) else {
            return;
        };
        let mut bufs = std::mem::take(&mut c.gathered);
        let unsent = bufs.iter().map(|b| b.len()).sum::<usize>() > 0;
        let n = match c.result {
            Ok(n) if n > 0 || !unsent => n,
            Ok(_) => return self.close_conn(id, conn, "send made no progress"),
            Err(e) if self.retry_later(&mut conn, id, Retry::SEND, "send", &e) => {
                // Nothing went out: every buffer goes back to the front of the queue.
                if let Some(out) = conn.out.as_mut() {
                    out.sent(&mut bufs, 0);
                }
                if self.spare.len() < SPARE_LISTS {
                    self.spare.push(bufs);
                }
                return self.keep(id, conn);
            }
            Err(e) => return self.close_failed(id, conn, "send", &e),
        };
        conn.last_active = self.millis(self.now);
        if n > 0 {
            conn.retry.succeeded();
        }
        trace!("socket {}: sent {n} bytes", conn.handle.as_raw_fd());
        // What was not sent goes back to the front of the queue.
        let idle = conn.out.as_mut().is_none_or(|out| {
            out.sent(&mut bufs, n);
            out.is_idle()
        });
        if !idle {
            self.wants_send(id, &mut conn);
        } else if let Some(mut out) = conn.out.take() {
            // Nothing left to echo: the queue goes back to the spares (without this
            // connection's mark).
            debug_assert_eq!(out.pending(), 0);
            out.mark = None;
            if self.spare_queues.len() < SPARE_LISTS {
                self.spare_queues.push(out);
            }
        }
        if self.spare.len() < SPARE_LISTS {
            self.spare.push(bufs);
        }
        self.maybe_resume(id, &mut conn);
        self.settle(id, conn);
    }

    /// Milliseconds from the worker's start to `t`.
    fn millis(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the peer of a connection whose echo has not moved for a while (`last_active`
    /// unchanged: no send completed) still takes it, however slowly: a send waiting for room
    /// completes only once a good part of the socket's send buffer (megabytes) has drained,
    /// so between completions progress shows only in the kernel, in its count of the bytes
    /// sent and not yet acknowledged (`SIOCOUTQ`). The first look since the last activity
    /// notes the count, and, if any is outstanding, gives the connection as long again (it
    /// counts as active from `now`); a later one, whether the count changed since, and if it
    /// did, as long again from `now`. So a peer taking its echo however slowly stays (as long as
    /// its window opens within the period: once shut, its kernel reopens it only when a full
    /// segment's worth is free, about 64 KiB on loopback, and until then its reading does not
    /// show here), and one
    /// taking none of it is found out a period later than by its last completion alone. Echo
    /// all in the socket, with no queue left here, is looked at too (an empty queue from
    /// `spare`, or a new one, holds the count): closed, the socket would still send it before
    /// its FIN, but anything more its peer sent would draw a reset that drops the rest.
    #[allow(clippy::vec_box)] // `Worker::spare_queues`.
    fn echo_moving(conn: &mut Conn, now: u64, spare: &mut Vec<Box<EchoQueue<PoolBuf>>>) -> bool {
        let Ok(unacked) = conn.handle.unacked_bytes() else {
            return false;
        };
        if conn.out.is_none() && unacked == 0 {
            return false;
        }
        let q = conn
            .out
            .get_or_insert_with(|| spare.pop().unwrap_or_else(|| Box::new(EchoQueue::new())));
        let moved = match q.mark {
            // Down as the peer takes it, or up as a send whose completion is not in yet put
            // more in: either way it moves (a peer that takes none leaves it as it was).
            Some((at, before)) if at == conn.last_active => unacked != before,
            // A first look since the last activity: the count to compare with next time.
            _ => unacked > 0,
        };
        if moved {
            conn.last_active = now;
        }
        q.mark = Some((conn.last_active, unacked));
        moved
    }

    /// Pool memory the connection may hold: each pool buffer its slices are in, whole, however
    /// little of it they carry (a slice kept back keeps its whole buffer out of the pool, so
    /// this is the bound that holds whatever the other connections do), and at least
    /// `SLICE_CHARGE` per slice.
    fn held_bytes(&self, conn: &Conn) -> usize {
        conn.out.as_ref().map_or(0, |q| {
            (q.buffers() * self.limits.pool_buffer).max(q.held() * SLICE_CHARGE)
        })
    }

    /// Re-arms a paused receive once the echo has drained to half the bound; behind the
    /// connections already waiting for a buffer, if any.
    fn maybe_resume(&mut self, id: u64, conn: &mut Conn) {
        if conn.paused
            && conn.recv.is_none()
            && self.held_bytes(conn) <= self.limits.conn_buffer / 2
        {
            conn.paused = false;
            if !conn.eof {
                if self.waiting > 0 && self.deadline.is_none() {
                    self.wait_for_buffer(id, conn);
                } else {
                    self.arm(conn);
                }
            }
        }
    }

    fn keep(&mut self, id: u64, conn: Conn) {
        self.conns.put(id, conn);
    }

    /// Whether the connection has nothing queued or in flight to send.
    fn idle(&self, conn: &Conn) -> bool {
        conn.out.as_ref().is_none_or(|q| q.is_idle())
    }

    /// Whether the peer has no input waiting in the socket (during a drain).
    fn nothing_waiting(&self, conn: &Conn) -> bool {
        conn.handle.readable_bytes().map_or(true, |n| n == 0)
    }

    /// About how many receives the pool's free buffers can take: one each where a receive takes
    /// a whole buffer; where receives share buffers, as many of the receives seen lately as fit
    /// in one (at most eight: as many buffer-sized batches of a peer's input, 8 KiB, as fit in
    /// one). Budgets the turns of connections waiting for a buffer: arming more than the pool
    /// can fill only has the rest end at once for want of a buffer, and wait again.
    fn free_receives(&self) -> usize {
        let most = (self.limits.pool_buffer / WHOLE_BUFFER).max(1);
        let per_buffer = (self.limits.pool_buffer / self.recv_size.max(1)).clamp(1, most);
        self.worker.pool_available() * per_buffer
    }

    /// How long the connection that has waited longest for a buffer has waited, in
    /// milliseconds (0 when none waits). Entries of connections no longer waiting (closed, or
    /// armed again) are dropped from the front of the queue on the way; `current` is the id
    /// and `starved` flag of a record taken out of the table to be worked on.
    fn longest_wait(&mut self, current: (u64, bool)) -> u64 {
        while let Some(&(id, since)) = self.starved.front() {
            let waits = if id == current.0 {
                current.1
            } else {
                match self.conns.get_mut(id) {
                    Some(c) => c.starved,
                    // Closed; or taken out (only `current` is, here): then still counted.
                    None => self.conns.is_live(id),
                }
            };
            if !waits {
                self.starved.pop_front();
                continue;
            }
            return self.millis(self.now).saturating_sub(since);
        }
        0
    }

    /// Queues a connection to be re-armed when buffers are free.
    fn wait_for_buffer(&mut self, id: u64, conn: &mut Conn) {
        if !conn.starved {
            conn.starved = true;
            self.waiting += 1;
            self.buffer_waits += 1;
            let now = self.millis(self.now);
            // Re-armed from the queue and out of luck again at once: the wait goes on from
            // when it began. (Re-armed, then quiet for a while: a new wait.)
            let since = match self.rearmed.remove(&id) {
                Some((since, at)) if now.saturating_sub(at) <= REARM_CARRY_MS => since,
                _ => now,
            };
            self.starved.push_back((id, since));
        }
    }

    fn done_waiting(&mut self, conn: &mut Conn) {
        if std::mem::take(&mut conn.starved) {
            self.waiting -= 1;
        }
    }

    /// Re-arms connections waiting for a buffer, oldest first, and about as many as there are
    /// free buffers: arming them all at once would only see most fail again (and the same
    /// unlucky ones wait longest). A re-armed receive on a socket with nothing to read takes no
    /// buffer, so while buffers stay free a short timer gives the rest their turn.
    fn rearm_starved(&mut self) {
        if self.waiting == 0 && !self.rearmed.is_empty() {
            // Nobody waits: those armed by earlier passes got a buffer or went quiet, and one
            // that waits again starts afresh. (Not after this pass's arming: those it arms may
            // yet find no buffer.)
            self.rearmed = HashMap::default();
        }
        let mut budget = self.free_receives();
        while budget > 0 {
            let Some((id, since)) = self.starved.pop_front() else {
                break;
            };
            let Some(mut conn) = self.conns.take(id) else {
                continue;
            };
            if conn.starved {
                self.done_waiting(&mut conn);
                if conn.recv.is_none() && !conn.paused && !conn.eof {
                    self.arm(&mut conn);
                    let at = self.millis(self.now);
                    self.rearmed.insert(id, (since, at));
                    budget -= 1;
                }
            }
            self.conns.put(id, conn);
        }
        if self.waiting > 0
            && !self.rearm_timer
            && self.deadline.is_none()
            && self.free_receives() > 0
        {
            self.rearm_timer = true;
            self.worker.submit(Op::timeout(REARM_AGAIN), Io::Rearm);
        }
    }

    /// Closes the connection holding the most of the receive pool (and any other holding over
    /// twice `--conn-buffer`), among those whose echo has not moved for `POOL_GRACE`, once
    /// connections have waited for the pool that long and it is dry. Such a connection's peer
    /// sent and does not read its echo: without this, enough such peers (each paused at an
    /// eighth of the pool's worth at most, plus what arrived before the pause took effect, or
    /// stopping short of the pause) would keep every other connection of the worker waiting for
    /// as long as they like.
    fn close_pool_hog(&mut self) {
        // Draining too: the connections waiting have input to echo before the drain ends, and
        // the holders would be closed at its end anyway.
        if self.waiting == 0 {
            self.hog_check = None;
            return;
        }
        // Counted from when connections started waiting; a buffer freed for a moment (and
        // taken again at once) does not restart the count.
        let at = *self.hog_check.get_or_insert_with(|| far(POOL_GRACE));
        if self.now < at {
            return;
        }
        // The next look in `HOG_AGAIN` whatever happens now (a check time in the past would
        // make the worker's wait return at once, again and again).
        self.hog_check = Some(far(HOG_AGAIN));
        // Dry: every buffer of the pool in user hands. (Buffers outside the working set are
        // there for connections that hold on to theirs: a busy working set is not a dry pool.)
        if self.worker.pool_in_use() < self.limits.pool_buffers {
            return;
        }
        // The connection holding the most, and with it every one holding more than twice the
        // bound: a peer that reads can overshoot the bound by what arrived before its pause
        // took effect, but not by that much while its echo keeps draining. Only those whose
        // echo has not moved for a while: a slow reader that still reads stays (sends and
        // receives both set `last_active`), and so does a connection whose send waits to be
        // tried again for want of memory. A connection need not be paused: peers that each
        // stop sending just short of the bound can hold the pool between them as well (such a
        // one after `UNPAUSED_GRACE`).
        let now = self.millis(self.now);
        let grace = |c: &Conn| {
            let grace = if c.paused { POOL_GRACE } else { UNPAUSED_GRACE };
            grace.as_millis() as u64
        };
        let mut held: Vec<(usize, u64)> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.retry.pending() && now.saturating_sub(c.last_active) >= grace(c))
            .map(|(id, c)| (self.held_bytes(c), id))
            .filter(|&(bytes, _)| bytes > 0)
            .collect();
        held.sort_unstable_by(|a, b| b.cmp(a));
        let over = held
            .iter()
            .skip(1)
            .take_while(|(h, _)| *h > 2 * self.limits.conn_buffer)
            .count();
        for (bytes, id) in held.into_iter().take(1 + over) {
            let Some(mut conn) = self.conns.take(id) else {
                continue;
            };
            if Self::echo_moving(&mut conn, now, &mut self.spare_queues) {
                // A slow reader: its peer still takes the echo (looked at again next time).
                self.conns.put(id, conn);
                continue;
            }
            if !std::mem::replace(&mut self.hog_warned, true) {
                warn!(
                    "socket {}: closing it: it holds {bytes} bytes of the receive pool and \
                     reads none of its echo while {} connections wait for the pool (later \
                     closes for this are logged at debug)",
                    conn.handle.as_raw_fd(),
                    self.waiting
                );
            }
            self.totals.hogs_closed.fetch_add(1, Ordering::Relaxed);
            self.close_conn(id, conn, "held the receive pool without reading its echo");
        }
    }

    fn drain(&mut self) {
        if self.deadline.is_some() {
            return;
        }
        self.deadline = Some(far(self.limits.drain_timeout));
        if let Some(op) = self.sweep.take() {
            self.worker.cancel(op);
        }
        // Its refusals are logged as it completes.
        if let Some(op) = self.refusal_timer {
            self.worker.cancel(op);
        }
        if let Some(l) = self.listener.take() {
            self.worker.submit(Op::close(&l), Io::Close);
        }
        // Connections with nothing to echo and no input coming are done; the others keep
        // echoing until they are (or the drain times out).
        self.drain_tick();
    }

    fn sweep(&mut self) {
        let Some(idle) = self.limits.idle_timeout else {
            return;
        };
        let now = self.millis(Instant::now());
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let quiet: Vec<u64> = self
            .conns
            .iter()
            // One that waits to try again what failed for want of memory is busy, not idle.
            .filter(|(_, c)| !c.retry.pending() && now.saturating_sub(c.last_active) >= idle_ms)
            .map(|(id, _)| id)
            .collect();
        for id in quiet {
            let Some(mut conn) = self.conns.take(id) else {
                continue;
            };
            // Nor is one waiting for a pool buffer with input its peer sent, nor one whose
            // peer is still taking its echo, however slowly.
            let waits_with_input = conn.starved && !self.nothing_waiting(&conn);
            if waits_with_input || Self::echo_moving(&mut conn, now, &mut self.spare_queues) {
                self.conns.put(id, conn);
                continue;
            }
            self.totals.idle_closed.fetch_add(1, Ordering::Relaxed);
            self.close_conn(id, conn, "idle timeout");
        }
        if self.deadline.is_none() {
            self.sweep = Some(
                self.worker
                    .submit(Op::timeout(sweep_period(idle)), Io::Sweep),
            );
        }
    }

    fn force_close(&mut self) {
        let n = self.conns.ids().len();
        if n > 0 {
            warn!("drain timeout: closing {n} connections still echoing");
        }
        self.close_all("drain timeout");
    }

    /// Closes every connection, and from then on takes no new work: what completes within
    /// `FORCE_GRACE` is only counted.
    fn close_all(&mut self, why: &str) {
        self.forced = true;
        self.deadline = Some(Instant::now() + FORCE_GRACE);
        for id in self.conns.ids() {
            if let Some(conn) = self.conns.take(id) {
                self.close_conn(id, conn, why);
            }
        }
    }

    /// After a send or receive (`op`) failed: when the system ran short of memory, which
    /// passes, the connection keeps what it holds and `op` is tried again after a pause that
    /// doubles with each failure in a row (sends and receives counted together, a success of
    /// either starting the count again), up to `RETRY_LIMIT`. Returns whether a retry is due;
    /// `false` for any other error, or once the failures in a row reach the limit.
    fn retry_later(&mut self, conn: &mut Conn, id: u64, op: u8, what: &str, e: &io::Error) -> bool {
        // `EAGAIN` reaches a send or receive only when it could not start: io_uring short of
        // memory for the request (a socket that is not ready waits in the kernel).
        let transient = matches!(
            e.raw_os_error(),
            Some(libc::ENOMEM | libc::ENOBUFS | libc::EAGAIN)
        ) && !(op == Retry::RECV && e.raw_os_error() == Some(libc::ENOBUFS));
        if !transient || !conn.retry.failed(op) {
            return false;
        }
        let delay = conn.retry.delay();
        let fd = conn.handle.as_raw_fd();
        if std::mem::replace(&mut self.retry_warned, true) {
            debug!(
                "socket {fd}: {what}: {}: trying again in {delay:?}",
                describe(e)
            );
        } else {
            warn!(
                "socket {fd}: {what}: {}: trying again in {delay:?}, for up to {RETRY_LIMIT} \
                 failures in a row (later retries are logged at debug)",
                describe(e)
            );
        }
        let due = self.millis(Instant::now()) + u64::try_from(delay.as_millis()).unwrap_or(0);
        self.retries.push((due, id));
        self.retry_tick();
        true
    }

    /// Posts the `RETRY_TICK` timer unless one is pending.
    fn retry_tick(&mut self) {
        if !self.retry_timer {
            self.retry_timer = true;
            self.worker.submit(Op::timeout(RETRY_TICK), Io::Retry);
        }
    }

    /// Tries again the sends and receives whose pause is over.
    fn retry_due(&mut self) {
        self.retry_timer = false;
        let now = self.millis(Instant::now());
        let mut later = Vec::new();
        for (due, id) in std::mem::take(&mut self.retries) {
            if due > now {
                later.push((due, id));
                continue;
            }
            let Some(mut conn) = self.conns.take(id) else {
                continue; // Closed meanwhile.
            };
            // Whatever waits goes now, even if this entry was the other operation's; the
            // connection is busy from here, not idle since before its failures.
            let ops = conn.retry.take();
            conn.last_active = now;
            let mut retried = 0;
            if ops & Retry::SEND != 0 && !self.idle(&conn) {
                self.wants_send(id, &mut conn);
                retried += 1;
            }
            if ops & Retry::RECV != 0 && conn.recv.is_none() && !conn.eof {
                if conn.paused {
                    // Re-armed once its echo has drained (now, if it has).
                    self.maybe_resume(id, &mut conn);
                } else if self.waiting > 0 && self.deadline.is_none() {
                    self.wait_for_buffer(id, &mut conn);
                } else {
                    self.arm(&mut conn);
                }
                // Counted when armed here; one that waits for its echo to drain or for a buffer
                // is armed later, as any receive is, and not counted as tried again.
                retried += u64::from(conn.recv.is_some());
            }
            self.totals.retried.fetch_add(retried, Ordering::Relaxed);
            self.settle(id, conn);
        }
        // Entries of connections closed meanwhile are dropped; those of a connection that
        // failed again meanwhile were pushed anew.
        later.retain(|&(_, id)| self.conns.get_mut(id).is_some());
        self.retries.append(&mut later);
        if !self.retries.is_empty() {
            self.retry_tick();
        }
    }

    /// Closes a connection whose `what` failed. A peer's reset is routine (logged at debug);
    /// a resource running out is the server's problem, and the first such close is a warning.
    fn close_failed(&mut self, id: u64, conn: Conn, what: &str, e: &io::Error) {
        let why = format!("{what}: {}", describe(e));
        if is_resource(e) {
            self.totals.resource_closed.fetch_add(1, Ordering::Relaxed);
            if !std::mem::replace(&mut self.resource_warned, true) {
                warn!(
                    "socket {}: {why}: closing the connection (later closes for want of a \
                     resource are counted in the exit summary and --stats, and logged at debug)",
                    conn.handle.as_raw_fd()
                );
            }
        }
        self.close_conn(id, conn, &why);
    }

    /// Closes a connection taken out of the table, and frees its slot.
    fn close_conn(&mut self, id: u64, mut conn: Conn, why: &str) {
        self.conns.free(id);
        if !self.rearmed.is_empty() {
            self.rearmed.remove(&id);
        }
        self.done_waiting(&mut conn);
        let fd = conn.handle.as_raw_fd();
        match conn.out.as_ref().map_or(0, |q| q.pending()) {
            0 => debug!("closing socket {fd} ({why})"),
            // (A part of it may be going out in a send in flight.)
            n => debug!("closing socket {fd} ({why}), up to {n} bytes not echoed"),
        }
        // FIN now, after everything already echoed, even if input is still unread.
        let _ = conn.handle.shutdown(Shutdown::Write);
        self.worker.submit(Op::close(&conn.handle), Io::Close);
        self.totals.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether `e` says the system ran short of something (descriptors, memory, buffers), not that
/// a peer misbehaved.
fn is_resource(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ENOSPC
                | libc::EAGAIN
        )
    )
}

/// Now plus `d`, or a year from now when `d` is too long to add.
fn far(d: Duration) -> Instant {
    crate::later(Instant::now(), d)
}

/// How often idle connections are looked for: a quarter of the timeout, at least every 10 ms.
fn sweep_period(idle: Duration) -> Duration {
    (idle / 4).max(Duration::from_millis(10))
}

fn conn_id(c: &Completion<Key, Io>) -> Option<u64> {
    c.key()?.conn_id()
}

#[cfg(test)]
mod tests {
    /// With `--listen` on port 0 and the UDP port of the kernel's choice for TCP taken, both
    /// are bound again on another port, the same for both; with a port given, that is an
    /// error naming it.
    #[test]
    fn udp_beside_a_listener_on_port_0_finds_a_port_free_for_both() {
        let mut listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = listener.local_addr().unwrap();
        let _holder = std::net::UdpSocket::bind(taken).unwrap();
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        let udp = super::bind_udp_beside(&mut listener, any, 0).unwrap();
        let tcp = listener.local_addr().unwrap();
        assert_ne!(tcp, taken, "bound again");
        assert_eq!(udp.local_addr().unwrap(), tcp);

        let mut fixed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = fixed.local_addr().unwrap();
        let _holder = std::net::UdpSocket::bind(at).unwrap();
        let err = super::bind_udp_beside(&mut fixed, at, 0).unwrap_err();
        assert!(err.contains(&format!("{at} (UDP)")), "{err}");
    }

    /// Every connection, idle or not, holds one record in its worker's table: keep it small.
    #[test]
    fn connection_records_stay_small() {
        assert!(std::mem::size_of::<super::Conn>() <= 48);
    }

    #[test]
    fn a_worker_that_panics_tells_every_worker_to_drain() {
        use super::{DrainOnPanic, Io, Key};
        let (port, mut workers) = ringport::Port::builder()
            .workers(2)
            .build::<Key, Io>()
            .unwrap();
        let guarded = port.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = DrainOnPanic(guarded);
            panic!("a worker's bug");
        })
        .join();
        assert!(panicked.is_err());
        for w in &mut workers {
            let c = w
                .dequeue(Some(std::time::Duration::from_secs(5)))
                .expect("a packet");
            assert!(matches!(c.data, Io::Drain), "worker {}", w.index());
        }
        // Without a panic, nothing is posted.
        drop(DrainOnPanic(port));
        for w in &mut workers {
            assert!(w.dequeue(Some(std::time::Duration::ZERO)).is_err());
        }
    }

    /// A connection handed over to worker `to` of a port of `workers`, whose listener's home
    /// is worker 0, with "hello" sent by its peer: the port, the workers, the listener, the
    /// peer, the connection's handle, and the limits and totals for the worker's `Server`.
    #[allow(clippy::type_complexity)]
    fn handed_over(
        workers: usize,
        to: usize,
    ) -> (
        ringport::Port<super::Key, super::Io>,
        Vec<ringport::Worker<super::Key, super::Io>>,
        ringport::Handle<super::Key>,
        std::net::TcpStream,
        ringport::Handle<super::Key>,
        super::Limits,
        std::sync::Arc<super::Totals>,
    ) {
        use super::{Io, Key, Limits, Totals};
        use std::io::Write;
        let (port, workers) = ringport::Port::builder()
            .workers(workers)
            .recv_pool(super::WHOLE_BUFFER, 64)
            .build::<Key, Io>()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        let listener = port.associate_with(0, listener, Key::listener()).unwrap();
        peer.write_all(b"hello").unwrap();
        peer.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let conn = port.associate_with(to, ours, Key::conn()).unwrap();
        let totals = std::sync::Arc::new(Totals::new(0, None));
        totals
            .live
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let limits = Limits {
            drain_timeout: std::time::Duration::from_secs(10),
            idle_timeout: None,
            max_connections: 0,
            conn_buffer: 1 << 20,
            strict: true,
            pool_buffer: super::WHOLE_BUFFER,
            pool_buffers: 64,
        };
        (port, workers, listener, peer, conn, limits, totals)
    }

    /// Posts a packet of `data` (and `handle`) to worker `to`.
    fn post_to(
        port: &ringport::Port<super::Key, super::Io>,
        to: usize,
        data: super::Io,
        handle: Option<ringport::Handle<super::Key>>,
    ) {
        let packet = ringport::Packet {
            bytes: 0,
            handle,
            data,
        };
        assert!(port.post(to, packet).is_ok(), "worker {to} is gone");
    }

    #[test]
    fn a_connection_handed_over_as_the_drain_begins_is_echoed_then_closed() {
        use super::{Io, Server};
        use std::io::Read;
        let (port, mut workers, listener, mut peer, conn, limits, totals) = handed_over(1, 0);
        // The drain reaches the worker first, then the connection another worker accepted.
        post_to(&port, 0, Io::Drain, None);
        post_to(&port, 0, Io::Adopt, Some(conn));
        let worker = workers.pop().unwrap();
        let server =
            std::thread::spawn(move || Server::new(worker, listener, limits, totals).run());
        let mut echo = Vec::new();
        peer.read_to_end(&mut echo).expect("a FIN, not a reset");
        assert_eq!(echo, b"hello");
        server.join().unwrap().unwrap();
    }

    /// A worker without the listener that drains with no connection of its own does not
    /// finish before the listener's worker says it hands over no more: a connection that
    /// worker accepted just before its own drain, and hands over late, is still echoed and
    /// closed with a FIN.
    #[test]
    fn a_worker_waits_for_the_last_connection_handed_over_before_it_finishes() {
        use super::{Io, Server};
        use std::io::Read;
        use std::io::Write;
        use std::time::Duration;
        // The listener's home is worker 0, which this test plays; worker 1 runs the server.
        let (port, mut workers, listener, mut peer, conn, limits, totals) = handed_over(2, 1);
        // A first connection, handed over as the drain begins, shows the worker has taken the
        // drain: it is echoed and closed, and leaves the worker with no connection.
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut first_peer = std::net::TcpStream::connect(first.local_addr().unwrap()).unwrap();
        first_peer.write_all(b"first").unwrap();
        first_peer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let first = port
            .associate_with(1, first.accept().unwrap().0, super::Key::conn())
            .unwrap();
        totals
            .live
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        post_to(&port, 1, Io::Drain, None);
        post_to(&port, 1, Io::Adopt, Some(first));
        let worker = workers.pop().unwrap();
        assert_eq!(worker.index(), 1);
        let server =
            std::thread::spawn(move || Server::new(worker, listener, limits, totals).run());
        let mut echo = Vec::new();
        first_peer
            .read_to_end(&mut echo)
            .expect("a FIN, not a reset");
        assert_eq!(echo, b"first");
        // Time for a worker that did not wait to have finished.
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !server.is_finished(),
            "finished before the listener's worker handed over its last connection"
        );
        post_to(&port, 1, Io::Adopt, Some(conn));
        post_to(&port, 1, Io::HandedOver, None);
        let mut echo = Vec::new();
        peer.read_to_end(&mut echo).expect("a FIN, not a reset");
        assert_eq!(echo, b"hello");
        server.join().unwrap().unwrap();
    }

    #[test]
    fn retries_double_their_pause_and_give_up_at_the_limit() {
        use super::{Retry, RETRY_FIRST, RETRY_LIMIT};
        let mut r = Retry::default();
        assert!(!r.pending());
        assert!(r.failed(Retry::SEND));
        assert!(r.waits(Retry::SEND) && !r.waits(Retry::RECV));
        assert_eq!(r.delay(), RETRY_FIRST);
        assert!(r.failed(Retry::RECV));
        assert!(r.waits(Retry::SEND) && r.waits(Retry::RECV));
        assert_eq!(r.delay(), RETRY_FIRST * 2);
        assert_eq!(r.take(), Retry::SEND | Retry::RECV);
        assert!(!r.pending());
        assert_eq!(r.failures(), 2, "taking the ops keeps the count");
        for n in 3..=RETRY_LIMIT {
            assert!(r.failed(Retry::SEND), "failure {n} is retried");
        }
        assert_eq!(r.delay(), RETRY_FIRST * (1 << (RETRY_LIMIT - 1)));
        assert!(!r.failed(Retry::SEND), "one more is too many");
        r.take();
        r.succeeded();
        assert_eq!(r.failures(), 0);
        assert!(
            r.failed(Retry::RECV),
            "the count starts again after a success"
        );
    }
}
