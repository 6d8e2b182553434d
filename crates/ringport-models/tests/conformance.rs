//! One conformance suite, run against every model: `conformance!` below makes a module per
//! model with one test per case, and `covers_every_model` checks that the list is
//! `Model::ALL`.

mod util;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use ringport_models::{Config, Model, Stats};
use socket2::SockRef;
use util::{
    assert_closed, echo_through, pattern, read_to_eof, read_until_end, round_trip, start,
    start_after, start_with,
};

/// The cases, each a function of the model.
mod cases {
    use super::*;

    pub fn echo(model: Model, len: usize) {
        let Some(server) = start(model) else { return };
        let payload = pattern(len, len as u64);
        let got = echo_through(server.connect(), payload.clone());
        assert_eq!(got.len(), payload.len(), "{model}: echo length");
        assert!(got == payload, "{model}: the {len}-byte echo differs");
        let stats = server.stop();
        assert_eq!(
            stats,
            Stats {
                connections: 1,
                bytes: len as u64,
                refused: 0
            },
            "{model}"
        );
    }

    pub fn concurrent_connections(model: Model) {
        const CLIENTS: usize = 100;
        let _many_fds = MANY_FDS.lock().unwrap_or_else(|e| e.into_inner());
        let Some(server) = start(model) else { return };
        // All connected before any traffic: the server holds all of them at once.
        let clients: Vec<TcpStream> = (0..CLIENTS).map(|_| server.connect()).collect();
        let workers: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, stream)| {
                thread::spawn(move || {
                    let payload = pattern(16 * 1024 + i * 100, i as u64);
                    let got = echo_through(stream, payload.clone());
                    (got == payload, payload.len() as u64)
                })
            })
            .collect();
        let mut total = 0;
        for (i, w) in workers.into_iter().enumerate() {
            let (same, len) = w.join().expect("client thread");
            assert!(same, "{model}: client {i}: echo differs");
            total += len;
        }
        let stats = server.stop();
        assert_eq!(
            stats,
            Stats {
                connections: CLIENTS as u64,
                bytes: total,
                refused: 0
            },
            "{model}"
        );
    }

    /// More connections wait in the backlog when the model starts than two turns accept (64
    /// each): an edge-triggered model gets one edge for them (as it registers the listener)
    /// and must come back for the rest without another.
    pub fn a_backlog_larger_than_a_turn_is_served(model: Model) {
        const CLIENTS: usize = 200;
        let _many_fds = MANY_FDS.lock().unwrap_or_else(|e| e.into_inner());
        let started = start_after(model, Config::default(), |addr| {
            (0..CLIENTS)
                .map(|_| util::connect(addr))
                .collect::<Vec<_>>()
        });
        let Some((server, clients)) = started else {
            return;
        };
        for (i, mut c) in clients.into_iter().enumerate() {
            let msg = format!("client {i}");
            c.write_all(msg.as_bytes()).expect("write");
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("{model}: client {i} got no echo: {e}"));
            assert_eq!(got, msg.as_bytes(), "{model}: client {i}");
        }
        assert_eq!(server.stop().connections, CLIENTS as u64, "{model}");
    }

    /// A listener that fails (here, shut down under the server: `accept` then says `EINVAL`)
    /// stops the server as a stop does, without triggering the caller's stop: the connections
    /// it holds are drained, their echo whole, and then the error is reported.
    pub fn a_failed_listener_drains_the_connections_then_fails(model: Model) {
        let Some((server, listener)) = util::start_keeping_listener(model) else {
            return;
        };
        let mut client = server.connect();
        round_trip(&mut client, b"accepted");
        // All of it in the server's socket, with the end of the stream, before the listener
        // fails (256 KiB fits in loopback's socket buffers).
        let payload = pattern(256 << 10, 41);
        client.write_all(&payload).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        SockRef::from(&listener).shutdown(Shutdown::Read).unwrap();
        let got = read_to_eof(&mut client).expect("the echo ends with a FIN");
        assert_eq!(got.len(), payload.len(), "{model}: echo length");
        assert!(got == payload, "{model}: the echo differs");
        assert!(
            !server.stop.is_triggered(),
            "{model}: the caller's stop was triggered (other servers may share it)"
        );
        let err = server.wait().expect_err("serve returned no error");
        assert!(err.to_string().contains("accept"), "{model}: {err}");
    }

    /// A listener whose every accept fails with an error the man page says to retry (here
    /// `EOPNOTSUPP`: a datagram socket, readable with a datagram in it) does not keep the
    /// model in its accept loop: the stop still ends it.
    pub fn accepts_that_keep_failing_do_not_keep_out_the_stop(model: Model) {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
        let addr = socket.local_addr().expect("local_addr");
        UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.send_to(b"readable", addr))
            .expect("a datagram");
        let listener = TcpListener::from(OwnedFd::from(socket));
        let Some(server) = util::start_on(model, listener) else {
            return;
        };
        // The model has been round its accept loop: it paused accepts, saying why.
        let warning = [&format!("{model}: accept failed") as &str, "not supported"];
        assert!(
            util::warned(&warning),
            "no warning {warning:?} while every accept fails"
        );
        // Panics should `serve` not return.
        server.stop();
    }

    pub fn pipelined(model: Model) {
        let Some(server) = start(model) else { return };
        let stream = server.connect();
        stream.set_nodelay(true).expect("nodelay");
        // Many small writes, none waiting for its echo: they arrive split and merged
        // arbitrarily, and must come back in order.
        let messages: Vec<Vec<u8>> = (0..2000)
            .map(|i| format!("message {i}: {}\n", "x".repeat(i % 97)).into_bytes())
            .collect();
        let expected = messages.concat();
        let mut writer = stream.try_clone().expect("try_clone");
        let sender = thread::spawn(move || {
            for m in &messages {
                writer.write_all(m).expect("write");
            }
            writer.shutdown(Shutdown::Write).expect("shutdown(Write)");
        });
        let mut reader = stream;
        let got = read_to_eof(&mut reader).expect("read to EOF");
        sender.join().expect("writer thread");
        assert!(
            got == expected,
            "{model}: pipelined echo differs ({} of {} bytes)",
            got.len(),
            expected.len()
        );
        server.stop();
    }

    pub fn half_close(model: Model) {
        let Some(server) = start(model) else { return };
        let mut stream = server.connect();
        let payload = pattern(4096, 7);
        // All written, and the write side closed, before a single byte is read.
        stream.write_all(&payload).expect("write");
        stream.shutdown(Shutdown::Write).expect("shutdown(Write)");
        let got = read_to_eof(&mut stream).expect("read to EOF");
        assert!(got == payload, "{model}: echo after half-close differs");
        assert_eq!(
            stream.read(&mut [0u8; 16]).expect("read after EOF"),
            0,
            "{model}: EOF stays EOF"
        );
        let stats = server.stop();
        assert_eq!(
            stats,
            Stats {
                connections: 1,
                bytes: 4096,
                refused: 0
            },
            "{model}"
        );
    }

    pub fn reset_client_does_not_disturb_others(model: Model) {
        let Some(server) = start(model) else { return };
        let mut a = server.connect();
        round_trip(&mut a, b"before the resets");

        // B sends, never reads, and resets.
        let mut b = server.connect();
        b.write_all(&pattern(64 * 1024, 1)).expect("write");
        reset(b);
        // C fills the pipe, so the server holds echo it cannot send, and resets.
        let c = server.connect();
        fill(&c, 2);
        reset(c);

        round_trip(&mut a, b"after the resets");
        let d = server.connect();
        let payload = pattern(100_000, 3);
        assert!(
            echo_through(d, payload.clone()) == payload,
            "{model}: a new client after the resets"
        );
        round_trip(&mut a, b"still here");
        let stats = server.stop();
        assert_eq!(stats.connections, 4, "{model}");
        assert_closed(&mut a);
    }

    pub fn stop_with_connections_open(model: Model) {
        let Some(server) = start(model) else { return };
        let mut clients = Vec::new();
        let mut total = 0;
        for i in 0..5 {
            let mut s = server.connect();
            let msg = pattern(1000 * (i + 1), i as u64);
            round_trip(&mut s, &msg);
            total += msg.len() as u64;
            clients.push(s);
        }
        let stats = server.stop();
        assert_eq!(
            stats,
            Stats {
                connections: 5,
                bytes: total,
                refused: 0
            },
            "{model}"
        );
        for (i, mut s) in clients.into_iter().enumerate() {
            // A FIN: nothing was left unread on the server, so no reset.
            let n = s
                .read(&mut [0u8; 16])
                .unwrap_or_else(|e| panic!("{model}: client {i}: {e}"));
            assert_eq!(n, 0, "{model}: client {i}: EOF after the stop");
        }
    }

    pub fn stop_finishes_the_echo(model: Model) {
        let Some(server) = start(model) else { return };
        let stream = server.connect();
        let payload = pattern(4 << 20, 9);
        let mut writer = stream.try_clone().expect("try_clone");
        let to_send = payload.clone();
        // It may fail: once stopped, the server closes as soon as it has caught up with this
        // writer, which may still be writing then.
        let sender = thread::spawn(move || {
            let _ = writer.write_all(&to_send);
        });
        let mut reader = stream;
        let mut first = [0u8; 1];
        reader
            .read_exact(&mut first)
            .expect("the first echoed byte");
        // The server is echoing now. Stop it while the client keeps reading.
        let stopper = thread::spawn(move || server.stop());
        let (rest, end) = read_until_end(&mut reader);
        let got = [&first[..], &rest].concat();
        assert!(
            payload.starts_with(&got),
            "{model}: the echo during the drain is not a prefix of the payload"
        );
        if let Err(e) = end {
            assert_eq!(
                e.kind(),
                io::ErrorKind::ConnectionReset,
                "{model}: how the echo ended: {e}"
            );
        }
        let stats = stopper.join().expect("stopper thread");
        assert!(
            stats.bytes >= got.len() as u64,
            "{model}: stats count what was echoed"
        );
        sender.join().expect("writer thread");
    }

    pub fn stop_echoes_everything_sent_before_it(model: Model) {
        let Some(server) = start(model) else { return };
        let mut stream = server.connect();
        round_trip(&mut stream, b"accepted?");
        // Written without reading until the socket would block: at the stop the server holds
        // echo it cannot send, and input it has not read yet (megabytes of it).
        let written = fill(&stream, 5);
        server.stop.trigger();
        // All of it was sent before the stop, so all of it comes back, then a FIN.
        stream.set_nonblocking(false).expect("blocking");
        let (got, end) = read_until_end(&mut stream);
        if let Err(e) = end {
            panic!(
                "{model}: the echo ended with `{e}`, not EOF, after {} of {} bytes",
                got.len(),
                written.len()
            );
        }
        assert_eq!(
            got.len(),
            written.len(),
            "{model}: echo length after the stop"
        );
        assert!(got == written, "{model}: the echo after the stop differs");
        let stats = server.stop();
        assert_eq!(
            stats,
            Stats {
                connections: 1,
                bytes: written.len() as u64 + 9,
                refused: 0
            },
            "{model}"
        );
    }

    /// A peer that pauses between messages for longer than the quiet a drain waits for
    /// (250 ms), but never for a second, is closed with a FIN at a pause once the server stops,
    /// not kept until the drain's deadline (a minute here).
    pub fn stop_closes_a_peer_at_its_first_pause(model: Model) {
        let Some(server) = start_with(
            model,
            Config {
                drain_timeout: Duration::from_secs(60),
            },
        ) else {
            return;
        };
        let mut stream = server.connect();
        round_trip(&mut stream, b"before the stop");
        server.stop.trigger();
        // One message every 500 ms, each echoed, until the server closes: 20 at most (10 s).
        let mut closed = false;
        for i in 0..20 {
            thread::sleep(Duration::from_millis(500));
            let msg = format!("heartbeat {i}");
            if stream.write_all(msg.as_bytes()).is_err() {
                closed = true;
                break;
            }
            let mut echo = vec![0u8; msg.len()];
            match stream.read(&mut echo[..]) {
                // Closed at the pause before this message.
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    stream
                        .read_exact(&mut echo[n..])
                        .expect("the rest of the echo");
                    assert_eq!(echo, msg.as_bytes(), "{model}: echo of {msg}");
                }
                // Closed at the pause, and this message then reset the connection.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    closed = true;
                    break;
                }
                Err(e) => panic!("{model}: echo of {msg}: {e}"),
            }
        }
        assert!(
            closed,
            "{model}: still open after 20 messages 500 ms apart, the server stopping"
        );
        server.stop();
    }

    /// A peer that sends without reading is not read from without bound: once the server holds
    /// echo it cannot send, it stops reading, and the peer's sends stall within what the socket
    /// buffers hold (megabytes), long before four times that.
    pub fn a_peer_that_does_not_read_is_not_read_without_bound(model: Model) {
        // What the socket buffers can hold at most: the client's send buffer, the server's
        // receive and send buffers and the client's receive buffer, each up to the largest
        // the kernel grows one to; and the server's own (a read's worth).
        let max = |file: &str| -> usize {
            std::fs::read_to_string(file)
                .ok()
                .and_then(|t| t.split_whitespace().nth(2)?.parse().ok())
                .unwrap_or(32 << 20)
        };
        let buffered = 2
            * (max("/proc/sys/net/ipv4/tcp_rmem") + max("/proc/sys/net/ipv4/tcp_wmem"))
            + (16 << 20);
        let cap = (256 << 20).max(4 * buffered);
        let Some(server) = start(model) else { return };
        let mut stream = server.connect();
        stream
            .set_write_timeout(Some(Duration::from_secs(1)))
            .expect("write timeout");
        let chunk = pattern(64 << 10, 11);
        let mut sent = 0;
        while sent < cap {
            match stream.write(&chunk) {
                Ok(n) => sent += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => panic!("{model}: write after {sent} bytes: {e}"),
            }
        }
        assert!(
            sent <= buffered,
            "{model}: took {sent} bytes from a peer that reads none of its echo (the socket \
             buffers hold at most {buffered})"
        );
        reset(stream);
        server.stop();
    }

    pub fn drain_timeout_bounds_the_stop(model: Model) {
        let Some(server) = start_with(
            model,
            Config {
                drain_timeout: Duration::from_millis(200),
            },
        ) else {
            return;
        };
        let mut stream = server.connect();
        let written = fill(&stream, 4);
        // The client reads nothing: the server cannot finish, and gives up at the deadline.
        server.stop();
        stream.set_nonblocking(false).expect("blocking");
        let (got, end) = read_until_end(&mut stream);
        assert!(
            written.starts_with(&got),
            "{model}: what came back is not a prefix of what was sent"
        );
        if let Err(e) = end {
            assert_eq!(
                e.kind(),
                io::ErrorKind::ConnectionReset,
                "{model}: how the echo ended: {e}"
            );
        }
    }

    /// A drain timeout too long to add to the clock (`--drain-timeout 1e19`) is a very long
    /// wait, not an overflow: the stop still drains an idle connection and returns.
    pub fn huge_drain_timeout_still_drains(model: Model) {
        let Some(server) = start_with(
            model,
            Config {
                drain_timeout: Duration::MAX,
            },
        ) else {
            return;
        };
        let mut stream = server.connect();
        round_trip(&mut stream, b"still here");
        let stats = server.stop();
        assert_eq!((stats.connections, stats.bytes), (1, 10), "{model}");
        assert_closed(&mut stream);
    }

    /// Writes without reading until the pipe is full: the socket would block, and stays so for
    /// a moment (the server then holds echo it cannot send, and has stopped reading). Returns
    /// what was written. The pause is no assertion: were the server merely slow, the test
    /// would still pass, only through an easier path.
    fn fill(stream: &TcpStream, seed: u64) -> Vec<u8> {
        const CHUNK: usize = 64 * 1024;
        const MAX: usize = 256 << 20;
        const QUIET_MS: libc::c_int = 100;
        stream.set_nonblocking(true).expect("nonblocking");
        let mut written = Vec::new();
        let chunk = pattern(CHUNK, seed);
        // Bounded: the pipe's capacity is finite, and so is this loop.
        while written.len() < MAX {
            match (&*stream).write(&chunk) {
                Ok(n) => written.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd: stream.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one live `pollfd`, and its count.
                    if unsafe { libc::poll(&mut pfd, 1, QUIET_MS) } <= 0 {
                        break;
                    }
                }
                Err(e) => panic!("fill: {e}"),
            }
        }
        written
    }

    /// Closes with a reset (`SO_LINGER` 0).
    fn reset(stream: TcpStream) {
        SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER");
        drop(stream);
    }
}

/// Tests that hold many descriptors at once run one at a time: every test in this file shares
/// one process, and `select` refuses connections whose descriptor is past 1024.
static MANY_FDS: Mutex<()> = Mutex::new(());

macro_rules! conformance {
    ($($module:ident => $model:expr),* $(,)?) => {
        /// The models the macro made tests for.
        const COVERED: &[Model] = &[$($model),*];

        #[test]
        fn covers_every_model() {
            assert_eq!(COVERED, Model::ALL, "conformance! must list Model::ALL, in order");
        }

        $(
            mod $module {
                use super::{cases, Model};
                const MODEL: Model = $model;

                #[test]
                fn echo_1_byte() {
                    cases::echo(MODEL, 1);
                }
                #[test]
                fn echo_64_kib() {
                    cases::echo(MODEL, 64 << 10);
                }
                #[test]
                fn echo_4_mib() {
                    cases::echo(MODEL, 4 << 20);
                }
                #[test]
                fn concurrent_connections() {
                    cases::concurrent_connections(MODEL);
                }
                #[test]
                fn a_backlog_larger_than_a_turn_is_served() {
                    cases::a_backlog_larger_than_a_turn_is_served(MODEL);
                }
                #[test]
                fn accepts_that_keep_failing_do_not_keep_out_the_stop() {
                    cases::accepts_that_keep_failing_do_not_keep_out_the_stop(MODEL);
                }
                #[test]
                fn pipelined() {
                    cases::pipelined(MODEL);
                }
                #[test]
                fn a_failed_listener_drains_the_connections_then_fails() {
                    cases::a_failed_listener_drains_the_connections_then_fails(MODEL);
                }
                #[test]
                fn half_close() {
                    cases::half_close(MODEL);
                }
                #[test]
                fn reset_client_does_not_disturb_others() {
                    cases::reset_client_does_not_disturb_others(MODEL);
                }
                #[test]
                fn stop_with_connections_open() {
                    cases::stop_with_connections_open(MODEL);
                }
                #[test]
                fn stop_finishes_the_echo() {
                    cases::stop_finishes_the_echo(MODEL);
                }
                #[test]
                fn stop_echoes_everything_sent_before_it() {
                    cases::stop_echoes_everything_sent_before_it(MODEL);
                }
                #[test]
                fn stop_closes_a_peer_at_its_first_pause() {
                    cases::stop_closes_a_peer_at_its_first_pause(MODEL);
                }
                #[test]
                fn a_peer_that_does_not_read_is_not_read_without_bound() {
                    cases::a_peer_that_does_not_read_is_not_read_without_bound(MODEL);
                }
                #[test]
                fn drain_timeout_bounds_the_stop() {
                    cases::drain_timeout_bounds_the_stop(MODEL);
                }
                #[test]
                fn huge_drain_timeout_still_drains() {
                    cases::huge_drain_timeout_still_drains(MODEL);
                }
            }
        )*
    };
}

conformance! {
    blocking => Model::Blocking,
    select => Model::Select,
    sigio => Model::Sigio,
    poll => Model::Poll,
    epoll => Model::Epoll,
    uring => Model::Uring,
}
