//! Shutdown: SIGTERM / SIGINT stop the server gracefully (echo what was sent, FIN every
//! connection, exit 0, print a summary), and `--drain-timeout` bounds the wait.

mod util;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use util::{
    assert_bytes_eq, connect, number_between, pattern, read_to_eof, round_trip, Output, Server,
};

/// Default drain timeout (5 s) plus a generous margin: a hang guard only.
const EXIT_GUARD: Duration = Duration::from_secs(15);

fn summary(output: &Output) -> (u64, u64) {
    let served = number_between(&output.stdout, "served ", " connections")
        .unwrap_or_else(|| panic!("stdout lacks `served N connections`\n{}", output.describe()));
    let echoed = number_between(&output.stdout, "echoed ", " bytes")
        .unwrap_or_else(|| panic!("stdout lacks `echoed B bytes`\n{}", output.describe()));
    (served, echoed)
}

/// Opens `busy + 1` connections (the last one idle), round-trips a message on each so the server
/// has surely accepted them, leaves a final chunk unread on the busy ones, sends `sig`, and checks
/// that every client reads its data and then a clean EOF, that the server exits 0, and that the
/// summary counts every connection and byte.
fn graceful_shutdown(sig: libc::c_int, busy: usize) {
    // SIGHUP's disposition is inherited: the server must start with the default one.
    let server = Server::start_configured(&["--listen", "127.0.0.1:0"], |cmd| {
        sighup_set_to(cmd, libc::SIG_DFL);
    });
    let addr = server.addr;
    let mut streams: Vec<TcpStream> = (0..=busy).map(|_| connect(addr)).collect();
    let mut total = 0u64;
    for (i, s) in streams.iter_mut().enumerate() {
        let msg = pattern(i as u64, 1000);
        round_trip(s, &msg);
        total += msg.len() as u64;
    }
    // Data in flight at the moment of the signal: written, not yet read back. 16 KiB fits the
    // loopback buffers, so the write completes at once.
    let finals: Vec<Vec<u8>> = (0..busy)
        .map(|i| pattern(100 + i as u64, 16 * 1024))
        .collect();
    for (s, data) in streams.iter_mut().zip(&finals) {
        s.write_all(data).unwrap();
        total += data.len() as u64;
    }

    server.signal(sig);

    for (i, mut s) in streams.into_iter().enumerate() {
        let got = read_to_eof(&mut s);
        let want: &[u8] = finals.get(i).map_or(&[], Vec::as_slice);
        assert_bytes_eq(
            &got,
            want,
            &format!("connection {i}: data after the signal"),
        );
    }

    let output = server.wait_exit(EXIT_GUARD);
    output.assert_no_panic();
    assert_eq!(
        output.code(),
        Some(0),
        "exit status after signal {sig}\n{}",
        output.describe()
    );
    let (served, echoed) = summary(&output);
    assert_eq!(
        served,
        busy as u64 + 1,
        "served count\n{}",
        output.describe()
    );
    assert_eq!(echoed, total, "echoed byte count\n{}", output.describe());
}

fn sigterm_with_open_connections_drains_and_exits_0() {
    graceful_shutdown(libc::SIGTERM, 3);
}

fn sigint_with_open_connections_drains_and_exits_0() {
    graceful_shutdown(libc::SIGINT, 1);
}

/// A closed terminal (SIGHUP) drains as SIGTERM does.
fn sighup_with_open_connections_drains_and_exits_0() {
    graceful_shutdown(libc::SIGHUP, 2);
}

/// Makes `cmd`'s process start with SIGHUP's disposition `to` (`SIG_IGN`, as `nohup` does, or
/// `SIG_DFL`).
fn sighup_set_to(cmd: &mut std::process::Command, to: libc::sighandler_t) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before `exec`, and only calls `signal(2)`,
    // which is async-signal-safe and touches no memory of the parent's.
    unsafe {
        cmd.pre_exec(move || {
            if libc::signal(libc::SIGHUP, to) == libc::SIG_ERR {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Started with SIGHUP ignored (`nohup ringport serve`), the server stays up when its terminal
/// goes: SIGHUP neither drains it nor kills it.
fn sighup_ignored_at_start_stays_ignored() {
    let mut server = Server::start_configured(&["--listen", "127.0.0.1:0"], |cmd| {
        sighup_set_to(cmd, libc::SIG_IGN);
    });
    let mut s = connect(server.addr);
    round_trip(&mut s, b"before");
    server.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    server.assert_running();
    round_trip(&mut s, b"after the hangup");
    assert!(
        !server.stderr_so_far().contains("draining"),
        "the server drains on an ignored SIGHUP\n{}",
        server.stderr_so_far()
    );
    drop(s);
    let output = server.terminate_cleanly(EXIT_GUARD);
    assert_eq!(summary(&output).0, 1, "{}", output.describe());
    assert!(
        !output.stderr.contains(&format!("signal {}:", libc::SIGHUP)),
        "the server took the ignored SIGHUP\n{}",
        output.describe()
    );
}

fn sigterm_when_idle_exits_0_with_zero_summary() {
    let server = Server::start();
    let output = server.terminate_cleanly(EXIT_GUARD);
    assert_eq!(summary(&output), (0, 0), "{}", output.describe());
}

fn sigterm_echoes_backlogged_data_sent_before_the_signal() {
    // The client writes without reading until its socket would block, so that at the moment of
    // the signal the server surely has input it has not echoed yet (it cannot send while our
    // receive buffer is full). All of it was sent before the signal, so all of it must come back
    // once we read, followed by a FIN.
    let server = Server::start();
    let mut stream = connect(server.addr);
    round_trip(&mut stream, b"accepted?");
    stream.set_nonblocking(true).unwrap();
    // (Capped at 32 MiB; the loopback buffers hold a few MiB.)
    let burst = pattern(77, 32 * 1024 * 1024);
    let mut written = 0usize;
    while written < burst.len() {
        match stream.write(&burst[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write failed: {e}"),
        }
    }
    assert!(written > 0, "could not write anything");
    println!(
        "{written} of {} bytes written before the signal",
        burst.len()
    );
    stream.set_nonblocking(false).unwrap();

    server.signal(libc::SIGTERM);

    let got = read_to_eof(&mut stream);
    assert_bytes_eq(
        &got,
        &burst[..written],
        "echo of the data sent before SIGTERM",
    );
    drop(stream);
    let output = server.wait_exit(EXIT_GUARD);
    output.assert_no_panic();
    assert_eq!(output.code(), Some(0), "{}", output.describe());
    assert_eq!(
        summary(&output),
        (1, written as u64 + 9),
        "{}",
        output.describe()
    );
}

/// A connection to `addr` whose receive buffer is `size` bytes (set before it connects, so the
/// window it offers follows), with a 10 s read timeout.
fn connect_with_recv_buffer(addr: std::net::SocketAddr, size: usize) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(size).unwrap();
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(10))
        .unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// A client that has not read its echo when the drain begins, and writes once more after the
/// server has gone quiet (before it has seen any FIN), still gets all of its echo and a clean
/// EOF: the server does not close while the client has not taken the echo (a close would make
/// the kernel answer that write with a reset, and drop the echo it still held).
fn a_client_writing_during_the_drain_gets_all_of_its_echo() {
    let server = Server::start();
    // A receive buffer of its own size, whatever the host's default: the echo below is more
    // than it takes, so part of it waits in the server's kernel, unacknowledged.
    let mut stream = connect_with_recv_buffer(server.addr, 64 << 10);
    round_trip(&mut stream, b"accepted?");
    let data = pattern(31, 200_000);
    stream.write_all(&data).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    server.signal(libc::SIGTERM);
    // Longer than the drain's quiet spell.
    std::thread::sleep(Duration::from_millis(1000));
    let mut expected = data.clone();
    if stream.write_all(b"z").is_ok() {
        expected.push(b'z');
    }
    std::thread::sleep(Duration::from_millis(200));
    let got = read_to_eof(&mut stream);
    assert_bytes_eq(
        &got,
        &expected,
        "echo of a client that wrote during the drain",
    );
    drop(stream);
    let output = server.wait_exit(EXIT_GUARD);
    output.assert_no_panic();
    assert_eq!(output.code(), Some(0), "{}", output.describe());
}

/// Writes to `stream` without reading its echo until every buffer on the way is full: a write
/// that would block for 200 ms in a row (the server may be slow to run). How much went.
fn write_until_stuck(stream: &mut TcpStream) -> usize {
    stream.set_nonblocking(true).unwrap();
    let chunk = pattern(9, 64 * 1024);
    let mut written = 0usize;
    let mut blocked_since: Option<std::time::Instant> = None;
    while written < 64 * 1024 * 1024 {
        match stream.write(&chunk) {
            Ok(n) => {
                written += n;
                blocked_since = None;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= Duration::from_millis(200) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }
    written
}

/// Once draining, the server takes no new connection (its listener is closed), while a
/// connection it cannot finish keeps the drain going.
fn the_drain_takes_no_new_connection() {
    let mut server = Server::start_with(&["--listen", "127.0.0.1:0", "--drain-timeout", "30"]);
    let mut stuck = connect_with_recv_buffer(server.addr, 4096);
    round_trip(&mut stuck, b"hello");
    write_until_stuck(&mut stuck);
    server.signal(libc::SIGTERM);
    assert!(
        server.wait_for_stderr("draining", Duration::from_secs(10)),
        "the server did not say it drains\n{}",
        server.stderr_so_far()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&server.addr, Duration::from_secs(5)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
            Err(e) => panic!("connect during the drain: {e}"),
            // Taken before the drain began (the signal is logged before the workers hear of
            // it), or in the backlog when the listener closed (then reset): either way,
            // dropped here, and the next try comes.
            Ok(late) => drop(late),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections are still accepted 10 s into the drain"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.assert_running();
    drop(stuck);
    let output = server.wait_exit(EXIT_GUARD);
    output.assert_no_panic();
}

fn drain_timeout_bounds_shutdown_when_a_client_never_reads() {
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--drain-timeout", "1"]);
    // A small receive buffer, so the kernel cannot take in the whole echo on the client's
    // behalf (it would, a few MiB of it, and the drain would then finish on time).
    let mut stuck = connect_with_recv_buffer(server.addr, 4096);
    round_trip(&mut stuck, b"hello");
    // Write without ever reading the echo: the server cannot finish echoing this connection.
    let written = write_until_stuck(&mut stuck);

    server.signal(libc::SIGTERM);
    // 1 s drain timeout plus a generous margin: a hang guard, not a timing assertion.
    let output = server.wait_exit(Duration::from_secs(10));
    output.assert_no_panic();
    println!(
        "drain timeout expired with {written} bytes unread by the client; exit status {:?}",
        output.status
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "a drain that times out still ends in an orderly exit\n{}",
        output.describe()
    );
    assert!(
        output.stderr.contains("drain timeout"),
        "no warning says the drain timed out\n{}",
        output.describe()
    );
    // The connection was closed, not left open: the client sees the end of what was echoed
    // (or a reset, its input unread) within the guard.
    stuck.set_nonblocking(false).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match stuck.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if util::is_reset(&e) => break,
            Err(e) => panic!("the connection was not closed: {e}"),
        }
    }
}

/// With `-vv` the server logs each step of a connection, as the book's server prints them:
/// connected, bytes received, bytes sent, closing.
fn every_step_of_a_connection_is_logged_with_vv() {
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "-vv"]);
    let mut s = connect(server.addr);
    round_trip(&mut s, b"hello");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut s), Vec::<u8>::new());
    let output = server.terminate_cleanly(EXIT_GUARD);
    let fd = output
        .stderr
        .lines()
        .find_map(|l| {
            l.split("socket ")
                .nth(1)?
                .strip_suffix(" connected")?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no `socket N connected` line\n{}", output.describe()));
    for step in [
        format!("socket {fd}: received 5 bytes"),
        format!("socket {fd}: sent 5 bytes"),
        format!("closing socket {fd}"),
    ] {
        assert!(
            output.stderr.contains(&step),
            "no `{step}` line\n{}",
            output.describe()
        );
    }
}

per_backend!(
    every_step_of_a_connection_is_logged_with_vv,
    sigterm_with_open_connections_drains_and_exits_0,
    sigint_with_open_connections_drains_and_exits_0,
    sighup_with_open_connections_drains_and_exits_0,
    sighup_ignored_at_start_stays_ignored,
    sigterm_when_idle_exits_0_with_zero_summary,
    sigterm_echoes_backlogged_data_sent_before_the_signal,
    a_client_writing_during_the_drain_gets_all_of_its_echo,
    drain_timeout_bounds_shutdown_when_a_client_never_reads,
    the_drain_takes_no_new_connection,
);

per_model!(
    sigterm_with_open_connections_drains_and_exits_0,
    sigint_with_open_connections_drains_and_exits_0,
    sighup_with_open_connections_drains_and_exits_0,
    sighup_ignored_at_start_stays_ignored,
    sigterm_when_idle_exits_0_with_zero_summary,
    sigterm_echoes_backlogged_data_sent_before_the_signal,
    a_client_writing_during_the_drain_gets_all_of_its_echo,
    drain_timeout_bounds_shutdown_when_a_client_never_reads,
    the_drain_takes_no_new_connection,
);

/// The reader of the server's output can go away (`ringport serve | head`, a log collector that
/// stopped): the server still drains and exits 0 on SIGTERM, leaving unwritten what it cannot
/// write.
#[test]
fn sigterm_exits_0_after_the_output_readers_are_gone() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    let mut child = Command::new(util::BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ringport serve");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // A watchdog kills the server should the test hang (a server that never says it listens)
    // or fail before reaping it; told the outcome once the server is reaped, it does nothing.
    let (reaped, watch) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if watch.recv_timeout(2 * EXIT_GUARD).is_err() {
            // SAFETY: kill(2) on our child's pid, which has not been reaped (the test says so
            // once it has), so the pid is still the server's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut stderr = io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        let n = stderr.read_line(&mut line).expect("read the server's log");
        assert!(n > 0, "the server exited before listening");
    }
    drop(stderr);
    drop(child.stdout.take());
    // SAFETY: kill(2) on our own child's pid, which has not been waited for yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let guard = Instant::now() + EXIT_GUARD;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait on the server") {
            break status;
        }
        if Instant::now() >= guard {
            let _ = child.kill();
            let _ = child.wait();
            let _ = reaped.send(());
            panic!("the server did not exit after SIGTERM once its output readers were gone");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = reaped.send(());
    assert_eq!(status.code(), Some(0), "{status}");
}
