//! `select`: one thread, `select(2)`, the descriptor sets rebuilt before every wait.
//!
//! Each turn puts every connection in the read set, or in the write set while it has unsent
//! bytes (it reads nothing then), adds the listener and the stop, and calls `select`. Then it
//! drives the connections `select` marked, and accepts.
//!
//! # The `FD_SETSIZE` limit
//!
//! An `fd_set` is a fixed bitmap of `FD_SETSIZE` (1024) bits; `FD_SET` with a descriptor
//! `>= 1024` writes past its end (in C it silently corrupts memory; `libc`'s Rust version
//! panics). Descriptors are numbered from the lowest free one, so this model serves about
//! 1000 connections at most, whatever `RLIMIT_NOFILE` allows. A connection that gets a
//! descriptor `>= FD_SETSIZE` is therefore closed at once, before it is ever put in a set,
//! counted in [`Stats::refused`](crate::Stats::refused) and reported by a rate-limited warning;
//! the connections already served are not disturbed. The listener and the stop must have
//! descriptors below the limit, or [`serve`] fails at once.

use std::io;
use std::mem::MaybeUninit;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::conn::{Acceptor, Conn, RateLimit, Step, SCRATCH};
use crate::sys::{self, syscall};
use crate::{Config, Stats, Stop};

pub(crate) fn serve(listener: TcpListener, config: &Config, stop: &Stop) -> io::Result<Stats> {
    for (what, fd) in [
        ("listener", listener.as_raw_fd()),
        ("stop", stop.as_raw_fd()),
    ] {
        if !FdSet::fits(fd) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "select: the {what}'s descriptor {fd} is >= FD_SETSIZE ({})",
                    libc::FD_SETSIZE
                ),
            ));
        }
    }
    let stop_fd = stop.as_raw_fd();
    let mut acceptor = Some(Acceptor::new("select", listener, true)?);
    let mut conns: Vec<Conn> = Vec::new();
    let mut stats = Stats::default();
    // The listener's failure, reported once the connections are drained.
    let mut failed: Option<io::Error> = None;
    let mut scratch = vec![0u8; SCRATCH];
    let mut refusals = RateLimit::new();
    let mut deadline: Option<Instant> = None;

    loop {
        let now = Instant::now();
        if deadline.is_none() && (stop.is_triggered() || failed.is_some()) {
            info!("select: stopping, draining {} connections", conns.len());
            deadline = Some(crate::later(now, config.drain_timeout));
            acceptor = None;
            let mut i = 0;
            while i < conns.len() {
                conns[i].drain();
                match conns[i].drive(&mut scratch, &mut stats.bytes) {
                    Step::Close(why) => conns.swap_remove(i).close(why),
                    _ => i += 1,
                }
            }
        }
        if let Some(deadline) = deadline {
            if conns.is_empty() {
                break;
            }
            if now >= deadline {
                warn!("select: drain timeout, closing {} connections", conns.len());
                conns.drain(..).for_each(Conn::close_unfinished);
                break;
            }
        }

        let mut read = FdSet::new();
        let mut write = FdSet::new();
        if deadline.is_none() {
            read.insert(stop_fd);
        }
        if let Some(a) = acceptor.as_mut() {
            if !a.paused(now) {
                read.insert(a.fd());
            }
        }
        for c in &conns {
            if c.has_unsent() {
                write.insert(c.fd());
            } else {
                read.insert(c.fd());
            }
        }
        let paused = acceptor.as_ref().and_then(Acceptor::paused_until);
        // While draining (only then: it is a scan), when the first quiet period ends.
        let quiet = deadline.and_then(|_| conns.iter().filter_map(Conn::quiet_until).min());
        select(
            &mut read,
            &mut write,
            sys::until(now, [deadline, paused, quiet]),
        )?;

        // Connections first: closing them frees descriptor numbers for the accepts below, and
        // a socket accepted this turn is not mistaken for one the sets speak about. While
        // draining, a connection whose quiet period is over is driven too (to be closed).
        let now = Instant::now();
        let mut i = 0;
        while i < conns.len() {
            let c = &mut conns[i];
            let (r, w) = (read.contains(c.fd()), write.contains(c.fd()));
            if !(r || w || c.quiet_until().is_some_and(|t| t <= now)) {
                i += 1;
                continue;
            }
            c.readable |= r;
            c.writable |= w;
            match c.drive(&mut scratch, &mut stats.bytes) {
                Step::Close(why) => conns.swap_remove(i).close(why),
                _ => i += 1,
            }
        }

        let Some(a) = acceptor.as_mut().filter(|a| read.contains(a.fd())) else {
            continue;
        };
        while let Some(stream) = a.accept_or_fail(&mut failed) {
            if !FdSet::fits(stream.as_raw_fd()) {
                refuse(stream, &mut stats, &mut refusals);
                continue;
            }
            stats.connections += 1;
            let mut c = Conn::new(stream);
            match c.drive(&mut scratch, &mut stats.bytes) {
                Step::Close(why) => c.close(why),
                _ => conns.push(c),
            }
        }
    }
    failed.map_or(Ok(stats), Err)
}

/// Closes a connection `select` cannot watch (see the module docs).
fn refuse(stream: TcpStream, stats: &mut Stats, refusals: &mut RateLimit) {
    let fd = stream.as_raw_fd();
    stats.refused += 1;
    if let Some(suppressed) = refusals.check() {
        warn!(
            suppressed,
            "select: refusing socket {fd}: descriptor >= FD_SETSIZE ({}), which select(2) cannot watch",
            libc::FD_SETSIZE
        );
    }
    debug!("closing socket {fd}");
    drop(stream);
}

/// An `fd_set` that only takes descriptors below `FD_SETSIZE`, and knows the highest it holds.
struct FdSet {
    set: libc::fd_set,
    max: RawFd,
}

impl FdSet {
    /// Whether `fd` can be put in an `fd_set`.
    fn fits(fd: RawFd) -> bool {
        usize::try_from(fd).is_ok_and(|fd| fd < libc::FD_SETSIZE)
    }

    fn new() -> FdSet {
        let mut set = MaybeUninit::<libc::fd_set>::uninit();
        // SAFETY: `FD_ZERO` initializes the whole set it is given.
        let set = unsafe {
            libc::FD_ZERO(set.as_mut_ptr());
            set.assume_init()
        };
        FdSet { set, max: -1 }
    }

    /// # Panics
    ///
    /// If `fd` does not fit (a bug: the loop refuses such connections before this).
    fn insert(&mut self, fd: RawFd) {
        assert!(Self::fits(fd), "descriptor {fd} does not fit in an fd_set");
        // SAFETY: `fd` is in `0..FD_SETSIZE`, so the bit is inside the set.
        unsafe { libc::FD_SET(fd, &mut self.set) };
        self.max = self.max.max(fd);
    }

    fn contains(&self, fd: RawFd) -> bool {
        // SAFETY: `fd` is in `0..FD_SETSIZE` (checked first), so the bit is inside the set.
        Self::fits(fd) && unsafe { libc::FD_ISSET(fd, &self.set) }
    }
}

/// `select(2)` on a read and a write set; on return they hold the ready descriptors. A wait
/// interrupted by a signal returns with both sets empty.
fn select(read: &mut FdSet, write: &mut FdSet, timeout: Option<Duration>) -> io::Result<()> {
    let nfds = read.max.max(write.max) + 1;
    // Rounded up to the next microsecond, so a wait never ends before its deadline.
    let mut tv = timeout.map(|d| {
        let d = d + Duration::from_nanos(999);
        libc::timeval {
            tv_sec: d.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_usec: d.subsec_micros() as libc::suseconds_t,
        }
    });
    let tv_ptr = tv
        .as_mut()
        .map_or(std::ptr::null_mut(), |tv| tv as *mut libc::timeval);
    // SAFETY: both sets are live and exclusively borrowed, `nfds` does not exceed
    // `FD_SETSIZE`, the except set may be null, and `tv_ptr` is null or points to `tv`.
    let res = unsafe {
        syscall!(select(
            nfds,
            &mut read.set,
            &mut write.set,
            std::ptr::null_mut(),
            tv_ptr
        ))
    };
    match res {
        Ok(_) => Ok(()),
        // A signal, or the kernel short of memory for the wait's tables for now (then after a
        // pause, not to spin): nothing is ready this turn, and the loop comes back.
        Err(e) if e.kind() == io::ErrorKind::Interrupted || sys::short_of_memory(&e) => {
            *read = FdSet::new();
            *write = FdSet::new();
            Ok(())
        }
        Err(e) => Err(e),
    }
}
