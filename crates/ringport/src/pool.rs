//! Receive buffer pools: buffers the kernel picks from when data arrives, so that a connection
//! waiting for input pins no buffer of its own (the book's "zero-byte receive" idea).
//!
//! Buffers are filled incrementally where the backend can: each receive takes only the bytes it
//! got, from where the previous one stopped, and the buffer is handed on only once it is full.
//! A [`PoolBuf`] is then a slice of a buffer, and a buffer goes back to the free list when the
//! driver has let go of it and the last of its slices is dropped (a count per buffer).

use std::alloc::{self, Layout};
use std::collections::VecDeque;
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicIsize, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// The most buffers in circulation at once, parked ones aside (see [`Circulation`]).
    working_set: u16,
}

// SAFETY: `base` is an allocation owned by the pool. Its bytes are read through `PoolBuf`s only
// after the kernel (or a recv(2) the driver makes) has finished writing them, and written only
// where no `PoolBuf` reaches: a whole buffer, or, with incremental filling, the part of a buffer
// past the slices already handed out.
unsafe impl Send for Pool {}
// SAFETY: as above; the shared state is behind atomics and a mutex.
unsafe impl Sync for Pool {}

impl Pool {
    /// A pool of `count` buffers of `size` bytes, of which at most `working_set` circulate
    /// (clamped to `1..=count`).
    pub(crate) fn new(size: usize, count: u16, working_set: u16) -> std::io::Result<Arc<Pool>> {
        let layout = Pool::layout(size, count)?;
        // SAFETY: the layout has a non-zero size (`Pool::layout` refuses a zero one).
        let base = unsafe { alloc::alloc(layout) };
        if base.is_null() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!(
                    "receive pool of {count} x {size} bytes: cannot allocate {} bytes",
                    layout.size()
                ),
            ));
        }
        Ok(Arc::new(Pool {
            base,
            layout,
            size,
            count,
            refs: (0..count).map(|_| AtomicU32::new(0)).collect(),
            out: AtomicIsize::new(0),
            returned: Mutex::new(Vec::new()),
            working_set: working_set.clamp(1, count),
        }))
    }

    /// The allocation a pool of `count` buffers of `size` bytes takes; an error naming the
    /// two when no pool can have them.
    pub(crate) fn layout(size: usize, count: u16) -> std::io::Result<Layout> {
        if count == 0 || count > 32768 || size > i32::MAX as usize {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "receive pool of {count} x {size} bytes: 1 to 32768 buffers of less than 2 GiB"
                ),
            ));
        }
        let bytes = size.checked_mul(usize::from(count)).filter(|&b| b > 0);
        bytes
            .and_then(|b| Layout::from_size_align(b, 4096).ok())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("receive pool of {count} x {size} bytes is not possible"),
                )
            })
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }

    pub(crate) fn count(&self) -> u16 {
        self.count
    }

    /// The start of buffer `bid`.
    pub(crate) fn addr(&self, bid: u16) -> *mut u8 {
        // A buffer id from the kernel or a caller in the crate: checked, as an offset past the
        // allocation would be undefined behaviour.
        assert!(bid < self.count, "buffer {bid} of {}", self.count);
        // SAFETY: `bid < count`, so the offset stays inside the allocation.
        unsafe { self.base.add(usize::from(bid) * self.size) }
    }

    /// The most buffers in circulation at once, parked ones aside.
    pub(crate) fn working_set(&self) -> u16 {
        self.working_set
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
        if old & HELD == 0 {
            // Released already (a driver bug): given back a second time, the buffer would be
            // on the free list twice, and two receives could write it at once.
            debug_assert!(false, "buffer {bid} released twice");
            tracing::error!("receive pool: buffer {bid} released twice; the second is ignored");
            return;
        }
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

/// How long a buffer stays in user hands before it counts as parked rather than circulating.
pub(crate) const PARK_AFTER: Duration = Duration::from_millis(20);

/// A buffer's `lent_at` while the driver has it (in the kernel's ring, being received into, or
/// free).
const HOME: u64 = u64::MAX;
/// A buffer's `lent_at` once it counts as parked.
const PARKED: u64 = u64::MAX - 1;

/// Keeps a pool's buffers in circulation within its working set, so that the bytes a receive
/// writes are still in the cache when the send that echoes them reads them: where every
/// connection has more in flight than the pool holds, a pool that lends out all its buffers
/// cycles through all of them (`BENCHMARKS.md`, "Many fast connections").
///
/// A buffer circulates from when the driver takes it until it comes back; one that user hands
/// have held for [`PARK_AFTER`] counts as parked instead (the slices of a connection that
/// stopped reading its echo, say), and the driver may put another in its place. So the
/// working set bounds the buffers in quick use, never what can be held: the whole pool stays
/// available to those who hold on to theirs. One per driver, used by its thread only.
pub(crate) struct Circulation {
    working_set: usize,
    count: usize,
    /// Per buffer: when it left the driver, in milliseconds since `epoch`; [`HOME`] or
    /// [`PARKED`].
    lent_at: Vec<u64>,
    /// Buffers in the order they left the driver, with when; an entry whose buffer has come
    /// back (or left again since) is stale and skipped.
    lent: VecDeque<(u16, u64)>,
    parked: usize,
    /// The clock's origin; `None` for a clock that moves only with [`Circulation::tick_at`]
    /// (tests).
    epoch: Option<Instant>,
    now: u64,
}

impl Circulation {
    pub(crate) fn new(pool: &Pool) -> Circulation {
        let count = usize::from(pool.count);
        Circulation {
            working_set: usize::from(pool.working_set),
            count,
            lent_at: vec![HOME; count],
            lent: VecDeque::new(),
            parked: 0,
            epoch: Some(Instant::now()),
            now: 0,
        }
    }

    /// The same, with a clock that moves only with [`Circulation::tick_at`].
    #[cfg(test)]
    pub(crate) fn manual(pool: &Pool) -> Circulation {
        Circulation {
            epoch: None,
            ..Circulation::new(pool)
        }
    }

    /// Milliseconds since `epoch`.
    fn clock(&self) -> u64 {
        self.epoch.map_or(self.now, |e| {
            u64::try_from(e.elapsed().as_millis()).unwrap_or(PARKED - 1)
        })
    }

    /// Buffer `bid` left the driver (filled, and let go of). Timed by the clock, read now: a
    /// driver lends buffers between its waits too (an operation run as it is posted, a queue
    /// reaped to make room).
    pub(crate) fn lent(&mut self, bid: u16) {
        if self.working_set < self.count {
            self.now = self.clock();
            self.lent_at[usize::from(bid)] = self.now;
            self.lent.push_back((bid, self.now));
        }
    }

    /// Buffer `bid` came back to the driver's free list.
    pub(crate) fn back(&mut self, bid: u16) {
        let at = &mut self.lent_at[usize::from(bid)];
        if *at == PARKED {
            self.parked -= 1;
        }
        *at = HOME;
    }

    /// Reads the clock and counts the buffers held for [`PARK_AFTER`] as parked. Called once
    /// per wait, as it returns.
    pub(crate) fn tick(&mut self) {
        if self.working_set < self.count {
            self.tick_at(self.clock());
        }
    }

    /// [`Circulation::tick`] at `now` milliseconds.
    pub(crate) fn tick_at(&mut self, now: u64) {
        self.now = now;
        let park = u64::try_from(PARK_AFTER.as_millis()).unwrap_or(u64::MAX);
        while let Some(&(bid, at)) = self.lent.front() {
            let state = &mut self.lent_at[usize::from(bid)];
            if *state == at {
                if self.now.saturating_sub(at) < park {
                    break;
                }
                *state = PARKED;
                self.parked += 1;
            }
            self.lent.pop_front();
        }
    }

    /// How many more buffers the driver may take from its `free` ones.
    pub(crate) fn room(&self, free: usize) -> usize {
        let circulating = self.count.saturating_sub(free);
        (self.working_set + self.parked)
            .min(self.count)
            .saturating_sub(circulating)
    }

    /// Buffers parked in user hands (see [`Circulation`]).
    pub(crate) fn parked(&self) -> usize {
        self.parked
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

#[cfg(test)]
mod tests {
    use super::*;

    fn circulation(count: u16, working_set: u16) -> (Arc<Pool>, Circulation) {
        let pool = Pool::new(16, count, working_set).unwrap();
        let c = Circulation::manual(&pool);
        (pool, c)
    }

    #[test]
    fn the_working_set_bounds_the_buffers_taken() {
        let (_pool, c) = circulation(8, 3);
        assert_eq!(c.room(8), 3, "all free: the working set");
        assert_eq!(c.room(6), 1, "two circulating");
        assert_eq!(c.room(5), 0);
        assert_eq!(c.room(2), 0, "never below nothing");
        let (_pool, whole) = circulation(8, 8);
        assert_eq!(whole.room(5), 5, "the whole pool: every free buffer");
        let (_pool, clamped) = circulation(4, 0);
        assert_eq!(clamped.room(4), 1, "at least one buffer circulates");
    }

    #[test]
    fn a_buffer_held_past_the_limit_is_parked_until_it_comes_back() {
        let (_pool, mut c) = circulation(8, 2);
        let park = PARK_AFTER.as_millis() as u64;
        c.tick_at(100);
        c.lent(0);
        c.lent(1);
        // Two out of eight: six free, none more may go out.
        assert_eq!(c.room(6), 0);
        c.tick_at(100 + park - 1);
        assert_eq!((c.parked(), c.room(6)), (0, 0), "not held long enough yet");
        c.lent(2); // Out beyond the working set only once the others are parked.
        c.tick_at(100 + park);
        assert_eq!(c.parked(), 2, "the first two are parked");
        assert_eq!(c.room(5), 1, "two parked, one young out: one more may go");
        c.back(0);
        assert_eq!((c.parked(), c.room(6)), (1, 1));
        c.tick_at(100 + 2 * park);
        assert_eq!(c.parked(), 2, "buffer 2 is parked too");
        c.back(1);
        c.back(2);
        assert_eq!((c.parked(), c.room(8)), (0, 2));
    }

    #[test]
    fn a_buffer_back_and_out_again_is_timed_from_its_new_loan() {
        let (_pool, mut c) = circulation(4, 1);
        let park = PARK_AFTER.as_millis() as u64;
        c.tick_at(10);
        c.lent(3);
        c.back(3);
        c.tick_at(10 + park / 2);
        c.lent(3);
        c.tick_at(10 + park);
        assert_eq!(c.parked(), 0, "its first loan ended; the second is young");
        c.tick_at(10 + park / 2 + park);
        assert_eq!(c.parked(), 1);
        assert!(c.lent.is_empty(), "entries are dropped once dealt with");
    }

    #[test]
    fn with_the_whole_pool_as_working_set_nothing_is_tracked() {
        let (_pool, mut c) = circulation(4, 4);
        c.lent(0);
        c.tick();
        assert!(c.lent.is_empty());
        assert_eq!(c.room(3), 3);
    }
}
