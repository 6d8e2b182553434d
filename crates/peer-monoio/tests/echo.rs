//! `peer-monoio` against the shared echo checks (`peer-tokio/tests/common/echo_check.rs`, shared).

#[path = "../../peer-tokio/tests/common/echo_check.rs"]
mod echo_check;

use echo_check::Server;

const BIN: &str = env!("CARGO_BIN_EXE_peer-monoio");

#[test]
fn echoes_1_byte_64_kib_and_4_mib_exactly() {
    let mut server = Server::start(BIN, 1);
    for len in [1, 64 << 10, 4 << 20] {
        echo_check::check_payload(server.addr(), len);
    }
    server.assert_running();
}

#[test]
fn echoes_on_50_concurrent_connections() {
    let mut server = Server::start(BIN, 1);
    echo_check::check_concurrent(server.addr(), 50, 8);
    server.assert_running();
}

#[test]
fn echoes_on_50_concurrent_connections_on_2_reuseport_listeners() {
    let mut server = Server::start(BIN, 2);
    echo_check::check_concurrent(server.addr(), 50, 8);
    server.assert_running();
}

#[test]
fn half_close_gets_everything_back_then_eof() {
    let mut server = Server::start(BIN, 1);
    echo_check::check_half_close(server.addr());
    server.assert_running();
}

#[test]
fn bad_arguments_exit_2() {
    echo_check::check_bad_args(BIN);
}
