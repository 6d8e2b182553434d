//! `sigio`: one thread, signal-driven I/O, the Linux counterpart of `WSAAsyncSelect`.
//!
//! `WSAAsyncSelect` posts a window message (socket, event) to a window whenever a socket's
//! state changes, and the program's message loop handles it. Here every socket is told to
//! raise a realtime signal aimed at the serving thread whenever its state changes
//! (`fcntl`: `F_SETSIG` picks the signal, `F_SETOWN_EX` with `F_OWNER_TID` the thread, `O_ASYNC`
//! turns it on); the signal is blocked in that thread, and the thread takes the queued signals
//! one by one with `sigtimedwait(2)`: its message loop. Each signal's `siginfo` carries the
//! descriptor (`si_fd`) and what happened (`si_band`, `POLLIN`/`POLLOUT`/... bits). No signal
//! handler runs, so nothing is restricted to async-signal-safe code.
//!
//! A signal reports a change, like an edge-triggered `epoll` event: a connection records it
//! ([`Conn::readable`], [`Conn::writable`]) and reads or writes until `EAGAIN`. A socket is
//! tried once as soon as it is accepted, since data that arrived before `O_ASYNC` was set
//! raises no signal. Signals are aimed at one thread (never the process), so several `sigio`
//! servers can run in one process, and other threads never see them.
//!
//! # Overflow
//!
//! Realtime signals queue, up to `RLIMIT_SIGPENDING` per user. When the queue is full the
//! kernel raises plain `SIGIO` instead (which does not queue and carries no descriptor): the
//! signals in between are lost. The thread blocks and waits for `SIGIO` too; when it gets one it
//! logs a (rate-limited) warning and tries every socket, the listener included, as `poll` would.
//!
//! # The stop
//!
//! A message loop is told to quit by a message; here, by a signal. A small thread waits on the
//! [`Stop`]'s descriptor and, when it becomes readable, sends `SIGIO` to the serving thread
//! (`pthread_kill`). `SIGIO` rather than the realtime signal: a realtime signal sent that way
//! fails (`EAGAIN`) when the queue is full, and the stop would be lost, while a standard signal
//! is only a pending bit and is never refused. The kernel's overflow `SIGIO` has `si_code`
//! `SI_KERNEL`, the waker's does not (`SI_USER` or `SI_TKILL`, depending on the kernel); but
//! since a pending `SIGIO` absorbs any later one, the two can arrive as one, so every `SIGIO`
//! is handled alike: the stop is checked and every socket is tried (the warning is logged only
//! for the kernel's).
//!
//! The realtime signal is `SIGRTMIN + 1` (glibc's `SIGRTMIN` already leaves out the ones it
//! reserves).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::{align_of, size_of, MaybeUninit};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libc::c_int;
use tracing::{info, warn};

use crate::conn::{
    drain_all, drain_over, queue, turn, turn_pending, wait_timeout, Acceptor, Conn, RateLimit,
    SCRATCH,
};
use crate::sys::{self, syscall};
use crate::{Config, Stats, Stop};

/// `<asm-generic/fcntl.h>` (not in the `libc` crate for glibc).
const F_SETSIG: c_int = 10;
const F_SETOWN_EX: c_int = 15;
const F_OWNER_TID: c_int = 0;

/// `struct f_owner_ex`.
#[repr(C)]
struct FOwnerEx {
    kind: c_int,
    pid: libc::pid_t,
}

pub(crate) fn serve(listener: TcpListener, config: &Config, stop: &Stop) -> io::Result<Stats> {
    let signal = libc::SIGRTMIN() + 1;
    let signals = Signals::block(&[signal, libc::SIGIO])?;
    let waker = StopWaker::spawn(stop)?;
    let result = run(listener, config, stop, &signals, signal);
    // Order matters: every socket is closed (`run` owned them) and the waker is joined, so
    // nothing can raise a signal any more; only then does `signals` drop what is still queued
    // and unblock the signals, which would otherwise kill the process.
    drop(waker);
    drop(signals);
    result
}

fn run(
    listener: TcpListener,
    config: &Config,
    stop: &Stop,
    signals: &Signals,
    signal: c_int,
) -> io::Result<Stats> {
    // SAFETY: `gettid` has no preconditions.
    let tid = unsafe { libc::gettid() };
    let mut acceptor = Some(Signalled(Acceptor::new("sigio", listener, true)?));
    let listener_fd = acceptor.as_ref().map_or(-1, |a| a.fd());
    notify(listener_fd, tid, signal)?;
    // Connections may be waiting already; they raised no signal.
    let mut accept_pending = true;

    let mut conns: HashMap<RawFd, Conn> = HashMap::new();
    let mut ready: VecDeque<RawFd> = VecDeque::new();
    let mut stats = Stats::default();
    // The listener's failure, reported once the connections are drained.
    let mut failed: Option<io::Error> = None;
    let mut scratch = vec![0u8; SCRATCH];
    let mut refusals = RateLimit::new();
    let mut overflows = RateLimit::new();
    let mut deadline: Option<Instant> = None;

    loop {
        let now = Instant::now();
        if deadline.is_none() && (stop.is_triggered() || failed.is_some()) {
            info!("sigio: stopping, draining {} connections", conns.len());
            deadline = Some(crate::later(now, config.drain_timeout));
            acceptor = None;
            drain_all(&mut conns, &mut ready, &mut scratch, &mut stats);
        }
        if drain_over("sigio", deadline, now, &mut conns) {
            break;
        }

        if let Some(a) = acceptor.as_mut() {
            if accept_pending && !a.paused(now) {
                while let Some(stream) = a.accept_or_fail(&mut failed) {
                    let fd = stream.as_raw_fd();
                    if let Err(e) = notify(fd, tid, signal) {
                        if let Some(suppressed) = refusals.check() {
                            warn!(
                                suppressed,
                                "sigio: refusing socket {fd}: cannot set signal-driven I/O: {e}"
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
                // signal will say so.
                accept_pending = a.paused_until().is_some() || a.cut_short();
            }
        }

        if failed.is_some() && deadline.is_none() {
            // The listener failed: the top of the loop starts the drain, before any wait.
            continue;
        }
        let timeout = wait_timeout(now, &conns, &ready, acceptor.as_deref(), deadline);
        match signals.wait(timeout)? {
            // Timed out, woken by the stop (the top of the loop sees it), or a stray signal.
            None | Some(Signal::Other) => {}
            Some(Signal::Io { fd, .. }) if fd == listener_fd => accept_pending = acceptor.is_some(),
            Some(Signal::Io { fd, band }) => {
                if let Some(c) = conns.get_mut(&fd) {
                    let band = band as libc::c_short;
                    c.readable |= band & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
                    c.writable |= band & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0;
                    turn(&mut conns, &mut ready, fd, &mut scratch, &mut stats);
                }
            }
            // An overflow, or the stop waker (or both: see the module docs).
            Some(Signal::Sigio { overflow }) => {
                if overflow {
                    if let Some(suppressed) = overflows.check() {
                        warn!(
                            suppressed,
                            "sigio: realtime signal queue overflow (SIGIO); trying all {} sockets",
                            conns.len()
                        );
                    }
                }
                accept_pending = acceptor.is_some();
                for (&fd, c) in &mut conns {
                    c.readable = true;
                    c.writable = true;
                    queue(c, &mut ready, fd);
                }
            }
        }
        // The connections queued before this wait, or by an overflow, then, while draining,
        // those whose quiet period is over.
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

/// The listener's acceptor, which gives up signal-driven I/O on the listener before closing it:
/// the caller may hold another descriptor of the same open file (a `try_clone`), which would
/// otherwise go on raising a signal that nobody blocks once `serve` has returned, and kill the
/// process.
struct Signalled(Acceptor);

impl std::ops::Deref for Signalled {
    type Target = Acceptor;
    fn deref(&self) -> &Acceptor {
        &self.0
    }
}

impl std::ops::DerefMut for Signalled {
    fn deref_mut(&mut self) -> &mut Acceptor {
        &mut self.0
    }
}

impl Drop for Signalled {
    fn drop(&mut self) {
        let fd = self.0.fd();
        // SAFETY: `fd` is the listener, still open (the acceptor drops after this); `F_GETFL`
        // takes nothing, `F_SETFL` and `F_SETSIG` an int.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_ASYNC);
            }
            libc::fcntl(fd, F_SETSIG, 0);
        }
    }
}

/// Makes `fd` non-blocking and signal-driven: `signal` goes to thread `tid` whenever its state
/// changes. The owner and the signal are set before `O_ASYNC`, so no signal goes elsewhere.
fn notify(fd: RawFd, tid: libc::pid_t, signal: c_int) -> io::Result<()> {
    let owner = FOwnerEx {
        kind: F_OWNER_TID,
        pid: tid,
    };
    // SAFETY: `F_SETSIG` takes an int; `F_SETOWN_EX` a pointer to a live `f_owner_ex`, which
    // the kernel copies; `F_GETFL`/`F_SETFL` take nothing and an int.
    unsafe {
        syscall!(fcntl(fd, F_SETSIG, signal))?;
        syscall!(fcntl(fd, F_SETOWN_EX, &raw const owner))?;
        let flags = syscall!(fcntl(fd, libc::F_GETFL))?;
        syscall!(fcntl(
            fd,
            libc::F_SETFL,
            flags | libc::O_NONBLOCK | libc::O_ASYNC
        ))?;
    }
    Ok(())
}

/// What `sigtimedwait` returned.
#[derive(Debug)]
enum Signal {
    /// Our realtime signal, raised by the kernel for a socket.
    Io { fd: RawFd, band: Band },
    /// `SIGIO`: from the kernel when the realtime queue overflowed (which sockets changed is
    /// unknown), or from the stop waker.
    Sigio { overflow: bool },
    /// Our realtime signal, sent by someone else.
    Other,
}

/// The signals of this model, blocked in the serving thread for as long as this lives.
struct Signals {
    set: libc::sigset_t,
    old: libc::sigset_t,
    signal: c_int,
}

impl Signals {
    fn block(signals: &[c_int]) -> io::Result<Signals> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: `sigemptyset` initializes the set; `sigaddset` only fails for an invalid
        // signal number, and these are valid.
        let set = unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            for &s in signals {
                libc::sigaddset(set.as_mut_ptr(), s);
            }
            set.assume_init()
        };
        let mut old = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: `set` is initialized; `old` is written by the call when it succeeds.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, old.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Signals {
            set,
            // SAFETY: `pthread_sigmask` succeeded, so it wrote the old mask.
            old: unsafe { old.assume_init() },
            signal: signals[0],
        })
    }

    /// Takes one queued signal, waiting up to `timeout` (`None`: no limit). `None`: timed
    /// out or interrupted.
    fn wait(&self, timeout: Option<Duration>) -> io::Result<Option<Signal>> {
        match self.take(timeout) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(None),
            other => other,
        }
    }

    /// As [`Signals::wait`], but an interruption (by a handler of some other signal) is the
    /// error `EINTR`, not `None`: `None` means nothing was queued.
    fn take(&self, timeout: Option<Duration>) -> io::Result<Option<Signal>> {
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: d.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_nsec: d.subsec_nanos() as _,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |ts| ts as *const libc::timespec);
        let mut info = MaybeUninit::<libc::siginfo_t>::zeroed();
        // SAFETY: `set` is initialized, `info` is writable, `ts_ptr` is null or points to `ts`.
        let res = unsafe { syscall!(sigtimedwait(&self.set, info.as_mut_ptr(), ts_ptr)) };
        let signo = match res {
            Ok(signo) => signo,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(None),
            Err(e) => return Err(e),
        };
        // SAFETY: `sigtimedwait` succeeded and filled `info` (which was zeroed anyway).
        let info = unsafe { info.assume_init() };
        Ok(Some(if signo == libc::SIGIO {
            Signal::Sigio {
                overflow: info.si_code == libc::SI_KERNEL,
            }
        } else if signo == self.signal && info.si_code > 0 {
            // Positive codes (`POLL_IN` ... `POLL_HUP`) come from the kernel's `F_SETSIG` path;
            // a signal sent by a thread has a code <= 0.
            let poll = SigPoll::of(&info);
            Signal::Io {
                fd: poll.fields.fd,
                band: poll.fields.band,
            }
        } else {
            Signal::Other
        }))
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        // Queued signals for closed sockets (or a stop not yet taken) must not be delivered
        // once unblocked: their default action ends the process.
        // An interruption is not the end of the queue: go on until it says it is empty.
        loop {
            match self.take(Some(Duration::ZERO)) {
                Ok(Some(_)) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Ok(None) | Err(_) => break,
            }
        }
        // SAFETY: `old` is the mask saved by `block`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// The `SIGPOLL` view of a `siginfo_t`: glibc's layout (`si_signo`, `si_errno`, `si_code`, then a
/// pointer-aligned union whose `_sigpoll` member is `{ si_band, si_fd }`). The `libc` crate
/// keeps that member private for glibc.
#[repr(C)]
struct SigPoll {
    _head: [c_int; 3],
    fields: SigPollFields,
}

#[repr(C)]
struct SigPollFields {
    band: Band,
    fd: c_int,
    /// Gives the struct the union's (pointer) alignment, hence its offset.
    _align: [*const u8; 0],
}

#[cfg(target_arch = "sparc64")]
type Band = c_int;
#[cfg(not(target_arch = "sparc64"))]
type Band = libc::c_long;

const _: () = assert!(size_of::<SigPoll>() <= size_of::<libc::siginfo_t>());
const _: () = assert!(align_of::<SigPoll>() <= align_of::<libc::siginfo_t>());

impl SigPoll {
    fn of(info: &libc::siginfo_t) -> &SigPoll {
        // SAFETY: `SigPoll` is a prefix of the kernel's `siginfo_t` layout, smaller and no more
        // aligned (checked above), and all its fields are plain integers, valid for any bits.
        unsafe { &*(info as *const libc::siginfo_t).cast::<SigPoll>() }
    }
}

/// Turns the stop's descriptor becoming readable into a `SIGIO` for the serving thread.
struct StopWaker {
    /// Written when the server ends first, to release the thread.
    done: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl StopWaker {
    fn spawn(stop: &Stop) -> io::Result<StopWaker> {
        let done = sys::eventfd()?;
        let done_fd = done.as_raw_fd();
        let stop = stop.clone();
        // SAFETY: `pthread_self` has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let thread = std::thread::Builder::new()
            .name("sigio-stop".into())
            .spawn(move || {
                let mut fds = [
                    libc::pollfd {
                        fd: stop.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: done_fd,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // A wait that fails (short of memory, say) is tried again: giving up would
                // leave an idle server deaf to the stop.
                let mut warned = false;
                while let Err(e) = sys::poll(&mut fds, None) {
                    if !std::mem::replace(&mut warned, true) {
                        warn!("sigio: the stop waker cannot wait: {e}; trying again");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                if stop.is_triggered() && fds[1].revents == 0 {
                    // SAFETY: `target` is the serving thread, which joins this thread before it
                    // returns, so it is alive.
                    unsafe { libc::pthread_kill(target, libc::SIGIO) };
                }
            })?;
        Ok(StopWaker {
            done,
            thread: Some(thread),
        })
    }
}

impl Drop for StopWaker {
    fn drop(&mut self) {
        sys::eventfd_signal(self.done.as_raw_fd());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
