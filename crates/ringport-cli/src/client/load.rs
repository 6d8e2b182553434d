//! The load generator: many connections on a ringport port, random payloads, every echoed byte
//! verified, latency per message.
//!
//! Each worker owns the connections `index, index + workers, ...`: it opens them (a bounded
//! number of connects at a time), keeps up to `pipeline` messages in flight on each (one send
//! and one receive outstanding per connection), and checks each echoed byte against the
//! connection's own deterministic stream.
//!
//! The load starts once every worker has opened its connections: the last one to finish posts a
//! start packet to every worker. The measured window runs from there (after `--warmup`) to the
//! deadline (`--duration`), or to the last message (`--messages`); the echoes still in flight
//! at the deadline are verified but not counted, and opening and closing the connections fall
//! outside the window.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use ringport::{Completion, Handle, Op, Packet, Port, Worker};
// The lines `--mark-window` prints: the harness that reads them owns their text.
use ringport_bench::proc::{WINDOW_CLOSED, WINDOW_OPEN};

use super::errors::{describe, ErrorCounts};
use super::payload::Stream;
use super::stats::{Recorder, Summary};
use crate::ClientArgs;

/// Connects in flight per worker.
const CONNECTS_IN_FLIGHT: usize = 256;
/// With no completion at all for this long, the remaining connections are given up.
const STALL_LIMIT: Duration = Duration::from_secs(30);
/// How often the main thread checks whether the workers ended before the deadline.
const END_CHECK: Duration = Duration::from_millis(10);
/// With `--duration`, how long after the deadline the last echoes, and each server's close
/// after the client's, may take; what is still missing then is counted as an error.
const FINISH_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum Until {
    Messages(u64),
    /// Send until `close`; count the echoes that come back from `open` (after the warm-up) to
    /// `close`.
    Window {
        open: Instant,
        close: Instant,
    },
}

impl Until {
    /// The same load, ended at `now` (a window no later than that; a message count as it is,
    /// the caller sending no more).
    fn cut_short(self, now: Instant) -> Until {
        match self {
            Until::Window { open, close } => Until::Window {
                open: open.min(now),
                close: close.min(now),
            },
            messages => messages,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    addr: SocketAddr,
    connections: u32,
    size: usize,
    pipeline: u64,
    /// `--duration`; without it, `messages` per connection.
    duration: Option<Duration>,
    /// `--warmup` (with `--duration`).
    warmup: Duration,
    messages: u64,
    workers: usize,
    /// `--timeout`, and when it runs out (counted from when the plan was made).
    limit: Option<(Duration, Instant)>,
}

impl Plan {
    /// The end of a load that starts at `start`.
    fn until(&self, start: Instant) -> Until {
        match self.duration {
            Some(d) => {
                let open = crate::later(start, self.warmup);
                Until::Window {
                    open,
                    close: crate::later(open, d),
                }
            }
            None => Until::Messages(self.messages),
        }
    }
}

/// Where the workers meet before the load starts.
struct Gate {
    /// Workers still opening their connections.
    opening: AtomicUsize,
    /// Told when the load starts.
    started: mpsc::Sender<Instant>,
}

/// Held by each worker thread: should the worker panic, the port shuts down, so that the
/// workers waiting for it at the gate (and the main thread, waiting for the start) end too,
/// and the run fails naming the panic instead of hanging.
struct ShutdownOnPanic(Port<u32, Io>);

impl Drop for ShutdownOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.shutdown();
        }
    }
}

/// The per-I/O data.
#[derive(Debug)]
enum Io {
    /// The custom packet that starts the load.
    Start(Until),
    /// The custom packet that ends it early (a signal, at the moment given): no new message
    /// goes out, and each connection closes once its echoes are back.
    Stop(Instant),
    Connect,
    Recv,
    /// `sent` bytes of the buffer are out.
    Send {
        sent: usize,
    },
    Close,
}

struct Conn {
    handle: Handle<u32>,
    tx: Stream,
    rx: Stream,
    /// Messages handed to send so far.
    sent_msgs: u64,
    /// Bytes echoed back and verified so far.
    received: u64,
    /// Send time of each message sent and not yet fully echoed.
    in_flight: VecDeque<Instant>,
    sending: bool,
    spare_send: Vec<u8>,
    /// Everything sent was echoed and the client shut down its sending side: the server is
    /// to close its side too, with nothing more.
    closing: bool,
}

/// One worker's results.
#[derive(Default)]
struct Tally {
    connections: u64,
    /// Messages whose echo completed in the measured window.
    messages: u64,
    /// Bytes echoed in the measured window (a message that straddles its opening counts only
    /// its bytes inside it).
    bytes: u64,
    /// Every byte echoed and checked, in the window or after it.
    verified: u64,
    /// When the last counted message came back.
    last: Option<Instant>,
    /// When the worker's loop ended.
    ended: Option<Instant>,
    latency: Recorder,
    errors: ErrorCounts,
    mismatches: u64,
    /// A stop signal ended the load before its end (not only after it).
    cut_short: bool,
}

pub fn run(args: &ClientArgs) -> Result<ExitCode, String> {
    let connections = args.connections.unwrap_or(1);
    let size = args.size.unwrap_or(64) as usize;
    let pipeline = u64::from(args.pipeline.unwrap_or(1));
    // (`--size` x `--pipeline` is at most 1 GiB: `main` checks it with the other flags.)
    // Every connection sends its whole pipeline at the start of the load: that much memory at
    // once, the time each message went out, and a receive buffer each.
    let per_conn = (size as u64 + std::mem::size_of::<Instant>() as u64)
        .saturating_mul(pipeline)
        .saturating_add(recv_buffer(size, pipeline) as u64);
    let in_flight = u64::from(connections).saturating_mul(per_conn);
    if let Some(available) = available_memory() {
        if in_flight > available / 4 * 3 {
            return Err(format!(
                "--connections {connections} x --size {size} x --pipeline {pipeline}: {:.1} GiB \
                 in flight at once, more than this machine (or its cgroup) can spare ({:.1} GiB \
                 available)",
                in_flight as f64 / f64::from(1u32 << 30),
                available as f64 / f64::from(1u32 << 30)
            ));
        }
    }
    let workers = args.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    );
    // Each connection is a descriptor; the client keeps a few of its own (standard streams,
    // the signal thread's pipe), and each port worker two or three (its ring or epoll
    // instance, its wake-up eventfd).
    let spare = 16 + 3 * workers.min(connections as usize) as u64;
    if let Some(limit) = crate::nofile_limit() {
        if u64::from(connections) + spare > limit {
            return Err(format!(
                "--connections {connections}: this process may open {} connections at most \
                 (RLIMIT_NOFILE {limit}, less {spare} kept for the client itself); raise the \
                 limit (`ulimit -n`) or open fewer",
                limit.saturating_sub(spare)
            ));
        }
    }
    // Every connection goes to the one address, so each needs a local port of its own.
    if let Some((low, high)) = local_port_range() {
        let ports = u64::from(high.saturating_sub(low)) + 1;
        if u64::from(connections) > ports {
            return Err(format!(
                "--connections {connections}: more than the {ports} local ports a connection to \
                 one address can take (net.ipv4.ip_local_port_range {low}-{high}); open fewer, \
                 or widen the range"
            ));
        }
    }
    let plan = Plan {
        addr: args.connect,
        connections,
        size,
        pipeline,
        duration: args.duration,
        warmup: args.warmup.unwrap_or(Duration::ZERO),
        messages: args.messages.unwrap_or(1000),
        workers: workers.min(connections as usize).max(1),
        limit: args.timeout.map(|t| (t, crate::later(Instant::now(), t))),
    };
    let (port, workers) = Port::builder()
        .workers(plan.workers)
        .backend(args.backend.get)
        .build::<u32, Io>()
        .map_err(|e| crate::serve::port_error(&e, Some(plan.workers)))?;
    // A stop signal ends the load early, with the report of what was measured until then.
    let signalled = Arc::new(AtomicI32::new(0));
    // When the first stop signal came: every worker's window, and this thread's, close then.
    let stopped_at = Arc::new(OnceLock::new());
    let signals = signal_hook::iterator::Signals::new(crate::serve::stop_signals())
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    {
        let signalled = Arc::clone(&signalled);
        let stopped_at = Arc::clone(&stopped_at);
        let port = port.clone();
        crate::serve::on_stop_signals(signals, "the load's end", move |sig| {
            let at = *stopped_at.get_or_init(Instant::now);
            // Set after the moment, which whoever sees it may then read.
            signalled.store(sig, Ordering::Release);
            for w in 0..port.workers() {
                // A worker gone already has nothing left to stop.
                let _ = port.post(w, Packet::new(Io::Stop(at)));
            }
        })?;
    }
    let began = Instant::now();
    let (started, start_rx) = mpsc::channel();
    let gate = Arc::new(Gate {
        opening: AtomicUsize::new(workers.len()),
        started,
    });
    let mut threads = Vec::with_capacity(workers.len());
    for w in workers {
        let gate = Arc::clone(&gate);
        let spawned = std::thread::Builder::new()
            .name(format!("client-{}", w.index()))
            .spawn(move || {
                let _guard = ShutdownOnPanic(w.port());
                Client::new(w, plan, gate).run()
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                // The workers already running stop at the shutdown (they wait at the gate).
                port.shutdown();
                for t in threads {
                    let _ = t.join();
                }
                return Err(format!(
                    "--workers {}: cannot start a worker thread: {e}",
                    plan.workers
                ));
            }
        }
    }
    drop(gate);
    // No start when every worker ended first (its sender dropped with the last one).
    let start = start_rx.recv().ok();
    let mark = |line: &str| {
        if args.mark_window {
            crate::to_stderr(&format!("{line}\n"));
        }
    };
    // A duration's window: from the end of the warm-up to the deadline (cut short when every
    // worker ended first).
    let mut window = None;
    if let Some(start) = start {
        match plan.until(start) {
            Until::Window { open, close } => {
                let opened = wait_until(open, &threads, &signalled, &stopped_at);
                mark(WINDOW_OPEN);
                let closed = wait_until(close, &threads, &signalled, &stopped_at);
                mark(WINDOW_CLOSED);
                window = Some((opened, closed));
            }
            Until::Messages(_) => mark(WINDOW_OPEN),
        }
    }
    let mut summary = Summary {
        server: args.connect.to_string(),
        backend: port.backend().to_owned(),
        ..Summary::default()
    };
    let mut last = None;
    let mut ended = Some(began);
    let mut panicked = false;
    let mut cut_short = false;
    for t in threads {
        let Ok(tally) = t.join() else {
            panicked = true;
            continue;
        };
        summary.connections += tally.connections;
        summary.messages += tally.messages;
        summary.bytes += tally.bytes;
        summary.verified += tally.verified;
        summary.latency.merge(&tally.latency);
        summary.errors.merge(&tally.errors);
        summary.mismatches += tally.mismatches;
        last = last.max(tally.last);
        ended = ended.max(tally.ended);
        cut_short |= tally.cut_short;
    }
    // A signal that came once the load was over (its last echoes coming back) cut nothing.
    let sig = if cut_short {
        signalled.load(Ordering::Acquire)
    } else {
        0
    };
    if panicked {
        if start.is_some() && window.is_none() {
            // A harness that saw the window open waits for it to close.
            mark(WINDOW_CLOSED);
        }
        return Err("a client worker panicked".to_owned());
    }
    // With a window, what counts is what it measured: echoes of the warm-up, or drained after
    // the deadline, are checked but not counted.
    let counted = match plan.duration {
        Some(_) => summary.messages,
        None => summary.verified,
    };
    if summary.connections > 0 && counted == 0 && summary.ok() {
        // Connections opened, but nothing was measured: a run of no messages does not pass.
        summary.errors.add_kind(&match plan.duration {
            _ if sig != 0 => {
                format!("nothing measured: signal {sig} ended the load before any echo counted")
            }
            Some(d) if summary.verified == 0 => format!(
                "nothing checked: --duration {} s ended before the first message went out",
                d.as_secs_f64()
            ),
            Some(d) => format!(
                "nothing measured: no message was echoed within the --duration {} s window",
                d.as_secs_f64()
            ),
            None => "nothing checked: no message went out".to_owned(),
        });
    }
    summary.setup = start.map_or_else(|| began.elapsed(), |s| s - began);
    if let Some((opened, closed)) = window {
        // Every worker ended before the deadline: the window closed when the last one did,
        // not when this thread noticed (up to `END_CHECK` later).
        let closed = ended.map_or(closed, |e| closed.min(e.max(opened)));
        summary.warmup = opened.saturating_duration_since(start.unwrap_or(opened));
        summary.elapsed = closed.saturating_duration_since(opened);
    } else if let Some(start) = start {
        // A message count's window: from the start to the last message.
        mark(WINDOW_CLOSED);
        summary.elapsed = last.unwrap_or(start).saturating_duration_since(start);
    }
    if args.json {
        crate::to_stdout(&format!("{}\n", summary.render_json()))?;
    } else {
        crate::to_stdout(&summary.render_text())?;
    }
    if sig != 0 {
        crate::to_stderr(&format!(
            "ringport: signal {sig}: the load ended early; the report covers it until then\n"
        ));
    }
    Ok(if !summary.ok() {
        ExitCode::FAILURE
    } else if sig != 0 {
        // Every echo checked, but not the run asked for: a script must not take it for one.
        ExitCode::from(u8::try_from(128 + sig).unwrap_or(1))
    } else {
        ExitCode::SUCCESS
    })
}

/// The receive buffer of a connection: room for its pipeline's echo, within bounds.
fn recv_buffer(size: usize, pipeline: u64) -> usize {
    (size as u64 * pipeline).clamp(512, 256 << 10) as usize
}

/// The memory this process may still take, in bytes: `MemAvailable` from `/proc/meminfo`, or
/// less where the process's cgroup (v2) has a `memory.max` closer to its `memory.current` (in
/// a container, going past that gets the process killed without a word). `None` where neither
/// can be read.
fn available_memory() -> Option<u64> {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| mem_available(&t));
    let group = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| {
            let path = t.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
            let dir = format!("/sys/fs/cgroup{}", path.trim_end_matches('/'));
            let max = std::fs::read_to_string(format!("{dir}/memory.max")).ok()?;
            let current = std::fs::read_to_string(format!("{dir}/memory.current")).ok()?;
            cgroup_room(&max, &current)
        });
    match (machine, group) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The range of local ports the kernel picks from for a connection
/// (`/proc/sys/net/ipv4/ip_local_port_range`, which IPv6 uses too); `None` where it cannot be
/// read.
fn local_port_range() -> Option<(u16, u16)> {
    port_range(&std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?)
}

/// The two ports of an `ip_local_port_range` text, low first.
fn port_range(text: &str) -> Option<(u16, u16)> {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(low)), Some(Ok(high)), None) = (ports.next(), ports.next(), ports.next()) else {
        return None;
    };
    Some((low.min(high), low.max(high)))
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// What a cgroup's `memory.max` leaves above its `memory.current`; `None` without a limit
/// (`max`) or where either cannot be read.
fn cgroup_room(max: &str, current: &str) -> Option<u64> {
    let max: u64 = max.trim().parse().ok()?;
    let current: u64 = current.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Sleeps until `deadline`, until every worker has ended or until a signal stopped the load
/// (`signalled` non-zero), whichever comes first, and returns that moment (for a signal, when
/// it came: `stopped_at`, not when this thread noticed).
fn wait_until(
    deadline: Instant,
    threads: &[std::thread::JoinHandle<Tally>],
    signalled: &AtomicI32,
    stopped_at: &OnceLock<Instant>,
) -> Instant {
    loop {
        let now = Instant::now();
        if signalled.load(Ordering::Acquire) != 0 {
            return stopped_at.get().copied().unwrap_or(now).min(deadline);
        }
        if threads.iter().all(std::thread::JoinHandle::is_finished) {
            return now.min(deadline);
        }
        if now >= deadline {
            return deadline;
        }
        std::thread::sleep(END_CHECK.min(deadline - now));
    }
}

struct Client {
    worker: Worker<u32, Io>,
    port: Port<u32, Io>,
    plan: Plan,
    gate: Arc<Gate>,
    /// Whether this worker has told the gate its connections are open.
    arrived: bool,
    /// The end of the load, once it has started.
    until: Option<Until>,
    /// When it was told to stop early (see [`Io::Stop`]).
    stopped: Option<Instant>,
    /// The next connection index this worker opens.
    next: u32,
    connecting: usize,
    conns: HashMap<u32, Conn>,
    /// Connections finished (successfully or not).
    done: u32,
    /// When the batch being handled was taken: the time its echoes arrived, for every one of
    /// them (handling the batch's earlier completions, which verify and refill, is not the
    /// later ones' latency).
    taken: Instant,
    /// How many connections this worker owns.
    owned: u32,
    tally: Tally,
}

impl Client {
    fn new(worker: Worker<u32, Io>, plan: Plan, gate: Arc<Gate>) -> Self {
        let index = worker.index() as u32;
        let step = plan.workers as u32;
        let owned = plan.connections.saturating_sub(index).div_ceil(step);
        Client {
            port: worker.port(),
            worker,
            plan,
            gate,
            arrived: false,
            until: None,
            stopped: None,
            next: index,
            connecting: 0,
            conns: HashMap::new(),
            done: 0,
            taken: Instant::now(),
            owned,
            tally: Tally::default(),
        }
    }

    fn run(mut self) -> Tally {
        let mut batch = Vec::with_capacity(64);
        self.open_more();
        self.arrive_when_open();
        while self.done < self.owned {
            // Waiting at the gate for the other workers to open their connections is not a
            // stall: a worker that stalls while opening leaves the loop and arrives below.
            let limit = if self.arrived && self.until.is_none() {
                None
            } else {
                Some(STALL_LIMIT)
            };
            // What is in flight has 10 s to come back once the load has ended: at the
            // window's close, or, for a message count, at the stop signal.
            let load_end_limit = match (self.until, self.stopped) {
                (Some(Until::Window { close, .. }), _) => Some(crate::later(close, FINISH_LIMIT)),
                (_, Some(at)) => Some(crate::later(at, FINISH_LIMIT)),
                _ => None,
            };
            let given_up = self.plan.limit.map(|(_, at)| at);
            let finish_by = match (load_end_limit, given_up) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let now = Instant::now();
            if given_up.is_some_and(|t| now >= t) {
                let secs = self.plan.limit.map_or(0.0, |(d, _)| d.as_secs_f64());
                self.give_up(
                    &format!("within --timeout {secs} s"),
                    &format!("--timeout {secs} s passed"),
                );
                break;
            }
            if finish_by.is_some_and(|t| now >= t) {
                if matches!(self.until, Some(Until::Window { .. })) {
                    self.give_up(
                        "within 10 s of the deadline",
                        "echo incomplete 10 s after the deadline",
                    );
                } else {
                    self.give_up(
                        "within 10 s of the stop signal",
                        "not finished 10 s after the stop signal",
                    );
                }
                break;
            }
            let limit = match (limit, finish_by) {
                (Some(l), Some(t)) => Some(l.min(t - now)),
                (None, Some(t)) => Some(t - now),
                (l, None) => l,
            };
            match self.worker.dequeue_batch(&mut batch, 64, limit) {
                Ok(_) => {
                    self.taken = Instant::now();
                    for c in batch.drain(..) {
                        self.complete(c);
                    }
                }
                // The window's finish limit: the loop gives the rest up.
                Err(ringport::WaitError::TimedOut)
                    if finish_by.is_some_and(|t| Instant::now() >= t) => {}
                Err(ringport::WaitError::TimedOut) => {
                    self.give_up("(no completion for 30 s)", "no completion for 30 s");
                    break;
                }
                Err(e) => {
                    // Every connection this worker still had ends with it, counted and closed.
                    let e = std::io::Error::from(e);
                    let why = format!("the client's wait failed: {}", describe(&e));
                    self.abandon(&why, &why);
                    break;
                }
            }
        }
        // A worker that ends before it has opened everything still lets the others start.
        self.arrive();
        self.tally.ended = Some(Instant::now());
        self.tally
    }

    /// Counts every connection not finished as an error, and closes those open: `timed out:
    /// the server did not close its side {when}` for those waiting for the server's close,
    /// `timed out: {otherwise}` for the rest (connections still being opened included).
    fn give_up(&mut self, when: &str, otherwise: &str) {
        self.abandon(
            &format!("timed out: the server did not close its side {when}"),
            &format!("timed out: {otherwise}"),
        );
    }

    /// Ends every connection this worker still has, each counted as an error: `closing` for
    /// one that waited for the server to close its side, `otherwise` for the rest, those not
    /// yet opened included.
    fn abandon(&mut self, closing: &str, otherwise: &str) {
        let open: Vec<u32> = self.conns.keys().copied().collect();
        for index in open {
            let what = if self.conns.get(&index).is_some_and(|c| c.closing) {
                closing
            } else {
                otherwise
            };
            self.fail(index, what);
        }
        let left = u64::from(self.owned - self.done);
        for _ in 0..left {
            self.tally.errors.add_kind(otherwise);
        }
        self.done = self.owned;
    }

    fn open_more(&mut self) {
        while self.connecting < CONNECTS_IN_FLIGHT && self.next < self.plan.connections {
            let index = self.next;
            self.next += self.plan.workers as u32;
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(self.plan.addr),
                socket2::Type::STREAM.cloexec(),
                None,
            );
            let handle =
                socket.and_then(|s| self.port.associate_with(self.worker.index(), s, index));
            match handle {
                Ok(h) => {
                    self.worker
                        .submit(Op::connect(&h, self.plan.addr), Io::Connect);
                    self.connecting += 1;
                }
                Err(e) => {
                    self.tally
                        .errors
                        .add_kind(&format!("socket: {}", describe(&e)));
                    self.done += 1;
                }
            }
        }
    }

    /// Tells the gate once every connection this worker owns is open (or has failed); the last
    /// worker to do so starts the load everywhere.
    fn arrive_when_open(&mut self) {
        if self.connecting == 0 && self.next >= self.plan.connections {
            self.arrive();
        }
    }

    /// Tells the gate this worker is done opening (once).
    fn arrive(&mut self) {
        if self.arrived {
            return;
        }
        self.arrived = true;
        if self.gate.opening.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let start = Instant::now();
        let until = self.plan.until(start);
        for w in 0..self.plan.workers {
            // Fails only for a worker that has already ended (all its connections failed),
            // which has nothing left to start.
            let _ = self.worker.post(w, Packet::new(Io::Start(until)));
        }
        let _ = self.gate.started.send(start);
    }

    /// Starts the load on every open connection.
    fn start(&mut self, until: Until) {
        self.until = Some(match self.stopped {
            Some(at) => until.cut_short(at),
            None => until,
        });
        self.each_connection();
    }

    /// Sends what each open connection may, and closes those done.
    fn each_connection(&mut self) {
        let open: Vec<u32> = self.conns.keys().copied().collect();
        for index in open {
            self.try_send(index);
            self.check_done(index);
        }
    }

    /// Ends the load early: a window closes at `now` (when the signal came); no new message goes
    /// out; the connections not opened yet are not (the load starts, and ends at once, on those
    /// open).
    fn stop(&mut self, now: Instant) {
        let step = self.plan.workers as u32;
        let cut = match self.until {
            None => true,
            Some(Until::Window { close, .. }) => now < close,
            Some(Until::Messages(m)) => self.conns.values().any(|c| c.sent_msgs < m),
        };
        self.tally.cut_short |= cut;
        self.stopped.get_or_insert(now);
        if self.next < self.plan.connections {
            self.owned -= (self.plan.connections - self.next).div_ceil(step);
            self.next = self.plan.connections;
            self.arrive_when_open();
        }
        if let Some(until) = self.until {
            self.until = Some(until.cut_short(now));
            self.each_connection();
        }
    }

    fn complete(&mut self, c: Completion<u32, Io>) {
        match c.data {
            Io::Start(until) => return self.start(until),
            Io::Stop(at) => return self.stop(at),
            _ => {}
        }
        let Some(handle) = c.handle.clone() else {
            return;
        };
        let index = *handle.key();
        match c.data {
            Io::Start(_) | Io::Stop(_) => {}
            Io::Connect => {
                self.connecting -= 1;
                match c.result {
                    Ok(_) => {
                        let _ = socket2::SockRef::from(&handle).set_tcp_nodelay(true);
                        self.tally.connections += 1;
                        let seed = 0x9E37_79B9_7F4A_7C15 ^ u64::from(index);
                        let conn = Conn {
                            handle,
                            tx: Stream::new(seed),
                            rx: Stream::new(seed),
                            sent_msgs: 0,
                            received: 0,
                            in_flight: VecDeque::new(),
                            sending: false,
                            spare_send: Vec::new(),
                            closing: false,
                        };
                        self.conns.insert(index, conn);
                        self.post_recv(index, Vec::new());
                        self.try_send(index);
                        self.check_done(index);
                    }
                    Err(e) => {
                        self.tally
                            .errors
                            .add_kind(&format!("connect: {}", describe(&e)));
                        self.done += 1;
                    }
                }
                self.open_more();
                self.arrive_when_open();
            }
            Io::Recv => self.received(index, c),
            Io::Send { sent } => self.sent(index, c, sent),
            Io::Close => {}
        }
    }

    fn post_recv(&mut self, index: u32, mut buf: Vec<u8>) {
        let Some(conn) = self.conns.get(&index) else {
            return;
        };
        let want = recv_buffer(self.plan.size, self.plan.pipeline);
        buf.clear();
        buf.reserve_exact(want);
        self.worker.submit(Op::recv(&conn.handle, buf), Io::Recv);
    }

    /// Sends as many messages as the pipeline allows, as one buffer.
    fn try_send(&mut self, index: u32) {
        let Some(conn) = self.conns.get_mut(&index) else {
            return;
        };
        if conn.sending {
            return;
        }
        let completed = conn.received / self.plan.size as u64;
        let credit = self.plan.pipeline - (conn.sent_msgs - completed);
        let left = match self.until {
            None => 0,
            _ if self.stopped.is_some() => 0,
            Some(Until::Messages(m)) => m - conn.sent_msgs,
            Some(Until::Window { close, .. }) if Instant::now() < close => u64::MAX,
            Some(Until::Window { .. }) => 0,
        };
        let k = credit.min(left);
        if k == 0 {
            return;
        }
        let mut buf = std::mem::take(&mut conn.spare_send);
        // Every byte is overwritten by `fill`: only a buffer that grows is zeroed first.
        buf.resize(k as usize * self.plan.size, 0);
        conn.tx.fill(&mut buf);
        let now = Instant::now();
        conn.in_flight.extend(std::iter::repeat_n(now, k as usize));
        conn.sent_msgs += k;
        conn.sending = true;
        self.worker
            .submit(Op::send(&conn.handle, buf, 0), Io::Send { sent: 0 });
    }

    fn sent(&mut self, index: u32, c: Completion<u32, Io>, before: usize) {
        let buf = c.buf.unwrap_or_default();
        let Some(conn) = self.conns.get_mut(&index) else {
            return;
        };
        match c.result {
            Ok(n) if n > 0 && before + n < buf.len() => {
                let sent = before + n;
                self.worker
                    .submit(Op::send(&conn.handle, buf, sent), Io::Send { sent });
            }
            Ok(n) if n > 0 || buf.is_empty() => {
                conn.sending = false;
                conn.spare_send = buf;
                self.try_send(index);
                // The last echo may have come back before this completion.
                self.check_done(index);
            }
            Ok(_) => self.fail(index, "send: no progress"),
            Err(e) => self.fail(index, &format!("send: {}", describe(&e))),
        }
    }

    fn received(&mut self, index: u32, c: Completion<u32, Io>) {
        let buf = c.buf.unwrap_or_default();
        let Some(conn) = self.conns.get_mut(&index) else {
            return;
        };
        match c.result {
            // The server's close after the client's, with nothing more: done.
            Ok(0) if conn.closing => self.finish(index),
            Ok(0) => {
                tracing::debug!(
                    "connection {index}: server closed the connection after {} of {} bytes",
                    conn.rx.position(),
                    conn.sent_msgs * self.plan.size as u64
                );
                self.fail(index, "server closed the connection early");
            }
            Ok(_) => {
                let size = self.plan.size as u64;
                // What could be echo of what was sent is checked; the bytes before a wrong
                // one (or before more than was sent) count, as echoes that came back right.
                let room = (conn.sent_msgs * size).saturating_sub(conn.received);
                let fits = (buf.len() as u64).min(room) as usize;
                let checked = conn.rx.verify(&buf[..fits]);
                let good = match &checked {
                    Ok(()) => fits as u64,
                    Err(m) => m.offset.saturating_sub(conn.received),
                };
                let before = conn.received / size;
                conn.received += good;
                self.tally.verified += good;
                let now = self.taken;
                let counted = match self.until {
                    Some(Until::Window { open, close }) => open <= now && now < close,
                    _ => true,
                };
                if counted && good > 0 {
                    self.tally.bytes += good;
                    self.tally.last = Some(now);
                }
                for _ in before..conn.received / size {
                    if let Some(t) = conn.in_flight.pop_front() {
                        if counted {
                            self.tally.latency.record(now - t);
                            self.tally.messages += 1;
                        }
                    }
                }
                if let Err(m) = checked {
                    let what = format!("connection {index}: {m}");
                    self.tally.mismatches += 1;
                    self.first_mismatch(&what);
                    self.fail(index, "echo mismatch");
                    return;
                }
                if fits < buf.len() {
                    let what = format!(
                        "connection {index}: {} bytes came back, {} were sent",
                        conn.received + (buf.len() - fits) as u64,
                        conn.sent_msgs * size
                    );
                    self.tally.mismatches += 1;
                    self.first_mismatch(&what);
                    self.fail(index, "echo mismatch: more bytes came back than were sent");
                    return;
                }
                self.try_send(index);
                // Done or not, a receive waits: for more echo, or for the server's close.
                self.check_done(index);
                self.post_recv(index, buf);
            }
            Err(e) => self.fail(index, &format!("receive: {}", describe(&e))),
        }
    }

    /// Logs the first mismatch this worker sees, with where it is (the rest are counted).
    fn first_mismatch(&self, what: &str) {
        if self.tally.mismatches == 1 {
            tracing::warn!("echo mismatch: {what}");
        }
    }

    /// Once a connection has nothing more to do, shuts down its sending side: the server is
    /// then to close its own, with nothing more (the receive armed sees which).
    fn check_done(&mut self, index: u32) {
        let Some(conn) = self.conns.get_mut(&index) else {
            return;
        };
        if conn.closing {
            return;
        }
        let size = self.plan.size as u64;
        let drained = conn.received >= conn.sent_msgs * size && !conn.sending;
        let done = match self.until {
            None => false,
            Some(Until::Messages(m)) => {
                conn.received >= m.saturating_mul(size) || (self.stopped.is_some() && drained)
            }
            Some(Until::Window { close, .. }) => Instant::now() >= close && drained,
        };
        if done {
            conn.closing = true;
            let shut = conn.handle.shutdown(std::net::Shutdown::Write);
            match shut {
                // Reset by the peer meanwhile: the armed receive says so.
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => {}
                Err(e) => self.fail(index, &format!("shutdown: {}", describe(&e))),
                Ok(()) => {}
            }
        }
    }

    fn fail(&mut self, index: u32, what: &str) {
        self.tally.errors.add_kind(what);
        self.finish(index);
    }

    fn finish(&mut self, index: u32) {
        if let Some(conn) = self.conns.remove(&index) {
            self.worker.submit(Op::close(&conn.handle), Io::Close);
            self.done += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_to_spare_is_the_smaller_of_the_machines_and_the_cgroups() {
        let meminfo = "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(mem_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(
            cgroup_room("1073741824\n", "73741824\n"),
            Some(1_000_000_000)
        );
        // No limit, or over it already.
        assert_eq!(cgroup_room("max\n", "73741824\n"), None);
        assert_eq!(cgroup_room("100\n", "200\n"), Some(0));
    }

    #[test]
    fn the_local_port_range_is_read_low_first() {
        assert_eq!(port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(port_range("61000 1024"), Some((1024, 61000)));
        assert_eq!(port_range("32768\n"), None);
        assert_eq!(port_range("1 2 3"), None);
        assert_eq!(port_range("1024 70000"), None);
    }
}
