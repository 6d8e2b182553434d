//! A connection's echo queue: received buffers waiting to be sent back, in arrival order. One
//! send is in flight at a time and takes every buffer queued so far (up to a limit) as one
//! gathering send; a short send leaves the rest at the front of the queue, resumed where it
//! stopped.

use std::collections::VecDeque;
use std::ops::Deref;

/// Received bytes that keep part of a pool buffer back: slices of one buffer share its index.
pub trait Slice: Deref<Target = [u8]> {
    /// The pool buffer the bytes are in.
    fn buffer(&self) -> usize;
}

impl Slice for ringport::PoolBuf {
    fn buffer(&self) -> usize {
        self.buffer_index()
    }
}

/// The queue. `B` is a received slice (a pool buffer's in the server).
#[derive(Debug)]
pub struct EchoQueue<B> {
    /// Not yet sent; the first may be partly sent already (`offset`).
    queue: VecDeque<B>,
    /// Bytes of the first queued buffer already sent.
    offset: usize,
    /// Buffers in the send in flight (0: none in flight).
    in_flight: usize,
    /// Where the send in flight started in its first buffer.
    flight_offset: usize,
    /// Bytes of every buffer queued or in flight, counted whole until the buffer is all out.
    pending: usize,
    /// Pool buffers the slices held (in flight, then queued) are in. A connection's slices
    /// of one buffer come one after another (a buffer is filled before the next is taken, and
    /// taken again only once all its slices are gone), so this counts runs of equal indexes.
    buffers: usize,
    /// The buffer of the last slice pushed, while any is held.
    last: Option<usize>,
    /// The owner's note of how far the echo had got in the kernel when it last looked (see
    /// `Server::echo_moving`): whatever the owner keeps there.
    pub mark: Option<(u64, usize)>,
}

impl<B: Slice> EchoQueue<B> {
    pub fn new() -> Self {
        EchoQueue {
            queue: VecDeque::new(),
            offset: 0,
            in_flight: 0,
            flight_offset: 0,
            pending: 0,
            buffers: 0,
            last: None,
            mark: None,
        }
    }

    /// Queues a received slice.
    pub fn push(&mut self, buf: B) {
        self.pending += buf.len();
        if self.last != Some(buf.buffer()) {
            self.buffers += 1;
            self.last = Some(buf.buffer());
        }
        self.queue.push_back(buf);
    }

    /// When no send is in flight and something is queued: moves up to `max` buffers (at
    /// least one) into `into`, marks them in flight and returns where the send starts in the
    /// first of them.
    pub fn take(&mut self, max: usize, into: &mut Vec<B>) -> Option<usize> {
        if self.in_flight > 0 || self.queue.is_empty() {
            return None;
        }
        let n = self.queue.len().min(max.max(1));
        into.extend(self.queue.drain(..n));
        self.in_flight = n;
        self.flight_offset = std::mem::take(&mut self.offset);
        Some(self.flight_offset)
    }

    /// Accounts for the send in flight having sent `n` bytes of `bufs` (the buffers `take`
    /// gave, in order): the buffers all sent are dropped, the others go back to the front of
    /// the queue. `bufs` is left empty, to be reused.
    pub fn sent(&mut self, bufs: &mut Vec<B>, mut n: usize) {
        debug_assert!(self.in_flight > 0);
        self.in_flight = 0;
        let mut offset = std::mem::take(&mut self.flight_offset);
        let mut done = 0;
        for buf in bufs.iter() {
            let left = buf.len().saturating_sub(offset);
            if n < left {
                break;
            }
            n -= left;
            offset = 0;
            done += 1;
        }
        if done < bufs.len() {
            // `bufs[done]` went out in part: it is resumed `n` bytes further on.
            self.offset = offset + n;
        }
        // A slice sent ends its buffer's run unless the next slice held is in the same buffer.
        for i in 0..done {
            let next = match bufs.get(i + 1) {
                Some(b) => Some(b.buffer()),
                None => self.queue.front().map(|b| b.buffer()),
            };
            if next != Some(bufs[i].buffer()) {
                self.buffers -= 1;
            }
        }
        for b in bufs.drain(done..).rev() {
            self.queue.push_front(b);
        }
        for b in bufs.drain(..) {
            self.pending -= b.len();
        }
        if self.queue.is_empty() {
            self.last = None;
        }
    }

    /// Bytes waiting to be echoed (queued or in flight), each buffer counted whole until it
    /// is all out.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Slices held: queued plus in flight.
    pub fn held(&self) -> usize {
        self.queue.len() + self.in_flight
    }

    /// Pool buffers the slices held are in: each is kept back whole, however few bytes of it
    /// are held, so this, not [`EchoQueue::pending`], is what bounds memory.
    pub fn buffers(&self) -> usize {
        self.buffers
    }

    /// Whether nothing is queued or in flight.
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A slice of test bytes in buffer `.0`.
    #[derive(Debug, PartialEq)]
    struct Part(usize, Vec<u8>);

    impl Deref for Part {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            &self.1
        }
    }

    impl Slice for Part {
        fn buffer(&self) -> usize {
            self.0
        }
    }

    /// Runs of equal buffers in `ids`.
    fn runs(ids: &[usize]) -> usize {
        ids.iter()
            .enumerate()
            .filter(|&(i, id)| i == 0 || ids[i - 1] != *id)
            .count()
    }

    proptest! {
        /// Whatever the buffer sizes, however many buffers each send gathers and however short
        /// it is, the bytes sent are exactly the bytes received, in order; one send is in
        /// flight at a time; `pending`, `held` and `buffers` are exactly what the queue holds
        /// (slices of one buffer arriving one after another, as a receive pool gives them).
        #[test]
        fn sends_everything_in_order_once(
            bufs in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..40),
            same_buffer in prop::collection::vec(any::<bool>(), 40),
            shorts in prop::collection::vec(0usize..900, 1..64),
            gathers in prop::collection::vec(1usize..6, 1..16),
            pushes_between in prop::collection::vec(0usize..3, 1..64),
        ) {
            let want: Vec<u8> = bufs.concat();
            let ids: Vec<usize> = same_buffer
                .iter()
                .scan(0, |id, &same| {
                    *id += usize::from(!same);
                    Some(*id)
                })
                .take(bufs.len())
                .collect();
            let mut q = EchoQueue::new();
            let mut incoming = bufs.into_iter().zip(ids.iter().copied());
            let mut pushed = 0usize;
            let mut wire = Vec::new();
            let mut flight: Vec<Part> = Vec::new();
            let mut flight_offset = 0;
            let mut received = 0usize;
            let mut step = 0usize;
            loop {
                // Some buffers arrive (at least one when nothing is in flight, so that the
                // loop always makes progress).
                let arrivals = pushes_between[step % pushes_between.len()];
                let arrivals = if flight.is_empty() { arrivals.max(1) } else { arrivals };
                for _ in 0..arrivals {
                    if let Some((b, id)) = incoming.next() {
                        received += b.len();
                        pushed += 1;
                        q.push(Part(id, b));
                    }
                }
                if flight.is_empty() {
                    if let Some(off) = q.take(gathers[step % gathers.len()], &mut flight) {
                        flight_offset = off;
                        prop_assert!(!flight.is_empty());
                        prop_assert!(flight.len() <= gathers[step % gathers.len()]);
                        prop_assert!(q.take(8, &mut Vec::new()).is_none(), "two sends in flight");
                    }
                }
                // The send in flight completes, possibly short (at least one byte when it
                // has any: a send that makes no progress is the caller's to handle).
                if !flight.is_empty() {
                    let mut all: Vec<u8> = flight.iter().flat_map(|p| p.1.iter()).copied().collect();
                    all.drain(..flight_offset);
                    let n = shorts[step % shorts.len()].clamp(all.len().min(1), all.len());
                    wire.extend_from_slice(&all[..n]);
                    q.sent(&mut flight, n);
                    prop_assert!(flight.is_empty(), "the buffers are handed back");
                } else if incoming.len() == 0 {
                    break;
                }
                // A buffer counts whole until it is all out: that memory is held.
                let unsent = received - wire.len();
                prop_assert!(q.pending() >= unsent);
                prop_assert!(q.pending() < unsent + 300);
                prop_assert_eq!(q.is_idle(), q.pending() == 0);
                prop_assert_eq!(q.held() == 0, q.is_idle());
                // The slices held are the last `held` pushed.
                prop_assert_eq!(q.buffers(), runs(&ids[pushed - q.held()..pushed]));
                step += 1;
            }
            prop_assert!(q.is_idle());
            prop_assert_eq!(wire, want);
        }
    }

    #[test]
    fn a_short_gathered_send_resumes_inside_the_buffer_it_stopped_in() {
        let mut q = EchoQueue::new();
        for (id, b) in [(0, &b"abcd"[..]), (1, b"efgh"), (1, b"ijkl")] {
            q.push(Part(id, b.to_vec()));
        }
        assert_eq!(q.buffers(), 2);
        let mut flight = Vec::new();
        assert_eq!(q.take(2, &mut flight), Some(0));
        assert_eq!(
            flight,
            [Part(0, b"abcd".to_vec()), Part(1, b"efgh".to_vec())]
        );
        q.sent(&mut flight, 6);
        assert_eq!(q.pending(), 8, "efgh is held until it is all out");
        assert_eq!(q.held(), 2);
        assert_eq!(q.buffers(), 1, "buffer 0 is let go of");
        assert_eq!(q.take(8, &mut flight), Some(2));
        assert_eq!(
            flight,
            [Part(1, b"efgh".to_vec()), Part(1, b"ijkl".to_vec())]
        );
        q.sent(&mut flight, 6);
        assert!(q.is_idle());
        assert_eq!(q.pending(), 0);
        assert_eq!(q.buffers(), 0);
        // Buffer 1 again, once let go of: a new run.
        q.push(Part(1, b"mn".to_vec()));
        assert_eq!(q.buffers(), 1);
    }
}
