//! The load generator: many connections on a ringport port, random payloads, every echoed byte
//! verified, latency per message.
//!
//! Each worker owns the connections `index, index + workers, ...`: it opens them (a bounded
//! number of connects at a time), keeps up to `pipeline` messages in flight on each (one send
//! and one receive outstanding per connection), and checks each echoed byte against the
//! connection's own deterministic stream.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ringport::{Completion, Handle, Op, Port, Worker};

use super::errors::{describe, ErrorCounts};
use super::payload::Stream;
use super::stats::{Recorder, Summary};
use crate::ClientArgs;

/// Connects in flight per worker.
const CONNECTS_IN_FLIGHT: usize = 256;
/// With no completion at all for this long, the remaining connections are given up.
const STALL_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
enum Until {
    Messages(u64),
    Deadline(Instant),
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    addr: SocketAddr,
    connections: u32,
    size: usize,
    pipeline: u64,
    until: Until,
    workers: usize,
}

/// The per-I/O data.
#[derive(Debug)]
enum Io {
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
}

/// One worker's results.
#[derive(Default)]
struct Tally {
    connections: u64,
    messages: u64,
    bytes: u64,
    latency: Recorder,
    errors: ErrorCounts,
    mismatches: u64,
}

pub fn run(args: &ClientArgs) -> Result<ExitCode, String> {
    let connections = args.connections.unwrap_or(1);
    let size = args.size.unwrap_or(64) as usize;
    let pipeline = u64::from(args.pipeline.unwrap_or(1));
    // One send carries up to `pipeline` messages: keep that buffer reasonable.
    if (size as u64).saturating_mul(pipeline) > 1 << 30 {
        return Err(format!(
            "--size {size} x --pipeline {pipeline}: more than 1 GiB in flight per connection"
        ));
    }
    let until = match (args.messages, args.duration) {
        // Counted from the start of the load, below.
        (_, Some(_)) => Until::Deadline(Instant::now()),
        (Some(m), None) => Until::Messages(m),
        (None, None) => Until::Messages(1000),
    };
    let workers = args.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    );
    let mut plan = Plan {
        addr: args.connect,
        connections,
        size,
        pipeline,
        until,
        workers: workers.min(connections as usize).max(1),
    };
    let (port, workers) = Port::builder()
        .workers(plan.workers)
        .backend(args.backend.get)
        .build::<u32, Io>()
        .map_err(|e| crate::serve::port_error(&e))?;
    let start = Instant::now();
    if let Some(d) = args.duration {
        // Counted from here, after setup; a duration too long to add runs for a year.
        let end = start
            .checked_add(d)
            .unwrap_or_else(|| start + Duration::from_secs(365 * 24 * 3600));
        plan.until = Until::Deadline(end);
    }
    let threads: Vec<_> = workers
        .into_iter()
        .map(|w| std::thread::spawn(move || Client::new(w, plan).run()))
        .collect();
    let mut summary = Summary {
        backend: port.backend().to_owned(),
        ..Summary::default()
    };
    for t in threads {
        let tally = t
            .join()
            .map_err(|_| "a client worker panicked".to_owned())?;
        summary.connections += tally.connections;
        summary.messages += tally.messages;
        summary.bytes += tally.bytes;
        summary.latency.merge(&tally.latency);
        summary.errors.merge(&tally.errors);
        summary.mismatches += tally.mismatches;
    }
    summary.elapsed = start.elapsed();
    if args.json {
        crate::to_stdout(&format!("{}\n", summary.render_json()));
    } else {
        crate::to_stdout(&summary.render_text());
    }
    Ok(if summary.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

struct Client {
    worker: Worker<u32, Io>,
    port: Port<u32, Io>,
    plan: Plan,
    /// The next connection index this worker opens.
    next: u32,
    connecting: usize,
    conns: HashMap<u32, Conn>,
    /// Connections finished (successfully or not).
    done: u32,
    /// How many connections this worker owns.
    owned: u32,
    tally: Tally,
}

impl Client {
    fn new(worker: Worker<u32, Io>, plan: Plan) -> Self {
        let index = worker.index() as u32;
        let step = plan.workers as u32;
        let owned = plan.connections.saturating_sub(index).div_ceil(step);
        Client {
            port: worker.port(),
            worker,
            plan,
            next: index,
            connecting: 0,
            conns: HashMap::new(),
            done: 0,
            owned,
            tally: Tally::default(),
        }
    }

    fn run(mut self) -> Tally {
        let mut batch = Vec::with_capacity(64);
        self.open_more();
        while self.done < self.owned {
            match self.worker.dequeue_batch(&mut batch, 64, Some(STALL_LIMIT)) {
                Ok(_) => {
                    for c in batch.drain(..) {
                        self.complete(c);
                    }
                }
                Err(ringport::WaitError::TimedOut) => {
                    let left = u64::from(self.owned - self.done);
                    for _ in 0..left {
                        self.tally
                            .errors
                            .add_kind("timed out (no completion for 30 s)");
                    }
                    break;
                }
                Err(e) => {
                    self.tally.errors.add(&std::io::Error::from(e));
                    break;
                }
            }
        }
        self.tally
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

    fn complete(&mut self, c: Completion<u32, Io>) {
        let Some(handle) = c.handle.clone() else {
            return;
        };
        let index = *handle.key();
        match c.data {
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
        let want = (self.plan.size as u64 * self.plan.pipeline).clamp(512, 64 << 10) as usize;
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
        let left = match self.plan.until {
            Until::Messages(m) => m - conn.sent_msgs,
            Until::Deadline(d) if Instant::now() < d => u64::MAX,
            Until::Deadline(_) => 0,
        };
        let k = credit.min(left);
        if k == 0 {
            return;
        }
        let mut buf = std::mem::take(&mut conn.spare_send);
        buf.clear();
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
            Ok(0) => {
                tracing::debug!(
                    "connection {index}: server closed the connection after {} of {} bytes",
                    conn.rx.position(),
                    conn.sent_msgs * self.plan.size as u64
                );
                self.fail(index, "server closed the connection early");
            }
            Ok(_) => {
                if let Err(m) = conn.rx.verify(&buf) {
                    self.tally.mismatches += 1;
                    tracing::debug!("connection {index}: {m}");
                    self.fail(index, "echo mismatch");
                    return;
                }
                let size = self.plan.size as u64;
                let before = conn.received / size;
                conn.received += buf.len() as u64;
                self.tally.bytes += buf.len() as u64;
                let now = Instant::now();
                for _ in before..conn.received / size {
                    if let Some(t) = conn.in_flight.pop_front() {
                        self.tally.latency.record(now - t);
                        self.tally.messages += 1;
                    }
                }
                self.try_send(index);
                if !self.check_done(index) {
                    self.post_recv(index, buf);
                }
            }
            Err(e) => self.fail(index, &format!("receive: {}", describe(&e))),
        }
    }

    /// Finishes the connection if it has nothing more to do.
    fn check_done(&mut self, index: u32) -> bool {
        let Some(conn) = self.conns.get(&index) else {
            return true;
        };
        let size = self.plan.size as u64;
        let done = match self.plan.until {
            Until::Messages(m) => conn.received >= m.saturating_mul(size),
            Until::Deadline(d) => {
                Instant::now() >= d && conn.received >= conn.sent_msgs * size && !conn.sending
            }
        };
        if done {
            self.finish(index);
        }
        done
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
