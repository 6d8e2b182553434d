//! `peer-tokio` against the echo checks every peer shares (`peer_common::echo_check`).

peer_common::echo_tests! {
    bin: env!("CARGO_BIN_EXE_peer-tokio"),
    backend: "epoll",
    two_workers: echoes_on_50_concurrent_connections_with_2_workers,
}
