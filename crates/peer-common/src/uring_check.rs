//! The workspace's one io_uring test policy, for every crate's tests (feature `testing`): which
//! failures mean the kernel refuses io_uring, whether such a refusal skips a test or fails it,
//! and the check that a thread is not left interrupted by a ring's teardown.

use std::io;
use std::net::UdpSocket;
use std::time::Duration;

/// Whether a test that needs io_uring skips where the kernel refuses it (built without it, the
/// sysctl `kernel.io_uring_disabled`, a container's seccomp profile): yes, unless
/// `RINGPORT_TEST_URING=require` (CI), where it fails instead.
pub fn refusal_skips() -> bool {
    std::env::var("RINGPORT_TEST_URING").map_or(true, |v| v != "require")
}

/// Whether an error's text names the kernel's own refusal of io_uring: `EPERM` (the sysctl, or
/// a seccomp profile), `EACCES`, or `ENOSYS` (a kernel without it). Any other failure to set up
/// a ring is a failure, not a reason to skip.
pub fn names_refusal(text: &str) -> bool {
    ["(os error 1)", "(os error 13)", "(os error 38)"]
        .iter()
        .any(|code| text.contains(code))
}

/// Why this kernel refuses io_uring, if it does: a ring cannot be set up, for one of the
/// reasons [`names_refusal`] accepts.
pub fn refusal() -> Option<String> {
    match io_uring::IoUring::new(2) {
        Ok(_) => None,
        Err(e) => {
            let why = format!("io_uring_setup: {e}");
            names_refusal(&why).then_some(why)
        }
    }
}

/// Asserts that this thread's blocking calls with a timeout time out rather than fail with
/// `EINTR`, twice: the kernel interrupts every thread it counts as a ring's user when the ring is
/// torn down. `after` says what happened before, for the message.
pub fn assert_timed_reads_time_out(after: &str) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    for _ in 0..2 {
        let err = socket.recv(&mut [0u8; 8]).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "a read after {after}: {err}"
        );
    }
}
