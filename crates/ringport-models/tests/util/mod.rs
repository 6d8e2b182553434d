//! Helpers shared by the test files: a server on a thread, clients whose every wait is bounded.

#![allow(dead_code)] // Each test file uses a different part of this module.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use ringport_models::{serve, Config, Model, Stats, Stop};

/// The bound on every wait of a test: a connect, a read, a write, the server's return.
pub const WAIT: Duration = Duration::from_secs(20);

/// A server running on its own thread.
pub struct Server {
    pub model: Model,
    pub addr: SocketAddr,
    pub stop: Stop,
    result: Option<mpsc::Receiver<io::Result<Stats>>>,
}

/// Starts `model` with a 10 s drain, or returns `None` (and says so) where the kernel lacks
/// what the model needs.
pub fn start(model: Model) -> Option<Server> {
    start_with(
        model,
        Config {
            drain_timeout: Duration::from_secs(10),
        },
    )
}

/// Starts `model` with `config` (see [`start`]).
pub fn start_with(model: Model, config: Config) -> Option<Server> {
    start_after(model, config, |_| ()).map(|(server, ())| server)
}

/// Starts `model` with `config` (see [`start`]) once `before` has run with the listener's
/// address: clients it connects wait in the listener's backlog when the model starts.
pub fn start_after<T>(
    model: Model,
    config: Config,
    before: impl FnOnce(SocketAddr) -> T,
) -> Option<(Server, T)> {
    start_on_listener(model, config, |l| {
        before(l.local_addr().expect("local_addr"))
    })
}

/// Starts `model` (see [`start`]), and returns a second descriptor of its listener too, with
/// which a test can break the listener under the server.
pub fn start_keeping_listener(model: Model) -> Option<(Server, TcpListener)> {
    let config = Config {
        drain_timeout: Duration::from_secs(10),
    };
    start_on_listener(model, config, |l| {
        l.try_clone().expect("a second descriptor of the listener")
    })
}

/// Starts `model` (see [`start`]) on `listener`, whatever socket it is.
pub fn start_on(model: Model, listener: TcpListener) -> Option<Server> {
    init_tracing();
    if let Some(why) = unsupported(model) {
        eprintln!("SKIPPED: {model}: {why}");
        return None;
    }
    let config = Config {
        drain_timeout: Duration::from_secs(10),
    };
    Some(spawn(
        model,
        config,
        listener,
        Stop::new().expect("Stop::new"),
    ))
}

/// Starts `model` with `config` (see [`start`]) once `before` has run with its listener.
fn start_on_listener<T>(
    model: Model,
    config: Config,
    before: impl FnOnce(&TcpListener) -> T,
) -> Option<(Server, T)> {
    init_tracing();
    if let Some(why) = unsupported(model) {
        eprintln!("SKIPPED: {model}: {why}");
        return None;
    }
    // Listener and stop first, so that they get low descriptors. A backlog of 1024 (std's is
    // 128) lets `before` queue hundreds of clients.
    let listener = listen_on_loopback(1024);
    let stop = Stop::new().expect("Stop::new");
    let waiting = before(&listener);
    Some((spawn(model, config, listener, stop), waiting))
}

/// Runs `model` on `listener` on a thread of its own.
fn spawn(model: Model, config: Config, listener: TcpListener, stop: Stop) -> Server {
    let addr = listener.local_addr().expect("local_addr");
    let (tx, rx) = mpsc::channel();
    let server_stop = stop.clone();
    thread::Builder::new()
        .name(format!("serve-{model}"))
        .spawn(move || {
            let _ = tx.send(serve(model, listener, &config, &server_stop));
        })
        .expect("spawn the server");
    Server {
        model,
        addr,
        stop,
        result: Some(rx),
    }
}

impl Server {
    /// Triggers the stop and waits (bounded) for `serve` to return; panics on an error.
    pub fn stop(mut self) -> Stats {
        self.stop.trigger();
        let rx = self.result.take().expect("not stopped yet");
        match rx.recv_timeout(WAIT) {
            Ok(Ok(stats)) => stats,
            Ok(Err(e)) => panic!("{}: serve failed: {e}", self.model),
            Err(e) => panic!("{}: serve did not return within {WAIT:?}: {e}", self.model),
        }
    }

    /// Waits (bounded) for `serve` to return by itself, and returns what it returned.
    pub fn wait(mut self) -> io::Result<Stats> {
        let rx = self.result.take().expect("not stopped yet");
        rx.recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("{}: serve did not return within {WAIT:?}: {e}", self.model))
    }

    /// A client connected to the server.
    pub fn connect(&self) -> TcpStream {
        connect(self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A test that failed half-way does not leave a server running.
        self.stop.trigger();
    }
}

/// A listener on a free loopback port with room for `backlog` waiting connections.
fn listen_on_loopback(backlog: i32) -> TcpListener {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("address");
    socket.bind(&addr.into()).expect("bind");
    socket.listen(backlog).expect("listen");
    socket.into()
}

/// Why `model` cannot run here, if it cannot. With `RINGPORT_TEST_URING=require` (CI) the
/// io_uring model always runs, so that a machine refusing io_uring fails its tests.
pub fn unsupported(model: Model) -> Option<String> {
    if !peer_common::uring_check::refusal_skips() {
        return None;
    }
    match model {
        Model::Uring => uring_unsupported(),
        _ => None,
    }
}

/// Why the io_uring model cannot run here, if it cannot; asked once, on a thread of its own (a
/// thread that created a ring is interrupted when the ring is torn down, and a test's next read
/// with a timeout would fail with `EINTR`).
fn uring_unsupported() -> Option<String> {
    static WHY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    WHY.get_or_init(|| {
        thread::spawn(probe_uring)
            .join()
            .unwrap_or_else(|_| Some("the io_uring probe panicked".into()))
    })
    .clone()
}

/// Sets up a ring and checks the opcodes the io_uring model uses. Only the kernel's refusal
/// of io_uring, or a kernel without an opcode, skips; any other failure (a probe that fails,
/// locked memory short) lets the tests run, and fail.
fn probe_uring() -> Option<String> {
    match io_uring::IoUring::new(4) {
        Ok(ring) => {
            let mut probe = io_uring::Probe::new();
            if ring.submitter().register_probe(&mut probe).is_err() {
                return None;
            }
            let needed = [
                io_uring::opcode::Accept::CODE,
                io_uring::opcode::Recv::CODE,
                io_uring::opcode::Send::CODE,
                io_uring::opcode::PollAdd::CODE,
                io_uring::opcode::Timeout::CODE,
                io_uring::opcode::AsyncCancel::CODE,
                io_uring::opcode::LinkTimeout::CODE,
            ];
            needed
                .iter()
                .find(|&&op| !probe.is_supported(op))
                .map(|op| format!("io_uring lacks opcode {op}"))
        }
        Err(e) if peer_common::uring_check::names_refusal(&e.to_string()) => {
            Some(format!("io_uring unavailable: {e}"))
        }
        Err(_) => None,
    }
}

/// Logs to the test's output at the level `RUST_LOG` asks for (none by default).
pub fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(tracing_subscriber::EnvFilter::from_default_env()),
        )
        .with(Warnings)
        .try_init();
}

/// Every warning logged so far in this test process, by any test.
static WARNINGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Keeps the message of every event at `WARN` or above in [`WARNINGS`].
struct Warnings;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        if *event.metadata().level() <= tracing::Level::WARN {
            let mut message = Message(String::new());
            event.record(&mut message);
            WARNINGS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(message.0);
        }
    }
}

/// Waits (up to [`WAIT`]) for a warning containing every one of `texts` to be logged; false if
/// none was.
pub fn warned(texts: &[&str]) -> bool {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let seen = WARNINGS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|w| texts.iter().all(|t| w.contains(t)));
        if seen || std::time::Instant::now() >= deadline {
            return seen;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A connected client whose reads and writes time out after [`WAIT`].
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    stream.set_write_timeout(Some(WAIT)).expect("write timeout");
    stream
}

/// `len` bytes that differ from connection to connection (`seed`) and are not periodic.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// Sends `payload` from a writer thread, then half-closes; reads on this thread until EOF and
/// returns what came back.
pub fn echo_through(stream: TcpStream, payload: Vec<u8>) -> Vec<u8> {
    let mut writer = stream.try_clone().expect("try_clone");
    let sender = thread::spawn(move || {
        writer.write_all(&payload).expect("write the payload");
        writer.shutdown(Shutdown::Write).expect("shutdown(Write)");
    });
    let mut reader = stream;
    let got = read_to_eof(&mut reader).expect("read the echo to EOF");
    sender.join().expect("writer thread");
    got
}

/// Reads until EOF (an error, a timeout included, loses what was read: see [`read_until_end`]).
pub fn read_to_eof(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut got = Vec::new();
    stream.read_to_end(&mut got)?;
    Ok(got)
}

/// Reads until EOF or an error; returns the bytes and how the stream ended.
pub fn read_until_end(stream: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (got, Err(e)),
        }
    }
}

/// Writes `msg` and reads exactly as many bytes back.
pub fn round_trip(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).expect("write");
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).expect("read the echo");
    assert_eq!(back, msg, "echo differs");
}

/// Asserts that the peer has closed: EOF, or a reset (what a close with unread data gives).
pub fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 1];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(_) => panic!("expected EOF, got data"),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected EOF, got {e}"),
    }
}

/// Sends this process's warnings (only) into a buffer, for the test to read with the returned
/// function. Call it before anything logs: it installs the global subscriber.
pub fn capture_warnings() -> impl Fn() -> String {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || Capture(Arc::clone(&sink)))
        .init();
    move || String::from_utf8_lossy(&log.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
