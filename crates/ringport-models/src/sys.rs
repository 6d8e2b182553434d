//! The system calls more than one model needs, each behind a small safe function.
//!
//! Every raw call goes through [`syscall!`], which turns `-1` into the thread's `errno`; model
//! modules keep only the calls that are the subject of their model (`select`, `epoll_wait`,
//! `sigtimedwait`, `io_uring_enter`) and wrap those the same way.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use tracing::debug;

/// Calls a `libc` function and maps a `-1` result to `io::Error::last_os_error()`.
///
/// The macro only names the call; the caller's `unsafe` block (and its `// SAFETY:` comment)
/// covers the arguments.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        let res = libc::$fn($($arg),*);
        if res == -1 {
            Err(::std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}
pub(crate) use syscall;

/// Accepts one connection with `accept4(2)`, close-on-exec, non-blocking if asked.
///
/// The new socket's flags are set by the same call, so no window exists in which it is blocking
/// (or inheritable).
pub(crate) fn accept(listener: RawFd, nonblocking: bool) -> io::Result<TcpStream> {
    let mut flags = libc::SOCK_CLOEXEC;
    if nonblocking {
        flags |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: null address and length pointers are allowed (the peer address is not wanted);
    // `listener` is only read.
    let fd = unsafe {
        syscall!(accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            flags
        ))?
    };
    // SAFETY: `accept4` returned a new descriptor that nothing else owns.
    let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    prepare(&stream);
    Ok(stream)
}

/// Sets up an accepted connection as `ringport serve` does: echoes go out at once (the
/// comparison is of I/O models, not of Nagle's algorithm), and TCP urgent data stays in the
/// stream (`SO_OOBINLINE`), so it is echoed in its place like the rest; without that the
/// kernel takes the urgent byte out and no read sees it.
pub(crate) fn prepare(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    if let Err(e) = socket2::SockRef::from(stream).set_out_of_band_inline(true) {
        tracing::warn!(
            "socket {}: cannot keep urgent data inline (SO_OOBINLINE): {e}; an urgent byte from \
             this peer would not be echoed",
            stream.as_raw_fd()
        );
    }
}

/// Creates an eventfd (close-on-exec, non-blocking) with a zero counter.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: no pointers are involved.
    let fd = unsafe { syscall!(eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))? };
    // SAFETY: `eventfd` returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd's counter, making it readable. Errors are ignored: the only one
/// possible for a counter that is never read is an overflow after 2^64 - 2 signals, and then it
/// is readable anyway.
pub(crate) fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: the buffer is a live 8-byte `u64`, the size an eventfd write requires.
    let _ = unsafe { syscall!(write(fd, (&raw const one).cast(), 8)) };
}

/// Whether a connection waits in listener `fd`'s backlog (asked without waiting; when the
/// kernel cannot say, as if one did). Running out of descriptors is worth a warning and a
/// pause only then: an accept may fail with `EMFILE` before it looks at the backlog.
pub(crate) fn has_waiting(fd: RawFd) -> bool {
    let mut fds = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    poll(&mut fds, Some(Duration::ZERO)).map_or(true, |n| n > 0)
}

/// `poll(2)` on a set of descriptors, retried on `EINTR` for what is left of the time;
/// `None` waits without a time limit.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let mut wait = timeout_ms(timeout);
    loop {
        // SAFETY: `fds` is a live, exclusively borrowed slice of `pollfd`, and its length is
        // passed with it.
        match unsafe { syscall!(poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait)) } {
            Ok(n) => return Ok(n as usize),
            // A signal must not restart the whole wait: that would put off deadlines.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                if let Some(d) = deadline {
                    wait = timeout_ms(Some(d.saturating_duration_since(Instant::now())));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether a wait (`poll`, `select`) failed because the kernel was short of memory for its
/// tables, which passes: after a pause of a millisecond (so that a loop that tries again
/// does not spin), true. The server keeps its connections rather than fail.
pub(crate) fn short_of_memory(e: &io::Error) -> bool {
    if e.raw_os_error() != Some(libc::ENOMEM) {
        return false;
    }
    debug!("the kernel is short of memory for a wait: {e}; trying again in 1 ms");
    std::thread::sleep(Duration::from_millis(1));
    true
}

/// A timeout in whole milliseconds for `poll`/`epoll_wait`, rounded up so a wait never ends
/// before the deadline it was computed from; `None` is `-1` (no limit).
pub(crate) fn timeout_ms(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000);
            ms.min(libc::c_int::MAX as u128) as libc::c_int
        }
    }
}

/// How long to wait until the earliest of some deadlines (`None`: no deadline, wait forever).
pub(crate) fn until(
    now: Instant,
    deadlines: impl IntoIterator<Item = Option<Instant>>,
) -> Option<Duration> {
    deadlines
        .into_iter()
        .flatten()
        .min()
        .map(|d| d.saturating_duration_since(now))
}

/// How many bytes the kernel has received on `stream` that were not read yet (`FIONREAD`).
///
/// A stopping server asks this of a connection that went idle: `0` means everything the peer
/// sent so far was read (and, once sent, echoed), so the connection can be closed without
/// dropping input; more means input arrived after the read that found none.
pub(crate) fn unread(stream: &TcpStream) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: `FIONREAD` writes one `c_int` through its pointer, which points to `n`, live and
    // exclusively borrowed; `stream` keeps the descriptor open.
    unsafe { syscall!(ioctl(stream.as_raw_fd(), libc::FIONREAD, &raw mut n))? };
    Ok(usize::try_from(n).unwrap_or(0))
}

/// How many bytes written to `stream` its peer has not acknowledged yet (`SIOCOUTQ`).
///
/// A stopping server waits for `0` before it closes an idle connection: should the peer send
/// anything after the close, the kernel would answer with a reset and drop the echo it still
/// held for the peer.
pub(crate) fn unacked(stream: &TcpStream) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: `SIOCOUTQ` (`TIOCOUTQ`) writes one `c_int` through its pointer, which points to
    // `n`, live and exclusively borrowed; `stream` keeps the descriptor open.
    unsafe { syscall!(ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &raw mut n))? };
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Closes a connection with a FIN: [`finish`], then `close`.
pub(crate) fn close_gracefully(stream: TcpStream) {
    finish(&stream);
    drop(stream);
}

/// The part of a graceful close that comes before `close`: `shutdown(Write)` (the FIN), then
/// drop whatever the peer sent that was never read, so that the `close` that follows does not
/// turn the FIN into a reset (which could destroy echoed bytes the peer has not read yet).
pub(crate) fn finish(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let mut sink = [0u8; 4096];
    // Bounded: a peer that keeps sending gets its reset after 64 KiB.
    for _ in 0..16 {
        match recv_nowait(stream, &mut sink) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}

/// One `recv` that does not wait (`MSG_DONTWAIT`), also on a blocking socket: `WouldBlock`
/// when nothing is there to read. Like `read`, it may return `Interrupted`.
pub(crate) fn recv_nowait(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, exclusively borrowed buffer of the length passed; `stream`
    // keeps the descriptor open.
    let n = unsafe {
        syscall!(recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT
        ))?
    };
    Ok(n as usize)
}

/// What an `accept` error means for the accepting loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcceptError {
    /// Nothing to accept now (`EAGAIN`).
    Empty,
    /// That one connection failed (aborted by the peer, a network error, a signal): go on
    /// accepting.
    Transient,
    /// Out of descriptors or memory (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`): the connection
    /// stays in the backlog; pause accepting for a while instead of spinning on it.
    Exhausted,
    /// The listener itself is broken: give up.
    Fatal,
}

/// Classifies an `accept(2)` errno (see its man page, "Error handling": Linux passes pending
/// network errors of the new socket to `accept`).
pub(crate) fn classify_accept_error(errno: i32) -> AcceptError {
    match errno {
        libc::EAGAIN => AcceptError::Empty,
        libc::EINTR
        | libc::ECONNABORTED
        | libc::EPROTO
        | libc::EPERM
        | libc::ENETDOWN
        | libc::ENOPROTOOPT
        | libc::EHOSTDOWN
        | libc::ENONET
        | libc::EHOSTUNREACH
        | libc::EOPNOTSUPP
        | libc::ENETUNREACH
        | libc::ETIMEDOUT => AcceptError::Transient,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => AcceptError::Exhausted,
        _ => AcceptError::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait the kernel could not make for want of memory is tried again (after a pause);
    /// every other failure is the caller's to report.
    #[test]
    fn only_a_wait_short_of_memory_is_tried_again() {
        assert!(short_of_memory(&io::Error::from_raw_os_error(libc::ENOMEM)));
        for errno in [libc::EINVAL, libc::EBADF, libc::EFAULT, libc::EINTR] {
            assert!(
                !short_of_memory(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
    }
}
