//! `ringport serve`: the book's completion-port echo server.
//!
//! The listener lives on one worker, which keeps a pool of accepts posted. Each accepted
//! connection is associated with the least-loaded worker and handed to it with a posted packet;
//! from then on only that worker touches the connection, so its state needs no lock. Each
//! connection has one operation outstanding at a time: a receive, or the send echoing what that
//! receive brought (re-posted until every byte is out), so bytes go back in the order they came.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringport::{Completion, Handle, Op, OpId, Packet, Port, Worker};
use tracing::{debug, info, trace, warn};

use crate::client::errors::describe;
use crate::ServeArgs;

/// Receive buffer per connection, as in the book.
const BUFFER_SIZE: usize = 8192;
/// Accepts kept posted on the listener.
const ACCEPT_POOL: usize = 16;
/// Pause before accepting again after running out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Completions taken per wait.
const BATCH: usize = 64;
/// After the drain timeout, how long to wait for the forced closes to complete.
const FORCE_GRACE: Duration = Duration::from_secs(1);

/// The completion key: which socket this is.
#[derive(Debug)]
enum Key {
    Listener,
    Conn(u64),
}

/// The per-I/O data.
#[derive(Debug)]
enum Io {
    Accept,
    /// A pause before re-posting an accept.
    AcceptBackoff,
    /// A new connection for its home worker (a posted packet).
    Adopt,
    /// Start draining (a posted packet).
    Drain,
    Recv,
    /// Echoing a received buffer; `sent` bytes of it are out.
    Send {
        sent: usize,
    },
    Close,
}

struct Conn {
    handle: Handle<Key>,
    /// The receive outstanding, if any (during a drain it is cancelled).
    recv: Option<OpId>,
}

/// Totals for the exit summary.
#[derive(Default)]
struct Totals {
    connections: AtomicU64,
    bytes: AtomicU64,
}

pub fn run(args: &ServeArgs) -> Result<ExitCode, String> {
    let listener = bind(args.listen).map_err(|e| format!("{}: {}", args.listen, describe(&e)))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("{}: {}", args.listen, describe(&e)))?;
    let workers = args.workers.map_or(0, usize::from);
    let (port, workers) = Port::builder()
        .workers(workers)
        .backend(args.backend)
        .build::<Key, Io>()
        .map_err(|e| port_error(&e))?;
    let listener = port
        .associate_with(0, listener, Key::Listener)
        .map_err(|e| format!("{local}: {}", describe(&e)))?;
    info!(
        "listening on {local} backend={} workers={}",
        port.backend(),
        port.workers()
    );

    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let signal_port = port.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut forever = signals.forever();
            if let Some(sig) = forever.next() {
                info!("signal {sig}: draining (stopped accepting; a second signal exits at once)");
                for w in 0..signal_port.workers() {
                    let _ = signal_port.post(w, Packet::new(Io::Drain));
                }
            }
            if let Some(sig) = forever.next() {
                eprintln!("ringport: signal {sig} during the drain: exiting now");
                std::process::exit(130);
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;

    let totals = Arc::new(Totals::default());
    let mut threads = Vec::new();
    for worker in workers {
        let listener = listener.clone();
        let totals = Arc::clone(&totals);
        let drain_timeout = args.drain_timeout;
        let t = std::thread::Builder::new()
            .name(format!("worker-{}", worker.index()))
            .spawn(move || Server::new(worker, listener, drain_timeout).run(&totals))
            .map_err(|e| format!("cannot start a worker thread: {e}"))?;
        threads.push(t);
    }
    drop(listener);
    let mut failed = false;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("ringport: worker failed: {e}");
                failed = true;
            }
            Err(_) => failed = true,
        }
    }
    println!(
        "ringport: served {} connections, echoed {} bytes",
        totals.connections.load(Ordering::Relaxed),
        totals.bytes.load(Ordering::Relaxed)
    );
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Names why the port could not start, and what to do about it.
pub fn port_error(e: &io::Error) -> String {
    let mut msg = format!("cannot start the completion port: {}", describe(e));
    if msg.contains("io_uring is not available") {
        msg.push_str(" (run with --backend auto or --backend epoll)");
    }
    msg
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// One worker's share of the server.
struct Server {
    worker: Worker<Key, Io>,
    port: Port<Key, Io>,
    listener: Option<Handle<Key>>,
    /// Accepts outstanding (on the listener's worker).
    accepts: usize,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    /// Spare receive buffers.
    buffers: Vec<Vec<u8>>,
    drain_timeout: Duration,
    /// Set once draining; past it, remaining connections are closed.
    deadline: Option<Instant>,
    forced: bool,
    connections: u64,
    bytes: u64,
    /// Whether the current run of accept failures was already logged.
    accept_failing: bool,
}

impl Server {
    fn new(worker: Worker<Key, Io>, listener: Handle<Key>, drain_timeout: Duration) -> Self {
        let owns_listener = listener.worker() == worker.index();
        Server {
            port: worker.port(),
            next_id: worker.index() as u64,
            worker,
            listener: owns_listener.then_some(listener),
            accepts: 0,
            conns: HashMap::new(),
            buffers: Vec::new(),
            drain_timeout,
            deadline: None,
            forced: false,
            connections: 0,
            bytes: 0,
            accept_failing: false,
        }
    }

    fn run(mut self, totals: &Totals) -> io::Result<()> {
        if let Some(l) = self.listener.clone() {
            for _ in 0..ACCEPT_POOL {
                self.worker.submit(Op::accept(&l), Io::Accept);
                self.accepts += 1;
            }
        }
        let mut batch = Vec::with_capacity(BATCH);
        let result = loop {
            if self.finished() {
                break Ok(());
            }
            let timeout = self
                .deadline
                .map(|d| d.saturating_duration_since(Instant::now()));
            match self.worker.dequeue_batch(&mut batch, BATCH, timeout) {
                Ok(_) => {
                    for c in batch.drain(..) {
                        self.complete(c);
                    }
                }
                Err(ringport::WaitError::TimedOut) => {}
                Err(e) => break Err(io::Error::from(e)),
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                if self.forced {
                    // The forced closes did not all complete in time: give up waiting.
                    break Ok(());
                }
                self.force_close();
            }
        };
        totals
            .connections
            .fetch_add(self.connections, Ordering::Relaxed);
        totals.bytes.fetch_add(self.bytes, Ordering::Relaxed);
        result
    }

    fn finished(&self) -> bool {
        self.deadline.is_some() && self.conns.is_empty() && self.accepts == 0
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
            Io::Recv => self.received(c),
            Io::Send { sent } => self.sent(c, sent),
            Io::Close => {}
        }
    }

    fn post_accept(&mut self) {
        if let (Some(l), None) = (&self.listener, self.deadline) {
            self.worker.submit(Op::accept(l), Io::Accept);
            self.accepts += 1;
        }
    }

    fn accepted(&mut self, c: Completion<Key, Io>) {
        self.accepts -= 1;
        match c.result {
            Ok(_) => {
                if self.accept_failing {
                    info!("accepting again");
                    self.accept_failing = false;
                }
                if let Some(stream) = c.accepted {
                    self.hand_out(stream);
                }
                self.post_accept();
            }
            Err(_) if c.is_cancelled() || self.deadline.is_some() => {}
            Err(e) => {
                // Out of descriptors or memory, or a connection aborted before it was accepted:
                // keep serving the others; pause when the cause is a resource.
                let resource = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                if resource {
                    if !self.accept_failing {
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
        let _ = stream.set_nodelay(true);
        let id = self.next_id;
        self.next_id += self.port.workers() as u64;
        match self.port.associate(stream, Key::Conn(id)) {
            Ok(h) => {
                let home = h.worker();
                let packet = Packet {
                    bytes: 0,
                    handle: Some(h),
                    data: Io::Adopt,
                };
                if let Err(e) = self.worker.post(home, packet) {
                    warn!("socket {id}: cannot hand to worker {home}: {e}");
                }
            }
            Err(e) => warn!("socket {id}: cannot associate: {}", describe(&e)),
        }
    }

    fn adopt(&mut self, c: Completion<Key, Io>) {
        let Some(handle) = c.handle else { return };
        let Key::Conn(id) = *handle.key() else { return };
        if self.deadline.is_some() {
            debug!("closing socket {id} (draining)");
            return;
        }
        debug!("socket {id} connected");
        self.connections += 1;
        let buf = self.buffers.pop().unwrap_or_default();
        let mut conn = Conn { handle, recv: None };
        post_recv(&mut self.worker, &mut conn, buf);
        self.conns.insert(id, conn);
    }

    fn received(&mut self, c: Completion<Key, Io>) {
        let Some(id) = conn_id(&c) else { return };
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.recv = None;
        let cancelled = c.is_cancelled();
        let buf = c.buf.unwrap_or_default();
        match c.result {
            Ok(n) if n > 0 => {
                trace!("socket {id}: received {n} bytes");
                let h = conn.handle.clone();
                self.worker
                    .submit(Op::send(&h, buf, 0), Io::Send { sent: 0 });
            }
            Ok(_) => {
                self.recycle(buf);
                self.close(id, "peer closed");
            }
            Err(_) if cancelled && self.deadline.is_some() => {
                self.recycle(buf);
                self.close(id, "draining");
            }
            Err(e) => {
                self.recycle(buf);
                self.close(id, &describe(&e));
            }
        }
    }

    fn sent(&mut self, c: Completion<Key, Io>, before: usize) {
        let Some(id) = conn_id(&c) else { return };
        let buf = c.buf.unwrap_or_default();
        match c.result {
            Ok(n) => {
                let sent = before + n;
                self.bytes += n as u64;
                let Some(conn) = self.conns.get_mut(&id) else {
                    return;
                };
                if n > 0 && sent < buf.len() {
                    // A short send: post the rest.
                    let h = conn.handle.clone();
                    self.worker
                        .submit(Op::send(&h, buf, sent), Io::Send { sent });
                } else if n == 0 && sent < buf.len() {
                    self.recycle(buf);
                    self.close(id, "send made no progress");
                } else if self.deadline.is_some() {
                    self.recycle(buf);
                    self.close(id, "draining");
                } else {
                    let mut buf = buf;
                    buf.clear();
                    post_recv(&mut self.worker, conn, buf);
                }
            }
            Err(e) => {
                self.recycle(buf);
                self.close(id, &describe(&e));
            }
        }
    }

    fn drain(&mut self) {
        if self.deadline.is_some() {
            return;
        }
        self.deadline = Some(Instant::now() + self.drain_timeout);
        if let Some(l) = self.listener.take() {
            self.worker.submit(Op::close(&l), Io::Close);
        }
        // Connections waiting for input are done; those echoing finish their send first.
        for conn in self.conns.values_mut() {
            if let Some(op) = conn.recv.take() {
                self.worker.cancel(op);
            }
        }
    }

    fn force_close(&mut self) {
        self.forced = true;
        self.deadline = Some(Instant::now() + FORCE_GRACE);
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        if !ids.is_empty() {
            warn!(
                "drain timeout: closing {} connections still echoing",
                ids.len()
            );
        }
        for id in ids {
            self.close(id, "drain timeout");
        }
    }

    fn close(&mut self, id: u64, why: &str) {
        if let Some(conn) = self.conns.remove(&id) {
            debug!("closing socket {id} ({why})");
            if self.deadline.is_some() {
                // Send FIN now, after everything already echoed, even if input is unread.
                let _ = socket2::SockRef::from(&conn.handle).shutdown(Shutdown::Write);
            }
            self.worker.submit(Op::close(&conn.handle), Io::Close);
        }
    }

    fn recycle(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() == BUFFER_SIZE && self.buffers.len() < 1024 {
            buf.clear();
            self.buffers.push(buf);
        }
    }
}

fn post_recv(worker: &mut Worker<Key, Io>, conn: &mut Conn, mut buf: Vec<u8>) {
    if buf.capacity() < BUFFER_SIZE {
        buf = Vec::with_capacity(BUFFER_SIZE);
    }
    conn.recv = Some(worker.submit(Op::recv(&conn.handle, buf), Io::Recv));
}

fn conn_id(c: &Completion<Key, Io>) -> Option<u64> {
    match c.key()? {
        Key::Conn(id) => Some(*id),
        Key::Listener => None,
    }
}
