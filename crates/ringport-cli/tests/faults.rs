//! Injected faults (`RINGPORT_FAULTS`): a send or receive that fails cuts that one connection
//! cleanly (what came back is an exact prefix of what was sent, then EOF or a reset), a short
//! send loses nothing, a receive that finds no buffer loses nothing, and the server keeps
//! serving the others and exits 0.

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use util::{connect, number_between, pattern, read_prefix_of, Server, StreamEnd};

/// Connections streaming at once.
const CONNECTIONS: usize = 50;
/// Chunks each connection writes, and their size (irregular, so that nothing lines up with the
/// server's pool buffers).
const CHUNKS: usize = 8;
const CHUNK: usize = 8 * 1024 + 123;
/// Hang guard for the exit after SIGTERM (default drain timeout plus margin).
const EXIT_GUARD: Duration = Duration::from_secs(15);
/// Hang guard for each read and write of a connection whose worker may be lost.
const IO_GUARD: Duration = Duration::from_secs(30);
/// Fresh connections tried after the run (a fault may hit one of them too).
const FRESH_TRIES: usize = 20;

/// What one connection saw.
#[derive(Debug)]
struct Outcome {
    got: usize,
    end: StreamEnd,
    /// Whether the writer sent everything (it stops at the first error).
    wrote_all: bool,
}

/// A server on 127.0.0.1 with `extra` flags and the fault rules `spec`.
fn server_with_faults(spec: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Server::start_configured(&args, |cmd| {
        cmd.env("RINGPORT_FAULTS", spec);
    })
}

/// The exit summary's count of sends and receives tried again for want of memory.
fn retries_in_summary(output: &util::Output) -> u64 {
    number_between(&output.stdout, "tried ", " sends or receives again")
        .unwrap_or_else(|| panic!("the summary counts no retries\n{}", output.describe()))
}

/// Writes `data` in chunks from a writer thread, then half-closes, while this thread reads the
/// echo back; checks it is a prefix of `data`.
fn stream_one(addr: SocketAddr, data: Vec<u8>, what: String) -> Outcome {
    stream_on(connect(addr), data, what)
}

/// [`stream_one`] on a connection already made.
fn stream_on(mut stream: TcpStream, data: Vec<u8>, what: String) -> Outcome {
    let mut writer = stream.try_clone().unwrap();
    let sent = data.clone();
    let w = thread::spawn(move || -> bool {
        for chunk in data.chunks(CHUNK) {
            if writer.write_all(chunk).is_err() {
                return false;
            }
        }
        let _ = writer.shutdown(Shutdown::Write);
        true
    });
    let (got, end) = read_prefix_of(&mut stream, &sent, &what);
    let wrote_all = w.join().expect("writer thread panicked");
    Outcome {
        got,
        end,
        wrote_all,
    }
}

/// One small round trip on a new connection; `Err` if a fault cut it.
fn fresh_echo(addr: SocketAddr) -> Result<(), String> {
    let mut s = connect(addr);
    let msg = pattern(999, 100);
    s.write_all(&msg).map_err(|e| format!("write: {e}"))?;
    s.shutdown(Shutdown::Write).map_err(|e| format!("{e}"))?;
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if util::is_reset(&e) => return Err(format!("reset after {} bytes", got.len())),
        Err(e) => panic!("fresh connection: read failed: {e}"),
    }
    assert!(
        msg.starts_with(&got),
        "fresh connection: the echo is not a prefix of what was sent"
    );
    if got.len() == msg.len() {
        Ok(())
    } else {
        Err(format!("EOF after {} of {} bytes", got.len(), msg.len()))
    }
}

/// Starts a server with `RINGPORT_FAULTS=spec` and streams `CONNECTIONS` connections at it at
/// once (data seeded from `seed`); returns the server and what each connection saw.
fn stream_with_faults(spec: &str, seed: u64) -> (Server, Vec<Outcome>) {
    let server = server_with_faults(spec, &[]);
    let addr = server.addr;
    let handles: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let data = pattern(seed + i as u64, CHUNKS * CHUNK);
            let what = format!("connection {i} ({spec})");
            thread::spawn(move || stream_one(addr, data, what))
        })
        .collect();
    let outcomes = handles
        .into_iter()
        .map(|h| h.join().expect("a connection's check failed"))
        .collect();
    (server, outcomes)
}

fn faulty_streams(spec: &str) {
    let (server, outcomes) = stream_with_faults(spec, 7000);
    let addr = server.addr;
    let len = CHUNKS * CHUNK;

    let complete = outcomes
        .iter()
        .filter(|o| o.got == len && o.end == StreamEnd::Eof)
        .count();
    let cut: Vec<&Outcome> = outcomes.iter().filter(|o| o.got < len).collect();
    let resets = outcomes
        .iter()
        .filter(|o| o.end == StreamEnd::Reset)
        .count();
    let short_writes = outcomes.iter().filter(|o| !o.wrote_all).count();
    println!(
        "{spec}: {complete} of {CONNECTIONS} connections echoed everything, {} were cut \
         ({resets} ended with a reset, {short_writes} writers stopped early)",
        cut.len()
    );
    assert!(
        complete >= 1,
        "{spec}: no connection got its whole stream back: {outcomes:?}"
    );
    assert!(
        !cut.is_empty(),
        "{spec}: every connection got its whole stream back: the fault never hit"
    );

    let mut server = server;
    server.assert_running();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut errors = Vec::new();
    let served = (0..FRESH_TRIES).any(|_| {
        if Instant::now() >= deadline {
            return false;
        }
        match fresh_echo(addr) {
            Ok(()) => true,
            Err(e) => {
                errors.push(e);
                false
            }
        }
    });
    assert!(
        served,
        "{spec}: no fresh connection was served after the run: {errors:?}"
    );
    drop(errors);

    let output = server.terminate_cleanly(EXIT_GUARD);
    let served = number_between(&output.stdout, "served ", " connections")
        .unwrap_or_else(|| panic!("no summary\n{}", output.describe()));
    assert!(
        served > CONNECTIONS as u64,
        "served {served} connections, want more than {CONNECTIONS}\n{}",
        output.describe()
    );
}

fn failing_and_short_sends_cut_only_their_connection() {
    faulty_streams("send=EPIPE/37,send=short/5");
}

fn failing_receives_cut_only_their_connection() {
    faulty_streams("recv=ECONNRESET/3");
}

/// Streams with faults `spec` that must cost nothing: every connection gets all its bytes back,
/// then EOF, and the server exits cleanly; returns its output.
fn faults_lose_nothing(spec: &str, seed: u64) -> util::Output {
    let (mut server, outcomes) = stream_with_faults(spec, seed);
    let len = CHUNKS * CHUNK;
    for (i, o) in outcomes.iter().enumerate() {
        assert!(
            o.got == len && o.end == StreamEnd::Eof && o.wrote_all,
            "connection {i} ({spec}): {o:?}, want all {len} bytes back, then EOF"
        );
    }
    server.assert_running();
    server.terminate_cleanly(EXIT_GUARD)
}

/// A receive that ends for want of a buffer (`ENOBUFS`) is not an error: the connection waits
/// for its turn and is re-armed, and no byte is lost or reordered.
fn receives_that_find_no_buffer_lose_nothing() {
    faults_lose_nothing("recv=ENOBUFS/3", 9000);
}

/// A receive cancelled by someone other than the server (here, injected) is not the end of
/// its connection: it is re-armed in its turn, and no byte is lost or reordered.
fn receives_cancelled_from_elsewhere_lose_nothing() {
    faults_lose_nothing("recv=ECANCELED/3", 9500);
}

/// A send or receive that could not start because io_uring was short of memory for the
/// request (`EAGAIN`) is tried again after a pause, as for `ENOMEM`: no connection is cut.
fn sends_and_receives_the_kernel_could_not_take_are_retried_and_lose_nothing() {
    let output = faults_lose_nothing("send=EAGAIN/7,recv=EAGAIN/11", 11500);
    assert!(retries_in_summary(&output) > 0, "{}", output.describe());
}

/// A send or receive that fails for want of memory (`ENOMEM`) is tried again after a pause:
/// no connection is cut, every byte comes back in order, and the summary counts the retries.
fn sends_and_receives_that_run_out_of_memory_are_retried_and_lose_nothing() {
    // Rare enough that no connection fails `RETRY_LIMIT` (8) times in a row.
    let output = faults_lose_nothing("send=ENOMEM/7,recv=ENOMEM/11", 11000);
    let retried = retries_in_summary(&output);
    assert!(retried > 0, "{}", output.describe());
    assert!(
        output.stderr.contains("ENOMEM") && output.stderr.contains("trying again"),
        "no warning names the error and the retry\n{}",
        output.describe()
    );
}

/// Sends that keep failing for want of memory are given up after a bounded number of tries:
/// the connection is closed with a warning (the first; every one is counted in the summary),
/// having echoed nothing it did not send whole, and the server goes on.
fn sends_that_keep_running_out_of_memory_close_their_connection() {
    let spec = "send=ENOMEM/1";
    let mut server = server_with_faults(spec, &[]);
    for _ in 0..2 {
        let mut s = connect(server.addr);
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&pattern(5, 1000)).unwrap();
        let mut got = Vec::new();
        match s.read_to_end(&mut got) {
            Ok(_) => {}
            Err(e) if util::is_reset(&e) => {}
            Err(e) => panic!("{spec}: the connection was not closed: {e}"),
        }
        assert!(got.is_empty(), "{spec}: {} bytes came back", got.len());
    }
    server.assert_running();
    let output = server.terminate_cleanly(EXIT_GUARD);
    assert!(
        output.stderr.contains("send") && output.stderr.contains("closing the connection"),
        "no warning says why the connection was closed\n{}",
        output.describe()
    );
    let retried = retries_in_summary(&output);
    assert_eq!(
        retried,
        16,
        "retries before giving up, 8 a connection\n{}",
        output.describe()
    );
    assert_eq!(
        number_between(&output.stdout, "closed ", " whose sends or receives failed"),
        Some(2),
        "the summary counts both connections closed for want of memory\n{}",
        output.describe()
    );
}

/// A worker whose wait for completions fails (as a failing `io_uring_enter` or `epoll_wait`
/// would) is lost: the error is logged at once, naming the worker, every connection gets back
/// an exact prefix of what it sent, the other workers drain, and the server exits by itself
/// with status 1 rather than serve on without that worker. One wait fails, once: the other
/// worker's waits all succeed, so only the drain it is told to do makes it stop.
fn a_worker_that_cannot_wait_stops_the_server_with_status_1() {
    let spec = "wait=EIO/40*1";
    let server = server_with_faults(spec, &["--workers", "2"]);
    let addr = server.addr;
    // Each connection checks that what came back is a prefix of what it sent; once the
    // listener's worker has stopped, connecting is refused.
    let handles: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let data = pattern(13000 + i as u64, CHUNKS * CHUNK);
            let what = format!("connection {i} ({spec})");
            thread::spawn(move || {
                // Bounded: a server that served on without the lost worker would otherwise
                // leave these reads waiting for ever.
                let s = TcpStream::connect_timeout(&addr, IO_GUARD).ok()?;
                s.set_read_timeout(Some(IO_GUARD)).unwrap();
                s.set_write_timeout(Some(IO_GUARD)).unwrap();
                Some(stream_on(s, data, what))
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a connection's check failed");
    }
    // Should the load have taken fewer than 40 waits (a loaded machine batches more per wait),
    // more connections make more, until the failing one comes.
    let mut server = server;
    let deadline = Instant::now() + EXIT_GUARD;
    while server.try_status().is_none() && Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, IO_GUARD) {
            let _ = s.write_all(b"another wait");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let output = server.wait_exit(EXIT_GUARD);
    output.assert_no_panic();
    assert_eq!(output.code(), Some(1), "{}", output.describe());
    assert!(
        output.stderr.contains("ERROR")
            && output.stderr.contains("Input/output error")
            && output.stderr.contains("exiting with status 1"),
        "no error names the failed worker and what follows\n{}",
        output.describe()
    );
}

fn bad_fault_spec_is_named() {
    let output = util::run_cli_configured(
        &["serve", "--listen", "127.0.0.1:0"],
        util::CLI_TIMEOUT,
        |cmd| {
            cmd.env("RINGPORT_FAULTS", "recv=EWHAT/3");
        },
    );
    output.assert_no_panic();
    assert_eq!(output.code(), Some(1), "{}", output.describe());
    assert!(
        output.stderr.contains("RINGPORT_FAULTS"),
        "the error does not name RINGPORT_FAULTS\n{}",
        output.describe()
    );
}

/// A drain (SIGTERM) that begins while receives wait to be tried again for want of memory
/// still echoes everything each peer sent before its FIN, and the server exits 0.
fn a_drain_during_receive_retries_loses_nothing() {
    // Every other receive fails: retries are pending most of the time, and never eight in a
    // row for one connection.
    let spec = "recv=ENOMEM/2";
    let server = server_with_faults(spec, &["--workers", "1"]);
    let sent: Vec<Vec<u8>> = (0..4).map(|i| pattern(40 + i, 200_000)).collect();
    let mut streams: Vec<TcpStream> = sent
        .iter()
        .map(|data| {
            let mut s = connect(server.addr);
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            // An echo first: the server has accepted the connection (one still in the listen
            // queue when the drain begins is refused, as the listener closes).
            util::round_trip(&mut s, b"accepted?");
            s.write_all(data)
                .unwrap_or_else(|e| panic!("{spec}: write failed: {e}"));
            s
        })
        .collect();
    let readers: Vec<_> = streams
        .iter_mut()
        .map(|s| {
            s.shutdown(Shutdown::Write).unwrap();
            let mut r = s.try_clone().unwrap();
            thread::spawn(move || {
                let mut got = Vec::new();
                r.read_to_end(&mut got).map(|_| got)
            })
        })
        .collect();
    // The drain starts with the echo still on its way.
    server.signal(libc::SIGTERM);
    let got: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let output = server.wait_exit(EXIT_GUARD);
    for (i, (got, data)) in got.into_iter().zip(&sent).enumerate() {
        let got =
            got.unwrap_or_else(|e| panic!("{spec}: connection {i}: {e}\n{}", output.describe()));
        util::assert_bytes_eq(&got, data, &format!("{spec}: connection {i}"));
    }
    output.assert_no_panic();
    assert_eq!(output.code(), Some(0), "{}", output.describe());
    let retried = retries_in_summary(&output);
    assert!(retried > 0, "{}", output.describe());
}

per_backend!(
    a_drain_during_receive_retries_loses_nothing,
    failing_and_short_sends_cut_only_their_connection,
    failing_receives_cut_only_their_connection,
    receives_that_find_no_buffer_lose_nothing,
    receives_cancelled_from_elsewhere_lose_nothing,
    sends_and_receives_that_run_out_of_memory_are_retried_and_lose_nothing,
    sends_and_receives_the_kernel_could_not_take_are_retried_and_lose_nothing,
    sends_that_keep_running_out_of_memory_close_their_connection,
    a_worker_that_cannot_wait_stops_the_server_with_status_1,
    bad_fault_spec_is_named,
);
