//! `peer-tokio`: an RFC 862 TCP echo server on tokio, written the way tokio's users write one.
//!
//! One multi-thread runtime with `--workers` worker threads, one listener, a task per connection,
//! and the canonical loop: `read` into a buffer, `write_all` what came in, until the peer's EOF. It
//! is a baseline for `ringport serve` in the benchmarks, so it does nothing that tokio's
//! documentation would not.

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;

use peer_common::Cli;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NAME: &str = "peer-tokio";

const CLI: Cli = Cli {
    name: NAME,
    workers: "tokio worker threads",
};

fn main() -> ExitCode {
    let args = CLI.args();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_io()
        .build()
    {
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
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))?;
    // tokio's I/O driver is epoll (mio) on Linux.
    eprintln!("listening on {} backend=epoll", listener.local_addr()?);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    // A reset from a load generator that hung up is the connection's end, not news.
                    let _ = echo(stream, buffer).await;
                });
            }
            // EMFILE and friends: this connection is lost, the listener is not.
            Err(e) => eprintln!("{NAME}: accept: {e}"),
        }
    }
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
