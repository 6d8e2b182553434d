//! The echo checks every peer server must pass, run by each peer's `tests/echo.rs` through
//! [`echo_tests!`](crate::echo_tests), so all three are held to literally the same code.
//!
//! A [`Server`] is the peer binary on `127.0.0.1:0`, its address read from its `listening on ADDR`
//! stderr line and the process killed when the `Server` drops. Every wait here is bounded by
//! [`WAIT`]: socket reads and writes by timeouts, the startup line and exits by deadlines.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::uring_check;

/// Whether a server's error line says the kernel refused io_uring: `EPERM` (the sysctl, or a
/// seccomp profile), `EACCES`, or `ENOSYS` (a kernel without it).
fn says_uring_refused(line: &str) -> bool {
    line.contains("io_uring") && uring_check::names_refusal(line)
}

/// The longest any single wait may take: a read, a write, a connect, the server's start or exit.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running peer server; killed (and reaped) on drop.
pub struct Server {
    child: KillOnDrop,
    addr: SocketAddr,
    /// The `backend=NAME` of its listening line, if it had one.
    backend: Option<String>,
    /// Its stderr lines after the listening line.
    lines: mpsc::Receiver<String>,
}

/// Kills and reaps the child when dropped, also while a test unwinds.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    /// Starts `bin --listen 127.0.0.1:0 --workers WORKERS` and waits for its `listening on ADDR`
    /// line.
    ///
    /// The server's stderr is forwarded to the test's, prefixed, for the log of a failing test.
    ///
    /// `None` (the test is then skipped, saying so) when the server exits before listening
    /// because the kernel refuses io_uring, which an io_uring-only peer needs (see
    /// [`uring_check::refusal_skips`]).
    ///
    /// # Panics
    ///
    /// If the server cannot start, exits for another reason, or prints no such line within
    /// [`WAIT`].
    pub fn start(bin: &str, workers: usize) -> Option<Server> {
        Server::start_with(bin, workers, &[])
    }

    /// [`Server::start`] with more arguments after `--listen` and `--workers`.
    pub fn start_with(bin: &str, workers: usize, more: &[&str]) -> Option<Server> {
        Server::start_in(Command::new(bin), bin, workers, more)
    }

    /// [`Server::start`] with a soft descriptor limit (`RLIMIT_NOFILE`) of `nofile`.
    pub fn start_limited(bin: &str, workers: usize, nofile: u64) -> Option<Server> {
        let mut sh = Command::new("sh");
        sh.args([
            "-c",
            "ulimit -Sn \"$0\" && exec \"$@\"",
            &nofile.to_string(),
            bin,
        ]);
        Server::start_in(sh, bin, workers, &[])
    }

    /// Starts `command` (which runs `bin`) with the listening arguments and `more`.
    fn start_in(mut command: Command, bin: &str, workers: usize, more: &[&str]) -> Option<Server> {
        let workers = workers.to_string();
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--workers", &workers])
            .args(more)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: cannot start: {e}"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut child = KillOnDrop(child);
        let (lines_tx, lines_rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[server] {line}");
                let _ = lines_tx.send(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        let mut said: Vec<String> = Vec::new();
        let (addr, backend) = loop {
            let line =
                match lines_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(line) => line,
                    Err(RecvTimeoutError::Timeout) => {
                        panic!("{bin}: no 'listening on' line within {WAIT:?}")
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        let status = wait_exit(&mut child.0, deadline);
                        if let Some(why) = said.iter().find(|l| says_uring_refused(l.as_str())) {
                            if uring_check::refusal_skips() {
                                println!("SKIPPED: {bin} cannot run here: {why}");
                                return None;
                            }
                        }
                        panic!("{bin}: exited before listening: {status:?}");
                    }
                };
            let Some(rest) = line.strip_prefix("listening on ") else {
                said.push(line);
                continue;
            };
            let addr = rest.split_whitespace().next().unwrap_or_default();
            let backend = rest
                .split_whitespace()
                .find_map(|word| word.strip_prefix("backend="))
                .map(str::to_owned);
            break (
                addr.parse::<SocketAddr>()
                    .unwrap_or_else(|e| panic!("{bin}: bad address in {line:?}: {e}")),
                backend,
            );
        };
        assert_ne!(
            addr.port(),
            0,
            "{bin}: printed the requested port 0, not the bound one"
        );
        Some(Server {
            child,
            addr,
            backend,
            lines: lines_rx,
        })
    }

    /// The kernel interface the server said it drives (`backend=NAME`), if it said.
    pub fn backend(&self) -> Option<&str> {
        self.backend.as_deref()
    }

    /// The address the server is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The lines the server wrote on stderr since its listening line (or the last call).
    pub fn said(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Panics if the server has exited: a check passed by a server that then died has not passed.
    pub fn assert_running(&mut self) {
        let status = self.child.0.try_wait().expect("try_wait on the server");
        assert!(status.is_none(), "server exited: {status:?}");
    }
}

/// Runs `bin ARGS` and waits up to [`WAIT`] for it to exit: its exit status (`None` if it was
/// still running, and then killed) and what it wrote on stderr.
fn run_to_exit(bin: &str, args: &[&str]) -> (Option<ExitStatus>, String) {
    let mut child = KillOnDrop(
        Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: cannot start: {e}")),
    );
    let status = wait_exit(&mut child.0, Instant::now() + WAIT);
    // One still running is ended before its stderr is read to the end.
    let _ = child.0.kill();
    let _ = child.0.wait();
    let mut said = String::new();
    let mut pipe = child.0.stderr.take().expect("stderr is piped");
    pipe.read_to_string(&mut said).expect("read stderr");
    (status, said)
}

/// Waits for `child` to exit until `deadline`; `None` if it is still running then.
fn wait_exit(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Opens `connections` connections to a server that has descriptors for only some of them,
/// and checks that each is served (a byte echoed) or closed at once: none is left waiting, and
/// the server neither spins on its failing accepts nor floods its log with them.
pub fn check_out_of_descriptors(server: &Server, connections: usize) {
    let mut conns: Vec<TcpStream> = (0..connections).map(|_| connect(server.addr())).collect();
    let (mut echoed, mut closed) = (0, 0);
    // Every connection stays open to the end: one closed here would free its descriptor.
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set_read_timeout");
        let mut b = [0u8; 1];
        let got = c.write_all(b"x").and_then(|()| c.read(&mut b));
        match got {
            Ok(1) if b[0] == b'x' => echoed += 1,
            Ok(0) => closed += 1,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => closed += 1,
            Ok(_) => panic!("connection {i}: a wrong byte {:?} echoed", b[0]),
            Err(e) => panic!("connection {i} neither served nor closed: {e}"),
        }
    }
    assert!(echoed > 0, "no connection was served");
    assert!(
        closed > 0,
        "every connection was served: the limit was not reached"
    );
    let accept_lines = server
        .said()
        .into_iter()
        .filter(|l| l.contains("accept"))
        .count();
    assert!(
        accept_lines < 20,
        "{accept_lines} lines about failed accepts: the accept loop spins"
    );
}

/// Starts `bin` on the address a running instance of it listens on: the second must exit with
/// an error naming the address, not share the port with the first.
pub fn check_busy_address(bin: &str) {
    let Some(mut first) = Server::start_with(bin, 1, &["--listen", "127.0.0.1:0"]) else {
        return;
    };
    let listen = first.addr().to_string();
    let (status, said) = run_to_exit(bin, &["--listen", &listen]);
    assert!(
        status.is_some_and(|s| !s.success()),
        "a second instance on {listen} did not fail: {status:?}, {said:?}"
    );
    assert!(said.contains(&listen), "{said:?}");
    first.assert_running();
}

/// A connection to `addr` whose every read and write times out after [`WAIT`].
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream =
        TcpStream::connect_timeout(&addr, WAIT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(WAIT))
        .expect("set_read_timeout");
    stream
        .set_write_timeout(Some(WAIT))
        .expect("set_write_timeout");
    stream.set_nodelay(true).expect("set_nodelay");
    stream
}

/// `len` pseudo-random bytes (xorshift64 from `seed`): reordered, dropped or repeated bytes show.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Reads until EOF, failing on a timeout, on an error, or once more than `limit` bytes came.
fn read_to_eof(stream: &mut TcpStream, limit: usize) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::with_capacity(limit);
    let mut chunk = vec![0; 64 * 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(got);
        }
        got.extend_from_slice(&chunk[..n]);
        if got.len() > limit {
            return Err(io::Error::other(format!(
                "{} bytes back, more than the {limit} sent",
                got.len()
            )));
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no EOF within the deadline",
            ));
        }
    }
}

/// Asserts that `got` is `want`, naming the first differing offset rather than printing megabytes.
fn assert_echo(want: &[u8], got: &[u8], what: &str) {
    if want == got {
        return;
    }
    let first = want.iter().zip(got).position(|(w, g)| w != g);
    panic!(
        "{what}: sent {} bytes, got {} back; first difference at {}",
        want.len(),
        got.len(),
        first.map_or("the end of the shorter".to_owned(), |i| format!(
            "offset {i}"
        )),
    );
}

/// Sends `data` on `stream` from a writer thread, then half-closes; returns all that came back
/// before EOF, read on this thread meanwhile (so neither side stalls on full socket buffers).
fn send_all_then_read_to_eof(stream: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    let mut writer = stream.try_clone().expect("try_clone");
    thread::scope(|scope| {
        let sent = scope.spawn(move || -> io::Result<()> {
            writer.write_all(data)?;
            writer.shutdown(Shutdown::Write)
        });
        let echoed = read_to_eof(stream, data.len());
        sent.join()
            .expect("writer thread panicked")
            .expect("write, then shutdown(Write)");
        echoed.expect("read the echo up to EOF")
    })
}

/// One connection: `len` bytes written by a writer thread while this thread reads them back
/// exactly; then the client's half-close must bring the server's EOF.
pub fn check_payload(addr: SocketAddr, len: usize) {
    let data = payload(len, len as u64);
    let mut stream = connect(addr);
    let mut echoed = vec![0; len];
    let mut writer = stream.try_clone().expect("try_clone");
    thread::scope(|scope| {
        let data = &data;
        let sent = scope.spawn(move || writer.write_all(data));
        let read = stream.read_exact(&mut echoed);
        sent.join()
            .expect("writer thread panicked")
            .expect("write the payload");
        read.unwrap_or_else(|e| panic!("{len} bytes: read the echo: {e}"));
    });
    assert_echo(&data, &echoed, &format!("{len}-byte payload"));
    stream.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let extra = read_to_eof(&mut stream, 0)
        .unwrap_or_else(|e| panic!("{len} bytes: EOF after half-close: {e}"));
    assert!(
        extra.is_empty(),
        "{len} bytes: {} bytes more than sent",
        extra.len()
    );
}

/// `connections` connections open at once, each (on its own thread) echoing `messages` messages of
/// different sizes, every one read back exactly before the next is sent.
pub fn check_concurrent(addr: SocketAddr, connections: usize, messages: usize) {
    let streams: Vec<TcpStream> = (0..connections).map(|_| connect(addr)).collect();
    let failures: Vec<String> = thread::scope(|scope| {
        let workers: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(conn, mut stream)| {
                scope.spawn(move || -> Result<(), String> {
                    for message in 0..messages {
                        let len = 1 + (conn * 7919 + message * 1031) % 20_000;
                        let data = payload(len, (conn * 1000 + message) as u64);
                        stream.write_all(&data).map_err(|e| {
                            format!("connection {conn} message {message}: write: {e}")
                        })?;
                        let mut echoed = vec![0; len];
                        stream.read_exact(&mut echoed).map_err(|e| {
                            format!("connection {conn} message {message}: read: {e}")
                        })?;
                        if echoed != data {
                            return Err(format!(
                                "connection {conn} message {message}: wrong bytes back"
                            ));
                        }
                    }
                    stream
                        .shutdown(Shutdown::Write)
                        .map_err(|e| format!("connection {conn}: shutdown(Write): {e}"))?;
                    match read_to_eof(&mut stream, 0) {
                        Ok(_) => Ok(()),
                        Err(e) => Err(format!("connection {conn}: EOF after half-close: {e}")),
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .filter_map(|worker| worker.join().expect("connection thread panicked").err())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {connections} connections failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Two connections served at once: the first sends part of a message and gets it back, then the
/// second is echoed whole while the first is still open mid-message, then the first finishes.
/// A server that served its connections one after another would not answer the second until
/// the first ended, and the read would time out.
pub fn check_interleaved(addr: SocketAddr) {
    let data = payload(4096, 5150);
    let (head, tail) = data.split_at(1000);
    let mut first = connect(addr);
    first.write_all(head).expect("first connection: write");
    let mut echoed = vec![0; head.len()];
    first
        .read_exact(&mut echoed)
        .expect("first connection: read the echo of its first part");
    assert_echo(head, &echoed, "first connection, first part");

    let mut second = connect(addr);
    let other = payload(2000, 862);
    second.write_all(&other).expect("second connection: write");
    let mut echoed = vec![0; other.len()];
    second.read_exact(&mut echoed).unwrap_or_else(|e| {
        panic!("second connection, while the first is open: read the echo: {e}")
    });
    assert_echo(
        &other,
        &echoed,
        "second connection, while the first is open",
    );
    drop(second);

    first
        .write_all(tail)
        .expect("first connection: write the rest");
    let mut echoed = vec![0; tail.len()];
    first
        .read_exact(&mut echoed)
        .expect("first connection: read the echo of the rest");
    assert_echo(tail, &echoed, "first connection, the rest");
}

/// Asserts that `server` drives `expected` (`backend=NAME` on its listening line). A peer that
/// falls back to another interface where the kernel refuses io_uring ([`uring_check::refusal`])
/// is skipped there, as [`Server::start`] skips a peer that cannot run, unless the policy
/// requires io_uring ([`uring_check::refusal_skips`]); a fallback for any other reason fails.
pub fn check_backend(server: &Server, bin: &str, expected: &str) {
    let said = server.backend();
    if said == Some(expected) {
        return;
    }
    if expected == "io_uring" && uring_check::refusal_skips() {
        if let Some(why) = uring_check::refusal() {
            println!("SKIPPED: {bin} drives {said:?}: the kernel refuses io_uring ({why})");
            return;
        }
    }
    panic!("{bin}: drives {said:?}, not {expected}");
}

/// Half-close: what the client sent before `shutdown(Write)` all comes back, then EOF; the server
/// must neither close early nor hold the connection open after echoing.
pub fn check_half_close(addr: SocketAddr) {
    // Small: written in three pieces, nothing read until after the half-close.
    let mut stream = connect(addr);
    for piece in [&b"hello, "[..], b"half-", b"closed world"] {
        stream.write_all(piece).expect("write");
    }
    stream.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let echoed = read_to_eof(&mut stream, 64).expect("read the echo up to EOF");
    assert_echo(
        b"hello, half-closed world",
        &echoed,
        "small write before half-close",
    );

    // Larger than the socket buffers hold: the echo must keep flowing after the client's FIN is
    // queued.
    let data = payload(1 << 20, 862);
    let mut stream = connect(addr);
    let echoed = send_all_then_read_to_eof(&mut stream, &data);
    assert_echo(&data, &echoed, "1 MiB then half-close");
}

/// Bad command lines: each must end the program with status 2 and a message on stderr.
pub fn check_bad_args(bin: &str) {
    let cases: [&[&str]; 5] = [
        &["--workers", "0"],
        &["--workers", "many"],
        &["--listen", "not-an-address"],
        &["--listen"],
        &["--no-such-flag"],
    ];
    for args in cases {
        let (status, stderr) = run_to_exit(bin, args);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "{bin} {args:?}: {status:?}, stderr: {stderr:?}"
        );
        assert!(
            !stderr.trim().is_empty(),
            "{bin} {args:?}: exit 2 without a message"
        );
    }
}

/// The echo suite of one peer binary, as `#[test]` functions in the calling test crate:
///
/// ```text
/// peer_common::echo_tests! {
///     bin: env!("CARGO_BIN_EXE_peer-tokio"),
///     backend: "epoll",
///     two_workers: echoes_on_50_concurrent_connections_with_2_workers,
/// }
/// ```
///
/// `backend` is the kernel interface the peer must say it drives on every worker (see
/// [`check_backend`]); `two_workers` names the test that runs the server with `--workers 2`
/// (what two workers are differs between the peers).
#[macro_export]
macro_rules! echo_tests {
    (bin: $bin:expr, backend: $backend:expr, two_workers: $two_workers:ident $(,)?) => {
        const BIN: &str = $bin;

        #[test]
        fn says_which_backend_it_drives_on_every_worker() {
            for workers in [1, 2] {
                let Some(mut server) = $crate::echo_check::Server::start(BIN, workers) else {
                    return;
                };
                $crate::echo_check::check_backend(&server, BIN, $backend);
                server.assert_running();
            }
        }

        #[test]
        fn echoes_exactly_with_the_smallest_buffer() {
            let smallest = $crate::BUFFER_RANGE.start().to_string();
            let Some(mut server) =
                $crate::echo_check::Server::start_with(BIN, 1, &["--buffer", &smallest])
            else {
                return;
            };
            for len in [1, 64 << 10] {
                $crate::echo_check::check_payload(server.addr(), len);
            }
            server.assert_running();
        }

        #[test]
        fn serves_a_second_connection_while_the_first_is_mid_message() {
            let Some(mut server) = $crate::echo_check::Server::start(BIN, 1) else {
                return;
            };
            $crate::echo_check::check_interleaved(server.addr());
            server.assert_running();
        }

        #[test]
        fn echoes_1_byte_64_kib_and_4_mib_exactly() {
            let Some(mut server) = $crate::echo_check::Server::start(BIN, 1) else {
                return;
            };
            for len in [1, 64 << 10, 4 << 20] {
                $crate::echo_check::check_payload(server.addr(), len);
            }
            server.assert_running();
        }

        #[test]
        fn echoes_on_50_concurrent_connections() {
            let Some(mut server) = $crate::echo_check::Server::start(BIN, 1) else {
                return;
            };
            $crate::echo_check::check_concurrent(server.addr(), 50, 8);
            server.assert_running();
        }

        #[test]
        fn refuses_an_address_another_instance_listens_on() {
            $crate::echo_check::check_busy_address(BIN);
        }

        #[test]
        fn out_of_descriptors_closes_what_it_cannot_serve_without_spinning() {
            let Some(mut server) = $crate::echo_check::Server::start_limited(BIN, 1, 64) else {
                return;
            };
            $crate::echo_check::check_out_of_descriptors(&server, 100);
            server.assert_running();
        }

        #[test]
        fn $two_workers() {
            let Some(mut server) = $crate::echo_check::Server::start(BIN, 2) else {
                return;
            };
            $crate::echo_check::check_concurrent(server.addr(), 50, 8);
            server.assert_running();
        }

        #[test]
        fn half_close_gets_everything_back_then_eof() {
            let Some(mut server) = $crate::echo_check::Server::start(BIN, 1) else {
                return;
            };
            $crate::echo_check::check_half_close(server.addr());
            server.assert_running();
        }

        #[test]
        fn bad_arguments_exit_2() {
            $crate::echo_check::check_bad_args(BIN);
        }
    };
}
