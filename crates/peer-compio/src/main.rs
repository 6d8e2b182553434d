//! `peer-compio`: an RFC 862 TCP echo server on compio, written the way compio's users write one.
//!
//! Thread-per-core: `--workers` threads, each running its own compio runtime with its own listener
//! on the same address (`SO_REUSEPORT`, set through compio's `TcpSocket`), so the kernel spreads
//! connections across them and nothing is shared. Each connection is a detached task on the thread
//! that accepted it, running the owned-buffer loop of compio's IO traits: `AsyncRead::read(buf)`,
//! `AsyncWriteExt::write_all(buf)`, each giving the buffer back in a `BufResult`, until EOF.
//!
//! The driver is io_uring only (the `io-uring` feature, not `polling`): where the kernel refuses
//! io_uring, the runtime fails to start and the server says so and exits.

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;

use compio::io::{AsyncRead, AsyncWriteExt};
use compio::net::{TcpListener, TcpSocket, TcpStream};
use compio::runtime::Runtime;
use compio::BufResult;
use peer_common::{AcceptAction, Bound, Cli};

const NAME: &str = "peer-compio";

const CLI: Cli = Cli {
    name: NAME,
    workers: "threads, each with a compio runtime and a SO_REUSEPORT listener",
};

fn main() -> ExitCode {
    let args = CLI.args();
    let buffer = args.buffer;
    peer_common::serve_thread_per_core(NAME, args, move |_id, addr, bound| {
        worker(addr, bound, buffer)
    })
}

/// One thread of the server: a runtime, a listener on `addr`, and its connections (each with a
/// receive buffer of `buffer` bytes).
///
/// Sends the listener's bound address, or the error that prevented it, on `bound`, then serves
/// forever.
fn worker(addr: SocketAddr, bound: Bound, buffer: usize) {
    let runtime = match Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return bound.fail("cannot start the compio runtime (io_uring)", e),
    };
    peer_common::report_backend("io_uring");
    runtime.block_on(async move {
        let listener = bind(addr).await;
        let Some(listener) = bound.listening(addr, listener, TcpListener::local_addr) else {
            return;
        };
        let mut errors = peer_common::AcceptErrors::new();
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    errors.accepted();
                    // A reset from a load generator that hung up is the connection's end, not news.
                    compio::runtime::spawn(async move {
                        let _ = echo(stream, buffer).await;
                    })
                    .detach();
                }
                // EMFILE and friends: see `AcceptErrors`.
                Err(e) => match errors.failed(NAME, &e, std::time::Instant::now()) {
                    AcceptAction::Retry => {}
                    AcceptAction::UseSpare => {
                        let got = listener.accept().await.ok().map(|(s, _)| s);
                        if let Some(stream) = errors.take_spare_back(got, drop) {
                            compio::runtime::spawn(async move {
                                let _ = echo(stream, buffer).await;
                            })
                            .detach();
                        }
                    }
                    AcceptAction::Pause(d) => std::thread::sleep(d),
                },
            }
        }
    });
}

/// A listener on `addr` that shares the port with the other workers' (`SO_REUSEPORT`).
async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4().await?
    } else {
        TcpSocket::new_v6().await?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr).await?;
    socket.listen(peer_common::BACKLOG).await
}

/// Echoes everything the peer sends until its EOF; returning drops (closes) the stream.
async fn echo(mut stream: TcpStream, buffer: usize) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(buffer);
    loop {
        // `read` fills the buffer from its start but only ever raises its length (to `n` if that is
        // more), so the buffer goes in empty: cleared after each echo, as in monoio's example.
        let BufResult(res, read_buf) = stream.read(buf).await;
        buf = read_buf;
        if res? == 0 {
            return Ok(());
        }
        let BufResult(res, written_buf) = stream.write_all(buf).await;
        buf = written_buf;
        res?;
        buf.clear();
    }
}
