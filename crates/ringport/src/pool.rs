//! Receive buffer pools: buffers the kernel picks from when data arrives, so that a connection
//! waiting for input pins no buffer of its own (the book's "zero-byte receive" idea).

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// One worker's pool: `count` buffers of `size` bytes in one allocation.
pub(crate) struct Pool {
    base: *mut u8,
    layout: Layout,
    size: usize,
    count: u16,
    /// Buffers handed out as [`PoolBuf`] and not yet dropped.
    out: AtomicUsize,
    /// Buffers dropped and not yet given back to the kernel (or the epoll free list).
    returned: Mutex<Vec<u16>>,
}

// SAFETY: `base` is an allocation owned by the pool; disjoint buffers of it are read through
// `PoolBuf`s only while the kernel does not own them, and written only by the kernel (or a
// recv(2) the driver makes) while no `PoolBuf` for them exists.
unsafe impl Send for Pool {}
// SAFETY: as above; the shared state is behind atomics and a mutex.
unsafe impl Sync for Pool {}

impl Pool {
    pub(crate) fn new(size: usize, count: u16) -> std::io::Result<Arc<Pool>> {
        if count == 0 || count > 32768 || size > u32::MAX as usize {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "receive pool of {count} x {size} bytes: 1 to 32768 buffers of at most 4 GiB"
                ),
            ));
        }
        let bytes = size.checked_mul(usize::from(count)).filter(|&b| b > 0);
        let layout = bytes
            .and_then(|b| Layout::from_size_align(b, 4096).ok())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("receive pool of {count} x {size} bytes is not possible"),
                )
            })?;
        // SAFETY: the layout has a non-zero size (checked above).
        let base = unsafe { alloc::alloc(layout) };
        if base.is_null() {
            return Err(std::io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(Arc::new(Pool {
            base,
            layout,
            size,
            count,
            out: AtomicUsize::new(0),
            returned: Mutex::new(Vec::new()),
        }))
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }

    pub(crate) fn count(&self) -> u16 {
        self.count
    }

    /// The start of buffer `bid`.
    pub(crate) fn addr(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.count);
        // SAFETY: `bid < count`, so the offset stays inside the allocation.
        unsafe { self.base.add(usize::from(bid) * self.size) }
    }

    /// Buffers in user hands right now.
    pub(crate) fn out(&self) -> usize {
        self.out.load(Ordering::Relaxed)
    }

    /// Takes the buffers dropped since the last call.
    pub(crate) fn take_returned(&self, into: &mut Vec<u16>) {
        let mut r = self.returned.lock().unwrap_or_else(|e| e.into_inner());
        into.append(&mut r);
    }

    /// Wraps buffer `bid`, into which `len` bytes were just received.
    ///
    /// # Safety
    /// The kernel (or the driver's `recv`) has finished writing `bid`, wrote `len` bytes at its
    /// start, and will not write it again until it is given back; no other `PoolBuf` for it
    /// exists.
    pub(crate) unsafe fn buf(self: &Arc<Self>, bid: u16, len: usize) -> PoolBuf {
        self.out.fetch_add(1, Ordering::Relaxed);
        PoolBuf {
            pool: Arc::clone(self),
            bid,
            len: len.min(self.size),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the pool is dropped only once the kernel
        // no longer uses it (the worker leaks its reference otherwise).
        unsafe { alloc::dealloc(self.base, self.layout) };
    }
}

/// A received buffer from a worker's receive pool ([`Builder::recv_pool`]). It derefs to the
/// bytes received; dropping it gives the buffer back to the pool. It can be sent as it is with
/// [`Op::send_pooled`], which avoids a copy.
///
/// [`Builder::recv_pool`]: crate::Builder::recv_pool
/// [`Op::send_pooled`]: crate::Op::send_pooled
pub struct PoolBuf {
    pool: Arc<Pool>,
    bid: u16,
    len: usize,
}

impl PoolBuf {
    /// The buffer's capacity (the pool's buffer size).
    pub fn capacity(&self) -> usize {
        self.pool.size
    }
}

impl Deref for PoolBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: while this `PoolBuf` exists the buffer is out of the kernel's and the driver's
        // hands, and its first `len` bytes were written by the receive that produced it.
        unsafe { std::slice::from_raw_parts(self.pool.addr(self.bid), self.len) }
    }
}

impl fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuf")
            .field("bid", &self.bid)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        self.pool
            .returned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.bid);
        self.pool.out.fetch_sub(1, Ordering::Relaxed);
    }
}
