//! The book's blocking echo client: send a message, read its echo back, `count` times.
//!
//! This is the client from the Winsock chapter, on plain blocking `std::net` sockets, so it can check
//! any echo server (ours on any backend, or someone else's) without the port involved.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::errors::describe;

/// How many messages the book's client sends by default.
pub const DEFAULT_COUNT: u32 = 20;

/// The book's default message.
pub const DEFAULT_MESSAGE: &str = "A test message from client";

/// How long the client waits to connect, and for each read or write, before giving up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the book's client does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookOptions {
    /// The echo server to connect to.
    pub addr: SocketAddr,
    /// How many times to send the message (default [`DEFAULT_COUNT`]).
    pub count: u32,
    /// The message to send (default [`DEFAULT_MESSAGE`]).
    pub message: String,
    /// Only send; do not read the echoes back.
    pub send_only: bool,
    /// Give up this long after starting (`--timeout`), however the server answers.
    pub limit: Option<Duration>,
}

impl BookOptions {
    /// Returns the book's defaults for a server at `addr`: 20 times the default message, reading
    /// each echo back.
    pub fn new(addr: SocketAddr) -> BookOptions {
        BookOptions {
            addr,
            count: DEFAULT_COUNT,
            message: DEFAULT_MESSAGE.to_owned(),
            send_only: false,
            limit: None,
        }
    }
}

/// What a successful run of the book's client did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BookReport {
    /// Messages sent in full.
    pub sent: u64,
    /// Messages whose echo came back in full and matched (0 with `send_only`).
    pub received: u64,
}

/// Why the book's client failed; the message names the server and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BookError {
    /// The full message, such as `127.0.0.1:5150: connection refused (ECONNREFUSED)`.
    pub message: String,
}

impl fmt::Display for BookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BookError {}

impl From<BookError> for io::Error {
    fn from(err: BookError) -> io::Error {
        io::Error::other(err.message)
    }
}

/// Runs the book's client: connect, then `count` times send the message and (unless `send_only`)
/// read its echo back and check it, printing a `Sent ...` and a `Received ...` line each time.
///
/// Every read, write and the connect time out after [`IO_TIMEOUT`], so the client never hangs.
/// At the end it shuts down its sending side and closes the connection.
///
/// # Errors
///
/// Fails, with a message naming the server address, when the connection cannot be made, a send or
/// receive fails or times out, the server closes the connection before the whole echo is back, the
/// echo differs from the message (with `send_only`, a byte of what is read back at the end), the
/// server sends more after the last echo (before it closes,
/// or within [`IO_TIMEOUT`]), the server keeps its side open for [`IO_TIMEOUT`] after ours
/// closed, with `send_only` the server resets the connection rather than close it (dropping
/// what it had not read), or writing to `out` fails (other than with `EPIPE`: a reader gone
/// from `out` ends the printing only). A send or receive that fails names the message it was on.
pub fn run(opts: &BookOptions, out: &mut dyn Write) -> Result<BookReport, BookError> {
    run_with_timeout(opts, out, IO_TIMEOUT)
}

/// [`run`] with a chosen I/O timeout, so tests need not wait the full [`IO_TIMEOUT`].
fn run_with_timeout(
    opts: &BookOptions,
    out: &mut dyn Write,
    timeout: Duration,
) -> Result<BookReport, BookError> {
    let addr = opts.addr;
    let fail = |what: String| BookError {
        message: format!("{addr}: {what}"),
    };
    let io_fail = |what: &str, err: &io::Error| fail(format!("{what}: {}", describe(err)));
    // A reader gone from our output (`ringport client | head -1`) ends the printing, not the
    // conversation: the echoes are still checked, and the exit status says how that went.
    let say = |out: &mut dyn Write, line: fmt::Arguments<'_>| match out.write_fmt(line) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(BookError {
            message: format!("writing output: {}", describe(&e)),
        }),
        _ => Ok(()),
    };

    // `--timeout`: every wait ends by then.
    let until = opts.limit.map(|l| crate::later(Instant::now(), l));
    let mut report = BookReport::default();
    let late = |report: &BookReport| {
        let limit = opts.limit.unwrap_or_default().as_secs_f64();
        let (done, what) = if opts.send_only {
            (report.sent, "messages sent")
        } else {
            (report.received, "echoes back")
        };
        fail(format!(
            "timed out: --timeout {limit} s passed with {done} of {} {what}",
            opts.count
        ))
    };
    // Every echo came back (every message went out, with `send_only`), but the server kept
    // its side open after ours closed: for `timeout` (10 s), or until `--timeout` passed
    // (`cut`).
    let not_closed = |cut: bool| {
        let n = opts.count;
        let done = if opts.send_only {
            format!("all {n} messages sent")
        } else {
            format!("all {n} echoes came back")
        };
        if cut {
            let limit = opts.limit.unwrap_or_default().as_secs_f64();
            fail(format!(
                "timed out: --timeout {limit} s passed before the server closed its side \
                 ({done})"
            ))
        } else {
            fail(format!(
                "the server did not close its side within {} s of ours ({done})",
                timeout.as_secs_f64()
            ))
        }
    };
    // How long the next wait may last: `timeout`, cut short by `--timeout`.
    let wait = |report: &BookReport| match until {
        None => Ok(timeout),
        Some(t) => match t.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(left.min(timeout)),
            _ => Err(late(report)),
        },
    };
    let first = wait(&report)?;
    let mut stream = TcpStream::connect_timeout(&addr, first).map_err(|e| {
        if is_timeout(&e) && first < timeout {
            late(&report)
        } else {
            fail(describe(&e))
        }
    })?;
    // One small message per round trip: do not let Nagle hold it back.
    stream
        .set_nodelay(true)
        .map_err(|e| io_fail("set TCP_NODELAY", &e))?;
    let set_timeouts = |stream: &TcpStream, d: Duration| {
        stream
            .set_read_timeout(Some(d))
            .map_err(|e| io_fail("set read timeout", &e))?;
        stream
            .set_write_timeout(Some(d))
            .map_err(|e| io_fail("set write timeout", &e))
    };
    set_timeouts(&stream, first)?;
    // Before each read or write with `--timeout`: cuts the socket's timeouts to what is left;
    // the timeout they have now, and whether it was cut (a wait cut short that times out ran
    // into `--timeout`: the kernel may end it a tick early, before the clock says the limit
    // passed).
    let arm = |stream: &TcpStream, report: &BookReport| -> Result<(Duration, bool), BookError> {
        if until.is_none() {
            return Ok((timeout, false));
        }
        let d = wait(report)?;
        set_timeouts(stream, d)?;
        Ok((d, d < timeout))
    };

    let message = opts.message.as_bytes();
    let len = message.len();
    let mut echo = vec![0u8; len];

    for round in 1..=opts.count {
        // One write at a time, so that `--timeout` bounds a send that a slow reader stretches.
        // The whole message goes out within `timeout` (the kernel taking it in parts would
        // otherwise start the socket's timeout afresh with each).
        let send_by = crate::later(Instant::now(), timeout);
        let mut written = 0;
        while written < len {
            let (armed, limit_cut) = arm(&stream, &report)?;
            let left = send_by.saturating_duration_since(Instant::now());
            let send_cut = left < armed;
            // Timed out on `--timeout` rather than on this message's send.
            let cut = limit_cut && !send_cut;
            let result = if left.is_zero() {
                Err(io::ErrorKind::TimedOut.into())
            } else {
                stream
                    .set_write_timeout(Some(left.min(armed)))
                    .map_err(|e| io_fail("set write timeout", &e))?;
                stream.write(&message[written..])
            };
            match result {
                Ok(0) => {
                    return Err(io_fail(
                        &format!("send (message {round})"),
                        &io::ErrorKind::WriteZero.into(),
                    ))
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) && cut => return Err(late(&report)),
                Err(e) if is_timeout(&e) && opts.send_only => {
                    let unread = report.sent * len as u64 + written as u64;
                    return Err(fail(format!(
                        "send timed out after {} s (message {round}): with --send-only the echo \
                         goes unread ({unread} bytes sent so far), and once the buffers on the way are \
                         full the server stops reading (its backpressure); send less \
                         (--count, --message) or drop --send-only",
                        timeout.as_secs_f64()
                    )));
                }
                Err(e) if is_timeout(&e) => {
                    return Err(fail(format!(
                        "send timed out after {} s (message {round})",
                        timeout.as_secs_f64()
                    )))
                }
                Err(e) => return Err(io_fail(&format!("send (message {round})"), &e)),
            }
        }
        report.sent += 1;
        say(out, format_args!("Sent {len} bytes: '{}'\n", opts.message))?;

        if opts.send_only {
            continue;
        }

        // The echo may come back in several pieces: read until all of it is here. A wrong
        // byte in what came is the first thing wrong, whatever ends the wait for the rest.
        let mismatch = |echo: &[u8]| {
            let at = message.iter().zip(echo).position(|(m, e)| m != e)?;
            Some(fail(format!(
                "echo mismatch at byte {at} of message {round}: sent 0x{:02x}, got 0x{:02x}",
                message[at], echo[at]
            )))
        };
        let mut filled = 0;
        while filled < len {
            let (_, cut) = arm(&stream, &report)?;
            let err = match stream.read(&mut echo[filled..]) {
                Ok(0) => fail(format!(
                    "server closed the connection after {filled} of the {len} bytes of \
                     message {round}'s echo"
                )),
                Ok(n) => {
                    filled += n;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) && cut => late(&report),
                Err(e) if is_timeout(&e) => fail(format!(
                    "receive timed out after {} s with {filled} of the {len} bytes of message \
                     {round}'s echo",
                    timeout.as_secs_f64()
                )),
                Err(e) => io_fail(&format!("receive (message {round})"), &e),
            };
            return Err(mismatch(&echo[..filled]).unwrap_or(err));
        }
        if let Some(err) = mismatch(&echo) {
            return Err(err);
        }
        report.received += 1;
        say(
            out,
            format_args!(
                "Received {len} bytes: '{}'\n",
                String::from_utf8_lossy(&echo)
            ),
        )?;
    }

    match stream.shutdown(Shutdown::Write) {
        // The server may have closed first; the conversation is over either way.
        Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(io_fail("shutdown", &e)),
        _ => {}
    }
    if opts.send_only {
        // The echoes were not read: read (and drop) them until the server closes its side, so
        // that closing ours is a FIN. With echoes unread, the kernel would close it with a
        // reset, which also discards whatever of the messages it has not sent yet.
        // A reset instead says the server dropped what it had not read: lost, not sent; a
        // side it keeps open, that it may not have (and the close would then be a reset).
        // The echoes still on their way may be megabytes: the wait runs from the latest byte,
        // up to `--timeout`, and ends once more has come than was sent.
        let left = wait(&report).map_err(|_| not_closed(true))?;
        let sent = report.sent.saturating_mul(opts.message.len() as u64);
        let (echoed, end) = bytes_before_close(&mut stream, left, until, Some((sent, message)));
        if let End::Wrong { at, got } = end {
            let want = message[(at % len as u64) as usize];
            return Err(fail(format!(
                "echo mismatch at byte {} of message {} (read after the last message): sent \
                 0x{want:02x}, got 0x{got:02x}",
                at % len as u64,
                at / len as u64 + 1
            )));
        }
        if echoed > sent {
            return Err(fail(format!(
                "the server sent {} bytes more than it was sent",
                echoed - sent
            )));
        }
        match end {
            End::Closed | End::Wrong { .. } => {}
            End::Failed(e) => {
                return Err(io_fail(
                    "receive, after the last message (the server may not have read them all)",
                    &e,
                ));
            }
            End::Open { cut } => return Err(not_closed(cut)),
        }
        // Not an error when short: the server may be one that echoes nothing (a discard server).
        say(
            out,
            format_args!("Read back {echoed} of the {sent} bytes sent, then the server closed\n"),
        )?;
    } else {
        // Every echo came back: the server has nothing more to send, and closes its side once
        // it sees ours closed. Anything else it sends is an echo of nothing; a side it keeps
        // open is an error too, as in load mode.
        let left = wait(&report).map_err(|_| not_closed(true))?;
        let (extra, end) = bytes_before_close(&mut stream, left, None, None);
        if extra > 0 {
            return Err(fail(format!(
                "the server sent {extra} bytes more than it was sent, after the last echo"
            )));
        }
        match end {
            End::Closed | End::Wrong { .. } => {}
            // As in load mode: the echo is whole, but the connection did not end well.
            End::Failed(e) => {
                return Err(io_fail("receive, after the last echo", &e));
            }
            End::Open { .. } => return Err(not_closed(left < timeout)),
        }
    }
    Ok(report)
}

/// How the server's side of a connection ended, once ours was closed.
enum End {
    /// With a FIN.
    Closed,
    /// With a reset or another error.
    Failed(io::Error),
    /// It did not, within the time given (`cut`: the time `until` gave, not the wait).
    Open { cut: bool },
    /// Byte `at` of what came back (counted from the first) was `got`, not the message's.
    Wrong { at: u64, got: u8 },
}

/// Reads until the server closes its side, an error, or `wait` has passed; returns the bytes
/// read, and how the server's side ended. A server that keeps its side open, or keeps sending,
/// is not waited for longer. With `expected` (the bytes still to come, at most, and the message
/// they repeat), `wait` runs from the latest byte read, up to `until`, the reading stops once
/// more than that came, and each byte is checked against the message's (the first wrong one
/// ends the reading).
fn bytes_before_close(
    stream: &mut TcpStream,
    wait: Duration,
    until: Option<Instant>,
    expected: Option<(u64, &[u8])>,
) -> (u64, End) {
    let mut deadline = Instant::now() + wait;
    let mut cut = until.is_some_and(|t| t <= deadline);
    let mut read = 0u64;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return (read, End::Open { cut });
        }
        match stream.read(&mut buf) {
            Ok(0) => return (read, End::Closed),
            Ok(n) => {
                if let Some((expected, message)) = expected {
                    // Past what was sent, a byte is one too many, whatever its value.
                    let echo = (expected.saturating_sub(read)).min(n as u64) as usize;
                    let wrong = buf[..echo].iter().enumerate().find(|&(i, &b)| {
                        b != message[((read + i as u64) % message.len() as u64) as usize]
                    });
                    if let Some((i, &got)) = wrong {
                        return (
                            read + i as u64,
                            End::Wrong {
                                at: read + i as u64,
                                got,
                            },
                        );
                    }
                }
                read += n as u64;
                if let Some((expected, _)) = expected {
                    if read > expected {
                        return (read, End::Open { cut: false });
                    }
                    let next = crate::later(Instant::now(), wait);
                    cut = until.is_some_and(|t| t <= next);
                    deadline = until.map_or(next, |t| next.min(t));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return (read, End::Open { cut }),
            Err(e) => return (read, End::Failed(e)),
        }
    }
}

/// Returns `true` for the errors a socket timeout produces (`EAGAIN` on Linux).
fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread::{self, JoinHandle};

    /// Starts a one-connection server on 127.0.0.1 that runs `serve` on the accepted stream.
    fn server<T: Send + 'static>(
        serve: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> (SocketAddr, JoinHandle<T>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            serve(stream)
        });
        (addr, handle)
    }

    /// Echoes everything back one byte at a time, so the client sees the echo in pieces.
    fn echo_in_pieces(mut stream: TcpStream) -> u64 {
        stream.set_nodelay(true).unwrap();
        let mut total = 0;
        let mut buf = [0u8; 64];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => n,
            };
            for b in &buf[..n] {
                if stream.write_all(std::slice::from_ref(b)).is_err() {
                    return total;
                }
            }
            total += n as u64;
        }
    }

    fn run_to_string(opts: &BookOptions) -> (Result<BookReport, BookError>, String) {
        let mut out = Vec::new();
        let result = run_with_timeout(opts, &mut out, Duration::from_secs(5));
        (result, String::from_utf8(out).unwrap())
    }

    /// A server that reads nothing: with `--send-only`, the send that finds the buffers full
    /// times out with an error that says why (the echo unread, the server's backpressure).
    #[test]
    fn a_send_only_run_that_fills_the_buffers_says_why_it_stopped() {
        let (addr, server) = server(|stream| {
            thread::sleep(Duration::from_secs(3));
            drop(stream);
        });
        let opts = BookOptions {
            count: 1000,
            message: "x".repeat(60_000),
            send_only: true,
            ..BookOptions::new(addr)
        };
        let mut out = Vec::new();
        let result = run_with_timeout(&opts, &mut out, Duration::from_millis(500));
        let err = result.expect_err("60 MB to a server that reads nothing");
        assert!(
            err.message.contains("send timed out") && err.message.contains("--send-only"),
            "{err}"
        );
        server.join().unwrap();
    }

    #[test]
    fn echoes_twenty_messages() {
        let (addr, server) = server(echo_in_pieces);
        let opts = BookOptions::new(addr);
        let (result, text) = run_to_string(&opts);
        assert_eq!(
            result,
            Ok(BookReport {
                sent: 20,
                received: 20
            })
        );
        let sent = "Sent 26 bytes: 'A test message from client'";
        let received = "Received 26 bytes: 'A test message from client'";
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 40, "{text}");
        for pair in lines.chunks(2) {
            assert_eq!(pair, [sent, received]);
        }
        // The server saw every byte, then our shutdown as end of stream.
        assert_eq!(server.join().unwrap(), 20 * 26);
    }

    /// A server that echoes a byte every 200 ms keeps each read short of the I/O timeout:
    /// `--timeout` ends the conversation anyway, and says how far it got (the first echo would
    /// be complete only after 2.2 s, so none is, even on a loaded machine).
    #[test]
    fn the_overall_limit_ends_a_trickling_echo() {
        let (addr, server) = server(|mut stream| {
            let mut buf = [0u8; 64];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    return;
                }
                for b in &buf[..n] {
                    thread::sleep(Duration::from_millis(200));
                    if stream.write_all(std::slice::from_ref(b)).is_err() {
                        return;
                    }
                }
            }
        });
        let opts = BookOptions {
            count: 5,
            message: "hello world".to_owned(),
            limit: Some(Duration::from_millis(300)),
            ..BookOptions::new(addr)
        };
        // Without the limit this run would pass: 55 bytes at 200 ms each, each read well
        // within the I/O timeout.
        let (result, _) = run_to_string(&opts);
        assert_eq!(
            result.unwrap_err().to_string(),
            format!("{addr}: timed out: --timeout 0.3 s passed with 0 of 5 echoes back")
        );
        server.join().unwrap();
    }

    /// A server that never reads: once the socket buffers are full, a send blocks, and
    /// `--timeout` ends it (not the longer I/O timeout), counting what went out.
    #[test]
    fn the_overall_limit_ends_a_send_to_a_server_that_does_not_read() {
        // The server holds the connection, unread, until the client is done (10 s at most).
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let (addr, server) = server(move |stream| {
            let _ = wait.recv_timeout(Duration::from_secs(10));
            drop(stream);
        });
        let opts = BookOptions {
            count: 50,
            message: "x".repeat(1 << 20),
            send_only: true,
            limit: Some(Duration::from_millis(300)),
            ..BookOptions::new(addr)
        };
        let (result, _) = run_to_string(&opts);
        drop(done);
        let err = result.unwrap_err().to_string();
        let prefix = format!("{addr}: timed out: --timeout 0.3 s passed with ");
        assert!(
            err.starts_with(&prefix) && err.ends_with(" of 50 messages sent"),
            "{err}"
        );
        server.join().unwrap();
    }

    /// A message the server takes in parts, each well within the I/O timeout, but the whole
    /// of it not: the send times out after that timeout, not after however many parts.
    #[test]
    fn a_message_sent_in_slow_parts_times_out_as_a_whole() {
        let (gone, client_gone) = std::sync::mpsc::channel::<()>();
        let (addr, server) = server(move |mut stream| {
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0usize;
            // 64 KiB every 50 ms (1.3 MB/s: all of it would take seconds), until the client
            // has given up.
            stream
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let gone = || {
                !matches!(
                    client_gone.try_recv(),
                    Err(std::sync::mpsc::TryRecvError::Empty)
                )
            };
            while !gone() {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n,
                    Err(e) if is_timeout(&e) => {}
                    Err(_) => break,
                }
                thread::sleep(Duration::from_millis(50));
            }
            total
        });
        let opts = BookOptions {
            count: 1,
            message: "x".repeat(16 << 20),
            send_only: true,
            ..BookOptions::new(addr)
        };
        let mut out = Vec::new();
        let result = run_with_timeout(&opts, &mut out, Duration::from_secs(1));
        drop(gone);
        let err = result.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{addr}: send timed out after 1 s (message 1)")),
            "{err}"
        );
        let taken = server.join().unwrap();
        assert!(taken < 16 << 20, "the server took all of it: {taken}");
    }

    /// Send-only against an echo server: the echoes go unread while sending, but the client
    /// reads (and drops) them until the server closes, so that the server's last sends reach
    /// an open socket rather than draw a reset.
    #[test]
    fn send_only_ends_with_a_fin_against_an_echo_server() {
        let (addr, server) = server(|mut stream| {
            let mut buf = [0u8; 64];
            // The last 8 bytes read, held back.
            let mut held = Vec::new();
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        held.extend_from_slice(&buf[..n]);
                        let now = held.len().saturating_sub(8);
                        stream.write_all(&held[..now]).map_err(|e| e.kind())?;
                        held.drain(..now);
                    }
                    Err(e) => return Err(e.kind()),
                }
            }
            // The client's FIN is in; the echo of the last bytes is still on its way, as from
            // a server that is slow to send. A client that has closed its socket answers them
            // with a reset, which the next send reports.
            for piece in held.chunks(4) {
                thread::sleep(Duration::from_millis(50));
                stream.write_all(piece).map_err(|e| e.kind())?;
            }
            Ok(())
        });
        let opts = BookOptions {
            count: 50,
            send_only: true,
            ..BookOptions::new(addr)
        };
        let (result, text) = run_to_string(&opts);
        assert_eq!(
            result,
            Ok(BookReport {
                sent: 50,
                received: 0
            })
        );
        assert!(
            text.ends_with("'\nRead back 1300 of the 1300 bytes sent, then the server closed\n"),
            "{text}"
        );
        assert_eq!(server.join().unwrap(), Ok(()), "the server saw a reset");
    }

    /// Send-only against a server that reads every message but keeps its side open: the
    /// client cannot tell it took them all, and says so, as it does for echoes.
    #[test]
    fn send_only_reports_a_server_that_keeps_its_side_open() {
        let (addr, server) = server(|mut stream| {
            let mut all = Vec::new();
            stream.read_to_end(&mut all).unwrap();
            thread::sleep(Duration::from_secs(2));
            all.len()
        });
        let opts = BookOptions {
            count: 3,
            send_only: true,
            ..BookOptions::new(addr)
        };
        let mut out = Vec::new();
        let result = run_with_timeout(&opts, &mut out, Duration::from_millis(300));
        assert_eq!(
            result.unwrap_err().to_string(),
            format!(
                "{addr}: the server did not close its side within 0.3 s of ours (all 3 \
                 messages sent)"
            )
        );
        assert_eq!(server.join().unwrap(), 3 * 26);
    }

    /// Send-only: echoes that keep coming after the last message, for longer than the I/O
    /// timeout in all but never stalling near that long, are read to the server's close; more
    /// than was sent is an error.
    #[test]
    fn send_only_reads_a_slow_echo_to_the_end_but_no_more_than_was_sent() {
        for extra in [0usize, 1] {
            let (addr, server) = server(move |mut stream| {
                let mut all = Vec::new();
                stream.read_to_end(&mut all).unwrap();
                all.extend(std::iter::repeat_n(b'!', extra));
                // A piece every 50 ms: 1.6 s in all, against a 1 s I/O timeout.
                for piece in all.chunks(16) {
                    thread::sleep(Duration::from_millis(50));
                    if stream.write_all(piece).is_err() {
                        return;
                    }
                }
            });
            let opts = BookOptions {
                count: 20,
                send_only: true,
                ..BookOptions::new(addr)
            };
            let mut out = Vec::new();
            let result = run_with_timeout(&opts, &mut out, Duration::from_secs(1));
            if extra == 0 {
                assert_eq!(
                    result,
                    Ok(BookReport {
                        sent: 20,
                        received: 0
                    })
                );
            } else {
                assert_eq!(
                    result.unwrap_err().to_string(),
                    format!("{addr}: the server sent 1 bytes more than it was sent")
                );
            }
            server.join().unwrap();
        }
    }

    /// Send-only: what comes back before the server closes need not be whole, but each byte of
    /// it is checked; a wrong one is a mismatch, naming the message and byte.
    #[test]
    fn send_only_checks_every_byte_it_reads_back() {
        let (addr, server) = server(|mut stream| {
            let mut all = Vec::new();
            stream.read_to_end(&mut all).unwrap();
            // Byte 4 of the second message.
            all[26 + 4] ^= 0x20;
            let _ = stream.write_all(&all);
        });
        let opts = BookOptions {
            count: 3,
            send_only: true,
            ..BookOptions::new(addr)
        };
        let (result, _) = run_to_string(&opts);
        assert_eq!(
            result.unwrap_err().to_string(),
            format!(
                "{addr}: echo mismatch at byte 4 of message 2 (read after the last message): \
                 sent 0x73, got 0x53"
            )
        );
        server.join().unwrap();
    }

    /// Output that fails.
    struct FailingOutput(io::ErrorKind);

    impl Write for FailingOutput {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(self.0.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(self.0.into())
        }
    }

    /// A reader of the output that has gone (`| head -1`) ends the printing only: every echo is
    /// still read and checked. Output that fails otherwise is an error, named.
    #[test]
    fn a_closed_output_pipe_does_not_end_the_conversation() {
        let (addr, echo) = server(echo_in_pieces);
        let opts = BookOptions {
            count: 3,
            ..BookOptions::new(addr)
        };
        let mut out = FailingOutput(io::ErrorKind::BrokenPipe);
        let result = run_with_timeout(&opts, &mut out, Duration::from_secs(5));
        assert_eq!(
            result,
            Ok(BookReport {
                sent: 3,
                received: 3
            })
        );
        assert_eq!(echo.join().unwrap(), 3 * 26);

        let (addr, _echo) = server(echo_in_pieces);
        let opts = BookOptions::new(addr);
        let mut out = FailingOutput(io::ErrorKind::StorageFull);
        let err = run_with_timeout(&opts, &mut out, Duration::from_secs(5)).unwrap_err();
        assert!(err.message.starts_with("writing output: "), "{err}");
    }

    #[test]
    fn send_only_skips_reading() {
        let (addr, server) = server(|mut stream| {
            let mut all = Vec::new();
            stream.read_to_end(&mut all).unwrap();
            all
        });
        let opts = BookOptions {
            count: 3,
            message: "hi".to_owned(),
            send_only: true,
            ..BookOptions::new(addr)
        };
        let (result, text) = run_to_string(&opts);
        assert_eq!(
            result,
            Ok(BookReport {
                sent: 3,
                received: 0
            })
        );
        assert_eq!(
            text,
            "Sent 2 bytes: 'hi'\n".repeat(3)
                + "Read back 0 of the 6 bytes sent, then the server closed\n"
        );
        assert_eq!(server.join().unwrap(), b"hihihi");
    }

    #[test]
    fn flipped_byte_is_a_mismatch() {
        let (addr, _server) = server(|mut stream| {
            let mut buf = [0u8; 26];
            stream.read_exact(&mut buf).unwrap();
            buf[5] ^= 0x20;
            stream.write_all(&buf).unwrap();
            // Hold the connection until the client gives up on it.
            let _ = stream.read(&mut buf);
        });
        let (result, text) = run_to_string(&BookOptions::new(addr));
        let err = result.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{addr}: echo mismatch at byte 5 of message 1")),
            "{err}"
        );
        assert_eq!(text, "Sent 26 bytes: 'A test message from client'\n");
    }

    #[test]
    fn an_echo_sent_twice_is_reported_after_the_last_message() {
        // Every message is the same, so each round reads the copy left by the round before and
        // matches: only the copies left over at the end show the fault.
        let (addr, _server) = server(|mut stream| {
            let mut buf = [0u8; 64];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let twice = [&buf[..n], &buf[..n]].concat();
                        if stream.write_all(&twice).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let opts = BookOptions {
            count: 3,
            ..BookOptions::new(addr)
        };
        let (result, text) = run_to_string(&opts);
        assert_eq!(
            result.unwrap_err().to_string(),
            format!("{addr}: the server sent 78 bytes more than it was sent, after the last echo")
        );
        assert_eq!(text.lines().count(), 6, "every round matched: {text}");
    }

    /// Echoes `count` messages of `len` bytes, then keeps its side open (holding the stream)
    /// until the client has hung up or `hold` has passed.
    fn echo_then_hold(count: usize, len: usize, hold: Duration) -> impl FnOnce(TcpStream) {
        move |mut stream| {
            let mut buf = vec![0u8; len];
            for _ in 0..count {
                stream.read_exact(&mut buf).unwrap();
                stream.write_all(&buf).unwrap();
            }
            stream.set_read_timeout(Some(hold)).unwrap();
            // The client's FIN reads as 0 bytes: keep holding until it goes away or time is up.
            let until = Instant::now() + hold;
            while Instant::now() < until {
                match stream.read(&mut buf) {
                    Ok(0) => thread::sleep(Duration::from_millis(10)),
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }
    }

    /// Every echo came back, but the server keeps its side open after the client closed
    /// its own: an error, as in load mode, whether the wait ends at the I/O timeout or at
    /// `--timeout`.
    #[test]
    fn a_server_that_keeps_its_side_open_is_an_error() {
        // Waits long enough for a loaded machine to echo in time; the server holds on longer.
        let (addr, _held) = server(echo_then_hold(2, 26, Duration::from_secs(6)));
        let opts = BookOptions {
            count: 2,
            ..BookOptions::new(addr)
        };
        let mut out = Vec::new();
        let err = run_with_timeout(&opts, &mut out, Duration::from_secs(1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{addr}: the server did not close its side within 1 s of ours (all 2 echoes \
                 came back)"
            )
        );

        let (addr, _held) = server(echo_then_hold(2, 26, Duration::from_secs(6)));
        let opts = BookOptions {
            count: 2,
            limit: Some(Duration::from_secs(2)),
            ..BookOptions::new(addr)
        };
        let err = run_to_string(&opts).0.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{addr}: timed out: --timeout 2 s passed before the server closed its side \
                 (all 2 echoes came back)"
            )
        );
    }

    #[test]
    fn early_close_is_reported() {
        let (addr, _server) = server(|mut stream| {
            let mut buf = [0u8; 26];
            stream.read_exact(&mut buf).unwrap();
            stream.write_all(&buf[..13]).unwrap();
            // Dropping the stream closes it cleanly: nothing unread, so a FIN, not a reset.
        });
        let err = run_to_string(&BookOptions::new(addr)).0.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{addr}: server closed the connection after 13 of the 26 bytes of message 1's echo"
            )
        );
        assert!(err.to_string().contains("closed"));
    }

    /// The third echo ends part-way: the error names the message whose echo was cut short.
    #[test]
    fn an_early_close_names_the_message() {
        let (addr, _server) = server(|mut stream| {
            let mut buf = [0u8; 26];
            for _ in 0..2 {
                stream.read_exact(&mut buf).unwrap();
                stream.write_all(&buf).unwrap();
            }
            stream.read_exact(&mut buf).unwrap();
            stream.write_all(&buf[..7]).unwrap();
        });
        let err = run_to_string(&BookOptions::new(addr)).0.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{addr}: server closed the connection after 7 of the 26 bytes of message 3's \
                 echo"
            )
        );
    }

    /// A wrong byte in an echo cut short is the error reported, not the close after it.
    #[test]
    fn a_wrong_byte_before_a_close_is_a_mismatch() {
        let (addr, _server) = server(|mut stream| {
            let mut buf = [0u8; 26];
            stream.read_exact(&mut buf).unwrap();
            buf[5] ^= 0x20;
            stream.write_all(&buf[..6]).unwrap();
        });
        let err = run_to_string(&BookOptions::new(addr)).0.unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{addr}: echo mismatch at byte 5 of message 1")),
            "{err}"
        );
    }

    /// With `--send-only`, a server that resets the connection (closing with input unread)
    /// dropped what it had not read: an error, not a run that sent everything.
    #[test]
    fn send_only_reports_a_server_that_reset_with_input_unread() {
        let (addr, _server) = server(|mut stream| {
            let mut buf = [0u8; 10];
            stream.read_exact(&mut buf).unwrap();
            // Time for every message to be written before the reset.
            thread::sleep(Duration::from_millis(300));
            socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        });
        let opts = BookOptions {
            send_only: true,
            ..BookOptions::new(addr)
        };
        let err = run_to_string(&opts).0.unwrap_err();
        assert!(
            err.to_string()
                .contains("connection reset by peer (ECONNRESET)"),
            "{err}"
        );
    }

    #[test]
    fn reset_is_named() {
        let (addr, _server) = server(|mut stream| {
            let mut buf = [0u8; 26];
            stream.read_exact(&mut buf).unwrap();
            // A zero linger makes close send a reset.
            socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        });
        let err = run_to_string(&BookOptions::new(addr)).0.unwrap_err();
        assert!(
            err.to_string()
                .contains("connection reset by peer (ECONNRESET)"),
            "{err}"
        );
    }

    /// Every echo came back, and then the server reset the connection: an error, as in load
    /// mode, naming the reset.
    #[test]
    fn a_reset_after_the_last_echo_is_an_error() {
        let (addr, _server) = server(|mut stream| {
            let mut buf = [0u8; 26];
            for _ in 0..2 {
                stream.read_exact(&mut buf).unwrap();
                stream.write_all(&buf).unwrap();
            }
            // The client's FIN, then a close that resets (zero linger).
            let _ = stream.read(&mut buf);
            socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        });
        let opts = BookOptions {
            count: 2,
            ..BookOptions::new(addr)
        };
        let err = run_to_string(&opts).0.unwrap_err();
        assert!(
            err.to_string()
                .contains("receive, after the last echo: connection reset by peer (ECONNRESET)"),
            "{err}"
        );
    }

    #[test]
    fn silent_server_times_out() {
        let (addr, server) = server(|mut stream| {
            // Read the message but never answer; wait for the client to hang up.
            let mut all = Vec::new();
            let _ = stream.read_to_end(&mut all);
        });
        let opts = BookOptions::new(addr);
        let mut out = Vec::new();
        let err = run_with_timeout(&opts, &mut out, Duration::from_millis(100)).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "{addr}: receive timed out after 0.1 s with 0 of the 26 bytes of message 1's echo"
            )),
            "{err}"
        );
        server.join().unwrap();
    }

    #[test]
    fn refused_connection_names_the_address() {
        // A socket bound and not listening: connecting is refused, and no other test can take
        // the port meanwhile.
        let held =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        held.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let addr = held.local_addr().unwrap().as_socket().unwrap();
        let mut out = Vec::new();
        let err = run(&BookOptions::new(addr), &mut out).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{addr}: connection refused (ECONNREFUSED)")
        );
        assert!(out.is_empty());
        let io: io::Error = err.into();
        assert!(io.to_string().contains("connection refused"));
    }
}
