//! Out of descriptors (`EMFILE`): every model pauses accepting (and says so) instead of failing
//! or spinning, keeps serving its connections, and accepts the waiting connection once a
//! descriptor is free again.
//!
//! A file of its own: it lowers `RLIMIT_NOFILE` and holds the free descriptors of its whole
//! process, one model after the other.

mod util;

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::thread;
use std::time::{Duration, Instant};

use ringport_models::{Model, Stats};
use util::{capture_warnings, round_trip};

#[test]
fn every_model_pauses_accepting_when_out_of_descriptors() {
    let log = capture_warnings();
    let original = get_nofile().expect("getrlimit");
    for model in Model::ALL {
        // A low limit, set before the server starts: io_uring reads the limit when an accept
        // is submitted, not when it runs.
        let lowest_free = std::fs::File::open("/dev/null")
            .expect("open /dev/null")
            .as_raw_fd();
        let limit = (lowest_free as libc::rlim_t + 64).min(original.rlim_cur);
        set_nofile(limit, original.rlim_max).expect("setrlimit");
        let Some(server) = util::start(model) else {
            set_nofile(original.rlim_cur, original.rlim_max).expect("setrlimit");
            continue;
        };
        // A connection being served: proves the server is set up (it allocates no descriptor
        // from now on but for connections).
        let mut a = server.connect();
        round_trip(&mut a, b"first");

        // Take every free descriptor but one, which B's client socket takes: the server's
        // accept of B then fails with EMFILE.
        let mut spare: Vec<OwnedFd> = Vec::new();
        loop {
            match a.as_fd().try_clone_to_owned() {
                Ok(fd) => spare.push(fd),
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
                Err(e) => panic!("dup: {e}"),
            }
        }
        spare.pop();
        let mut b = server.connect();
        let pause = format!("{model}: accept: Too many open files");
        wait_for(
            || log().contains(&pause),
            &format!("{model}: the accept to fail"),
        );

        // A descriptor is free again: the server accepts B once its pause is over.
        spare.pop();
        round_trip(&mut b, b"accepted after the pause");
        round_trip(&mut a, b"A is still served");

        drop(spare);
        set_nofile(original.rlim_cur, original.rlim_max).expect("setrlimit");
        let stats = server.stop();
        assert_eq!(
            stats,
            Stats {
                connections: 2,
                bytes: (b"first".len()
                    + b"accepted after the pause".len()
                    + b"A is still served".len()) as u64,
                refused: 0
            },
            "{model}"
        );
    }
}

/// Polls `done` until it holds; panics after [`util::WAIT`].
fn wait_for(done: impl Fn() -> bool, what: &str) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < util::WAIT,
            "waited {:?} for {what}",
            util::WAIT
        );
        thread::sleep(Duration::from_millis(5));
    }
}

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live, writable `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

fn set_nofile(cur: libc::rlim_t, max: libc::rlim_t) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: `lim` is a live `rlimit`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
