//! `poll`: one thread, `poll(2)` on one `pollfd` array kept in step with the connections.
//!
//! `fds[0]` is the stop, `fds[1]` the listener, and `fds[2 + i]` belongs to `conns[i]`: both
//! vectors grow by `push` and shrink by `swap_remove` together. A connection's `events` are
//! `POLLIN`, or `POLLOUT` while it has unsent bytes (it reads nothing then). A slot whose
//! descriptor is negative is ignored by `poll`: that is how the stop and the listener leave the
//! wait while draining, and the listener while accepting is paused.
//!
//! There is no limit but descriptors; the cost is that every wait hands the kernel the whole
//! array, and every turn scans it.

use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::time::Instant;

use tracing::{info, warn};

use crate::conn::{Acceptor, Conn, Step, SCRATCH};
use crate::sys;
use crate::{Config, Stats, Stop};

const STOP: usize = 0;
const LISTENER: usize = 1;
const CONNS: usize = 2;

pub(crate) fn serve(listener: TcpListener, config: &Config, stop: &Stop) -> io::Result<Stats> {
    let mut acceptor = Some(Acceptor::new("poll", listener, true)?);
    let mut fds = vec![
        pollfd(stop.as_raw_fd(), libc::POLLIN),
        pollfd(-1, libc::POLLIN),
    ];
    let mut conns: Vec<Conn> = Vec::new();
    let mut stats = Stats::default();
    // The listener's failure, reported once the connections are drained.
    let mut failed: Option<io::Error> = None;
    let mut scratch = vec![0u8; SCRATCH];
    let mut deadline: Option<Instant> = None;

    loop {
        let now = Instant::now();
        if deadline.is_none() && (stop.is_triggered() || failed.is_some()) {
            info!("poll: stopping, draining {} connections", conns.len());
            deadline = Some(crate::later(now, config.drain_timeout));
            acceptor = None;
            fds[STOP].fd = -1;
            let mut i = 0;
            while i < conns.len() {
                conns[i].drain();
                i = turn(&mut conns, &mut fds, i, &mut scratch, &mut stats);
            }
        }
        if let Some(deadline) = deadline {
            if conns.is_empty() {
                break;
            }
            if now >= deadline {
                warn!("poll: drain timeout, closing {} connections", conns.len());
                conns.drain(..).for_each(Conn::close_unfinished);
                break;
            }
        }

        fds[LISTENER].fd = match acceptor.as_mut() {
            Some(a) => {
                if a.paused(now) {
                    -1
                } else {
                    a.fd()
                }
            }
            None => -1,
        };
        let paused = acceptor.as_ref().and_then(Acceptor::paused_until);
        // While draining (only then: it is a scan), when the first quiet period ends.
        let quiet = deadline.and_then(|_| conns.iter().filter_map(Conn::quiet_until).min());
        match sys::poll(&mut fds, sys::until(now, [deadline, paused, quiet])) {
            Ok(_) => {}
            // Nothing is ready this turn, and the loop comes back.
            Err(e) if sys::short_of_memory(&e) => fds.iter_mut().for_each(|p| p.revents = 0),
            Err(e) => return Err(e),
        }

        // Connections first: a socket accepted this turn has no `revents` yet. While draining,
        // a connection whose quiet period is over is driven too (to be closed).
        let now = Instant::now();
        let mut i = 0;
        while i < conns.len() {
            let revents = fds[CONNS + i].revents;
            let quiet_over = conns[i].quiet_until().is_some_and(|t| t <= now);
            if revents == 0 && !quiet_over {
                i += 1;
                continue;
            }
            let c = &mut conns[i];
            c.readable |= revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
            c.writable |= revents & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0;
            i = turn(&mut conns, &mut fds, i, &mut scratch, &mut stats);
        }

        if fds[LISTENER].revents == 0 {
            continue;
        }
        let Some(a) = acceptor.as_mut() else { continue };
        while let Some(stream) = a.accept_or_fail(&mut failed) {
            stats.connections += 1;
            conns.push(Conn::new(stream));
            fds.push(pollfd(conns[conns.len() - 1].fd(), libc::POLLIN));
            let last = conns.len() - 1;
            turn(&mut conns, &mut fds, last, &mut scratch, &mut stats);
        }
    }
    failed.map_or(Ok(stats), Err)
}

/// Drives `conns[i]`, then updates its `pollfd`, or closes it and removes both. Returns the
/// index of the next connection to look at.
fn turn(
    conns: &mut Vec<Conn>,
    fds: &mut Vec<libc::pollfd>,
    i: usize,
    scratch: &mut [u8],
    stats: &mut Stats,
) -> usize {
    let events = match conns[i].drive(scratch, &mut stats.bytes) {
        Step::Read | Step::Yield => libc::POLLIN,
        Step::Write => libc::POLLOUT,
        Step::Close(why) => {
            fds.swap_remove(CONNS + i);
            conns.swap_remove(i).close(why);
            // The last connection moved into slot `i`: look at it next.
            return i;
        }
    };
    fds[CONNS + i].events = events;
    fds[CONNS + i].revents = 0;
    i + 1
}

fn pollfd(fd: std::os::fd::RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}
