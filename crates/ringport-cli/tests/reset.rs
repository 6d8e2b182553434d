//! A connection that a client resets (RST, via SO_LINGER 0) mid-stream closes only that
//! connection: the server keeps serving the others and accepts new ones.

mod util;

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use util::{connect, echo_exact, pattern, round_trip, Server};

/// Opens a connection, gets data in flight in both directions (written without reading, until
/// the socket buffers are full), then closes it with an RST.
fn reset_with_data_in_flight(addr: SocketAddr, seed: u64) {
    let mut stream = connect(addr);
    // Make sure the server has accepted it and is echoing.
    round_trip(&mut stream, &pattern(seed, 512));
    stream.set_nonblocking(true).unwrap();
    let chunk = pattern(seed + 1, 64 * 1024);
    let mut written = 0usize;
    // Stop at the first would-block (buffers full) or at 16 MiB, whichever comes first.
    while written < 16 * 1024 * 1024 {
        match stream.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write before the reset failed: {e}"),
        }
    }
    assert!(written > 0, "nothing was written before the reset");
    reset(stream);
}

fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream); // close(2) with linger 0 sends an RST and discards unsent data
}

fn client_reset_mid_stream_leaves_other_connections_working() {
    let mut server = Server::start();
    // A connection that stays open across the reset.
    let mut bystander = connect(server.addr);
    round_trip(&mut bystander, &pattern(1, 1000));

    reset_with_data_in_flight(server.addr, 10);

    // The bystander still echoes, byte for byte.
    round_trip(&mut bystander, &pattern(2, 1000));
    // A new connection works.
    echo_exact(server.addr, &pattern(3, 256 * 1024));
    round_trip(&mut bystander, &pattern(4, 1000));
    server.assert_running();
}

fn many_resets_in_a_row_do_not_disturb_the_server() {
    let mut server = Server::start();
    let mut bystander = connect(server.addr);
    for i in 0..20u64 {
        reset_with_data_in_flight(server.addr, 100 + 2 * i);
        // Reset right after connect, before the server has had any data.
        reset(connect(server.addr));
        round_trip(&mut bystander, &pattern(200 + i, 300));
    }
    echo_exact(server.addr, &pattern(300, 1024 * 1024));
    server.assert_running();
    assert!(
        !server.stderr_so_far().contains("panicked"),
        "server log mentions a panic:\n{}",
        server.stderr_so_far()
    );
}

per_backend!(
    client_reset_mid_stream_leaves_other_connections_working,
    many_resets_in_a_row_do_not_disturb_the_server,
);

per_model!(
    client_reset_mid_stream_leaves_other_connections_working,
    many_resets_in_a_row_do_not_disturb_the_server,
);
