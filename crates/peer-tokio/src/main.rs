//! `peer-tokio`: an RFC 862 TCP echo server on tokio, written the way tokio's users write one.
//!
//! One multi-thread runtime with `--workers` worker threads, one listener, a task per connection,
//! and the canonical loop: `read` into a buffer, `write_all` what came in, until the peer's EOF. It
//! is a baseline for `ringport serve` in the benchmarks, so it does nothing that tokio's
//! documentation would not.
//!
//! For experiments only, the environment variable `PEER_TOKIO_GLOBAL_QUEUE_INTERVAL=N` sets the
//! runtime's `global_queue_interval` (how many tasks a worker runs from its local queue before it
//! takes one from the shared queue, where woken tasks beyond the local queue's 256 go). `1`
//! serves woken connections about in the order they became ready; the benchmarks leave it unset.

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;

use peer_common::{AcceptAction, Cli};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const NAME: &str = "peer-tokio";

/// Sets the runtime's `global_queue_interval`, for experiments (see the crate docs).
const QUEUE_INTERVAL_ENV: &str = "PEER_TOKIO_GLOBAL_QUEUE_INTERVAL";

const CLI: Cli = Cli {
    name: NAME,
    workers: "tokio worker threads",
};

fn main() -> ExitCode {
    let args = CLI.args();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(args.workers).enable_io();
    if let Some(v) = std::env::var_os(QUEUE_INTERVAL_ENV) {
        match v
            .to_str()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|&n| n > 0)
        {
            Some(n) => {
                builder.global_queue_interval(n);
            }
            None => {
                eprintln!("{NAME}: {QUEUE_INTERVAL_ENV}: {v:?} is not a positive integer");
                return ExitCode::FAILURE;
            }
        }
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{NAME}: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args.listen, args.buffer)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{NAME}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Accepts connections on `addr` forever, one task each with a receive buffer of `buffer` bytes.
async fn serve(addr: SocketAddr, buffer: usize) -> io::Result<()> {
    let listener = bind(addr).map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))?;
    // tokio's I/O driver is epoll (mio) on Linux.
    eprintln!("listening on {} backend=epoll", listener.local_addr()?);
    let mut errors = peer_common::AcceptErrors::new();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                errors.accepted();
                tokio::spawn(async move {
                    // A reset from a load generator that hung up is the connection's end, not news.
                    let _ = echo(stream, buffer).await;
                });
            }
            // EMFILE and friends: see `AcceptErrors`.
            Err(e) => match errors.failed(NAME, &e, std::time::Instant::now()) {
                AcceptAction::Retry => {}
                AcceptAction::UseSpare => {
                    let got = listener.accept().await.ok().map(|(s, _)| s);
                    if let Some(stream) = errors.take_spare_back(got, drop) {
                        tokio::spawn(async move {
                            let _ = echo(stream, buffer).await;
                        });
                    }
                }
                AcceptAction::Pause(d) => std::thread::sleep(d),
            },
        }
    }
}

/// A listener on `addr`: what `TcpListener::bind` makes (`SO_REUSEADDR`), with the backlog of
/// a server meant for thousands of connections rather than `bind`'s 128.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(peer_common::BACKLOG as u32)
}

/// Echoes everything the peer sends until its EOF; returning drops (closes) the stream.
async fn echo(mut stream: TcpStream, buffer: usize) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0; buffer];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}
