//! Shutdown under load: SIGTERM while many connections stream still exits 0 within the drain
//! timeout and never corrupts an echo; data sent before the signal all comes back; a second
//! signal during the drain exits at once with status 128 + its number.

mod util;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use util::{
    connect, fill_stream, is_reset, number_between, round_trip, Server, StreamChecker, StreamEnd,
};

/// Connections streaming when the signal arrives.
const CONNECTIONS: usize = 30;
/// How long they stream before it.
const LOAD_BEFORE_SIGNAL: Duration = Duration::from_millis(1000);
/// `--drain-timeout` of the server under load.
const DRAIN_TIMEOUT_SECS: u64 = 2;
/// Margin over the drain timeout for the exit (startup of the forced closes, slow CI).
const EXIT_MARGIN: Duration = Duration::from_secs(8);
/// How long writes must keep failing with `WouldBlock` before a never-reading client counts as
/// stuck (every buffer on the way full).
const STUCK_FOR: Duration = Duration::from_millis(300);
/// A hang guard for the exit after the second signal. The exit status tells an exit on the
/// second signal (128 + its number) from one at the end of the 10 s drain (0), so this need not
/// be short.
const SECOND_SIGNAL_GUARD: Duration = Duration::from_secs(30);

/// One streaming connection: a writer thread sending an endless deterministic stream and a
/// reader thread checking its echo.
struct Streamer {
    written: Arc<AtomicU64>,
    writer: JoinHandle<()>,
    reader: JoinHandle<(u64, StreamEnd)>,
}

impl Streamer {
    /// Starts streaming on a new connection; the writer stops at the first error or once
    /// `stop` is set.
    fn start(addr: SocketAddr, seed: u64, stop: Arc<AtomicBool>) -> Streamer {
        let mut stream = connect(addr);
        let mut out = stream.try_clone().unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&written);
        let writer = thread::spawn(move || {
            let mut chunk = vec![0u8; 16 * 1024 + 7];
            let mut off = 0u64;
            while !stop.load(Ordering::Relaxed) {
                fill_stream(seed, off, &mut chunk);
                match out.write(&chunk) {
                    Ok(n) => {
                        off += n as u64;
                        counter.store(off, Ordering::Release);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // The server closed the connection (reset, broken pipe) or the write timed
                    // out because the server stopped reading: either way, stop.
                    Err(_) => break,
                }
            }
        });
        let reader = thread::spawn(move || {
            let mut checker = StreamChecker::new(seed);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return (checker.offset, StreamEnd::Eof),
                    Ok(n) => checker.check(&buf[..n], &format!("stream {seed}")),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if is_reset(&e) => return (checker.offset, StreamEnd::Reset),
                    Err(e) => panic!("stream {seed}: read failed after {}: {e}", checker.offset),
                }
            }
        });
        Streamer {
            written,
            writer,
            reader,
        }
    }

    /// Waits for both threads; returns (bytes written, bytes read back, how the echo ended).
    fn finish(self) -> (u64, u64, StreamEnd) {
        self.writer.join().expect("writer thread panicked");
        let (read, end) = self.reader.join().expect("reader thread panicked");
        (self.written.load(Ordering::Acquire), read, end)
    }
}

fn sigterm_under_load_exits_0_within_the_drain_timeout() {
    let drain = DRAIN_TIMEOUT_SECS.to_string();
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--drain-timeout", &drain]);
    let stop = Arc::new(AtomicBool::new(false));
    let streamers: Vec<Streamer> = (0..CONNECTIONS)
        .map(|i| Streamer::start(server.addr, 300 + i as u64, Arc::clone(&stop)))
        .collect();
    thread::sleep(LOAD_BEFORE_SIGNAL);
    let before: u64 = streamers
        .iter()
        .map(|s| s.written.load(Ordering::Acquire))
        .sum();
    assert!(before > 0, "nothing was written before the signal");

    // The writers keep writing through the drain: the server must still exit in time.
    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    let output = server.wait_exit(Duration::from_secs(DRAIN_TIMEOUT_SECS) + EXIT_MARGIN);
    let exit_after = signalled.elapsed();
    stop.store(true, Ordering::Relaxed);
    output.assert_no_panic();
    assert_eq!(output.code(), Some(0), "{}", output.describe());

    let mut received = 0u64;
    let mut resets = 0;
    for (i, s) in streamers.into_iter().enumerate() {
        let (written, read, end) = s.finish();
        // The reader checked byte by byte that it is the stream; it cannot be longer.
        assert!(
            read <= written,
            "connection {i}: read back {read} bytes of {written} written"
        );
        received += read;
        resets += usize::from(end == StreamEnd::Reset);
    }
    println!(
        "{CONNECTIONS} connections: {:.1} MiB written before the signal, {:.1} MiB echoed in \
         all; exit {exit_after:?} after SIGTERM; {resets} ended with a reset",
        before as f64 / 1048576.0,
        received as f64 / 1048576.0
    );
    let echoed = number_between(&output.stdout, "echoed ", " bytes")
        .unwrap_or_else(|| panic!("no summary\n{}", output.describe()));
    assert!(
        echoed >= received,
        "the summary counts {echoed} bytes echoed, the clients read {received}\n{}",
        output.describe()
    );
}

fn sigterm_under_load_echoes_everything_sent_before_it() {
    // The writers stop just before the signal, with plenty still in flight: every byte
    // they wrote must come back, then a clean EOF.
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--drain-timeout", "10"]);
    let stop = Arc::new(AtomicBool::new(false));
    let streamers: Vec<Streamer> = (0..CONNECTIONS)
        .map(|i| Streamer::start(server.addr, 600 + i as u64, Arc::clone(&stop)))
        .collect();
    thread::sleep(LOAD_BEFORE_SIGNAL);
    stop.store(true, Ordering::Relaxed);
    // Wait (bounded) until every writer has returned from its last write.
    let deadline = Instant::now() + Duration::from_secs(15);
    while streamers.iter().any(|s| !s.writer.is_finished()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        streamers.iter().all(|s| s.writer.is_finished()),
        "a writer did not stop within 15 s"
    );
    server.signal(libc::SIGTERM);

    let mut total = 0;
    for (i, s) in streamers.into_iter().enumerate() {
        let (written, read, end) = s.finish();
        assert_eq!(
            (read, end),
            (written, StreamEnd::Eof),
            "connection {i}: wrote {written} bytes before the signal; (bytes read back, end)"
        );
        total += written;
    }
    let output = server.wait_exit(Duration::from_secs(10) + EXIT_MARGIN);
    output.assert_no_panic();
    assert_eq!(output.code(), Some(0), "{}", output.describe());
    assert!(
        !output.stderr.contains("drain timeout"),
        "the drain timed out although every client read everything\n{}",
        output.describe()
    );
    let echoed = number_between(&output.stdout, "echoed ", " bytes")
        .unwrap_or_else(|| panic!("no summary\n{}", output.describe()));
    assert_eq!(echoed, total, "echoed byte count\n{}", output.describe());
}

/// Writes without reading until writes have failed with `WouldBlock` for [`STUCK_FOR`]: the
/// server then holds echo it cannot send, and input it will not read.
fn write_until_stuck(stream: &mut TcpStream) -> u64 {
    stream.set_nonblocking(true).unwrap();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    let mut blocked_since: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            Instant::now() < deadline,
            "writes never stayed blocked: the server reads without bound ({written} bytes)"
        );
        fill_stream(5, written, &mut chunk);
        match stream.write(&chunk) {
            Ok(n) => {
                written += n as u64;
                blocked_since = None;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= STUCK_FOR {
                    return written;
                }
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("write failed after {written} bytes: {e}"),
        }
    }
}

fn second_signal(first: libc::c_int, second: libc::c_int) {
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--drain-timeout", "10"]);
    let mut stuck = connect(server.addr);
    round_trip(&mut stuck, b"hello");
    let written = write_until_stuck(&mut stuck);
    println!("{written} bytes written by a client that never reads");

    server.signal(first);
    assert!(
        server.wait_for_stderr("draining", Duration::from_secs(5)),
        "the server did not say it is draining\n{}",
        server.stderr_so_far()
    );
    // The drain cannot finish (the client reads nothing), and its timeout is 10 s away.
    thread::sleep(Duration::from_millis(200));
    let mut server = server;
    server.assert_running();

    let signalled = Instant::now();
    server.signal(second);
    let output = server.wait_exit(SECOND_SIGNAL_GUARD);
    println!("exited {:?} after the second signal", signalled.elapsed());
    output.assert_no_panic();
    assert_eq!(
        output.code(),
        Some(128 + second),
        "exit status after a second signal during the drain\n{}",
        output.describe()
    );
    assert!(
        output.stderr.contains("during the drain"),
        "no message about the second signal\n{}",
        output.describe()
    );
    drop(stuck);
}

fn second_sigterm_during_the_drain_exits_143_at_once() {
    second_signal(libc::SIGTERM, libc::SIGTERM);
}

fn sigint_during_a_sigterm_drain_exits_130_at_once() {
    second_signal(libc::SIGTERM, libc::SIGINT);
}

per_backend!(
    sigterm_under_load_exits_0_within_the_drain_timeout,
    sigterm_under_load_echoes_everything_sent_before_it,
    second_sigterm_during_the_drain_exits_143_at_once,
    sigint_during_a_sigterm_drain_exits_130_at_once,
);
