//! Shared helpers for the `ringport` binary's integration tests.
//!
//! Every helper here bounds its waits: child processes get a deadline (and are killed when they
//! overrun), sockets get read and write timeouts, and a [`Server`] kills its child when dropped so
//! that no test leaves a server process behind.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use peer_common::uring_check;

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ringport");

/// How long a server may take to print its `listening on` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Read/write timeout on every test socket: a hang guard, not a timing assertion.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Hang guard for short-lived CLI invocations (`--help`, bad input, book-mode client).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// The book's message, as the client sends it.
pub const BOOK_MESSAGE: &str = "A test message from client";

/// Collects everything a child writes to one pipe, line by line, on a background thread, so the
/// pipe never fills; optionally forwards each line to a channel as it arrives.
struct Drain {
    lines: Arc<Mutex<Vec<String>>>,
    handle: Option<JoinHandle<()>>,
}

impl Drain {
    /// Drains a child's stdout, or nothing where the test sent it elsewhere (a file).
    fn spawn_or_empty(pipe: Option<std::process::ChildStdout>) -> Drain {
        match pipe {
            Some(pipe) => Drain::spawn(pipe, None),
            None => Drain::spawn(io::empty(), None),
        }
    }

    fn spawn<R: Read + Send + 'static>(pipe: R, notify: Option<mpsc::Sender<String>>) -> Drain {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let handle = thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_owned();
                        if let Some(tx) = &notify {
                            let _ = tx.send(line.clone());
                        }
                        sink.lock().unwrap().push(line);
                    }
                }
            }
        });
        Drain {
            lines,
            handle: Some(handle),
        }
    }

    /// Everything read so far, joined with newlines.
    fn text(&self) -> String {
        let lines = self.lines.lock().unwrap();
        let mut s = lines.join("\n");
        if !lines.is_empty() {
            s.push('\n');
        }
        s
    }

    /// Waits (bounded) for the writer side to close, then returns everything.
    fn finish(&mut self, deadline: Instant) -> String {
        if let Some(handle) = self.handle.take() {
            while !handle.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        self.text()
    }
}

/// What a finished child left behind.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stdout and stderr together, for "the output contains" checks.
    pub fn combined(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// A description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// Asserts that the process did not panic.
    pub fn assert_no_panic(&self) {
        assert!(
            !self.stderr.contains("panicked") && !self.stdout.contains("panicked"),
            "the binary panicked\n{}",
            self.describe()
        );
    }
}

/// Waits for `child` until `deadline`; on overrun kills it and returns `Err` with what it printed.
fn wait_deadline(
    child: &mut Child,
    out: &mut Drain,
    err: &mut Drain,
    deadline: Instant,
) -> Result<Output, Output> {
    loop {
        match child.try_wait().expect("try_wait on the child") {
            Some(status) => {
                let pipe_deadline = Instant::now() + Duration::from_secs(5);
                return Ok(Output {
                    status,
                    stdout: out.finish(pipe_deadline),
                    stderr: err.finish(pipe_deadline),
                });
            }
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let status = child.wait().expect("wait on the killed child");
                let pipe_deadline = Instant::now() + Duration::from_secs(2);
                return Err(Output {
                    status,
                    stdout: out.finish(pipe_deadline),
                    stderr: err.finish(pipe_deadline),
                });
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    }
}

thread_local! {
    /// The backend the current test runs the binary with (see [`per_backend!`]).
    static BACKEND: std::cell::Cell<&'static str> = const { std::cell::Cell::new("auto") };
}

thread_local! {
    /// The I/O model the current test runs `ringport serve` with (see [`per_model!`]).
    static MODEL: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// Runs `test` with every `ringport serve` this thread starts using `--model model`.
pub fn with_model(model: &'static str, test: fn()) {
    if model == "uring" {
        if let Some(why) = uring_refused() {
            println!("SKIPPED (--model uring): {why}");
            return;
        }
    }
    MODEL.with(|m| m.set(Some(model)));
    eprintln!("model: {model}");
    test();
}

/// The `--model` this thread's servers are started with, if any (those take only `--listen`,
/// `--keepalive` and `--drain-timeout`).
pub fn model() -> Option<&'static str> {
    MODEL.with(|m| m.get())
}

/// Turns each listed function into one test per I/O model of `ringport serve --model`:
/// `models::blocking::NAME`, `models::select::NAME`, ... (the completion port runs them through
/// [`per_backend!`]).
#[macro_export]
macro_rules! per_model {
    ($($name:ident),* $(,)?) => {
        mod models {
            $crate::per_model!(@one blocking; $($name),*);
            $crate::per_model!(@one select; $($name),*);
            $crate::per_model!(@one sigio; $($name),*);
            $crate::per_model!(@one poll; $($name),*);
            $crate::per_model!(@one epoll; $($name),*);
            $crate::per_model!(@one uring; $($name),*);
        }
    };
    (@one $model:ident; $($name:ident),*) => {
        mod $model {
            $(#[test] fn $name() {
                $crate::util::with_model(stringify!($model), super::super::$name)
            })*
        }
    };
}

/// Runs `test` with every `ringport` this thread starts using `backend`.
pub fn with_backend(backend: &'static str, test: fn()) {
    if backend == "uring" {
        if let Some(why) = uring_refused() {
            println!("SKIPPED (io_uring): {why}");
            return;
        }
    }
    BACKEND.with(|b| b.set(backend));
    eprintln!("backend: {backend}");
    test();
}

/// Why the io_uring tests cannot run here, if they cannot: the kernel refuses io_uring (built
/// without it, the sysctl `kernel.io_uring_disabled`, a container's seccomp profile). Always
/// `None` with `RINGPORT_TEST_URING=require` (CI), where such a machine then fails the tests
/// instead of skipping them.
pub fn uring_refused() -> Option<String> {
    static WHY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    WHY.get_or_init(|| {
        if !uring_check::refusal_skips() {
            return None;
        }
        match ringport::Port::builder()
            .workers(1)
            .backend(ringport::Backend::Uring)
            .recv_pool(64 << 10, 1)
            .build::<(), ()>()
        {
            // Only the kernel's own refusal (`EPERM`, `EACCES`, `ENOSYS` from setting a ring
            // up) skips: anything else, a failing probe of the port's included, fails.
            Err(e) if uring_check::names_refusal(&e.to_string()) => Some(e.to_string()),
            _ => None,
        }
    })
    .clone()
}

/// The backend the binary is started with in this test.
pub fn backend() -> &'static str {
    BACKEND.with(|b| b.get())
}

/// Whether the backend in use ends a pooled receive at a byte limit: epoll always, io_uring
/// where the kernel takes the limit (Linux 6.17), as the port finds it.
pub fn receives_end_at_a_limit() -> bool {
    if backend() == "epoll" {
        return true;
    }
    ringport::Port::builder()
        .workers(1)
        .backend(ringport::Backend::Uring)
        .recv_pool(4096, 1)
        .build::<(), ()>()
        .is_ok_and(|(_port, workers)| workers.iter().all(|w| w.recv_limits()))
}

/// Turns each listed function into two tests, `uring::NAME` and `epoll::NAME`: the whole suite
/// runs once per backend.
#[macro_export]
macro_rules! per_backend {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test] fn $name() { $crate::util::with_backend("uring", super::$name) })*
        }
        mod epoll {
            $(#[test] fn $name() { $crate::util::with_backend("epoll", super::$name) })*
        }
    };
}

/// Runs `ringport ARGS`, killing it if it runs past `timeout` (and then failing the test).
pub fn run_cli(args: &[&str], timeout: Duration) -> Output {
    run_cli_configured(args, timeout, |_| {})
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), so that one colour bug does not break every
/// test that reads the log; `cli.rs` checks for colours separately.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses the address out of a `... listening on ADDR ...` log line.
pub fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// A running `ringport` child, its output collected as it comes. Dropping it kills the child.
pub struct Running {
    child: Option<Child>,
    out: Drain,
    err: Drain,
    /// What it is, for messages ("the server").
    what: String,
}

impl Running {
    /// `ringport ARGS`, with the test's backend.
    pub fn spawn(args: &[&str]) -> Running {
        let child = Command::new(BIN)
            .args(args)
            .env("RINGPORT_BACKEND", backend())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the ringport binary");
        Running::collect(child, None, format!("`ringport {}`", args.join(" ")))
    }

    /// Takes `child`'s output pipes, stderr's lines also sent to `lines`.
    fn collect(mut child: Child, lines: Option<mpsc::Sender<String>>, what: String) -> Running {
        let out = Drain::spawn_or_empty(child.stdout.take());
        let err = Drain::spawn(child.stderr.take().unwrap(), lines);
        Running {
            child: Some(child),
            out,
            err,
            what,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("child still owned").id() as i32
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the child.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) takes plain integers; the pid is that of our own child, which has not
        // been reaped yet (the `Child` is still owned), so it cannot name another process.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.pid(),
            io::Error::last_os_error()
        );
    }

    /// `None` while the child runs; its exit status once it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().unwrap().try_wait().expect("try_wait")
    }

    /// Stdout so far.
    pub fn stdout_so_far(&self) -> String {
        self.out.text()
    }

    /// Stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.err.text()
    }

    /// Waits (bounded) until the child's stderr contains `needle`; returns whether it did.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if strip_ansi(&self.err.text()).contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the child to exit; kills it and panics if it overruns.
    pub fn wait_exit(mut self, timeout: Duration) -> Output {
        let mut child = self.child.take().unwrap();
        match wait_deadline(
            &mut child,
            &mut self.out,
            &mut self.err,
            Instant::now() + timeout,
        ) {
            Ok(output) => output,
            Err(output) => panic!(
                "{} did not exit within {timeout:?}; killed it\n{}",
                self.what,
                output.describe()
            ),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running `ringport serve` child. Dropping it kills the child.
pub struct Server {
    run: Running,
    /// The address the server reported in its `listening on` line.
    pub addr: SocketAddr,
    /// The raw `listening on` line.
    pub listening_line: String,
}

impl Server {
    /// `ringport serve --listen 127.0.0.1:0`.
    pub fn start() -> Server {
        Server::start_with(&["--listen", "127.0.0.1:0"])
    }

    /// `ringport serve ARGS`; waits (bounded) for the `listening on` line.
    pub fn start_with(args: &[&str]) -> Server {
        match Server::try_start_with(args) {
            Ok(server) => server,
            Err(output) => panic!(
                "`ringport serve {}` did not report `listening on ADDR `\n{}",
                args.join(" "),
                output.describe()
            ),
        }
    }

    /// Like [`Server::start_with`], but returns what the child printed when it exits (or is
    /// killed after [`STARTUP_TIMEOUT`]) without reporting a listening address.
    pub fn try_start_with(args: &[&str]) -> Result<Server, Output> {
        Server::try_start_configured(args, |_| {})
    }

    pub fn pid(&self) -> i32 {
        self.run.pid()
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the server.
    pub fn signal(&self, sig: libc::c_int) {
        self.run.signal(sig);
    }

    /// `None` while the server runs; its exit status once it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.run.try_status()
    }

    /// Asserts that the server is still running.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_status() {
            panic!(
                "the server exited unexpectedly with {status:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.run.stdout_so_far(),
                self.run.stderr_so_far()
            );
        }
    }

    /// Stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.run.stderr_so_far()
    }

    /// Sends SIGTERM and checks the server exits 0 within `timeout`, without a panic.
    pub fn terminate_cleanly(self, timeout: Duration) -> Output {
        self.signal(libc::SIGTERM);
        let output = self.wait_exit(timeout);
        output.assert_no_panic();
        assert_eq!(output.code(), Some(0), "{}", output.describe());
        output
    }

    /// Waits up to `timeout` for the server to exit; kills it and panics if it overruns.
    pub fn wait_exit(self, timeout: Duration) -> Output {
        self.run.wait_exit(timeout)
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), different per `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Connects with read/write timeouts set.
#[track_caller]
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

/// Reads exactly `len` bytes, with a message that says how far it got.
#[track_caller]
pub fn read_exact_len(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match stream.read(&mut buf[got..]) {
            Ok(0) => panic!("EOF after {got} of {len} echoed bytes"),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read failed after {got} of {len} echoed bytes: {e}"),
        }
    }
    buf
}

/// Reads until EOF; fails on any error (a reset is an error, not an EOF).
#[track_caller]
pub fn read_to_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "read failed after {} bytes (expected data then a clean EOF): {e} ({:?})",
                out.len(),
                e.kind()
            ),
        }
    }
}

/// Where two byte strings first differ, for readable assertion messages.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: got {} bytes, want {}; first difference at offset {first}",
            got.len(),
            want.len()
        );
    }
}

/// Sends `data` from a writer thread while this thread reads the echo; compares byte for byte,
/// then half-closes and expects a clean EOF.
#[track_caller]
pub fn echo_exact(addr: SocketAddr, data: &[u8]) {
    let mut stream = connect(addr);
    let mut writer = stream.try_clone().unwrap();
    let to_send = data.to_vec();
    let handle = thread::spawn(move || -> io::Result<()> {
        // Irregular chunk sizes so that message boundaries do not line up with anything.
        let mut off = 0;
        let mut step = 1;
        while off < to_send.len() {
            let end = (off + step).min(to_send.len());
            writer.write_all(&to_send[off..end])?;
            off = end;
            step = (step * 7 + 13) % (256 * 1024) + 1;
        }
        Ok(())
    });
    let got = read_exact_len(&mut stream, data.len());
    handle
        .join()
        .expect("writer thread panicked")
        .expect("writer thread failed");
    assert_bytes_eq(&got, data, "echo");
    stream.shutdown(Shutdown::Write).unwrap();
    let rest = read_to_eof(&mut stream);
    assert!(
        rest.is_empty(),
        "{} unexpected extra bytes after the echo",
        rest.len()
    );
}

/// Round-trips one small message on an open connection.
#[track_caller]
pub fn round_trip(stream: &mut TcpStream, data: &[u8]) {
    stream.write_all(data).unwrap();
    let got = read_exact_len(stream, data.len());
    assert_bytes_eq(&got, data, "round trip");
}

/// A port on 127.0.0.1 where nothing listens, and the socket that keeps it so: bound and not
/// listening, so connecting is refused, and no other test can take the port while it is held.
pub fn unused_port() -> (SocketAddr, socket2::Socket) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (addr, socket)
}

/// Parses `... <prefix>NUMBER<suffix> ...`, e.g. `served 5 connections`.
pub fn number_between(haystack: &str, prefix: &str, suffix: &str) -> Option<u64> {
    for (i, _) in haystack.match_indices(prefix) {
        let rest = &haystack[i + prefix.len()..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if !digits.is_empty() && rest[digits.len()..].starts_with(suffix) {
            return digits.parse().ok();
        }
    }
    None
}

/// A "bad" echo server on its own threads, for client error tests.
pub struct BadServer {
    pub addr: SocketAddr,
}

impl BadServer {
    /// Accepts, reads whatever arrives first, then closes with SO_LINGER 0 (an RST).
    pub fn resetting() -> BadServer {
        BadServer::spawn(|stream| {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let sock = socket2::SockRef::from(&stream);
            let _ = sock.set_linger(Some(Duration::ZERO));
            drop(stream);
        })
    }

    /// Echoes faithfully except the byte at stream offset 100, which it flips.
    pub fn corrupting() -> BadServer {
        BadServer::spawn(|stream| {
            let mut stream = stream;
            let mut buf = vec![0u8; 64 * 1024];
            let mut offset = 0usize;
            loop {
                let n = match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if (offset..offset + n).contains(&100) {
                    buf[100 - offset] ^= 0xFF;
                }
                offset += n;
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        })
    }

    /// Echoes faithfully, then, once the client has closed its side, sends 10 more bytes
    /// before closing its own: an echo of nothing.
    pub fn talking_after_close() -> BadServer {
        BadServer::spawn(|stream| {
            let mut stream = stream;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match stream.read(&mut buf) {
                    Ok(0) => break,
                    Err(_) => return,
                    Ok(n) => n,
                };
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            let _ = stream.write_all(b"0123456789");
        })
    }

    /// Echoes faithfully, one byte every 20 ms: never silent long enough for the client's
    /// stall limit, and slow enough never to finish a run of any size.
    pub fn trickling() -> BadServer {
        BadServer::spawn(|stream| {
            let mut stream = stream;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                for b in &buf[..n] {
                    thread::sleep(Duration::from_millis(20));
                    if stream.write_all(std::slice::from_ref(b)).is_err() {
                        return;
                    }
                }
            }
        })
    }

    fn spawn(handler: fn(TcpStream)) -> BadServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // The accept thread lives until the test process exits.
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                thread::spawn(move || handler(stream));
            }
        });
        BadServer { addr }
    }
}

/// A minimal JSON value: enough to read the client's one-line report without extra dependencies.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(s: &str) -> Result<Json, String> {
        let mut p = JsonParser {
            s: s.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing characters at {}", p.i));
        }
        Ok(v)
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected '{}' at {}", c as char, self.i))
        }
    }

    fn lit(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(format!("bad literal at {}", self.i))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.s.get(self.i) {
            None => Err("unexpected end".into()),
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(fields));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.eat(b':')?;
                    let v = self.value()?;
                    fields.push((k, v));
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(fields));
                        }
                        _ => return Err(format!("expected ',' or '}}' at {}", self.i)),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => return Err(format!("expected ',' or ']' at {}", self.i)),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.lit("true", Json::Bool(true)),
            Some(b'f') => self.lit("false", Json::Bool(false)),
            Some(b'n') => self.lit("null", Json::Null),
            Some(_) => {
                let start = self.i;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'
                    )
                {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i]).unwrap();
                text.parse()
                    .map(Json::Num)
                    .map_err(|_| format!("bad number {text:?} at {start}"))
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        if self.s.get(self.i) != Some(&b'"') {
            return Err(format!("expected a string at {}", self.i));
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.i) {
                None => return Err("unterminated string".into()),
                Some(b'"') => {
                    self.i += 1;
                    return String::from_utf8(out).map_err(|e| e.to_string());
                }
                Some(b'\\') => {
                    let esc = *self.s.get(self.i + 1).ok_or("bad escape")?;
                    self.i += 2;
                    match esc {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = self
                                .s
                                .get(self.i..self.i + 4)
                                .and_then(|h| std::str::from_utf8(h).ok())
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .ok_or("bad \\u escape")?;
                            self.i += 4;
                            let c = char::from_u32(hex).unwrap_or('\u{fffd}');
                            let mut tmp = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                Some(&c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
    }
}

/// The last line of `stdout` that is a JSON object, parsed.
pub fn json_report(output: &Output) -> Json {
    let line = output
        .stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line on stdout\n{}", output.describe()));
    Json::parse(line.trim()).unwrap_or_else(|e| {
        panic!(
            "stdout line is not JSON ({e}): {line}\n{}",
            output.describe()
        )
    })
}

/// A numeric field of the client's JSON report.
pub fn json_num(report: &Json, key: &str) -> f64 {
    report
        .get(key)
        .and_then(Json::as_f64)
        .unwrap_or_else(|| panic!("JSON report lacks numeric {key:?}: {report:?}"))
}

/// The keys the client's `--json` report must carry.
pub const JSON_KEYS: &[&str] = &[
    "server",
    "backend",
    "connections",
    "messages",
    "bytes",
    "verified_bytes",
    "setup_s",
    "warmup_s",
    "elapsed_s",
    "msgs_per_s",
    "mb_per_s",
    "p50_us",
    "p99_us",
    "p999_us",
    "max_us",
    "errors",
    "error_total",
    "mismatches",
    "ok",
];

// ---------------------------------------------------------------------------------------------
// Helpers for the limits, fault, soak and backend tests: children started with a custom
// environment or resource limits, and what /proc says about a running server.
// ---------------------------------------------------------------------------------------------

impl Server {
    /// Like [`Server::start_with`], but lets `configure` adjust the command first (extra
    /// environment variables, a `pre_exec` hook that sets resource limits or a seccomp filter).
    #[track_caller]
    pub fn start_configured(args: &[&str], configure: impl FnOnce(&mut Command)) -> Server {
        match Server::try_start_configured(args, configure) {
            Ok(server) => server,
            Err(output) => panic!(
                "`ringport serve {}` did not report `listening on ADDR`\n{}",
                args.join(" "),
                output.describe()
            ),
        }
    }

    /// Like [`Server::try_start_with`], with `configure` applied to the command before spawning.
    pub fn try_start_configured(
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Result<Server, Output> {
        let mut cmd = Command::new(BIN);
        // The log level is the test's (`-v`): some tests read the server's log.
        // Under `per_model!`, the model of the test's thread.
        let model: Vec<&str> = MODEL
            .with(|m| m.get())
            .map(|m| vec!["--model", m])
            .unwrap_or_default();
        cmd.arg("serve")
            .args(args)
            .args(model)
            .env_remove("RUST_LOG")
            .env("RINGPORT_BACKEND", backend())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        configure(&mut cmd);
        let child = cmd.spawn().expect("spawn `ringport serve`");
        let (tx, rx) = mpsc::channel();
        let mut run = Running::collect(child, Some(tx), "the server".to_owned());
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = parse_listening_line(&line) {
                        return Ok(Server {
                            run,
                            addr,
                            listening_line: line,
                        });
                    }
                }
                // Timed out, or stderr closed (the child is exiting): collect what it printed.
                Err(_) => {
                    let grace = Instant::now() + Duration::from_secs(2);
                    let mut child = run.child.take().unwrap();
                    return Err(
                        match wait_deadline(&mut child, &mut run.out, &mut run.err, grace) {
                            Ok(output) | Err(output) => output,
                        },
                    );
                }
            }
        }
    }

    /// Stdout so far.
    pub fn stdout_so_far(&self) -> String {
        self.run.stdout_so_far()
    }

    /// Waits (bounded) until the server's stderr contains `needle`; returns whether it did.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> bool {
        self.run.wait_for_stderr(needle, timeout)
    }
}

/// Like [`run_cli`], with `configure` applied to the command before spawning.
pub fn run_cli_configured(
    args: &[&str],
    timeout: Duration,
    configure: impl FnOnce(&mut Command),
) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("RINGPORT_BACKEND", backend())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    configure(&mut cmd);
    let mut child = cmd.spawn().expect("spawn the ringport binary");
    let mut out = Drain::spawn_or_empty(child.stdout.take());
    let mut err = Drain::spawn(child.stderr.take().unwrap(), None);
    match wait_deadline(&mut child, &mut out, &mut err, Instant::now() + timeout) {
        Ok(output) => output,
        Err(output) => panic!(
            "`ringport {}` did not exit within {:?}; killed it\n{}",
            args.join(" "),
            timeout,
            output.describe()
        ),
    }
}

/// A field of `/proc/PID/status` in bytes (`VmRSS`, `VmHWM`: the kernel reports kB).
#[track_caller]
pub fn proc_status_bytes(pid: i32, field: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let prefix = format!("{field}:");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("{path} has no {field} line"));
    let kib: u64 = line[prefix.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: bad {field} line {line:?}: {e}"));
    kib * 1024
}

/// The resident set size of `pid`, in bytes.
#[track_caller]
pub fn rss_bytes(pid: i32) -> u64 {
    proc_status_bytes(pid, "VmRSS")
}

/// How many descriptors `pid` has open (entries of `/proc/PID/fd`).
#[track_caller]
pub fn fd_count(pid: i32) -> usize {
    let path = format!("/proc/{pid}/fd");
    std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .count()
}

/// CPU time `pid` has used (user + system, from `/proc/PID/stat`), in seconds.
#[track_caller]
pub fn cpu_seconds(pid: i32) -> f64 {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // The command name (field 2) may contain spaces: count fields after its closing paren.
    let after = &text[text.rfind(')').expect("stat has a (comm)") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the paren: state is field 3, so utime (14) and stime (15) are at 11 and 12 here.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf takes a plain integer and reads no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(hz > 0, "sysconf(_SC_CLK_TCK) = {hz}");
    ticks as f64 / hz as f64
}

/// Raises this process's soft `RLIMIT_NOFILE` to at least `want` (up to the hard limit);
/// returns the soft limit after.
pub fn raise_own_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the local struct passed by pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert_eq!(rc, 0, "getrlimit: {}", io::Error::last_os_error());
    if lim.rlim_cur < want {
        lim.rlim_cur = want.min(lim.rlim_max);
        // SAFETY: setrlimit reads the local struct passed by pointer.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        assert_eq!(rc, 0, "setrlimit: {}", io::Error::last_os_error());
    }
    lim.rlim_cur
}

/// Whether `e` says the peer reset the connection (what a cut connection may show instead of
/// a clean EOF).
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// How a stream read back by [`read_prefix_of`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    Eof,
    Reset,
}

/// Reads until EOF or a reset, checking as it goes that what arrives is a prefix of
/// `sent`; returns how many bytes arrived and how the stream ended. Panics on anything else
/// (garbage, more than was sent, a timeout).
#[track_caller]
pub fn read_prefix_of(stream: &mut TcpStream, sent: &[u8], what: &str) -> (usize, StreamEnd) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, StreamEnd::Eof),
            Ok(n) => {
                assert!(
                    got + n <= sent.len(),
                    "{what}: received {} bytes, more than the {} sent",
                    got + n,
                    sent.len()
                );
                if buf[..n] != sent[got..got + n] {
                    let at = buf[..n]
                        .iter()
                        .zip(&sent[got..])
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    panic!(
                        "{what}: the echo differs from what was sent at offset {}",
                        got + at
                    );
                }
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_reset(&e) => return (got, StreamEnd::Reset),
            Err(e) => panic!(
                "{what}: read failed after {got} bytes: {e} ({:?})",
                e.kind()
            ),
        }
    }
}

/// Fills `buf` with the bytes at `offset..offset + buf.len()` of an endless deterministic stream
/// (different per `seed`): unlike [`pattern`], any part of it can be made without the rest, so
/// a test can stream hundreds of MiB without holding them.
pub fn fill_stream(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let word = pos / 8;
        // splitmix64 of the word index: cheap, and every word is independent of the others.
        let mut z = (word ^ seed.rotate_left(32)).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let bytes = z.to_le_bytes();
        let from = (pos % 8) as usize;
        let n = (8 - from).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&bytes[from..from + n]);
        i += n;
        pos += n as u64;
    }
}

/// Checks, chunk by chunk, that what a connection reads back is the stream [`fill_stream`] made
/// for `seed`.
pub struct StreamChecker {
    seed: u64,
    /// Bytes checked so far.
    pub offset: u64,
    scratch: Vec<u8>,
}

impl StreamChecker {
    pub fn new(seed: u64) -> StreamChecker {
        StreamChecker {
            seed,
            offset: 0,
            scratch: Vec::new(),
        }
    }

    /// Checks the next `got` bytes; panics naming the first differing offset.
    #[track_caller]
    pub fn check(&mut self, got: &[u8], what: &str) {
        self.scratch.resize(got.len(), 0);
        fill_stream(self.seed, self.offset, &mut self.scratch);
        if got != &self.scratch[..] {
            let at = got
                .iter()
                .zip(&self.scratch)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{what}: the echo differs from what was sent at stream offset {}",
                self.offset + at as u64
            );
        }
        self.offset += got.len() as u64;
    }
}
