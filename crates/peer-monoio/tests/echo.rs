//! `peer-monoio` against the echo checks every peer shares (`peer_common::echo_check`).

peer_common::echo_tests! {
    bin: env!("CARGO_BIN_EXE_peer-monoio"),
    backend: "io_uring",
    two_workers: echoes_on_50_concurrent_connections_on_2_reuseport_listeners,
}
