//! Sockets associated with a port, and their completion keys.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

/// A reference count without the weak count `std`'s `Arc` carries (never used here): every
/// connection holds one record, and the 8 bytes put it in a smaller allocation size class.
type Shared<T> = triomphe::Arc<T>;

/// `Inner::state`: a close was posted.
const CLOSED: u8 = 1;
/// `Inner::state`: the socket's type was asked, and `STREAM` holds the answer.
const STREAM_KNOWN: u8 = 2;
/// `Inner::state`: the socket is a stream socket.
const STREAM: u8 = 4;
/// `Inner::state`: the socket is a TCP socket (asked with `STREAM`).
const TCP: u8 = 8;
/// `Inner::state`, bits 4-7: how many times every operation of the socket was asked to be
/// cancelled (`Worker::cancel_all`, a close), modulo 16.
const CANCELS_SHIFT: u8 = 4;

/// `Inner::busy`, bits 3-5: the error that ended the connection, as an index into this list
/// plus one (0: none seen).
const ENDINGS: [i32; 5] = [
    libc::ECONNRESET,
    libc::ECONNREFUSED,
    libc::ETIMEDOUT,
    libc::EHOSTUNREACH,
    libc::ENETUNREACH,
];
const ENDING_SHIFT: u8 = 3;
const ENDING_MASK: u8 = 7 << ENDING_SHIFT;

/// A socket associated with a [`Port`](crate::Port), with its completion key (the per-handle
/// data of the completion-port model).
///
/// Cloning is cheap (a reference count). Every operation in flight holds a clone, so the
/// descriptor stays open, and its number cannot be reused by another socket, until the last
/// clone is dropped *and* every operation on it has completed; only then is it closed.
///
/// Each handle belongs to one worker (its *home*, see [`Handle::worker`]): operations on it run
/// on that worker's ring and their completions are dequeued by that worker.
pub struct Handle<K> {
    pub(crate) inner: Shared<Inner<K>>,
}

pub(crate) struct Inner<K> {
    fd: OwnedFd,
    /// Unique for the life of the process: tells a reused descriptor number from the old one.
    serial: u64,
    key: K,
    /// The home worker (a port has fewer than 2^16, see `Builder::build`).
    worker: u16,
    /// `CLOSED`, `STREAM_KNOWN`, `STREAM` and `TCP`, and in bits 4-7 a count of cancels.
    state: AtomicU8,
    /// The sides with an operation in the kernel (the value 1: receives; 2: sends and
    /// connects): the port starts the next operation on a side only once that one completes.
    /// Also 4: a gap in the socket's stream not yet reported (see `Worker::open_gap`); and in
    /// bits 3-5, the error that ended the connection (see `Handle::note_ending`). Read and
    /// written only by the home worker. With `state`, `worker` and `fd`, fills 8 bytes.
    busy: AtomicU8,
    /// The home worker's count of live handles, for least-loaded placement.
    load: Arc<AtomicUsize>,
}

impl<K> Handle<K> {
    pub(crate) fn new(fd: OwnedFd, key: K, worker: usize, load: Arc<AtomicUsize>) -> Self {
        static SERIAL: AtomicU64 = AtomicU64::new(1);
        load.fetch_add(1, Ordering::Relaxed);
        Handle {
            inner: Shared::new(Inner {
                fd,
                serial: SERIAL.fetch_add(1, Ordering::Relaxed),
                key,
                worker: u16::try_from(worker).unwrap_or(u16::MAX),
                state: AtomicU8::new(0),
                busy: AtomicU8::new(0),
                load,
            }),
        }
    }

    /// The completion key given when the socket was associated.
    pub fn key(&self) -> &K {
        &self.inner.key
    }

    /// The index of the worker that runs this socket's operations and dequeues their
    /// completions.
    pub fn worker(&self) -> usize {
        usize::from(self.inner.worker)
    }

    /// Whether the socket's home worker has started a close for it
    /// ([`Op::close`](crate::Op::close)). Operations it starts after that complete at once with
    /// `EBADF`. A close posted from another thread counts once the home worker takes it; one
    /// posted after [`Port::shutdown`](crate::Port::shutdown) is cancelled like every other
    /// operation, and does not count.
    pub fn is_closed(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) & CLOSED != 0
    }

    pub(crate) fn serial(&self) -> u64 {
        self.inner.serial
    }

    /// Whether the socket is a stream socket (`SO_TYPE`, asked once).
    pub(crate) fn is_stream(&self) -> bool {
        self.kind() & STREAM != 0
    }

    /// Whether the socket is a TCP socket (`SO_PROTOCOL`, asked once).
    pub(crate) fn is_tcp(&self) -> bool {
        self.kind() & TCP != 0
    }

    /// The `STREAM` and `TCP` bits of the state, asked of the socket the first time.
    fn kind(&self) -> u8 {
        let state = self.inner.state.load(Ordering::Relaxed);
        if state & STREAM_KNOWN != 0 {
            return state;
        }
        let (stream, tcp) = crate::sys::socket_kind(self.as_raw_fd());
        let bits = STREAM_KNOWN | if stream { STREAM } else { 0 } | if tcp { TCP } else { 0 };
        self.inner.state.fetch_or(bits, Ordering::Relaxed);
        bits
    }

    /// Whether an operation of side `bit` is in the kernel (see `Inner::busy`).
    pub(crate) fn busy(&self, bit: u8) -> bool {
        self.inner.busy.load(Ordering::Relaxed) & bit != 0
    }

    /// Marks side `bit` as having an operation in the kernel, or none.
    pub(crate) fn set_busy(&self, bit: u8, on: bool) {
        let busy = self.inner.busy.load(Ordering::Relaxed);
        let busy = if on { busy | bit } else { busy & !bit };
        self.inner.busy.store(busy, Ordering::Relaxed);
    }

    /// An operation on the socket failed with `errno`: if that is an error that ends a
    /// connection (a reset, a refusal, a timeout, no route), the first one seen is kept. The
    /// kernel reports such an error to one operation only (the first to look, which on
    /// io_uring is the one it wakes first), and the socket's others then find it merely shut:
    /// see [`Handle::ending`]. Whether `errno` is such an error.
    pub(crate) fn note_ending(&self, errno: i32) -> bool {
        let Some(at) = ENDINGS.iter().position(|&e| e == errno) else {
            return false;
        };
        let busy = self.inner.busy.load(Ordering::Relaxed);
        if busy & ENDING_MASK == 0 {
            let code = (at as u8 + 1) << ENDING_SHIFT;
            self.inner.busy.store(busy | code, Ordering::Relaxed);
        }
        true
    }

    /// Forgets the error that ended a connection: a connect starts a new one.
    pub(crate) fn clear_ending(&self) {
        let busy = self.inner.busy.load(Ordering::Relaxed);
        self.inner
            .busy
            .store(busy & !ENDING_MASK, Ordering::Relaxed);
    }

    /// The error that ended the connection, if an operation on the socket has seen one.
    pub(crate) fn ending(&self) -> Option<i32> {
        let code = (self.inner.busy.load(Ordering::Relaxed) & ENDING_MASK) >> ENDING_SHIFT;
        ENDINGS.get(usize::from(code).checked_sub(1)?).copied()
    }

    /// Starts loading the handle's record (see `sys::prefetch`): its start, where the
    /// reference count is, and its key, which may lie in the next cache line.
    pub(crate) fn prefetch(&self) {
        crate::sys::prefetch(Shared::as_ptr(&self.inner));
        crate::sys::prefetch(&self.inner.key);
    }

    /// Whether `load` is the load counter of the handle's home worker: false for a handle of
    /// another port, whose worker numbers mean nothing here.
    pub(crate) fn has_home(&self, load: &Arc<AtomicUsize>) -> bool {
        Arc::ptr_eq(&self.inner.load, load)
    }

    /// How many times (modulo 16) every operation of the socket was asked to be cancelled.
    pub(crate) fn cancels(&self) -> u8 {
        self.inner.state.load(Ordering::Relaxed) >> CANCELS_SHIFT
    }

    /// Counts a cancel of every operation of the socket (by its home worker).
    pub(crate) fn count_cancel(&self) {
        // Wraps within the top four bits: the carry out of the byte is dropped.
        self.inner
            .state
            .fetch_add(1 << CANCELS_SHIFT, Ordering::Relaxed);
    }

    pub(crate) fn mark_closed(&self) -> bool {
        self.inner.state.fetch_or(CLOSED, Ordering::AcqRel) & CLOSED == 0
    }

    /// Bytes received by the kernel and not yet read from the socket (`FIONREAD`): lets a
    /// server that is shutting down tell whether a peer still has input waiting.
    ///
    /// # Errors
    /// The `ioctl` failed (e.g. not a socket).
    pub fn readable_bytes(&self) -> std::io::Result<usize> {
        self.count_ioctl(libc::FIONREAD)
    }

    /// Bytes written to the socket that its peer has not yet acknowledged (`SIOCOUTQ`: on TCP,
    /// sent or not): while there are any, closing the socket could lose them, should the peer
    /// send anything more before it has read them (the kernel answers data for a closed socket
    /// with a reset, and drops what it still held).
    ///
    /// # Errors
    /// The `ioctl` failed (e.g. not a socket).
    pub fn unacked_bytes(&self) -> std::io::Result<usize> {
        // SIOCOUTQ is TIOCOUTQ.
        self.count_ioctl(libc::TIOCOUTQ)
    }

    /// A byte count the socket's `ioctl` `request` gives: `FIONREAD` or `SIOCOUTQ`, each of
    /// which writes one `c_int`.
    fn count_ioctl(&self, request: libc::Ioctl) -> std::io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: the requests this is called with write one c_int, into `n`; the descriptor
        // is open while `self` lives.
        let r = unsafe { libc::ioctl(self.as_raw_fd(), request, &mut n) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// The address of the socket's peer (`getpeername`): what `GetAcceptExSockaddrs` gives an
    /// IOCP server for an accepted connection.
    ///
    /// # Errors
    /// The socket is not connected, or not an internet socket.
    pub fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        socket2::SockRef::from(self)
            .peer_addr()
            .and_then(as_socket_addr)
    }

    /// The socket's own address (`getsockname`).
    ///
    /// # Errors
    /// The socket is not an internet socket.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        socket2::SockRef::from(self)
            .local_addr()
            .and_then(as_socket_addr)
    }

    /// Shuts down one or both directions of the socket (`shutdown(2)`, Winsock's `shutdown`
    /// with `SD_SEND` and the rest), at once: not an operation, so it is not ordered with the
    /// socket's operations in flight. Shut the sending side down only once no send is in
    /// flight, or what is still being sent may be cut short.
    ///
    /// # Errors
    /// The socket is not connected (`ENOTCONN`, also when the peer has reset it).
    pub fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()> {
        socket2::SockRef::from(self).shutdown(how)
    }

    /// Whether two handles refer to the same association.
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Shared::ptr_eq(&a.inner, &b.inner)
    }
}

/// A socket address as the standard type; an error for other families (Unix sockets).
fn as_socket_addr(addr: socket2::SockAddr) -> std::io::Result<std::net::SocketAddr> {
    addr.as_socket().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not an internet socket address",
        )
    })
}

impl<K> Clone for Handle<K> {
    fn clone(&self) -> Self {
        Handle {
            inner: Shared::clone(&self.inner),
        }
    }
}

impl<K> AsFd for Handle<K> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

impl<K> AsRawFd for Handle<K> {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.fd.as_raw_fd()
    }
}

impl<K: fmt::Debug> fmt::Debug for Handle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("fd", &self.inner.fd.as_raw_fd())
            .field("worker", &self.inner.worker)
            .field("key", &self.inner.key)
            .finish()
    }
}

impl<K> Drop for Inner<K> {
    fn drop(&mut self) {
        self.load.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection holds one of these: with a one-word key it stays at 32 bytes (48 with
    /// the reference counts).
    #[test]
    fn handle_records_stay_small() {
        assert!(std::mem::size_of::<super::Inner<u64>>() <= 32);
    }

    /// The error that ended a connection shares a byte with the busy sides: the first one
    /// seen is kept (the last of the list too, whose code fills the field), an error that
    /// ends nothing is not, neither disturbs the sides, and clearing it leaves them be. The
    /// home worker's load counts the handle while it lives.
    #[test]
    fn the_first_ending_is_kept_beside_the_busy_sides() {
        let fd: OwnedFd = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into();
        let load = Arc::new(AtomicUsize::new(0));
        let h = Handle::new(fd, (), 0, Arc::clone(&load));
        assert_eq!(load.load(Ordering::Relaxed), 1);
        h.set_busy(1, true);
        h.set_busy(4, true);
        assert!(!h.note_ending(libc::EPIPE));
        assert_eq!(h.ending(), None);
        assert!(h.note_ending(libc::ENETUNREACH));
        assert!(
            h.note_ending(libc::ECONNRESET),
            "an ending, though not kept"
        );
        assert_eq!(h.ending(), Some(libc::ENETUNREACH));
        assert!(h.busy(1) && !h.busy(2) && h.busy(4));
        h.set_busy(1, false);
        h.set_busy(2, true);
        assert_eq!(h.ending(), Some(libc::ENETUNREACH));
        h.clear_ending();
        assert_eq!(h.ending(), None);
        assert!(!h.busy(1) && h.busy(2) && h.busy(4));
        drop(h);
        assert_eq!(load.load(Ordering::Relaxed), 0);
    }
}
