//! `sigio` when the realtime signal queue overflows: the kernel raises `SIGIO` instead, the
//! server tries every socket, and the echo stays exact.
//!
//! A file of its own: it lowers `RLIMIT_SIGPENDING` for its whole process.

mod util;

use std::io;
use std::thread;

use ringport_models::Model;
use util::{capture_warnings, echo_through, pattern};

#[test]
fn sigio_survives_signal_queue_overflow() {
    let log = capture_warnings();
    // One queued realtime signal per user, at most (the count is per user, the limit is this
    // process's): nearly every burst of events overflows.
    let lim = libc::rlimit {
        rlim_cur: 1,
        rlim_max: 1,
    };
    // SAFETY: `lim` is a live `rlimit`.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_SIGPENDING, &lim) };
    assert_eq!(rc, 0, "setrlimit: {}", io::Error::last_os_error());

    let server = util::start(Model::Sigio).expect("sigio runs everywhere");
    let clients: Vec<_> = (0..20).map(|_| server.connect()).collect();
    let workers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            thread::spawn(move || {
                let payload = pattern(256 * 1024 + i, i as u64);
                echo_through(stream, payload.clone()) == payload
            })
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        assert!(w.join().expect("client thread"), "client {i}: echo differs");
    }
    let stats = server.stop();
    assert_eq!(stats.connections, 20);

    let log = log();
    assert!(
        log.contains("realtime signal queue overflow"),
        "the overflow path never ran; warnings: {log}"
    );
}
