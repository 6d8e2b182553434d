//! Receive buffer pools: buffers the kernel picks from when data arrives, so that a connection
//! waiting for input pins no buffer of its own (the book's "zero-byte receive" idea).
//!
//! Buffers are filled incrementally where the backend can: each receive takes only the bytes it
//! got, from where the previous one stopped, and the buffer is handed on only once it is full.
//! A [`PoolBuf`] is then a slice of a buffer, and a buffer goes back to the free list when the
//! driver has let go of it and the last of its slices is dropped (a count per buffer).

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicIsize, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// In a buffer's count: the driver holds it (it is in the kernel's ring, or the epoll backend
/// receives into it). The low bits count its live [`PoolBuf`]s.
const HELD: u32 = 1 << 31;

/// One worker's pool: `count` buffers of `size` bytes in one allocation.
pub(crate) struct Pool {
    base: *mut u8,
    layout: Layout,
    size: usize,
    count: u16,
    /// Per buffer: [`HELD`] while the driver holds it, plus its live slices.
    refs: Box<[AtomicU32]>,
    /// Buffers the driver let go of that slices still hold.
    out: AtomicIsize,
    /// Buffers let go of by everyone, not yet given back to the kernel (or the epoll free list).
    returned: Mutex<Vec<u16>>,
}

// SAFETY: `base` is an allocation owned by the pool. Its bytes are read through `PoolBuf`s only
// after the kernel (or a recv(2) the driver makes) has finished writing them, and written only
// where no `PoolBuf` reaches: a whole buffer, or, with incremental filling, the part of a buffer
// past the slices already handed out.
unsafe impl Send for Pool {}
// SAFETY: as above; the shared state is behind atomics and a mutex.
unsafe impl Sync for Pool {}

impl Pool {
    pub(crate) fn new(size: usize, count: u16) -> std::io::Result<Arc<Pool>> {
        if count == 0 || count > 32768 || size > i32::MAX as usize {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "receive pool of {count} x {size} bytes: 1 to 32768 buffers of less than 2 GiB"
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
            refs: (0..count).map(|_| AtomicU32::new(0)).collect(),
            out: AtomicIsize::new(0),
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

    /// Buffers that only slices in user hands hold right now.
    pub(crate) fn out(&self) -> usize {
        usize::try_from(self.out.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// The driver takes free buffer `bid` (to give to the kernel, or to receive into).
    pub(crate) fn hold(&self, bid: u16) {
        self.refs[usize::from(bid)].store(HELD, Ordering::Relaxed);
    }

    /// The driver will not write buffer `bid` again: it is free once its slices are dropped.
    pub(crate) fn release(&self, bid: u16) {
        let old = self.refs[usize::from(bid)].fetch_and(!HELD, Ordering::AcqRel);
        debug_assert!(old & HELD != 0, "buffer {bid} released twice");
        if old & !HELD == 0 {
            self.give_back(bid);
        } else {
            self.out.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn give_back(&self, bid: u16) {
        self.returned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(bid);
    }

    /// Takes the buffers dropped since the last call.
    pub(crate) fn take_returned(&self, into: &mut Vec<u16>) {
        let mut r = self.returned.lock().unwrap_or_else(|e| e.into_inner());
        into.append(&mut r);
    }

    /// Wraps bytes `off..off + len` of buffer `bid`, just received.
    ///
    /// # Safety
    /// The kernel (or the driver's `recv`) has finished writing those bytes, and writes only
    /// past them until the buffer is given back; the driver holds the buffer.
    pub(crate) unsafe fn buf(self: &Arc<Self>, bid: u16, off: usize, len: usize) -> PoolBuf {
        let old = self.refs[usize::from(bid)].fetch_add(1, Ordering::Relaxed);
        debug_assert!(
            old & HELD != 0,
            "slice of buffer {bid}, which the driver let go of"
        );
        let off = off.min(self.size);
        PoolBuf {
            pool: Arc::clone(self),
            bid,
            off: off as u32,
            len: len.min(self.size - off) as u32,
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

/// Bytes received into a worker's receive pool ([`Builder::recv_pool`]): a slice of one pool
/// buffer, which later receives may go on filling past its end. It derefs to the bytes
/// received; the buffer goes back to the pool once it is full and all its slices are dropped
/// (see [`Worker::pool_shares_buffers`](crate::Worker::pool_shares_buffers)).
/// It can be sent as it is with [`Op::send_pooled`], which avoids a copy.
///
/// [`Builder::recv_pool`]: crate::Builder::recv_pool
/// [`Op::send_pooled`]: crate::Op::send_pooled
pub struct PoolBuf {
    pool: Arc<Pool>,
    bid: u16,
    /// Where the slice starts in the buffer.
    off: u32,
    len: u32,
}

impl PoolBuf {
    /// The size of the pool buffer this slice is part of.
    pub fn capacity(&self) -> usize {
        self.pool.size
    }

    /// Which buffer of the pool this slice is part of. Slices with the same index share one
    /// buffer, which goes back to the pool only when the last of them is dropped: an
    /// application that bounds what a connection keeps back counts buffers with this. A
    /// receive fills one buffer until it is full before taking the next, so one connection's
    /// slices in order run through each buffer in one stretch.
    pub fn buffer_index(&self) -> usize {
        usize::from(self.bid)
    }
}

impl Deref for PoolBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the receive that produced this `PoolBuf` wrote these bytes, inside the buffer
        // (`Pool::buf` clamps them); the buffer is not given back, so not written again there,
        // while this `PoolBuf` exists.
        unsafe {
            std::slice::from_raw_parts(
                self.pool.addr(self.bid).add(self.off as usize),
                self.len as usize,
            )
        }
    }
}

impl fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuf")
            .field("bid", &self.bid)
            .field("off", &self.off)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let old = self.pool.refs[usize::from(self.bid)].fetch_sub(1, Ordering::AcqRel);
        // The last slice of a buffer the driver let go of.
        if old == 1 {
            self.pool.give_back(self.bid);
            self.pool.out.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
