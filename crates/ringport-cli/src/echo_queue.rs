//! A connection's echo queue: received buffers waiting to be sent back, in arrival order. One
//! send is in flight at a time and takes every buffer queued so far (up to a limit) as one
//! gathering send; a short send leaves the rest at the front of the queue, resumed where it
//! stopped.

use std::collections::VecDeque;
use std::ops::Deref;

/// The queue. `B` is a received buffer (a pool buffer in the server).
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
}

impl<B: Deref<Target = [u8]>> EchoQueue<B> {
    pub fn new() -> Self {
        EchoQueue {
            queue: VecDeque::new(),
            offset: 0,
            in_flight: 0,
            flight_offset: 0,
            pending: 0,
        }
    }

    /// Queues a received buffer.
    pub fn push(&mut self, buf: B) {
        self.pending += buf.len();
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
        for b in bufs.drain(done..).rev() {
            self.queue.push_front(b);
        }
        for b in bufs.drain(..) {
            self.pending -= b.len();
        }
    }

    /// Bytes waiting to be echoed (queued or in flight), each buffer counted whole until it
    /// is all out.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Buffers held: queued plus in flight. Each holds a whole pool buffer however few bytes
    /// it carries, so this, not [`EchoQueue::pending`], is what bounds memory.
    pub fn held(&self) -> usize {
        self.queue.len() + self.in_flight
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

    proptest! {
        /// Whatever the buffer sizes, however many buffers each send gathers and however short
        /// it is, the bytes sent are exactly the bytes received, in order; one send is in
        /// flight at a time; `pending` and `held` are exactly what the queue holds.
        #[test]
        fn sends_everything_in_order_once(
            bufs in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..40),
            shorts in prop::collection::vec(0usize..900, 1..64),
            gathers in prop::collection::vec(1usize..6, 1..16),
            pushes_between in prop::collection::vec(0usize..3, 1..64),
        ) {
            let want: Vec<u8> = bufs.concat();
            let mut q = EchoQueue::new();
            let mut incoming = bufs.into_iter();
            let mut wire = Vec::new();
            let mut flight: Vec<Vec<u8>> = Vec::new();
            let mut flight_offset = 0;
            let mut received = 0usize;
            let mut step = 0usize;
            loop {
                // Some buffers arrive (at least one when nothing is in flight, so that the
                // loop always makes progress).
                let arrivals = pushes_between[step % pushes_between.len()];
                let arrivals = if flight.is_empty() { arrivals.max(1) } else { arrivals };
                for _ in 0..arrivals {
                    if let Some(b) = incoming.next() {
                        received += b.len();
                        q.push(b);
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
                    let mut all: Vec<u8> = flight.concat();
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
                step += 1;
            }
            prop_assert!(q.is_idle());
            prop_assert_eq!(wire, want);
        }
    }

    #[test]
    fn a_short_gathered_send_resumes_inside_the_buffer_it_stopped_in() {
        let mut q = EchoQueue::new();
        for b in [&b"abcd"[..], b"efgh", b"ijkl"] {
            q.push(b.to_vec());
        }
        let mut flight = Vec::new();
        assert_eq!(q.take(2, &mut flight), Some(0));
        assert_eq!(flight, [b"abcd".to_vec(), b"efgh".to_vec()]);
        q.sent(&mut flight, 6);
        assert_eq!(q.pending(), 8, "efgh is held until it is all out");
        assert_eq!(q.held(), 2);
        assert_eq!(q.take(8, &mut flight), Some(2));
        assert_eq!(flight, [b"efgh".to_vec(), b"ijkl".to_vec()]);
        q.sent(&mut flight, 6);
        assert!(q.is_idle());
        assert_eq!(q.pending(), 0);
    }
}
