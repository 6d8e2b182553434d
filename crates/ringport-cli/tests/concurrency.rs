//! Many connections open at once, each echoing independently.

mod util;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use util::{assert_bytes_eq, connect, echo_exact, pattern, read_exact_len, read_to_eof, Server};

const THREADS: usize = 4;
const PER_THREAD: usize = 250; // 1000 connections in all
const ROUNDS: usize = 3;

/// A barrier that gives up (panics) after a deadline instead of hanging when a peer thread died.
struct BoundedBarrier {
    arrived: AtomicUsize,
    parties: usize,
}

impl BoundedBarrier {
    fn wait(&self, phase: usize) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.arrived.load(Ordering::SeqCst) < self.parties * phase {
            assert!(
                Instant::now() < deadline,
                "barrier phase {phase}: another client thread never arrived (did it fail?)"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
}

fn thousand_concurrent_connections_each_echo_a_few_messages() {
    // A thousand client sockets, on top of what the test harness holds.
    let nofile = util::raise_own_nofile(4096);
    assert!(
        nofile >= 1100,
        "RLIMIT_NOFILE {nofile}: too few descriptors for 1000 connections"
    );
    // The chapter's other models run one thread and take no --workers.
    let server = if util::model().is_some() {
        Server::start_with(&["--listen", "127.0.0.1:0"])
    } else {
        Server::start_with(&["--listen", "127.0.0.1:0", "--workers", "2"])
    };
    let addr = server.addr;
    let barrier = Arc::new(BoundedBarrier {
        arrived: AtomicUsize::new(0),
        parties: THREADS,
    });
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                let mut streams: Vec<TcpStream> = (0..PER_THREAD).map(|_| connect(addr)).collect();
                // All 1000 connections are open before anyone sends.
                barrier.wait(1);
                for round in 0..ROUNDS {
                    // Write on every connection first, then collect every echo: the server has
                    // all of this thread's connections busy at the same time.
                    let msgs: Vec<Vec<u8>> = (0..PER_THREAD)
                        .map(|i| {
                            let id = ((t * PER_THREAD + i) * ROUNDS + round) as u64;
                            pattern(id, 16 + (id as usize % 100))
                        })
                        .collect();
                    for (s, m) in streams.iter_mut().zip(&msgs) {
                        s.write_all(m).unwrap();
                    }
                    for (i, (s, m)) in streams.iter_mut().zip(&msgs).enumerate() {
                        let got = read_exact_len(s, m.len());
                        assert_bytes_eq(
                            &got,
                            m,
                            &format!("thread {t} connection {i} round {round}"),
                        );
                    }
                }
                barrier.wait(2);
                for s in &mut streams {
                    s.shutdown(Shutdown::Write).unwrap();
                }
                for (i, s) in streams.iter_mut().enumerate() {
                    let rest = read_to_eof(s);
                    assert!(rest.is_empty(), "thread {t} connection {i}: extra bytes");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a client thread failed");
    }
    // And it still serves a new connection afterwards.
    echo_exact(addr, &pattern(424_242, 4096));
}

per_backend!(thousand_concurrent_connections_each_echo_a_few_messages,);

per_model!(thousand_concurrent_connections_each_echo_a_few_messages,);
