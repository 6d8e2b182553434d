//! `epoll`: one thread, edge-triggered `epoll(7)`.
//!
//! Every socket is registered once, when it is accepted, for both directions
//! (`EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET`), with its descriptor as the token; nothing is
//! ever modified afterwards, so an echo costs no `epoll_ctl`. Edge-triggered means an event
//! says "this changed", not "this is ready": a connection records it
//! ([`Conn::readable`], [`Conn::writable`]) and reads or writes until `EAGAIN` clears it. A
//! connection that used up its turn while still readable goes on the `ready` queue, which is
//! served after the next (then non-blocking) wait, so one busy peer cannot starve the others.
//!
//! There is no limit but descriptors, and a wait costs O(ready sockets), not O(connections).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::conn::{
    drain_all, drain_over, turn, turn_pending, wait_timeout, Acceptor, Conn, RateLimit, SCRATCH,
};
use crate::sys::{self, syscall};
use crate::{Config, Stats, Stop};

const STOP: u64 = u64::MAX;
const LISTENER: u64 = u64::MAX - 1;
/// Events taken per `epoll_wait`.
const EVENTS: usize = 256;

const CONN_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
const READABLE: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
const WRITABLE: u32 = (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32;

pub(crate) fn serve(listener: TcpListener, config: &Config, stop: &Stop) -> io::Result<Stats> {
    let epoll = Epoll::new()?;
    let mut acceptor = Some(Acceptor::new("epoll", listener, true)?);
    let listener_fd = acceptor.as_ref().map_or(-1, Acceptor::fd);
    epoll.add(
        stop.as_raw_fd(),
        (libc::EPOLLIN | libc::EPOLLET) as u32,
        STOP,
    )?;
    epoll.add(
        listener_fd,
        (libc::EPOLLIN | libc::EPOLLET) as u32,
        LISTENER,
    )?;
    // Edge-triggered: connections already waiting when the listener was registered produced
    // no edge, so try to accept at once.
    let mut accept_pending = true;

    let mut conns: HashMap<RawFd, Conn> = HashMap::new();
    let mut ready: VecDeque<RawFd> = VecDeque::new();
    let mut events = Vec::with_capacity(EVENTS);
    let mut stats = Stats::default();
    // The listener's failure, reported once the connections are drained.
    let mut failed: Option<io::Error> = None;
    let mut scratch = vec![0u8; SCRATCH];
    let mut refusals = RateLimit::new();
    let mut deadline: Option<Instant> = None;

    loop {
        let now = Instant::now();
        if deadline.is_none() && (stop.is_triggered() || failed.is_some()) {
            info!("epoll: stopping, draining {} connections", conns.len());
            deadline = Some(crate::later(now, config.drain_timeout));
            if let Some(a) = acceptor.take() {
                // Removed explicitly: closing it would not, were the listener duplicated.
                epoll.delete(a.fd())?;
            }
            drain_all(&mut conns, &mut ready, &mut scratch, &mut stats);
        }
        if drain_over("epoll", deadline, now, &mut conns) {
            break;
        }

        if let Some(a) = acceptor.as_mut() {
            if accept_pending && !a.paused(now) {
                while let Some(stream) = a.accept_or_fail(&mut failed) {
                    let fd = stream.as_raw_fd();
                    if let Err(e) = epoll.add(fd, CONN_EVENTS, fd as u64) {
                        // ENOMEM, or ENOSPC: past /proc/sys/fs/epoll/max_user_watches.
                        if let Some(suppressed) = refusals.check() {
                            warn!(
                                suppressed,
                                "epoll: refusing socket {fd}: cannot watch it: {e}"
                            );
                        }
                        stats.refused += 1;
                        continue;
                    }
                    stats.connections += 1;
                    conns.insert(fd, Conn::new(stream));
                    turn(&mut conns, &mut ready, fd, &mut scratch, &mut stats);
                }
                // Still pending if accepting was paused, or the turn took its share: no new
                // edge will say so.
                accept_pending = a.paused_until().is_some() || a.cut_short();
            }
        }

        if failed.is_some() && deadline.is_none() {
            // The listener failed: the top of the loop starts the drain, before any wait.
            continue;
        }
        let timeout = wait_timeout(now, &conns, &ready, acceptor.as_ref(), deadline);
        epoll.wait(&mut events, timeout)?;

        for event in &events {
            let (bits, token) = (event.events, event.u64);
            match token {
                // The top of the loop sees the stop.
                STOP => {}
                LISTENER => accept_pending = true,
                fd => {
                    let fd = fd as RawFd;
                    let Some(c) = conns.get_mut(&fd) else {
                        continue;
                    };
                    c.readable |= bits & READABLE != 0;
                    c.writable |= bits & WRITABLE != 0;
                    turn(&mut conns, &mut ready, fd, &mut scratch, &mut stats);
                }
            }
        }
        // The connections waiting for a turn (see `turn_pending`), then, while draining, those
        // whose quiet period is over. (Closing a connection's descriptor also removes it from
        // the epoll set.)
        turn_pending(
            &mut conns,
            &mut ready,
            deadline.is_some(),
            &mut scratch,
            &mut stats,
        );
    }
    failed.map_or(Ok(stats), Err)
}

/// An epoll instance.
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: no pointers are involved.
        let fd = unsafe { syscall!(epoll_create1(libc::EPOLL_CLOEXEC))? };
        // SAFETY: `epoll_create1` returned a new descriptor that nothing else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: `event` is a live `epoll_event`; the kernel copies it.
        unsafe {
            syscall!(epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd,
                &mut event
            ))?
        };
        Ok(())
    }

    fn delete(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: a null event is allowed for `EPOLL_CTL_DEL` (since Linux 2.6.9).
        unsafe {
            syscall!(epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut()
            ))?
        };
        Ok(())
    }

    /// Waits for events; `events` is cleared and refilled (up to its capacity). A wait
    /// interrupted by a signal returns no events.
    fn wait(
        &self,
        events: &mut Vec<libc::epoll_event>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        events.clear();
        let spare: &mut [MaybeUninit<libc::epoll_event>] = events.spare_capacity_mut();
        // SAFETY: `spare` is writable memory for `spare.len()` events; the kernel fills the
        // first `n` of them, which are then marked initialized.
        let res = unsafe {
            syscall!(epoll_wait(
                self.0.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len().min(libc::c_int::MAX as usize) as libc::c_int,
                sys::timeout_ms(timeout)
            ))
        };
        match res {
            Ok(n) => {
                // SAFETY: the kernel initialized the first `n <= capacity` events.
                unsafe { events.set_len(n as usize) };
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }
}
