//! `--stats SECS`: one log line every SECS seconds with what the server holds and has done
//! (the book's scalable server prints its statistics every 5 s).
//!
//! Each worker publishes its own counters into a gauge of its own (a cache line each, plain
//! stores after each batch of completions, so workers never contend); a thread of its own reads
//! them all and logs the totals and what changed since the previous line.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::info;

use super::Totals;

/// One worker's published counters.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(super) struct Gauge {
    /// Connections the worker has taken on since the start.
    accepted: AtomicU64,
    /// Bytes it has echoed since the start.
    bytes: AtomicU64,
    /// Its receive pool's buffers in user hands.
    pool_used: AtomicUsize,
    /// Times since the start that one of its connections had to wait for a pool buffer.
    buffer_waits: AtomicU64,
}

impl Gauge {
    pub(super) fn publish(&self, accepted: u64, bytes: u64, pool_used: usize, buffer_waits: u64) {
        self.accepted.store(accepted, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
        self.pool_used.store(pool_used, Ordering::Relaxed);
        self.buffer_waits.store(buffer_waits, Ordering::Relaxed);
    }
}

/// The logging thread; [`Stats::stop`] ends it.
pub(super) struct Stats {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

/// Totals read at one moment.
#[derive(Debug, Default, Clone, Copy)]
struct Reading {
    accepted: u64,
    bytes: u64,
    pool_used: usize,
    buffer_waits: u64,
}

fn read(totals: &Totals) -> Reading {
    totals
        .gauges
        .iter()
        .fold(Reading::default(), |r, g| Reading {
            accepted: r.accepted + g.accepted.load(Ordering::Relaxed),
            bytes: r.bytes + g.bytes.load(Ordering::Relaxed),
            pool_used: r.pool_used + g.pool_used.load(Ordering::Relaxed),
            buffer_waits: r.buffer_waits + g.buffer_waits.load(Ordering::Relaxed),
        })
}

/// One line: totals, then what changed over `secs` since `last`.
fn line(totals: &Totals, now: Reading, last: Reading, secs: f64, pool_total: usize) -> String {
    let bytes = now.bytes.saturating_sub(last.bytes);
    let mut s = format!(
        "stats: open {}, accepted {} (+{}), echoed {} bytes (+{bytes}, {:.1} MB/s), pool {}/{} \
         buffers in use",
        totals.live.load(Ordering::Relaxed),
        now.accepted,
        now.accepted.saturating_sub(last.accepted),
        now.bytes,
        bytes as f64 / secs.max(1e-9) / 1e6,
        now.pool_used,
        pool_total,
    );
    if now.buffer_waits > 0 {
        // The pool (or its working set) ran dry, or a connection yielded its turn to others.
        s.push_str(&format!(
            ", waits for a pool buffer {} (+{})",
            now.buffer_waits,
            now.buffer_waits.saturating_sub(last.buffer_waits)
        ));
    }
    for (what, n) in [
        ("refused", &totals.refused),
        ("closed idle", &totals.idle_closed),
        ("closed holding the pool", &totals.hogs_closed),
        ("retried for want of memory", &totals.retried),
        ("closed for want of a resource", &totals.resource_closed),
    ] {
        let n = n.load(Ordering::Relaxed);
        if n > 0 {
            s.push_str(&format!(", {what} {n}"));
        }
    }
    if let Some(udp) = &totals.udp {
        let u = udp.read();
        s.push_str(&format!(", UDP echoed {} datagrams", u.echoed));
        for (what, n) in [
            ("over the rate limit", u.limited),
            ("from service ports", u.from_service_ports),
            ("to broadcast or multicast addresses", u.to_groups),
            ("failed", u.failed),
        ] {
            if n > 0 {
                s.push_str(&format!(", UDP {what} {n}"));
            }
        }
    }
    s
}

impl Stats {
    /// Starts logging every `every`; `pool_total` is the buffers of all workers' pools.
    pub(super) fn start(
        every: Duration,
        totals: Arc<Totals>,
        pool_total: usize,
    ) -> Result<Stats, String> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || {
                let mut last = read(&totals);
                let mut at = Instant::now();
                // Ends when `stop` is used or dropped.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    let now = read(&totals);
                    let secs = at.elapsed().as_secs_f64();
                    at = Instant::now();
                    info!("{}", line(&totals, now, last, secs, pool_total));
                    last = now;
                }
            })
            .map_err(|e| format!("cannot start the --stats thread: {e}"))?;
        Ok(Stats { stop, thread })
    }

    pub(super) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_gives_totals_changes_and_only_the_events_that_happened() {
        let totals = Totals::new(2, None);
        totals.gauges[0].publish(3, 1000, 6, 0);
        totals.gauges[1].publish(2, 500, 0, 0);
        totals.live.store(4, Ordering::Relaxed);
        totals.retried.store(7, Ordering::Relaxed);
        let last = Reading {
            accepted: 1,
            bytes: 300,
            pool_used: 0,
            buffer_waits: 0,
        };
        let s = line(&totals, read(&totals), last, 2.0, 32);
        assert_eq!(
            s,
            "stats: open 4, accepted 5 (+4), echoed 1500 bytes (+1200, 0.0 MB/s), pool 6/32 \
             buffers in use, retried for want of memory 7"
        );
        // Waits for a pool buffer, once there were any: the total and the change.
        totals.gauges[0].publish(3, 1000, 6, 40);
        totals.gauges[1].publish(2, 500, 0, 2);
        let last = Reading {
            buffer_waits: 12,
            ..read(&totals)
        };
        let s = line(&totals, read(&totals), last, 2.0, 32);
        assert!(
            s.contains("buffers in use, waits for a pool buffer 42 (+30), retried"),
            "{s}"
        );
    }
}
