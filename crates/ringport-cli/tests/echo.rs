//! `ringport serve` echoes every byte, in order: payload sizes, pipelining, half-close, IPv6.

mod util;

use std::io::Write;
use std::net::{Shutdown, TcpListener};

use util::{assert_bytes_eq, connect, echo_exact, pattern, read_exact_len, read_to_eof, Server};

fn echo_1_byte() {
    let server = Server::start();
    echo_exact(server.addr, &pattern(1, 1));
}

fn echo_1_kib() {
    let server = Server::start();
    echo_exact(server.addr, &pattern(2, 1024));
}

fn echo_64_kib() {
    let server = Server::start();
    echo_exact(server.addr, &pattern(3, 64 * 1024));
}

fn echo_1_mib() {
    let server = Server::start();
    echo_exact(server.addr, &pattern(4, 1024 * 1024));
}

fn echo_8_mib() {
    let server = Server::start();
    echo_exact(server.addr, &pattern(5, 8 * 1024 * 1024));
}

fn echo_every_size_on_one_server_in_sequence() {
    // Several connections, one after another, on the same server: state from one connection
    // (buffers, slots) must not leak into the next.
    let server = Server::start();
    for (i, len) in [
        1usize, 2, 3, 100, 1024, 4095, 4096, 4097, 65_535, 65_536, 65_537,
    ]
    .into_iter()
    .enumerate()
    {
        echo_exact(server.addr, &pattern(100 + i as u64, len));
    }
}

/// Receive buffers filled incrementally (the default where the backend can), so many
/// connections' bytes share pool buffers: every byte still comes back to its own connection, in
/// order. The same with a whole buffer per receive.
fn incremental_pool_keeps_every_connection_s_bytes_apart() {
    for extra in [None, Some("--pool-whole-buffers")] {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend(extra);
        eight_connections_echo_exactly(&Server::start_with(&args));
    }
}

fn eight_connections_echo_exactly(server: &Server) {
    let addr = server.addr;
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            std::thread::spawn(move || {
                for (i, len) in [1usize, 7, 100, 4095, 8192, 8193, 65_537]
                    .into_iter()
                    .enumerate()
                {
                    echo_exact(addr, &pattern(5000 + t * 100 + i as u64, len));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("an echo thread failed");
    }
}

fn pipelined_small_writes_then_read_everything() {
    let server = Server::start();
    let mut stream = connect(server.addr);
    stream.set_nodelay(true).unwrap();
    // 500 messages of 1..=64 bytes (about 16 KiB in all, well within the loopback buffers), all
    // written before a single byte is read.
    let mut sent = Vec::new();
    for i in 0..500u64 {
        let msg = pattern(1000 + i, 1 + (i as usize * 13) % 64);
        stream.write_all(&msg).unwrap();
        sent.extend_from_slice(&msg);
    }
    let got = read_exact_len(&mut stream, sent.len());
    assert_bytes_eq(&got, &sent, "pipelined echo");
    stream.shutdown(Shutdown::Write).unwrap();
    assert!(
        read_to_eof(&mut stream).is_empty(),
        "extra bytes after the echo"
    );
}

fn half_close_echoes_everything_then_eof() {
    let server = Server::start();
    let mut stream = connect(server.addr);
    let data = pattern(7, 200 * 1024);
    // 200 KiB fits the loopback socket buffers, so writing it all before reading cannot deadlock;
    // the server must keep echoing after it has seen our FIN.
    for chunk in data.chunks(10_000) {
        stream.write_all(chunk).unwrap();
    }
    stream.shutdown(Shutdown::Write).unwrap();
    let got = read_to_eof(&mut stream);
    assert_bytes_eq(&got, &data, "echo after half-close");
}

fn half_close_with_nothing_sent_gives_eof() {
    let server = Server::start();
    let mut stream = connect(server.addr);
    stream.shutdown(Shutdown::Write).unwrap();
    let got = read_to_eof(&mut stream);
    assert!(
        got.is_empty(),
        "got {} bytes for an empty stream",
        got.len()
    );
}

fn ipv6_loopback_echo() {
    if let Err(e) = TcpListener::bind("[::1]:0") {
        println!("SKIPPED ipv6_loopback_echo: cannot bind [::1]:0 on this machine ({e})");
        return;
    }
    let server = Server::start_with(&["--listen", "[::1]:0"]);
    assert!(
        server.addr.is_ipv6() && server.addr.ip().is_loopback() && server.addr.port() != 0,
        "server reported {} for --listen [::1]:0 (line: {})",
        server.addr,
        server.listening_line
    );
    echo_exact(server.addr, &pattern(8, 64 * 1024));
}

/// `--listen [::]` takes IPv4 as well as IPv6 (the server asks for it, whatever the system's
/// `net.ipv6.bindv6only`): both loopbacks echo.
fn ipv6_wildcard_takes_ipv4_too() {
    if let Err(e) = TcpListener::bind("[::1]:0") {
        println!("SKIPPED ipv6_wildcard_takes_ipv4_too: cannot bind [::1]:0 here ({e})");
        return;
    }
    let server = Server::start_with(&["--listen", "[::]:0"]);
    let port = server.addr.port();
    for ip in ["127.0.0.1", "::1"] {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        echo_exact(std::net::SocketAddr::new(ip, port), &pattern(9, 4096));
    }
}

/// TCP urgent data (`MSG_OOB`) is part of what the peer sent: it is echoed in its place.
fn urgent_data_is_echoed_in_place() {
    let server = Server::start();
    let mut s = connect(server.addr);
    s.set_nodelay(true).unwrap();
    s.write_all(b"hello").unwrap();
    socket2::SockRef::from(&s).send_out_of_band(b"!").unwrap();
    s.write_all(b"world").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_bytes_eq(&read_to_eof(&mut s), b"hello!world", "the echo");
}

/// Urgent bytes at the very start of a connection, one after another, sent at once after the
/// connect (before the server has taken the connection): each is echoed in its place.
fn urgent_data_first_is_echoed_in_place() {
    let server = Server::start();
    for round in 0..20 {
        let mut s = connect(server.addr);
        s.set_nodelay(true).unwrap();
        let oob = socket2::SockRef::from(&s);
        oob.send_out_of_band(b"A").unwrap();
        oob.send_out_of_band(b"B").unwrap();
        s.write_all(b"cdef").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert_bytes_eq(
            &read_to_eof(&mut s),
            b"ABcdef",
            &format!("the echo, round {round}"),
        );
    }
}

per_backend!(
    echo_1_byte,
    echo_1_kib,
    echo_64_kib,
    echo_1_mib,
    echo_8_mib,
    echo_every_size_on_one_server_in_sequence,
    incremental_pool_keeps_every_connection_s_bytes_apart,
    pipelined_small_writes_then_read_everything,
    half_close_echoes_everything_then_eof,
    half_close_with_nothing_sent_gives_eof,
    ipv6_loopback_echo,
    ipv6_wildcard_takes_ipv4_too,
    urgent_data_is_echoed_in_place,
    urgent_data_first_is_echoed_in_place,
);

per_model!(
    echo_1_byte,
    echo_1_kib,
    echo_64_kib,
    echo_1_mib,
    echo_8_mib,
    echo_every_size_on_one_server_in_sequence,
    pipelined_small_writes_then_read_everything,
    half_close_echoes_everything_then_eof,
    half_close_with_nothing_sent_gives_eof,
    ipv6_loopback_echo,
    ipv6_wildcard_takes_ipv4_too,
    urgent_data_is_echoed_in_place,
    urgent_data_first_is_echoed_in_place,
);
