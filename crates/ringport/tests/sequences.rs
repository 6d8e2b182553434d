//! Random sequences of receives (plain and pooled multishot), sends and cancels on one socket,
//! posted through the worker or through the port, with a peer that writes and reads at random
//! points between them: whatever the interleaving, every operation completes
//! exactly once with its buffer, the receives' bytes, taken in the order the receives were
//! posted, are the peer's stream, and the peer reads the sends' bytes in the order the sends
//! were posted. Each backend is checked the same way.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use peer_common::uring_check;
use proptest::prelude::*;
use ringport::{Backend, Completion, Op, OpId, OpKind, Port, WaitError, Worker};

/// What happens next, from the test's side or the peer's.
#[derive(Debug, Clone)]
enum Step {
    /// Post a receive with room for this many bytes; through the port (from its queue, the
    /// worker takes it when it next looks) if the flag is set, else through the worker.
    Recv(usize, bool),
    /// Post a pooled multishot receive: it completes with each arrival until it ends.
    RecvPooled,
    /// Post a send of this many bytes of our stream; the flag as for `Recv`.
    Send(usize, bool),
    /// The peer writes this many bytes of its stream (as many as its socket takes now).
    PeerWrite(usize),
    /// The peer reads what has arrived.
    PeerRead,
    /// Cancel the operation posted this many posts ago, if it is still outstanding.
    Cancel(usize),
    /// Take the completions that are ready.
    Poll,
    /// Post a close: what is outstanding is cancelled, what is posted later fails with `EBADF`.
    Close,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1usize..64, any::<bool>()).prop_map(|(n, port)| Step::Recv(n, port)),
        1 => Just(Step::RecvPooled),
        3 => (1usize..64, any::<bool>()).prop_map(|(n, port)| Step::Send(n, port)),
        // Past what the sockets' buffers hold while the peer does not read: it waits for room.
        1 => (64usize << 10..512 << 10, any::<bool>()).prop_map(|(n, port)| Step::Send(n, port)),
        3 => (1usize..256).prop_map(Step::PeerWrite),
        2 => Just(Step::PeerRead),
        1 => (0usize..4).prop_map(Step::Cancel),
        2 => Just(Step::Poll),
        1 => Just(Step::Close),
    ]
}

/// Byte `i` of a stream: a pattern with a period (251) that no length here divides evenly.
fn byte(seed: u8, i: usize) -> u8 {
    ((i % 251) as u8).wrapping_add(seed)
}

/// One operation as posted: its kind and, for a send, its bytes.
struct Posted {
    kind: OpKind,
    sent: Vec<u8>,
}

struct Run {
    worker: Worker<(), u64>,
    posted: Vec<(OpId, Posted)>,
    /// Each operation's last completion.
    done: HashMap<OpId, Completion<(), u64>>,
    /// What each pooled receive brought, in the order its completions came.
    pooled: HashMap<OpId, Vec<u8>>,
    /// What the peer has written, and how far into our stream it has read.
    peer_wrote: usize,
    peer_got: Vec<u8>,
    our_next: usize,
    /// How many operations were posted before the first close.
    closed_at: Option<usize>,
}

impl Run {
    fn take(&mut self, mut c: Completion<(), u64>) {
        assert!(
            !self.done.contains_key(&c.id),
            "a completion after an operation's last"
        );
        if let Some(buf) = c.pooled.take() {
            // Copied out, so that the pool buffer goes back at once.
            self.pooled.entry(c.id).or_default().extend_from_slice(&buf);
        }
        if !c.more {
            self.done.insert(c.id, c);
        }
    }

    /// Posts `op` through the port if `via_port`, else through the worker.
    fn submit(&mut self, port: &Port<(), u64>, op: Op<()>, data: u64, via_port: bool) -> OpId {
        if via_port {
            port.submit(op, data).expect("the worker is alive")
        } else {
            self.worker.submit(op, data)
        }
    }

    fn post(&mut self, id: OpId, kind: OpKind, sent: Vec<u8>) {
        self.posted.push((id, Posted { kind, sent }));
    }

    fn poll(&mut self) {
        loop {
            match self.worker.dequeue(Some(Duration::ZERO)) {
                Ok(c) => self.take(c),
                Err(WaitError::TimedOut) => return,
                Err(e) => panic!("dequeue: {e}"),
            }
        }
    }
}

fn peer_read(peer: &mut TcpStream, into: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        match peer.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("peer read: {e}"),
        }
    }
}

fn run(backend: Backend, steps: &[Step]) {
    let (port, mut workers) = Port::builder()
        .workers(1)
        .backend(backend)
        .recv_pool(4096, 8)
        .build::<(), u64>()
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut peer, _) = listener.accept().unwrap();
    peer.set_nonblocking(true).unwrap();
    let h = port.associate(ours, ()).unwrap();
    let mut r = Run {
        worker: workers.pop().unwrap(),
        posted: Vec::new(),
        done: HashMap::new(),
        pooled: HashMap::new(),
        peer_wrote: 0,
        peer_got: Vec::new(),
        our_next: 0,
        closed_at: None,
    };
    for (n, s) in steps.iter().enumerate() {
        let data = n as u64;
        match *s {
            Step::Recv(cap, via_port) => {
                let id = r.submit(&port, Op::recv(&h, Vec::with_capacity(cap)), data, via_port);
                r.post(id, OpKind::Recv, Vec::new());
            }
            Step::RecvPooled => {
                let id = r.worker.submit_multishot(Op::recv_pooled(&h), data);
                r.post(id, OpKind::RecvPooled, Vec::new());
            }
            Step::Send(len, via_port) => {
                let bytes: Vec<u8> = (r.our_next..r.our_next + len).map(|i| byte(7, i)).collect();
                r.our_next += len;
                let id = r.submit(&port, Op::send(&h, bytes.clone(), 0), data, via_port);
                r.post(id, OpKind::Send, bytes);
            }
            Step::PeerWrite(len) => {
                let bytes: Vec<u8> = (r.peer_wrote..r.peer_wrote + len)
                    .map(|i| byte(0, i))
                    .collect();
                match peer.write(&bytes) {
                    Ok(k) => r.peer_wrote += k,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("peer write: {e}"),
                }
            }
            Step::PeerRead => peer_read(&mut peer, &mut r.peer_got),
            Step::Cancel(back) => {
                if let Some((id, _)) = r.posted.iter().rev().nth(back) {
                    let id = *id;
                    if !r.done.contains_key(&id) {
                        r.worker.cancel(id);
                    }
                }
            }
            Step::Poll => r.poll(),
            Step::Close => {
                r.closed_at.get_or_insert(r.posted.len() + 1);
                let id = r.worker.submit(Op::close(&h), data);
                r.post(id, OpKind::Close, Vec::new());
            }
        }
    }
    // The peer says it is done writing, reads until every send has come back, and every
    // receive ends (with data, with the end of the stream, or cancelled).
    peer.shutdown(Shutdown::Write).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.done.len() < r.posted.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {} operations never completed",
            r.posted.len() - r.done.len(),
            r.posted.len()
        );
        peer_read(&mut peer, &mut r.peer_got);
        match r.worker.dequeue(Some(Duration::from_millis(5))) {
            Ok(c) => r.take(c),
            Err(WaitError::TimedOut) => {}
            Err(e) => panic!("dequeue: {e}"),
        }
    }
    assert_eq!(r.worker.in_flight(), 0);
    let mut received = Vec::new();
    let mut sent = Vec::new();
    for (n, (id, p)) in r.posted.iter().enumerate() {
        let c = &r.done[id];
        assert_eq!(c.kind, p.kind);
        // After the first close, everything fails with `EBADF`, later closes too.
        if r.closed_at.is_some_and(|at| n >= at) {
            assert_eq!(
                c.result.as_ref().map_err(|e| e.raw_os_error()).err(),
                Some(Some(libc::EBADF)),
                "{:?} posted after a close",
                p.kind
            );
        }
        if p.kind == OpKind::Close {
            if r.closed_at == Some(n + 1) {
                assert!(c.result.is_ok(), "close: {:?}", c.result);
            }
            continue;
        }
        if p.kind == OpKind::RecvPooled {
            // Ended by the end of the stream, a cancel, or a dry pool; what it brought before
            // counts either way.
            if let Err(e) = &c.result {
                assert!(
                    c.is_cancelled()
                        || matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EBADF)),
                    "a pooled receive failed: {e}"
                );
            }
            received.extend_from_slice(r.pooled.get(id).map_or(&[][..], Vec::as_slice));
            continue;
        }
        let buf = c.buf.as_ref().expect("the buffer comes back");
        match (p.kind, &c.result) {
            (OpKind::Recv, Ok(n)) => {
                assert_eq!(buf.len(), *n, "a receive's buffer holds what it read");
                received.extend_from_slice(buf);
            }
            (OpKind::Send, Ok(n)) => {
                assert_eq!(buf, &p.sent, "a send's buffer comes back as posted");
                sent.extend_from_slice(&p.sent[..*n]);
            }
            (_, Err(e)) => {
                assert!(
                    c.is_cancelled() || e.raw_os_error() == Some(libc::EBADF),
                    "{:?} failed: {e}",
                    p.kind
                );
                if p.kind == OpKind::Recv {
                    assert!(buf.is_empty(), "a failed receive read nothing");
                }
            }
            (kind, Ok(_)) => panic!("unexpected completion kind {kind:?}"),
        }
    }
    // In posting order, the receives read a prefix of the peer's stream, the peer read the
    // sends' bytes.
    let expected: Vec<u8> = (0..received.len()).map(|i| byte(0, i)).collect();
    assert!(
        received == expected,
        "the receives' bytes, in posting order, are not the peer's stream (first wrong at {:?})",
        received.iter().zip(&expected).position(|(a, b)| a != b)
    );
    assert!(received.len() <= r.peer_wrote);
    // Unless the socket was closed, what the receives left is still in it, and nothing is
    // missing: read on to the end of the stream.
    if r.closed_at.is_none() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no end of stream");
            let id = r
                .worker
                .submit(Op::recv(&h, Vec::with_capacity(4096)), u64::MAX);
            let c = match r.worker.dequeue(Some(Duration::from_secs(10))) {
                Ok(c) => c,
                Err(e) => panic!("dequeue: {e}"),
            };
            assert_eq!(c.id, id);
            match c.result {
                Ok(0) => break,
                Ok(_) => received.extend_from_slice(&c.buf.expect("the buffer comes back")),
                Err(e) => panic!("a receive of the rest: {e}"),
            }
        }
        let all: Vec<u8> = (0..r.peer_wrote).map(|i| byte(0, i)).collect();
        assert!(
            received == all,
            "{} bytes received of {} the peer wrote (first wrong at {:?})",
            received.len(),
            r.peer_wrote,
            received.iter().zip(&all).position(|(a, b)| a != b)
        );
    }
    // A send has completed once its bytes are queued; the peer's socket may take them a moment
    // later (loopback delivers them in a softirq).
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.peer_got.len() < sent.len() && Instant::now() < deadline {
        peer_read(&mut peer, &mut r.peer_got);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        r.peer_got == sent,
        "the peer read {} bytes, the sends sent {} (first difference at {:?})",
        r.peer_got.len(),
        sent.len(),
        r.peer_got.iter().zip(&sent).position(|(a, b)| a != b)
    );
}

fn uring_refused() -> Option<String> {
    if !uring_check::refusal_skips() {
        return None;
    }
    match Port::builder()
        .workers(1)
        .backend(Backend::Uring)
        .build::<(), ()>()
    {
        Err(e) if uring_check::names_refusal(&e.to_string()) => Some(e.to_string()),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn uring_sequences_keep_every_byte_in_order(steps in proptest::collection::vec(step(), 1..40)) {
        if let Some(why) = uring_refused() {
            println!("SKIPPED: io_uring refused: {why}");
            return Ok(());
        }
        run(Backend::Uring, &steps);
    }

    #[test]
    fn epoll_sequences_keep_every_byte_in_order(steps in proptest::collection::vec(step(), 1..40)) {
        run(Backend::Epoll, &steps);
    }
}
