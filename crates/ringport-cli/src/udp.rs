//! UDP echo (RFC 862), opt-in: one thread, one socket, a rate limit per source address.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info};

/// Sources remembered by the rate limiter; past this, the oldest are forgotten.
const MAX_SOURCES: usize = 65536;
/// How often the thread checks whether it should stop.
const POLL: Duration = Duration::from_millis(200);

/// What the UDP echo did.
#[derive(Debug, Default, Clone, Copy)]
pub struct UdpStats {
    pub echoed: u64,
    pub limited: u64,
    /// From service ports (below 1024), not answered.
    pub from_service_ports: u64,
}

/// Datagrams from ports below this are not answered: they come from services (echo, chargen,
/// daytime, DNS, ...) or carry a spoofed source aimed at one, and answering would let two such
/// services bounce datagrams between them for ever.
const FIRST_CLIENT_PORT: u16 = 1024;

/// The running UDP echo.
pub struct Udp {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<UdpStats>,
}

impl Udp {
    /// Stops the echo and returns its totals.
    pub fn stop(self) -> UdpStats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Binds `addr` and echoes datagrams, at most `rate` per second per source (0: no limit).
pub fn start(addr: SocketAddr, rate: u32) -> io::Result<Udp> {
    let socket = UdpSocket::bind(addr)?;
    socket.set_read_timeout(Some(POLL))?;
    info!(
        "UDP echo on {} (at most {rate} datagrams/s per source)",
        socket.local_addr()?
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("udp".into())
        .spawn(move || serve(&socket, rate, &flag))?;
    Ok(Udp { stop, thread })
}

fn serve(socket: &UdpSocket, rate: u32, stop: &AtomicBool) -> UdpStats {
    let mut stats = UdpStats::default();
    let mut limiter = Limiter::new(rate);
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                debug!("UDP receive: {e}");
                continue;
            }
        };
        if from.port() < FIRST_CLIENT_PORT {
            stats.from_service_ports += 1;
            continue;
        }
        if !limiter.allow(from.ip(), Instant::now()) {
            stats.limited += 1;
            continue;
        }
        match socket.send_to(&buf[..n], from) {
            Ok(_) => stats.echoed += 1,
            Err(e) => debug!("UDP send to {from}: {e}"),
        }
    }
    stats
}

/// A token bucket per source address: `rate` tokens a second, bursts of up to `rate`.
pub struct Limiter {
    rate: u32,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl Limiter {
    pub fn new(rate: u32) -> Self {
        Limiter {
            rate,
            buckets: HashMap::new(),
        }
    }

    /// Whether a datagram from `ip` may be echoed at `now`.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        if self.buckets.len() >= MAX_SOURCES && !self.buckets.contains_key(&ip) {
            // Forget sources whose buckets are full again: they are not over the limit.
            let rate = f64::from(self.rate);
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < rate
            });
            if self.buckets.len() >= MAX_SOURCES {
                return false;
            }
        }
        let rate = f64::from(self.rate);
        let (tokens, at) = self.buckets.entry(ip).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_a_burst_then_the_rate() {
        let mut l = Limiter::new(10);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        let burst = (0..20).filter(|_| l.allow(ip, t0)).count();
        assert_eq!(burst, 10);
        // Another source has its own bucket.
        assert!(l.allow(other, t0));
        // Half a second later, five more tokens.
        let t1 = t0 + Duration::from_millis(500);
        let later = (0..20).filter(|_| l.allow(ip, t1)).count();
        assert_eq!(later, 5);
    }

    #[test]
    fn limiter_off_allows_everything() {
        let mut l = Limiter::new(0);
        let ip: IpAddr = "::1".parse().unwrap();
        let now = Instant::now();
        assert!((0..1000).all(|_| l.allow(ip, now)));
    }
}
