//! `select` past `FD_SETSIZE`: a connection whose descriptor is >= 1024 is refused cleanly,
//! and the server goes on serving the others.
//!
//! A file of its own, so that its process holds the ~1000 spare descriptors alone.

mod util;

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use ringport_models::{Model, Stats};
use util::{pattern, round_trip};

/// `FD_SETSIZE`.
const LIMIT: usize = 1024;

#[test]
fn select_refuses_descriptors_past_fd_setsize() {
    if let Err(why) = allow_descriptors(LIMIT as u64 + 64) {
        eprintln!("SKIPPED: select_refuses_descriptors_past_fd_setsize: {why}");
        return;
    }
    let server = util::start(Model::Select).expect("select runs everywhere");
    let mut before = server.connect();
    round_trip(&mut before, b"a connection below the limit");

    // Hold every free descriptor below the limit: the next ones are >= 1024.
    let mut spare: Vec<OwnedFd> = Vec::new();
    loop {
        let fd = before.as_fd().try_clone_to_owned().expect("dup");
        let n = fd.as_raw_fd() as usize;
        spare.push(fd);
        if n >= LIMIT - 1 {
            break;
        }
    }
    let mut past = server.connect();
    assert!(
        past.as_raw_fd() as usize >= LIMIT,
        "the client's own descriptor is past the limit too"
    );
    // Refused: closed by the server before it read a byte, so with a FIN, not a reset.
    let n = past.read(&mut [0u8; 16]).expect("EOF, not an error");
    assert_eq!(n, 0, "the refused connection reads EOF");
    // The others are not disturbed.
    round_trip(&mut before, b"still served");
    drop(past);

    drop(spare);
    let mut after = server.connect();
    round_trip(&mut after, &pattern(100_000, 5));
    round_trip(&mut before, b"and still");

    let stats = server.stop();
    let expected = (b"a connection below the limit".len()
        + 100_000
        + b"still served".len()
        + b"and still".len()) as u64;
    assert_eq!(
        stats,
        Stats {
            connections: 2,
            bytes: expected,
            refused: 1
        }
    );
}

/// Raises the soft `RLIMIT_NOFILE` to at least `n` if the hard limit allows.
fn allow_descriptors(n: u64) -> io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live, writable `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur >= n as libc::rlim_t {
        return Ok(());
    }
    if lim.rlim_max < n as libc::rlim_t {
        return Err(io::Error::other(format!(
            "RLIMIT_NOFILE hard limit {} < {n}",
            lim.rlim_max
        )));
    }
    lim.rlim_cur = n as libc::rlim_t;
    // SAFETY: `lim` is a live `rlimit`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
