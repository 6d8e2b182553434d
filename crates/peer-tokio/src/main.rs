//! `peer-tokio`: an RFC 862 TCP echo server on tokio, written the way tokio's users write one.
//!
//! One multi-thread runtime with `--workers` worker threads, one listener, a task per connection,
//! and the canonical loop: `read` into a buffer, `write_all` what came in, until the peer's EOF. It
//! is a baseline for `ringport serve` in the benchmarks, so it does nothing that tokio's
//! documentation would not.

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Receive buffer per connection; the same size as `ringport serve`'s.
const BUFFER_SIZE: usize = 8 * 1024;

const NAME: &str = "peer-tokio";

const USAGE: &str = "\
usage: peer-tokio [--listen ADDR] [--workers N]
  --listen ADDR  address to listen on (default 127.0.0.1:5150; port 0 picks one)
  --workers N    tokio worker threads (default 1)";

/// The command line.
struct Args {
    listen: SocketAddr,
    workers: usize,
}

/// Parses the arguments after the program name; `Ok(None)` asks for the usage text.
fn parse_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Option<Args>, String> {
    let mut parsed = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 5150)),
        workers: 1,
    };
    let args = args
        .into_iter()
        .map(|arg| {
            arg.into_string()
                .map_err(|arg| format!("argument {arg:?} is not UTF-8"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        if flag != "--listen" && flag != "--workers" {
            return Err(format!("unknown argument '{flag}'"));
        }
        let value = match inline {
            Some(value) => value,
            None => args.next().ok_or_else(|| format!("{flag} needs a value"))?,
        };
        if flag == "--listen" {
            parsed.listen = value.parse().map_err(|_| {
                format!("--listen: '{value}' is not an address like 127.0.0.1:5150")
            })?;
        } else {
            parsed.workers = match value.parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => return Err(format!("--workers: '{value}' is not a positive integer")),
            };
        }
    }
    Ok(Some(parsed))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("{NAME}: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
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
    match runtime.block_on(serve(args.listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{NAME}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Accepts connections on `addr` forever, one task each.
async fn serve(addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))?;
    eprintln!("listening on {}", listener.local_addr()?);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    // A reset from a load generator that hung up is the connection's end, not news.
                    let _ = echo(stream).await;
                });
            }
            // EMFILE and friends: this connection is lost, the listener is not.
            Err(e) => eprintln!("{NAME}: accept: {e}"),
        }
    }
}

/// Echoes everything the peer sends until its EOF; returning drops (closes) the stream.
async fn echo(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0; BUFFER_SIZE];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}
