//! `peer-compio` against the echo checks every peer shares (`peer_common::echo_check`).

peer_common::echo_tests! {
    bin: env!("CARGO_BIN_EXE_peer-compio"),
    backend: "io_uring",
    two_workers: echoes_on_50_concurrent_connections_on_2_reuseport_listeners,
}
