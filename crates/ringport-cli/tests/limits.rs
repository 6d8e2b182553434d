//! Limits: `--max-connections` refuses the excess and recovers, `--idle-timeout` closes idle
//! connections only, and running out of descriptors (EMFILE) neither kills the server nor makes
//! it spin.

mod util;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use util::{
    connect, fd_count, is_reset, number_between, pattern, raise_own_nofile, read_exact_len,
    round_trip, Server,
};

/// Hang guard for the exit after SIGTERM (default drain timeout plus margin).
const EXIT_GUARD: Duration = Duration::from_secs(15);
/// How long a connection over the limit (or an idle one) may take to be closed: a hang guard.
const CLOSE_GUARD: Duration = Duration::from_secs(10);
/// How long to keep retrying a connection that the server should accept again.
const RECOVERY_GUARD: Duration = Duration::from_secs(10);

/// The server's descriptor limit (soft and hard) in the EMFILE test.
const SERVER_NOFILE: u64 = 256;
/// Connections the EMFILE test opens: well past [`SERVER_NOFILE`].
const EMFILE_CONNECTIONS: usize = 400;
/// Of which the test closes this many to let the server recover.
const EMFILE_CLOSED: usize = 300;
/// Window over which the server's accept attempts are counted while it is out of descriptors.
const SATURATED_WINDOW: Duration = Duration::from_secs(2);

/// Reads from `stream` until the server closes it; panics if it stays open or sends data.
#[track_caller]
fn expect_closed_by_server(stream: &mut TcpStream, what: &str) {
    let guard = Instant::now() + CLOSE_GUARD;
    let mut buf = [0u8; 64];
    loop {
        let left = guard.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => panic!("{what}: got {n} bytes instead of being closed"),
            Err(e) if is_reset(&e) => return,
            // A read with a timeout is not restarted after a signal handler ran (signal(7)).
            Err(e) if e.kind() == io::ErrorKind::Interrupted && !left.is_zero() => {}
            Err(e) => panic!("{what}: not closed by the server within {CLOSE_GUARD:?}: {e}"),
        }
    }
}

/// Connects and round-trips `msg`; `Err` (with why) if the server closes the connection instead.
fn try_round_trip(addr: SocketAddr, msg: &[u8]) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect_timeout(&addr, CLOSE_GUARD).map_err(|e| format!("{e}"))?;
    s.set_read_timeout(Some(CLOSE_GUARD)).unwrap();
    s.set_write_timeout(Some(CLOSE_GUARD)).unwrap();
    s.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; msg.len()];
    let mut n = 0;
    while n < msg.len() {
        match s.read(&mut got[n..]) {
            Ok(0) => return Err(format!("EOF after {n} bytes")),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read after {n} bytes: {e}")),
        }
    }
    assert_eq!(got, msg, "round trip on a connection the server accepted");
    Ok(s)
}

/// [`try_round_trip`], retried until it works or [`RECOVERY_GUARD`] passes.
#[track_caller]
fn round_trip_eventually(addr: SocketAddr, msg: &[u8], what: &str) -> TcpStream {
    let deadline = Instant::now() + RECOVERY_GUARD;
    let mut tries = 0;
    loop {
        tries += 1;
        match try_round_trip(addr, msg) {
            Ok(s) => return s,
            Err(e) if Instant::now() >= deadline => {
                panic!("{what}: still not served after {tries} tries ({RECOVERY_GUARD:?}): {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn max_connections_refuses_the_excess_and_recovers() {
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--max-connections", "5"]);
    let addr = server.addr;
    let mut first: Vec<TcpStream> = (0..5).map(|_| connect(addr)).collect();
    for (i, s) in first.iter_mut().enumerate() {
        round_trip(s, &pattern(i as u64, 100));
    }

    // Three more: each is closed at once.
    for i in 0..3 {
        let mut extra = connect(addr);
        expect_closed_by_server(&mut extra, &format!("connection {} over the limit", 6 + i));
    }

    // The five accepted ones are unaffected.
    for (i, s) in first.iter_mut().enumerate() {
        round_trip(s, &pattern(10 + i as u64, 4096));
    }

    // Close two: two new connections are served again (once the server has seen the closes).
    first.truncate(3);
    let a = round_trip_eventually(addr, b"room again?", "first connection after closing two");
    let b = round_trip_eventually(addr, b"and another?", "second connection after closing two");
    for (i, s) in first.iter_mut().enumerate() {
        round_trip(s, &pattern(20 + i as u64, 100));
    }
    drop((first, a, b));

    let output = server.terminate_cleanly(EXIT_GUARD);
    let refused = number_between(&output.stdout, "refused ", " over --max-connections")
        .unwrap_or_else(|| {
            panic!(
                "summary lacks `refused N over --max-connections`\n{}",
                output.describe()
            )
        });
    assert!(refused >= 3, "refused {refused} < 3\n{}", output.describe());
    assert!(
        output.stderr.contains("--max-connections"),
        "no warning about refused connections\n{}",
        output.describe()
    );
}

fn idle_timeout_closes_idle_connections_only() {
    // 4 s: the active connection below is idle for 0.1 s at a time, so only a stall of nearly
    // 4 s (of this test or the server) could make it look idle.
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--idle-timeout", "4"]);
    let addr = server.addr;
    let mut idle = connect(addr);
    // Taken before the last traffic: the server's last activity on this connection comes
    // after it, whatever this thread's pace.
    let since = Instant::now();
    round_trip(&mut idle, b"then silence");
    let mut active = connect(addr);
    round_trip(&mut active, b"keep-alive");

    // The active connection sends every 100 ms on its own thread until the idle one is closed.
    let done = Arc::new(AtomicBool::new(false));
    let keeper = thread::spawn({
        let done = Arc::clone(&done);
        move || {
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                round_trip(&mut active, &pattern(i, 32));
                i += 1;
                thread::sleep(Duration::from_millis(100));
            }
            (active, i)
        }
    });

    expect_closed_by_server(&mut idle, "idle connection");
    let idle_for = since.elapsed();
    // A lower bound only: the server was last active on the idle connection after `since`
    // was taken, so it cannot have closed it sooner than 4 s after (less the clocks'
    // millisecond rounding).
    assert!(
        idle_for >= Duration::from_millis(3900),
        "the idle connection was closed after {idle_for:?}, before its 4 s timeout"
    );
    done.store(true, Ordering::Relaxed);
    let (mut active, rounds) = keeper.join().expect("the active connection failed");
    println!("active connection: {rounds} round trips while the idle one lasted {idle_for:?}");
    round_trip(&mut active, b"still here");
    drop((idle, active));

    let output = server.terminate_cleanly(EXIT_GUARD);
    let closed = number_between(&output.stdout, "closed ", " idle")
        .unwrap_or_else(|| panic!("summary lacks `closed N idle`\n{}", output.describe()));
    assert_eq!(
        closed,
        1,
        "only the idle connection should have been closed\n{}",
        output.describe()
    );
}

/// Makes the server start with a descriptor limit (soft and hard) of `limit`.
fn limit_descriptors(cmd: &mut std::process::Command, limit: u64) {
    // SAFETY: the hook runs in the forked child before exec; it only calls setrlimit(2), which
    // is async-signal-safe, on a struct on its own stack, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn out_of_descriptors_backs_off_warns_once_and_recovers() {
    let own = raise_own_nofile(4096);
    assert!(
        own >= EMFILE_CONNECTIONS as u64 + 100,
        "this test needs {} descriptors; RLIMIT_NOFILE allows {own}",
        EMFILE_CONNECTIONS + 100
    );
    // `-v`: each failed accept is logged.
    let server = Server::start_configured(&["--listen", "127.0.0.1:0", "-v"], |cmd| {
        limit_descriptors(cmd, SERVER_NOFILE);
    });
    let addr = server.addr;
    let pid = server.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        nofile.split_whitespace().nth(3) == Some("256"),
        "the server's descriptor limit is not 256: {nofile}"
    );
    println!("server descriptors at start: {}", fd_count(pid));

    let mut conns: Vec<TcpStream> = (0..EMFILE_CONNECTIONS).map(|_| connect(addr)).collect();
    let warned = server.wait_for_stderr("too many open files", CLOSE_GUARD);
    assert!(
        warned,
        "no `too many open files` warning with {EMFILE_CONNECTIONS} connections and a limit of \
         {SERVER_NOFILE}; descriptors: {}\n{}",
        fd_count(pid),
        server.stderr_so_far()
    );
    // Give the server a moment to fill its descriptor table and settle into backing off.
    thread::sleep(Duration::from_millis(300));
    let mut server = server;
    server.assert_running();
    let fds = fd_count(pid);

    // Every failed accept is logged (at debug): backing off, the server tries once per pause
    // of 100 ms, however slow the machine; spinning, it would try thousands of times.
    let attempts = || {
        util::strip_ansi(&server.stderr_so_far())
            .matches("accept: ")
            .count()
    };
    let before = attempts();
    let t0 = Instant::now();
    thread::sleep(SATURATED_WINDOW);
    let window = t0.elapsed();
    let tried = attempts() - before;
    let most = window.as_millis() as usize / 100 + 5;
    println!("out of descriptors ({fds} open): {tried} accepts tried in {window:?}");
    assert!(
        tried <= most,
        "{tried} accepts tried in {window:?} while out of descriptors (at most {most} with a \
         pause of 100 ms between them): the server spins instead of backing off"
    );
    // And the count above counts something: the failed accepts are logged.
    assert!(
        server.wait_for_stderr("again in 100 ms", CLOSE_GUARD),
        "no failed accept logged while out of descriptors\n{}",
        server.stderr_so_far()
    );
    server.assert_running();
    let stderr = util::strip_ansi(&server.stderr_so_far());
    // Warnings only: with `-v` each failed accept is logged at debug too.
    let warnings = stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("too many open files"))
        .count();
    assert!(
        (1..5).contains(&warnings),
        "{warnings} `too many open files` warnings for one episode (want 1, fewer than 5)\n{stderr}"
    );

    // Free descriptors: the backlog drains, and a new connection is served.
    conns.drain(..EMFILE_CLOSED);
    let mut fresh = round_trip_eventually(addr, b"after EMFILE", "new connection after EMFILE");
    assert!(
        server.wait_for_stderr("accepting again", CLOSE_GUARD),
        "no `accepting again` after recovering\n{}",
        server.stderr_so_far()
    );
    // The connections that waited in the backlog are served too.
    for (i, s) in conns.iter_mut().enumerate().step_by(10) {
        let msg = pattern(i as u64, 64);
        s.write_all(&msg).unwrap();
        let got = read_exact_len(s, msg.len());
        assert_eq!(got, msg, "backlogged connection {i}");
    }
    round_trip(&mut fresh, b"still fine");
    drop((conns, fresh));
    server.terminate_cleanly(EXIT_GUARD);
}

/// The `uring` model out of descriptors with nobody waiting to connect does not warn (io_uring's
/// accept takes a descriptor before it looks at the backlog, so it fails then too); the warning
/// comes once a connection waits.
#[test]
fn uring_model_out_of_descriptors_warns_only_when_a_connection_waits() {
    if let Some(why) = util::uring_refused() {
        println!("SKIPPED: io_uring refused: {why}");
        return;
    }
    const LIMIT: u64 = 32;
    let args = ["--listen", "127.0.0.1:0", "--model", "uring"];
    let server = Server::start_configured(&args, |cmd| limit_descriptors(cmd, LIMIT));
    let warned = |server: &Server| {
        util::strip_ansi(&server.stderr_so_far())
            .to_lowercase()
            .contains("too many open files")
    };
    let mut served = Vec::new();
    loop {
        assert!(
            served.len() < LIMIT as usize,
            "{} connections served under a limit of {LIMIT} descriptors",
            served.len()
        );
        let mut s = connect(server.addr);
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        // Served (echoed), or not accepted: it waits in the backlog while the server holds
        // every descriptor it may. A slow echo is waited for while the server has descriptors
        // to spare, and for 2 s more once it has none (this connection may have taken the
        // last).
        let deadline = Instant::now() + CLOSE_GUARD;
        let mut full_since = None;
        let echoed = loop {
            match s.read(&mut byte) {
                Ok(1) => break true,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                other => panic!("connection {}: {other:?}", served.len()),
            }
            if fd_count(server.pid()) < LIMIT as usize {
                full_since = None;
            } else if full_since.get_or_insert_with(Instant::now).elapsed()
                >= Duration::from_secs(2)
            {
                break false;
            }
            assert!(
                Instant::now() < deadline,
                "connection {} neither echoed nor left waiting",
                served.len()
            );
        };
        if !echoed {
            break;
        }
        served.push(s);
        // Time for an accept that fails at once to be reported, were it to be.
        thread::sleep(Duration::from_millis(200));
        assert!(
            !warned(&server),
            "warned with {} connections open, all served, none waiting\n{}",
            served.len(),
            server.stderr_so_far()
        );
    }
    let deadline = Instant::now() + CLOSE_GUARD;
    while !warned(&server) {
        assert!(
            Instant::now() < deadline,
            "no warning with a connection waiting\n{}",
            server.stderr_so_far()
        );
        thread::sleep(Duration::from_millis(20));
    }
    drop(served);
    server.terminate_cleanly(EXIT_GUARD);
}

/// A burst of connections over `--max-connections` is logged within about a second, though
/// no other refusal follows it (the rate limit holds back all but the first until then).
fn a_burst_of_refusals_is_logged_without_waiting_for_another() {
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--max-connections", "1"]);
    let addr = server.addr;
    let mut held = connect(addr);
    round_trip(&mut held, b"the one allowed");
    const BURST: u64 = 20;
    for i in 0..BURST {
        let mut extra = connect(addr);
        expect_closed_by_server(&mut extra, &format!("connection {} over the limit", i + 2));
    }
    // Every refusal shows in the log, in one warning or more, with no connection after them.
    let logged = || -> u64 {
        util::strip_ansi(&server.stderr_so_far())
            .lines()
            .filter_map(|l| {
                let (_, rest) = l.split_once("refused ")?;
                rest.split_once(" connections over")?.0.parse::<u64>().ok()
            })
            .sum()
    };
    let guard = Instant::now() + CLOSE_GUARD;
    while logged() < BURST && Instant::now() < guard {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        logged(),
        BURST,
        "refusals logged before the server stopped\n{}",
        server.stderr_so_far()
    );
    drop(held);
    server.terminate_cleanly(EXIT_GUARD);
}

/// More workers than the descriptor limit allows (each takes a ring or an epoll instance, and
/// a descriptor to be woken by): the server does not start, and the error names the flag. With
/// 256 workers the descriptors to wake them run out first; with 40 those fit, and the rings
/// (or epoll instances) run out.
fn too_many_workers_for_the_descriptor_limit_names_the_flag() {
    for workers in ["256", "40"] {
        let output = util::run_cli_configured(
            &["serve", "--listen", "127.0.0.1:0", "--workers", workers],
            Duration::from_secs(30),
            |cmd| limit_descriptors(cmd, 64),
        );
        output.assert_no_panic();
        assert_eq!(output.code(), Some(1), "{}", output.describe());
        assert!(
            output.stderr.contains("--workers")
                && output.stderr.contains(&format!("{workers} worker")),
            "the error does not name --workers {workers}\n{}",
            output.describe()
        );
        assert!(
            output
                .stderr
                .contains("lower --workers, or raise the limit"),
            "the error does not say what to do\n{}",
            output.describe()
        );
    }
}

/// A load with more connections than the client may open descriptors for is refused before
/// any is opened, naming `--connections` and the limit, rather than run smaller than asked.
fn client_connections_past_the_descriptor_limit_are_refused_up_front() {
    // Nothing listens there: a run that went ahead would fail to connect instead.
    let (addr, _held) = util::unused_port();
    let addr = addr.to_string();
    let output = util::run_cli_configured(
        &[
            "client",
            "--connect",
            &addr,
            "--connections",
            "100",
            "--messages",
            "1",
        ],
        Duration::from_secs(30),
        |cmd| limit_descriptors(cmd, 64),
    );
    output.assert_no_panic();
    assert_eq!(output.code(), Some(1), "{}", output.describe());
    assert!(
        output.stderr.contains("--connections 100:")
            && output.stderr.contains("RLIMIT_NOFILE 64")
            && !output.stderr.contains("connect:"),
        "{}",
        output.describe()
    );
}

/// A peer that takes its echo slowly but steadily is not idle, though the server's sends to it
/// complete seconds apart (a send waiting for room completes once a good part of the socket's
/// send buffer has drained): it gets all of its echo.
fn idle_timeout_spares_a_slow_reader_taking_its_echo() {
    // More than the server's send buffer takes (a few MiB at most): a send stays in flight
    // while the echo drains.
    const TOTAL: usize = 6 << 20;
    // Room for all of it in the server (no pause): after the input, only sends move.
    let server = Server::start_with(&[
        "--listen",
        "127.0.0.1:0",
        "--idle-timeout",
        "1",
        "--conn-buffer",
        "16777216",
        "--pool-size",
        "134217728",
    ]);
    let stream = connect(server.addr);
    // A small receive buffer here (no autotuning), so that the echo waits in the server's
    // send buffer rather than in this one.
    socket2::SockRef::from(&stream)
        .set_recv_buffer_size(64 << 10)
        .unwrap();
    let data = pattern(7, TOTAL);
    let writer = thread::spawn({
        let mut stream = stream;
        let data = data.clone();
        move || {
            stream.write_all(&data).unwrap();
            stream
        }
    });
    // Once all of it is in, 64 KiB every 60 ms: about 1 MB/s, some 6 s in all, without a
    // pause near 1 s (a send waiting for room then completes more than 1 s apart).
    let stream = writer.join().unwrap();
    let mut reader = stream;
    reader
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::with_capacity(TOTAL);
    let mut chunk = vec![0u8; 64 << 10];
    while got.len() < TOTAL {
        thread::sleep(Duration::from_millis(60));
        match reader.read(&mut chunk) {
            Ok(0) => panic!(
                "closed after {} of {TOTAL} bytes of echo\n{}",
                got.len(),
                server.stderr_so_far()
            ),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("after {} of {TOTAL} bytes of echo: {e}", got.len()),
        }
    }
    assert!(got == data, "the echo differs");
    drop(reader);
    server.terminate_cleanly(EXIT_GUARD);
}

/// A peer that takes its echo slowly, once all of it is in the server's socket (nothing left
/// queued in the server), is not idle either: closed, the socket would send the rest before
/// its FIN, but what the peer sent next would draw a reset that drops it.
fn idle_timeout_spares_a_slow_reader_whose_echo_is_all_in_the_socket() {
    // Less than the server's send buffer grows to: its queue empties at once.
    const TOTAL: usize = 1 << 20;
    const MORE: &[u8] = b"and then some";
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--idle-timeout", "1"]);
    let stream = connect(server.addr);
    socket2::SockRef::from(&stream)
        .set_recv_buffer_size(8 << 10)
        .unwrap();
    let data = pattern(11, TOTAL);
    let mut writer = stream.try_clone().unwrap();
    writer.write_all(&data).unwrap();
    let mut reader = stream;
    reader
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // 8 KiB every 20 ms: about 400 KB/s, some 3 s in all; more input half-way through.
    let mut got = Vec::with_capacity(TOTAL + MORE.len());
    let mut chunk = vec![0u8; 8 << 10];
    let mut more_sent = false;
    while got.len() < TOTAL + MORE.len() {
        if !more_sent && got.len() >= TOTAL / 2 {
            writer.write_all(MORE).unwrap();
            more_sent = true;
        }
        thread::sleep(Duration::from_millis(20));
        match reader.read(&mut chunk) {
            Ok(0) => panic!(
                "closed after {} of {} bytes of echo\n{}",
                got.len(),
                TOTAL + MORE.len(),
                server.stderr_so_far()
            ),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("after {} bytes of echo: {e}", got.len()),
        }
    }
    assert!(
        got[..TOTAL] == data[..] && &got[TOTAL..] == MORE,
        "the echo differs"
    );
    drop((reader, writer));
    server.terminate_cleanly(EXIT_GUARD);
}

per_backend!(
    idle_timeout_spares_a_slow_reader_taking_its_echo,
    idle_timeout_spares_a_slow_reader_whose_echo_is_all_in_the_socket,
    client_connections_past_the_descriptor_limit_are_refused_up_front,
    max_connections_refuses_the_excess_and_recovers,
    idle_timeout_closes_idle_connections_only,
    out_of_descriptors_backs_off_warns_once_and_recovers,
    too_many_workers_for_the_descriptor_limit_names_the_flag,
    a_burst_of_refusals_is_logged_without_waiting_for_another,
);

/// The kernel's timer on the server's end of the connection from `client`, from
/// `/proc/net/tcp`: which timer is pending (0: none, 1: retransmit, 2: keepalive) and in how
/// many hundredths of a second it fires. Waits (bounded) for the echo's acknowledgement, while
/// the retransmit timer runs.
fn server_side_timer(client: &TcpStream) -> (u32, u64) {
    let (server_port, client_port) = (
        client.peer_addr().unwrap().port(),
        client.local_addr().unwrap().port(),
    );
    let deadline = Instant::now() + CLOSE_GUARD;
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
        // `sl local rem st tx:rx tr:when ...`, addresses as `HEXADDR:HEXPORT`.
        let port = |addr: &str| {
            addr.split(':')
                .nth(1)
                .and_then(|p| u16::from_str_radix(p, 16).ok())
        };
        let row = table.lines().skip(1).find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 5 && port(f[1]) == Some(server_port) && port(f[2]) == Some(client_port))
                .then(|| f[5].to_string())
        });
        let row = row.unwrap_or_else(|| panic!("no row for the server's end of :{client_port}"));
        let (tr, when) = row.split_once(':').expect("tr:when");
        let tr = u32::from_str_radix(tr, 16).unwrap();
        let when = u64::from_str_radix(when, 16).unwrap();
        if tr != 1 || Instant::now() > deadline {
            return (tr, when);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `--keepalive SECS` arms the kernel's keepalive timer on every accepted connection, SECS
/// seconds out (by default 300); `--keepalive 0` arms none. Also with `--model blocking`.
#[test]
fn keepalive_probes_idle_connections_after_the_given_time() {
    fn check() {
        for (args, timer) in [
            (&["--keepalive", "120"][..], Some(120)),
            (&[][..], Some(300)),
            (&["--keepalive", "0"][..], None),
        ] {
            let mut all = vec!["--listen", "127.0.0.1:0"];
            all.extend_from_slice(args);
            let server = Server::start_with(&all);
            let mut conn = connect(server.addr);
            round_trip(&mut conn, b"are you there");
            let (tr, when) = server_side_timer(&conn);
            match timer {
                Some(secs) => {
                    assert_eq!(tr, 2, "{args:?}: no keepalive timer (timer {tr})");
                    assert!(
                        when <= secs * 100 && when > 100,
                        "{args:?}: keepalive due in {when} hundredths of a second, not {secs} s"
                    );
                }
                None => assert_eq!(tr, 0, "{args:?}: a timer ({tr}) is armed"),
            }
            drop(conn);
            server.terminate_cleanly(EXIT_GUARD).assert_no_panic();
        }
    }
    check();
    util::with_model("blocking", check);
}
