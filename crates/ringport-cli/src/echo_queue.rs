//! A connection's echo queue: received buffers waiting to be sent back, in arrival order, with
//! one send in flight at a time and short sends resumed where they stopped.

use std::collections::VecDeque;
use std::ops::Deref;

/// What to do after a send completed.
#[derive(Debug)]
pub enum Next<B> {
    /// A short send: send this buffer again from this offset.
    Resend(B, usize),
    /// The buffer is out (it is dropped here); send this one next, if any.
    Done(Option<B>),
}

/// The queue. `B` is a received buffer (a pool buffer in the server).
#[derive(Debug)]
pub struct EchoQueue<B> {
    queue: VecDeque<B>,
    /// Bytes queued plus those of the buffer in flight.
    pending: usize,
    sending: bool,
}

impl<B: Deref<Target = [u8]>> EchoQueue<B> {
    pub fn new() -> Self {
        EchoQueue {
            queue: VecDeque::new(),
            pending: 0,
            sending: false,
        }
    }

    /// Queues a received buffer; returns the buffer to send now if no send is in flight.
    pub fn push(&mut self, buf: B) -> Option<B> {
        self.pending += buf.len();
        self.queue.push_back(buf);
        self.start()
    }

    fn start(&mut self) -> Option<B> {
        if self.sending {
            return None;
        }
        let next = self.queue.pop_front();
        self.sending = next.is_some();
        next
    }

    /// Accounts for a completed send of `n` bytes of `buf` from `offset`.
    pub fn sent(&mut self, buf: B, offset: usize, n: usize) -> Next<B> {
        debug_assert!(self.sending);
        let offset = offset + n;
        if offset < buf.len() {
            return Next::Resend(buf, offset);
        }
        self.pending -= buf.len();
        self.sending = false;
        drop(buf);
        Next::Done(self.start())
    }

    /// Bytes waiting to be echoed (queued or in flight).
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Buffers held: queued plus the one in flight. Each holds a whole pool buffer however few
    /// bytes it carries, so this, not [`EchoQueue::pending`], is what bounds memory.
    pub fn held(&self) -> usize {
        self.queue.len() + usize::from(self.sending)
    }

    /// Whether nothing is queued or in flight.
    pub fn is_idle(&self) -> bool {
        !self.sending && self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the buffer sizes and however short each send is, the bytes sent are exactly
        /// the bytes received, in order; one send is in flight at a time; `pending` is exactly
        /// what the queue holds.
        #[test]
        fn sends_everything_in_order_once(
            bufs in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..40),
            shorts in prop::collection::vec(1usize..400, 1..64),
            pushes_between in prop::collection::vec(0usize..3, 1..64),
        ) {
            let want: Vec<u8> = bufs.concat();
            let mut q = EchoQueue::new();
            let mut incoming = bufs.into_iter();
            let mut wire = Vec::new();
            let mut in_flight: Option<(Vec<u8>, usize)> = None;
            let mut received = 0usize;
            let mut step = 0usize;
            loop {
                // Some buffers arrive (at least one when nothing is in flight, so that the
                // loop always makes progress).
                let arrivals = pushes_between[step % pushes_between.len()];
                let arrivals = if in_flight.is_none() { arrivals.max(1) } else { arrivals };
                for _ in 0..arrivals {
                    if let Some(b) = incoming.next() {
                        received += b.len();
                        if let Some(s) = q.push(b) {
                            prop_assert!(in_flight.is_none(), "two sends in flight");
                            in_flight = Some((s, 0));
                        }
                    }
                }
                // The send in flight completes, possibly short.
                if let Some((buf, off)) = in_flight.take() {
                    let n = shorts[step % shorts.len()].min(buf.len() - off);
                    wire.extend_from_slice(&buf[off..off + n]);
                    match q.sent(buf, off, n) {
                        Next::Resend(b, o) => in_flight = Some((b, o)),
                        Next::Done(next) => in_flight = next.map(|b| (b, 0)),
                    }
                } else if incoming.len() == 0 {
                    break;
                }
                // A buffer in flight counts whole until it is all out: that memory is held.
                let partly_out = in_flight.as_ref().map_or(0, |(_, off)| *off);
                prop_assert_eq!(q.pending(), received - wire.len() + partly_out);
                prop_assert_eq!(q.is_idle(), in_flight.is_none() && q.pending() == 0);
                prop_assert_eq!(q.held() == 0, q.is_idle());
                step += 1;
            }
            prop_assert!(q.is_idle());
            prop_assert_eq!(wire, want);
        }
    }
}
