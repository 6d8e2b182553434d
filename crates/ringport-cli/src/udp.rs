//! UDP echo (RFC 862), opt-in: one thread, one socket, a rate limit per source address and
//! one for all sources together.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

/// Sources remembered by the rate limiter; past this, the oldest are forgotten.
const MAX_SOURCES: usize = 65536;
/// With the table of sources full, how often it is swept for sources that are no longer over
/// the limit: a sweep reads every entry, and a flood of new (spoofed) sources must not make
/// each of their datagrams pay for one.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// How often the thread checks whether it should stop.
const POLL: Duration = Duration::from_millis(200);

/// What the UDP echo did, read at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UdpStats {
    pub echoed: u64,
    pub limited: u64,
    /// From service ports (below 1024) or from this server's own port, not answered.
    pub from_service_ports: u64,
    /// Sent to a broadcast or multicast address, not answered.
    pub to_groups: u64,
    /// Receives and echoes that failed (the first is logged as a warning).
    pub failed: u64,
    /// Received, or waiting in the socket, when the echo stopped: not answered.
    pub unanswered: u64,
}

/// The UDP echo's counters, kept by its thread and read by anyone (`--stats`, the summary).
#[derive(Debug, Default)]
pub struct UdpCounters {
    echoed: AtomicU64,
    limited: AtomicU64,
    from_service_ports: AtomicU64,
    to_groups: AtomicU64,
    failed: AtomicU64,
    unanswered: AtomicU64,
}

impl UdpCounters {
    pub fn read(&self) -> UdpStats {
        UdpStats {
            echoed: self.echoed.load(Ordering::Relaxed),
            limited: self.limited.load(Ordering::Relaxed),
            from_service_ports: self.from_service_ports.load(Ordering::Relaxed),
            to_groups: self.to_groups.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            unanswered: self.unanswered.load(Ordering::Relaxed),
        }
    }

    fn count(counter: &AtomicU64) -> u64 {
        // One thread writes: no read-modify-write needed.
        let n = counter.load(Ordering::Relaxed) + 1;
        counter.store(n, Ordering::Relaxed);
        n
    }

    /// Counts a failed receive or echo: a warning the first time, debug after.
    fn failed(&self, what: &str, e: &io::Error) {
        if Self::count(&self.failed) == 1 {
            warn!("UDP {what}: {e} (further failures are counted in the exit summary)");
        } else {
            debug!("UDP {what}: {e}");
        }
    }

    /// Counts a datagram over the rate limit: noted the first time, counted after.
    fn limited(&self, from: SocketAddr) {
        if Self::count(&self.limited) == 1 {
            info!(
                "UDP: {from} is over the rate limit; datagrams over it are not answered \
                 (counted in --stats and the exit summary)"
            );
        }
    }
}

/// The pause after a failed receive: 1 ms, doubling with each failure in a row up to
/// [`POLL`] (so a stop is still seen within about that long).
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let pause = Duration::from_millis(1) * (1u32 << self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        pause.min(POLL)
    }
}

/// Datagrams from ports below this are not answered: they come from services (echo, chargen,
/// daytime, DNS, ...) or carry a spoofed source aimed at one, and answering would let two such
/// services bounce datagrams between them for ever.
const FIRST_CLIENT_PORT: u16 = 1024;

/// The running UDP echo.
pub struct Udp {
    stop: Arc<AtomicBool>,
    counters: Arc<UdpCounters>,
    thread: JoinHandle<()>,
}

impl Udp {
    /// What stops the echo from another thread (the signal handler's: the drain answers no
    /// new datagram); `stop` still collects the totals.
    pub fn stopper(&self) -> impl Fn() + Send + 'static {
        let stop = Arc::clone(&self.stop);
        move || stop.store(true, Ordering::Relaxed)
    }

    /// Its counters, for reading while it runs.
    pub fn counters(&self) -> Arc<UdpCounters> {
        Arc::clone(&self.counters)
    }

    /// Stops the echo and returns its totals, or, should its thread have panicked, what it
    /// had counted with the panic's message.
    pub fn stop(self) -> Result<UdpStats, (UdpStats, String)> {
        self.stop.store(true, Ordering::Relaxed);
        let joined = self.thread.join();
        let stats = self.counters.read();
        joined.map(|()| stats).map_err(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            (stats, msg)
        })
    }
}

/// The UDP echo's socket, bound to `addr` (on `[::]`, for IPv4 too: see
/// [`socket_for`](crate::serve::socket_for)).
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = crate::serve::socket_for(addr, socket2::Type::DGRAM)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Echoes datagrams on `socket` (from [`bind`]), at most `rate` per second per source and
/// `total` per second in all (0: no limit).
pub fn start(socket: UdpSocket, rate: u32, total: u32) -> io::Result<Udp> {
    let addr = socket.local_addr()?;
    socket.set_read_timeout(Some(POLL))?;
    // Each datagram's destination: on a wildcard address the reply is sent from it (the route
    // back would choose the source, which on a host with several addresses need not be the one
    // the client sent to, and a connected client drops a reply from any other); on any address
    // it tells a datagram sent to a group (a socket bound to a broadcast or multicast address
    // gets nothing else).
    wire::want_destinations(&socket, addr.is_ipv6())?;
    info!(
        "UDP echo on {} (at most {rate} datagrams/s per source, {total} in all; 0: no limit)",
        socket.local_addr()?
    );
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(UdpCounters::default());
    let flag = Arc::clone(&stop);
    let kept = Arc::clone(&counters);
    let thread = std::thread::Builder::new()
        .name("udp".into())
        .spawn(move || {
            serve(&socket, Limiter::new(rate, total), &flag, &kept);
            count_unanswered(&socket, &kept);
        })?;
    Ok(Udp {
        stop,
        counters,
        thread,
    })
}

/// At most this many datagrams waiting in the socket are counted when the echo stops (a
/// flood could otherwise keep it counting).
const MAX_UNANSWERED_COUNT: u64 = 1 << 20;

/// Counts the datagrams waiting in the stopped echo's socket, which close with it. The socket
/// is first connected to its own address, so that the kernel refuses what comes after (its
/// sender hears "port unreachable"), rather than queue it where nothing counts it.
fn count_unanswered(socket: &UdpSocket, stats: &UdpCounters) {
    if let Ok(own) = socket.local_addr() {
        let ip = match own.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        if let Err(e) = socket.connect(SocketAddr::new(ip, own.port())) {
            debug!("UDP: cannot close the stopped echo to new datagrams: {e}");
        }
    }
    if let Err(e) = socket.set_nonblocking(true) {
        debug!("UDP: cannot count the datagrams left unanswered: {e}");
        return;
    }
    let mut buf = [0u8; 1];
    for _ in 0..MAX_UNANSWERED_COUNT {
        match socket.recv(&mut buf) {
            // Truncated to a byte: only the count matters.
            Ok(_) => UdpCounters::count(&stats.unanswered),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
    }
}

fn serve(socket: &UdpSocket, mut limiter: Limiter, stop: &AtomicBool, stats: &UdpCounters) {
    let own = socket.local_addr().map_or(0, |a| a.port());
    // Bound to one address, the reply goes from it without being told.
    let wildcard = socket.local_addr().is_ok_and(|a| a.ip().is_unspecified());
    let mut buf = vec![0u8; 65536];
    let mut pause = Backoff::default();
    while !stop.load(Ordering::Relaxed) {
        let (n, from, dest) = match wire::recv(socket, &mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                stats.failed("receive", &e);
                // A datagram the kernel could not describe is one datagram's; a failure of the
                // socket itself (ENOMEM, say) may last, and is not retried in a tight loop.
                if e.kind() != io::ErrorKind::InvalidData {
                    std::thread::sleep(pause.next());
                }
                continue;
            }
        };
        pause = Backoff::default();
        if stop.load(Ordering::Relaxed) {
            // Stopped while this one came in: not answered.
            UdpCounters::count(&stats.unanswered);
            break;
        }
        if from_service_port(from, own) {
            UdpCounters::count(&stats.from_service_ports);
            continue;
        }
        // One datagram to a broadcast or multicast address would be answered by every host
        // that serves the echo there: a spoofed source gets them all ("fraggle").
        if dest.as_ref().is_some_and(wire::Dest::is_group) {
            UdpCounters::count(&stats.to_groups);
            continue;
        }
        if !limiter.allow(from.ip(), Instant::now()) {
            stats.limited(from);
            continue;
        }
        match wire::send(socket, &buf[..n], from, dest.as_ref().filter(|_| wildcard)) {
            Ok(_) => {
                UdpCounters::count(&stats.echoed);
            }
            Err(e) => stats.failed(&format!("echo to {from}"), &e),
        }
    }
}

/// The kernel edge: receives that report a datagram's destination address, and replies sent
/// from it.
mod wire {
    use std::io;
    use std::mem::{size_of, MaybeUninit};
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::AsRawFd;

    use socket2::SockAddr;

    /// Where a datagram was sent: its destination as the kernel reports it (`IP_PKTINFO` or
    /// `IPV6_PKTINFO`).
    #[derive(Clone, Copy)]
    pub enum Dest {
        V4(libc::in_pktinfo),
        V6(libc::in6_pktinfo),
    }

    impl Dest {
        /// Whether the datagram was sent to a group: an IPv4 broadcast (limited or directed)
        /// or a multicast address. For IPv4 the kernel says so: the local address it reports
        /// (`ipi_spec_dst`) is the destination itself only for a datagram sent to this host
        /// alone.
        pub fn is_group(&self) -> bool {
            match self {
                Dest::V4(info) => info.ipi_addr.s_addr != info.ipi_spec_dst.s_addr,
                Dest::V6(info) => std::net::Ipv6Addr::from(info.ipi6_addr.s6_addr).is_multicast(),
            }
        }
    }

    /// Room for both control messages an IPv4 datagram brings to a dual-stack socket
    /// (`IPV6_PKTINFO`, 40 bytes on 64-bit Linux, then `IP_PKTINFO`, 32), aligned for their
    /// headers.
    #[repr(C, align(8))]
    struct Control([u8; 128]);

    fn set_flag(socket: &UdpSocket, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
        let one: libc::c_int = 1;
        // SAFETY: the option value is a live `c_int` whose size is passed with it; the
        // descriptor is `socket`'s, open for the call.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                name,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Has the kernel report each datagram's destination on `socket` (for an IPv6 socket also
    /// that of IPv4 datagrams it receives, as `IP_PKTINFO`, whose local address is the one to
    /// answer from even for a broadcast; `recv` prefers it to the IPv4-mapped `IPV6_PKTINFO`
    /// that comes with it).
    pub fn want_destinations(socket: &UdpSocket, v6: bool) -> io::Result<()> {
        if v6 {
            set_flag(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
                .map_err(|e| io::Error::new(e.kind(), format!("IPV6_RECVPKTINFO: {e}")))?;
        }
        set_flag(socket, libc::IPPROTO_IP, libc::IP_PKTINFO)
            .map_err(|e| io::Error::new(e.kind(), format!("IP_PKTINFO: {e}")))
    }

    /// Receives one datagram into `buf`: its length, its source and, where the socket reports
    /// it, its destination.
    pub fn recv(
        socket: &UdpSocket,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, Option<Dest>)> {
        let mut control = Control([0; 128]);
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: all zeros is a valid `msghdr` (no name, buffers or control).
        let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control.0.len();
        // SAFETY: `try_init` hands a zeroed address storage and its size, which the call fills
        // and sets to the length written; the buffer, the control area and the message header
        // are locals that outlive the call, and their lengths are theirs.
        let (n, from) = unsafe {
            SockAddr::try_init(|storage, len| {
                msg.msg_name = storage.cast();
                msg.msg_namelen = *len;
                let n = libc::recvmsg(socket.as_raw_fd(), &raw mut msg, 0);
                *len = msg.msg_namelen;
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            })?
        };
        let from = from.as_socket().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a datagram from a non-IP address",
            )
        })?;
        let mut dest = None;
        // SAFETY: the kernel set `msg_controllen` to the control bytes it wrote into `control`,
        // which is still borrowed by `msg`; the macros walk only those bytes, and each message's
        // data is read unaligned, only where its length covers the type read.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                let len = ((*c).cmsg_len as usize).saturating_sub(data as usize - c as usize);
                match ((*c).cmsg_level, (*c).cmsg_type) {
                    (libc::IPPROTO_IP, libc::IP_PKTINFO)
                        if len >= size_of::<libc::in_pktinfo>() =>
                    {
                        dest = Some(Dest::V4(data.cast::<libc::in_pktinfo>().read_unaligned()));
                    }
                    (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)
                        if len >= size_of::<libc::in6_pktinfo>() && dest.is_none() =>
                    {
                        dest = Some(Dest::V6(data.cast::<libc::in6_pktinfo>().read_unaligned()));
                    }
                    _ => {}
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
        }
        Ok((n, from, dest))
    }

    /// The destination to answer from, as the control message that asks for it: for IPv4
    /// the local address the datagram was delivered to, on whatever interface the route
    /// picks; for IPv6 the destination itself, with its interface only where a link-local
    /// address needs one. `None` where the route back's choice stands: an IPv6 multicast
    /// destination cannot be a source.
    fn reply_from(dest: &Dest) -> Option<Dest> {
        match *dest {
            Dest::V4(info) => Some(Dest::V4(libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: info.ipi_spec_dst,
                ipi_addr: libc::in_addr { s_addr: 0 },
            })),
            Dest::V6(info) => {
                let addr = std::net::Ipv6Addr::from(info.ipi6_addr.s6_addr);
                if addr.is_multicast() {
                    return None;
                }
                Some(Dest::V6(libc::in6_pktinfo {
                    ipi6_addr: info.ipi6_addr,
                    ipi6_ifindex: if addr.is_unicast_link_local() {
                        info.ipi6_ifindex
                    } else {
                        0
                    },
                }))
            }
        }
    }

    /// Sends `data` to `to`, from the address `dest` names where it is given. Should the
    /// kernel refuse that source (`EINVAL`: a loopback address as the source of a reply that
    /// would leave the host, for a spoofed datagram), the echo fails: answered from another
    /// address, as the route back would pick, it would not be the answer to what was sent.
    pub fn send(
        socket: &UdpSocket,
        data: &[u8],
        to: SocketAddr,
        dest: Option<&Dest>,
    ) -> io::Result<usize> {
        let Some(reply) = dest.and_then(reply_from) else {
            return socket.send_to(data, to);
        };
        let (level, kind, len) = match reply {
            Dest::V4(_) => (
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                size_of::<libc::in_pktinfo>(),
            ),
            Dest::V6(_) => (
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                size_of::<libc::in6_pktinfo>(),
            ),
        };
        let name = SockAddr::from(to);
        let mut control = Control([0; 128]);
        let mut iov = libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        };
        // SAFETY: all zeros is a valid `msghdr`.
        let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        msg.msg_name = name.as_ptr().cast_mut().cast();
        msg.msg_namelen = name.len();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        // SAFETY: `CMSG_SPACE` only computes.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(len as u32) } as usize;
        debug_assert!(msg.msg_controllen <= control.0.len());
        // SAFETY: the control area is `control`, aligned for a header and at least
        // `msg_controllen` long (32 or 40 bytes on 64-bit Linux, of 128), so
        // `CMSG_FIRSTHDR` returns its start and the header and the `len` data bytes written
        // stay inside it. `sendmsg` only reads the message, whose buffer, address and control
        // area are live for the call; nothing writes to `data` through the `iovec`.
        let n = unsafe {
            let c = libc::CMSG_FIRSTHDR(&raw const msg);
            (*c).cmsg_level = level;
            (*c).cmsg_type = kind;
            (*c).cmsg_len = libc::CMSG_LEN(len as u32) as usize;
            match reply {
                Dest::V4(info) => libc::CMSG_DATA(c)
                    .cast::<libc::in_pktinfo>()
                    .write_unaligned(info),
                Dest::V6(info) => libc::CMSG_DATA(c)
                    .cast::<libc::in6_pktinfo>()
                    .write_unaligned(info),
            }
            libc::sendmsg(socket.as_raw_fd(), &raw const msg, 0)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        Err(io::Error::last_os_error())
    }
}

/// Whether a datagram's source is a service port (below 1024: another echo server, or a
/// spoofed source aimed at one), or this server's own port `own` (another server like this
/// one, or a spoofed source naming it: answering would start the two bouncing datagrams
/// between them): it gets no answer.
fn from_service_port(from: SocketAddr, own: u16) -> bool {
    from.port() < FIRST_CLIENT_PORT || from.port() == own
}

/// A token bucket per source address: `rate` tokens a second, bursts of up to `rate`; and one
/// for all sources together: `total` a second, bursts of up to `total`.
pub struct Limiter {
    rate: u32,
    buckets: HashMap<IpAddr, (f64, Instant)>,
    total: u32,
    /// The shared bucket's tokens, and when it was last filled.
    shared: (f64, Instant),
    /// When the full table of sources was last swept.
    swept: Option<Instant>,
}

impl Limiter {
    pub fn new(rate: u32, total: u32) -> Self {
        Limiter {
            rate,
            buckets: HashMap::new(),
            total,
            shared: (f64::from(total), Instant::now()),
            swept: None,
        }
    }

    /// Whether a datagram from `ip` may be echoed at `now`.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.total > 0 {
            let total = f64::from(self.total);
            let (tokens, at) = &mut self.shared;
            *tokens =
                (*tokens + now.saturating_duration_since(*at).as_secs_f64() * total).min(total);
            *at = now;
            if *tokens < 1.0 || !self.allow_source(ip, now) {
                return false;
            }
            self.shared.0 -= 1.0;
            return true;
        }
        self.allow_source(ip, now)
    }

    /// The per-source part of [`Limiter::allow`].
    fn allow_source(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        if self.buckets.len() >= MAX_SOURCES && !self.buckets.contains_key(&ip) {
            // Forget sources whose buckets are full again: they are not over the limit. At
            // most once per `SWEEP_EVERY`; until then a new source waits, as over the limit.
            if self
                .swept
                .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
            {
                return false;
            }
            self.swept = Some(now);
            let rate = f64::from(self.rate);
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < rate
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

    /// Below 1024, and the server's own port (7777 here). (The integration test of the first
    /// needs the privilege to bind a port below 1024.)
    #[test]
    fn service_ports_are_told_from_client_ports() {
        for (addr, service) in [
            ("127.0.0.1:7", true),
            ("127.0.0.1:19", true),
            ("[::1]:1023", true),
            ("10.0.0.1:1024", false),
            ("127.0.0.1:5150", false),
            ("[::1]:65535", false),
            ("10.0.0.9:7777", true),
        ] {
            assert_eq!(
                from_service_port(addr.parse().unwrap(), 7777),
                service,
                "{addr}"
            );
        }
    }

    #[test]
    fn failed_receives_in_a_row_pause_longer_up_to_the_poll() {
        let mut b = Backoff::default();
        let pauses: Vec<Duration> = (0..12).map(|_| b.next()).collect();
        assert_eq!(pauses[0], Duration::from_millis(1));
        assert_eq!(pauses[3], Duration::from_millis(8));
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
        assert_eq!(pauses[11], POLL, "capped at the stop check's period");
        for _ in 0..100 {
            assert_eq!(b.next(), POLL);
        }
    }

    #[test]
    fn limiter_allows_a_burst_then_the_rate() {
        let mut l = Limiter::new(10, 0);
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
    fn a_full_table_of_sources_is_swept_at_most_once_per_interval() {
        let mut l = Limiter::new(1, 0);
        let t0 = Instant::now();
        let source = |i: usize| IpAddr::from(std::net::Ipv6Addr::from(i as u128 + 1));
        for i in 0..MAX_SOURCES {
            assert!(l.allow(source(i), t0));
        }
        let new = source(MAX_SOURCES);
        // Every source is over its limit (its one token spent): a sweep frees nothing.
        let almost = t0 + Duration::from_millis(990);
        assert!(!l.allow(new, almost));
        // Their buckets are full again 1 s after t0, but the next sweep comes only
        // `SWEEP_EVERY` after the last: until then new sources wait.
        assert!(!l.allow(new, t0 + Duration::from_millis(1010)));
        assert!(l.allow(new, almost + SWEEP_EVERY));
        assert!(l.buckets.len() < 10, "the sweep forgot the quiet sources");
    }

    #[test]
    fn limiter_off_allows_everything() {
        let mut l = Limiter::new(0, 0);
        let ip: IpAddr = "::1".parse().unwrap();
        let now = Instant::now();
        assert!((0..1000).all(|_| l.allow(ip, now)));
    }

    /// Many sources, each within its own rate, together get no more than the total.
    #[test]
    fn limiter_caps_all_sources_together() {
        let t0 = Instant::now();
        let mut l = Limiter::new(5, 20);
        let allowed = (0..100u8)
            .map(|i| IpAddr::from([10, 0, 0, i]))
            .filter(|&ip| l.allow(ip, t0))
            .count();
        assert_eq!(allowed, 20);
        // A quarter of a second later the shared bucket has five tokens again, whoever asks.
        let t1 = t0 + Duration::from_millis(250);
        let later = (100..200u8)
            .map(|i| IpAddr::from([10, 0, 0, i]))
            .filter(|&ip| l.allow(ip, t1))
            .count();
        assert_eq!(later, 5);
    }
}
