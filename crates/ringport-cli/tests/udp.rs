//! UDP echo (`--udp`): datagrams come back whole, `--udp-rate` (per source) and
//! `--udp-rate-total` (all sources) drop and count the excess, and without `--udp` nothing
//! answers on UDP.

mod util;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use util::{number_between, pattern, Output, Server};

/// Hang guard for the exit after SIGTERM (default drain timeout plus margin).
const EXIT_GUARD: Duration = Duration::from_secs(15);
/// How long to wait for one echoed datagram before sending it again (loopback loses none in
/// practice; the retry only keeps a lost datagram from failing the test).
const ECHO_WAIT: Duration = Duration::from_secs(2);
/// Datagrams sent in a burst at the rate-limited server.
const BURST: usize = 100;
/// How long to keep collecting echoes of the burst after the last one arrived.
const QUIET: Duration = Duration::from_millis(500);

/// A UDP socket on the loopback of the server's family, connected to it.
fn udp_client(server: SocketAddr) -> UdpSocket {
    let local: SocketAddr = if server.is_ipv6() {
        "[::1]:0".parse().unwrap()
    } else {
        "127.0.0.1:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(local).unwrap();
    sock.connect(server).unwrap();
    sock
}

/// Receives on `sock` (within its read timeout) and fails if an answer comes from `from`:
/// nothing, or the kernel's "port unreachable" (ECONNREFUSED on a connected socket), is no
/// answer. Whether it was the latter.
fn expect_no_answer(sock: &UdpSocket, from: &str) -> bool {
    let mut buf = [0u8; 64];
    match sock.recv(&mut buf) {
        Ok(n) => panic!("a {n}-byte UDP answer from {from}: {:?}", &buf[..n]),
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ),
                "UDP receive: {e}"
            );
            e.kind() == io::ErrorKind::ConnectionRefused
        }
    }
}

/// Sends `msg` on `sock` (connected, with a read timeout) and returns what comes back, sending
/// again up to three times in all if nothing does; `None` if nothing ever did.
fn echo_of(sock: &UdpSocket, msg: &[u8]) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    for _attempt in 0..3 {
        sock.send(msg).unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => return Some(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("UDP receive of the echo of {} bytes: {e}", msg.len()),
        }
    }
    None
}

/// Summary counts: (echoed, dropped).
fn udp_summary(output: &Output) -> (u64, u64) {
    let echoed =
        number_between(&output.stdout, "UDP: echoed ", " datagrams").unwrap_or_else(|| {
            panic!(
                "summary lacks `UDP: echoed N datagrams`\n{}",
                output.describe()
            )
        });
    let dropped = number_between(&output.stdout, "dropped ", " over the rate limit")
        .unwrap_or_else(|| {
            panic!(
                "summary lacks `dropped M over the rate limit`\n{}",
                output.describe()
            )
        });
    (echoed, dropped)
}

fn datagrams_of_every_size_echo_exactly() {
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--udp", "--udp-rate", "0"]);
    let sock = udp_client(server.addr);
    sock.set_read_timeout(Some(ECHO_WAIT)).unwrap();
    // Up to the largest an IPv4 datagram carries, and none.
    let sizes = [0usize, 1, 1000, 60_000, 65_507];
    for (i, &len) in sizes.iter().enumerate() {
        let msg = pattern(500 + i as u64, len);
        let echoed = echo_of(&sock, &msg)
            .unwrap_or_else(|| panic!("no echo of a {len}-byte datagram in 3 tries"));
        assert_eq!(
            echoed.len(),
            len,
            "the echo of a {len}-byte datagram has {} bytes",
            echoed.len()
        );
        assert!(echoed == msg, "the echo of a {len}-byte datagram differs");
    }
    let output = server.terminate_cleanly(EXIT_GUARD);
    let (echoed, dropped) = udp_summary(&output);
    assert!(echoed >= sizes.len() as u64, "{}", output.describe());
    assert_eq!(
        dropped,
        0,
        "--udp-rate 0 dropped datagrams\n{}",
        output.describe()
    );
}

/// Collects the 32-byte echoes coming back to `sock` until none has come for a while (bounded
/// overall); how many came. The first may take up to `ECHO_WAIT` (a busy machine may be slow
/// to run the server), the rest stop at the first `QUIET` gap.
fn collect_echoes(sock: &UdpSocket) -> usize {
    sock.set_read_timeout(Some(ECHO_WAIT)).unwrap();
    let mut buf = vec![0u8; 65536];
    let mut received = 0usize;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                assert_eq!(n, 32, "an echoed datagram changed size");
                if received == 0 {
                    sock.set_read_timeout(Some(QUIET)).unwrap();
                }
                received += 1;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => panic!("UDP receive: {e}"),
        }
    }
    received
}

fn rate_limit_drops_and_counts_the_excess() {
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--udp", "--udp-rate", "10"]);
    let sock = udp_client(server.addr);
    for i in 0..BURST {
        sock.send(&pattern(i as u64, 32)).unwrap();
    }
    let received = collect_echoes(&sock);
    check_burst_was_limited(server, received, "--udp-rate 10");
}

/// `--stats` lines count the UDP echo's datagrams as it runs, and the first datagram over the
/// rate limit is noted when it comes (not only in the exit summary).
fn stats_lines_count_datagrams_echoed_and_over_the_limit() {
    let server = Server::start_with(&[
        "--listen",
        "127.0.0.1:0",
        "--udp",
        "--udp-rate",
        "10",
        "--stats",
        "0.05",
    ]);
    let sock = udp_client(server.addr);
    for i in 0..BURST {
        sock.send(&pattern(i as u64, 32)).unwrap();
    }
    let received = collect_echoes(&sock) as u64;
    assert!(received >= 1, "nothing was echoed");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (echoed, limited) = loop {
        let err = util::strip_ansi(&server.stderr_so_far());
        let last = err.lines().rev().find(|l| l.contains("stats: open "));
        let got = last.and_then(|l| {
            Some((
                number_between(l, "UDP echoed ", " datagrams")?,
                // The last item, or one followed by others.
                number_between(l, "UDP over the rate limit ", "")?,
            ))
        });
        match got {
            Some((e, l)) if e >= received && e + l >= BURST as u64 => break (e, l),
            _ if Instant::now() > deadline => {
                panic!("no --stats line counts the burst within 10 s\n{err}")
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert_eq!(
        echoed + limited,
        BURST as u64,
        "every datagram of the burst is echoed or over the limit"
    );
    assert!(
        server.stderr_so_far().contains("is over the rate limit"),
        "the first datagram over the limit was not noted\n{}",
        server.stderr_so_far()
    );
    server.terminate_cleanly(EXIT_GUARD);
}

/// Checks that some but at most half of a `BURST` came back (`received`) under `limit`, and
/// that the server's summary counts the rest as dropped.
fn check_burst_was_limited(server: Server, received: usize, limit: &str) {
    assert!(received >= 1, "nothing was echoed at {limit}");
    assert!(
        received <= BURST / 2,
        "{received} of {BURST} datagrams sent at once were echoed at {limit}"
    );
    let output = server.terminate_cleanly(EXIT_GUARD);
    let (echoed, dropped) = udp_summary(&output);
    assert!(
        dropped > 0,
        "the summary counts no dropped datagrams\n{}",
        output.describe()
    );
    assert!(
        echoed >= received as u64 && echoed + dropped <= BURST as u64,
        "summary echoed {echoed} + dropped {dropped}, but {received} of {BURST} came back\n{}",
        output.describe()
    );
}

fn without_udp_nothing_answers() {
    let server = Server::start();
    let sock = udp_client(server.addr);
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for _ in 0..3 {
        // A connected UDP socket reports the ICMP port-unreachable as ECONNREFUSED, on the
        // send or the receive after it.
        match sock.send(b"anyone?") {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => panic!("UDP send: {e}"),
        }
        expect_no_answer(&sock, "a server started without --udp");
    }
    let output = server.terminate_cleanly(EXIT_GUARD);
    assert!(
        !output.stdout.contains("UDP"),
        "a server without --udp reports UDP\n{}",
        output.describe()
    );
}

/// Four sources with no per-source limit together get no more than `--udp-rate-total`.
fn total_rate_limit_caps_every_source_together() {
    let server = Server::start_with(&[
        "--listen",
        "127.0.0.1:0",
        "--udp",
        "--udp-rate",
        "0",
        "--udp-rate-total",
        "10",
    ]);
    let socks: Vec<UdpSocket> = (1..=4u8)
        .map(|i| {
            let sock = UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, 0, i), 0)).unwrap();
            sock.connect(server.addr).unwrap();
            sock
        })
        .collect();
    for i in 0..BURST {
        socks[i % socks.len()].send(&pattern(i as u64, 32)).unwrap();
    }
    let received: usize = socks.iter().map(collect_echoes).sum();
    check_burst_was_limited(server, received, "--udp-rate-total 10 (4 sources)");
}

/// A datagram from a service port (another echo server, or a spoofed source aimed at one)
/// gets no answer, and is counted.
fn datagrams_from_service_ports_are_not_answered() {
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--udp", "--udp-rate", "0"]);
    // The server's own port, on another address (another ringport, say), takes no privilege;
    // a port below 1024 does (skipped without it).
    let mut socks = vec![UdpSocket::bind(("127.0.0.2", server.addr.port())).unwrap()];
    match (900..1000u16).find_map(|p| UdpSocket::bind(("127.0.0.1", p)).ok()) {
        Some(sock) => socks.push(sock),
        None => eprintln!("SKIPPED in part: cannot bind a UDP port below 1024 here"),
    }
    let mut buf = [0u8; 64];
    for sock in &socks {
        sock.connect(server.addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        for _ in 0..3 {
            sock.send(b"ping").unwrap();
            match sock.recv(&mut buf) {
                Ok(n) => panic!("a service port got an answer: {:?}", &buf[..n]),
                Err(e) => assert!(
                    matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ),
                    "UDP receive: {e}"
                ),
            }
        }
    }
    let output = server.terminate_cleanly(EXIT_GUARD);
    let refused = number_between(&output.stdout, "rate limit and ", " from service ports")
        .unwrap_or_else(|| {
            panic!(
                "summary lacks the service-port count\n{}",
                output.describe()
            )
        });
    assert_eq!(refused, 3 * socks.len() as u64, "{}", output.describe());
}

/// On SIGTERM the UDP echo stops at once, while a TCP connection still holds the drain: a
/// datagram sent then gets no answer, and the summary counts only the one before.
fn sigterm_stops_the_udp_echo_at_once() {
    use std::io::Write;
    let server = Server::start_with(&[
        "--listen",
        "127.0.0.1:0",
        "--udp",
        "--udp-rate",
        "0",
        "--drain-timeout",
        "3",
    ]);
    let sock = udp_client(server.addr);
    sock.set_read_timeout(Some(ECHO_WAIT)).unwrap();
    let mut buf = [0u8; 64];
    sock.send(b"before").unwrap();
    assert_eq!(sock.recv(&mut buf).expect("the echo before SIGTERM"), 6);
    // A TCP peer that sends and reads nothing keeps the drain going until its timeout (its
    // echo cannot be sent); it is closed then, which ends the writes.
    let mut tcp = util::connect(server.addr);
    let writer = std::thread::spawn(move || {
        let chunk = vec![7u8; 1 << 16];
        for _ in 0..512 {
            if tcp.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    server.signal(libc::SIGTERM);
    assert!(
        server.wait_for_stderr("UDP echo stopped", Duration::from_secs(10)),
        "the UDP echo was not stopped on SIGTERM\n{}",
        server.stderr_so_far()
    );
    // No echo: nothing comes back, or, once the stopped echo has closed its socket, the
    // kernel's "port unreachable" (ECONNREFUSED on this connected socket).
    sock.send(b"after").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let refused = expect_no_answer(&sock, "the drain");
    let output = server.wait_exit(EXIT_GUARD);
    writer.join().expect("the TCP writer");
    let (echoed, _) = udp_summary(&output);
    assert_eq!(echoed, 1, "{}", output.describe());
    // Refused: the socket had closed. Else the stopping echo received it, or found it waiting,
    // and says so.
    let unanswered = number_between(
        &output.stdout,
        ", ",
        " received or waiting when the echo stopped",
    );
    assert_eq!(
        unanswered,
        (!refused).then_some(1),
        "the datagram sent after the stop (refused: {refused})\n{}",
        output.describe()
    );
}

/// Nothing comes back to `sock` (within its read timeout) for what it sent to a broadcast
/// address.
fn assert_no_answer_to_a_broadcast(sock: &UdpSocket) {
    let mut buf = [0u8; 64];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => panic!("a {n}-byte answer from {from} to a broadcast"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "UDP receive: {e}"
        ),
    }
}

/// The exit summary counts one datagram sent to a broadcast or multicast address.
fn assert_one_to_a_group(output: &Output) {
    let groups = number_between(
        &output.stdout,
        ", ",
        " sent to a broadcast or multicast address",
    );
    assert_eq!(groups, Some(1), "{}", output.describe());
}

/// A datagram sent to a broadcast address (loopback's, 127.255.255.255, reaches a wildcard
/// socket) is not answered, and is counted: every host serving the echo there would answer
/// one datagram with a spoofed source. One sent to the host alone still is.
#[test]
fn datagrams_to_a_broadcast_address_are_not_answered() {
    let server = Server::start_with(&["--listen", "0.0.0.0:0", "--udp"]);
    let port = server.addr.port();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_broadcast(true).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    sock.send_to(b"to everyone", ("127.255.255.255", port))
        .unwrap();
    assert_no_answer_to_a_broadcast(&sock);
    sock.connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(ECHO_WAIT)).unwrap();
    assert_eq!(
        echo_of(&sock, b"to this host").as_deref(),
        Some(&b"to this host"[..]),
        "no echo of a datagram sent to the host alone"
    );
    assert_one_to_a_group(&server.terminate_cleanly(EXIT_GUARD));
}

/// Over IPv6, bound to the loopback address or to `[::]`, datagrams of every size up to the
/// largest (65,527 bytes) and of none come back whole, from the address they were sent to.
#[test]
fn ipv6_datagrams_echo_exactly() {
    if let Err(e) = UdpSocket::bind("[::1]:0") {
        println!("SKIPPED ipv6_datagrams_echo_exactly: cannot bind [::1]:0 here ({e})");
        return;
    }
    for listen in ["[::1]:0", "[::]:0"] {
        let server = Server::start_with(&["--listen", listen, "--udp", "--udp-rate", "0"]);
        let to = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, server.addr.port()));
        let sock = UdpSocket::bind("[::1]:0").unwrap();
        sock.connect(to).unwrap();
        sock.set_read_timeout(Some(ECHO_WAIT)).unwrap();
        for len in [0, 1, 1000, 65_527] {
            let msg = pattern(len as u64, len);
            assert_eq!(
                echo_of(&sock, &msg).map(|e| e == msg),
                Some(true),
                "the echo of {len} bytes on {listen}\n{}",
                server.stderr_so_far()
            );
        }
        server.terminate_cleanly(EXIT_GUARD);
    }
}

/// Bound to a broadcast address (a subnet's, say; here loopback's), the echo gets only datagrams
/// sent to everyone there: none is answered, each is counted.
#[test]
fn an_echo_bound_to_a_broadcast_address_answers_nothing() {
    let server = Server::start_with(&["--listen", "127.255.255.255:0", "--udp"]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_broadcast(true).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    sock.send_to(b"to everyone", server.addr).unwrap();
    assert_no_answer_to_a_broadcast(&sock);
    assert_one_to_a_group(&server.terminate_cleanly(EXIT_GUARD));
}

/// Bound to a wildcard address, the echo answers from the address the datagram was sent to:
/// a client connected to 127.0.0.2 drops an answer from 127.0.0.1, the source the route back
/// to it (from 127.0.0.1) would choose. On `0.0.0.0` and, as IPv4-mapped, on `[::]`.
#[test]
fn a_wildcard_echo_answers_from_the_address_it_was_sent_to() {
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let server = Server::start_with(&["--listen", listen, "--udp", "--udp-rate", "0"]);
        let to = SocketAddr::from(([127, 0, 0, 2], server.addr.port()));
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(to).unwrap();
        sock.set_read_timeout(Some(ECHO_WAIT)).unwrap();
        let echoed = echo_of(&sock, b"from the address asked");
        assert_eq!(
            echoed.as_deref(),
            Some(&b"from the address asked"[..]),
            "no echo from {to} in 3 tries (server on {listen})\n{}",
            server.stderr_so_far()
        );
        let output = server.terminate_cleanly(EXIT_GUARD);
        let (echoed, _) = udp_summary(&output);
        assert!(echoed >= 1, "{}", output.describe());
    }
}

per_backend!(
    sigterm_stops_the_udp_echo_at_once,
    datagrams_from_service_ports_are_not_answered,
    datagrams_of_every_size_echo_exactly,
    rate_limit_drops_and_counts_the_excess,
    stats_lines_count_datagrams_echoed_and_over_the_limit,
    total_rate_limit_caps_every_source_together,
    without_udp_nothing_answers,
);
