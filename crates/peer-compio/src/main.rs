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
use std::sync::mpsc;
use std::thread;

use compio::io::{AsyncRead, AsyncWriteExt};
use compio::net::{TcpListener, TcpSocket, TcpStream};
use compio::runtime::Runtime;
use compio::BufResult;

/// Receive buffer per connection; the same size as `ringport serve`'s.
const BUFFER_SIZE: usize = 8 * 1024;

/// Listen backlog: the one tokio's and monoio's `bind` use (compio's own `TcpListener::bind` says
/// 128, but it cannot set `SO_REUSEPORT`, so this server goes through `TcpSocket` and has to name
/// one).
const BACKLOG: i32 = 1024;

const NAME: &str = "peer-compio";

const USAGE: &str = "\
usage: peer-compio [--listen ADDR] [--workers N]
  --listen ADDR  address to listen on (default 127.0.0.1:5150; port 0 picks one)
  --workers N    threads, each with a compio runtime and a SO_REUSEPORT listener (default 1)";

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
    // Start the workers one at a time: each reports its bound address (or why it has none) before
    // the next starts, so that with port 0 the first one picks the port and the rest join it.
    let mut addr = args.listen;
    let mut workers = Vec::with_capacity(args.workers);
    for id in 0..args.workers {
        let (bound_tx, bound_rx) = mpsc::channel();
        let spawned = thread::Builder::new()
            .name(format!("{NAME}-{id}"))
            .spawn(move || worker(addr, bound_tx));
        match spawned {
            Ok(handle) => workers.push(handle),
            Err(e) => {
                eprintln!("{NAME}: cannot start worker thread {id}: {e}");
                return ExitCode::FAILURE;
            }
        }
        match bound_rx.recv() {
            Ok(Ok(bound)) => addr = bound,
            Ok(Err(e)) => {
                eprintln!("{NAME}: worker {id}: {e}");
                return ExitCode::FAILURE;
            }
            Err(mpsc::RecvError) => {
                eprintln!("{NAME}: worker {id} died while starting");
                return ExitCode::FAILURE;
            }
        }
    }
    eprintln!("listening on {addr}");
    for handle in workers {
        // Workers serve until the process is killed; one that returns has panicked (and said so).
        let _ = handle.join();
    }
    ExitCode::FAILURE
}

/// One thread of the server: a runtime, a listener on `addr`, and its connections.
///
/// Sends the listener's bound address, or the error that prevented it, on `bound`, then serves
/// forever.
fn worker(addr: SocketAddr, bound: mpsc::Sender<io::Result<SocketAddr>>) {
    let runtime = match Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            let message = format!("cannot start the compio runtime (io_uring): {e}");
            let _ = bound.send(Err(io::Error::new(e.kind(), message)));
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match bind(addr).await {
            Ok(listener) => listener,
            Err(e) => {
                let _ = bound.send(Err(io::Error::new(e.kind(), format!("{addr}: {e}"))));
                return;
            }
        };
        let _ = bound.send(listener.local_addr());
        drop(bound);
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    // A reset from a load generator that hung up is the connection's end, not news.
                    compio::runtime::spawn(async move {
                        let _ = echo(stream).await;
                    })
                    .detach();
                }
                // EMFILE and friends: this connection is lost, the listener is not.
                Err(e) => eprintln!("{NAME}: accept: {e}"),
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
    socket.listen(BACKLOG).await
}

/// Echoes everything the peer sends until its EOF; returning drops (closes) the stream.
async fn echo(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(BUFFER_SIZE);
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
