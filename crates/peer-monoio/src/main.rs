//! `peer-monoio`: an RFC 862 TCP echo server on monoio, written the way monoio's users write one.
//!
//! Thread-per-core: `--workers` threads, each running its own monoio runtime with its own listener
//! on the same address (`SO_REUSEPORT`, which monoio's `ListenerOpts` turns on by default), so the
//! kernel spreads connections across them and nothing is shared. Each connection is a task on the
//! thread that accepted it, running monoio's owned-buffer loop from its echo example: `read(buf)`,
//! `write_all(buf)`, until EOF.
//!
//! The runtime is monoio's `FusionDriver`: io_uring, or monoio's own automatic fallback to its
//! epoll (`legacy`) driver where the kernel refuses io_uring. That fallback would make this a
//! different baseline, so it is reported on stderr when it happens.

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{ListenerOpts, TcpListener, TcpStream};
use monoio::{FusionDriver, FusionRuntime, RuntimeBuilder};
use peer_common::{AcceptAction, Bound, Cli};

const NAME: &str = "peer-monoio";

const CLI: Cli = Cli {
    name: NAME,
    workers: "threads, each with a monoio runtime and a SO_REUSEPORT listener",
};

fn main() -> ExitCode {
    let args = CLI.args();
    let buffer = args.buffer;
    peer_common::serve_thread_per_core(NAME, args, move |id, addr, bound| {
        worker(id, addr, bound, buffer)
    })
}

/// One thread of the server: a runtime, a listener on `addr`, and its connections (each with a
/// receive buffer of `buffer` bytes).
///
/// Sends the listener's bound address, or the error that prevented it, on `bound`, then serves
/// forever.
fn worker(id: usize, addr: SocketAddr, bound: Bound, buffer: usize) {
    let mut runtime = match RuntimeBuilder::<FusionDriver>::new().build() {
        Ok(runtime) => runtime,
        Err(e) => return bound.fail("cannot start the monoio runtime", e),
    };
    if matches!(runtime, FusionRuntime::Legacy(_)) {
        eprintln!(
            "{NAME}: worker {id}: io_uring is unavailable; monoio fell back to its legacy (epoll) \
             driver"
        );
        peer_common::report_backend("epoll");
    } else {
        peer_common::report_backend("io_uring");
    }
    runtime.block_on(async move {
        let opts = ListenerOpts::new()
            .reuse_port(true)
            .backlog(peer_common::BACKLOG);
        let listener = TcpListener::bind_with_config(addr, &opts);
        let Some(listener) = bound.listening(addr, listener, TcpListener::local_addr) else {
            return;
        };
        let mut errors = peer_common::AcceptErrors::new();
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    errors.accepted();
                    // A reset from a load generator that hung up is the connection's end, not news.
                    monoio::spawn(async move {
                        let _ = echo(stream, buffer).await;
                    });
                }
                // EMFILE and friends: see `AcceptErrors`.
                Err(e) => match errors.failed(NAME, &e, std::time::Instant::now()) {
                    AcceptAction::Retry => {}
                    AcceptAction::UseSpare => {
                        let got = listener.accept().await.ok().map(|(s, _)| s);
                        if let Some(stream) = errors.take_spare_back(got, peer_common::close_now) {
                            monoio::spawn(async move {
                                let _ = echo(stream, buffer).await;
                            });
                        }
                    }
                    AcceptAction::Pause(d) => std::thread::sleep(d),
                },
            }
        }
    });
}

/// Echoes everything the peer sends until its EOF; returning drops (closes) the stream.
async fn echo(mut stream: TcpStream, buffer: usize) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(buffer);
    let mut res;
    loop {
        // `read` fills the buffer from its start and sets its length to what came in.
        (res, buf) = stream.read(buf).await;
        if res? == 0 {
            return Ok(());
        }
        (res, buf) = stream.write_all(buf).await;
        res?;
        buf.clear();
    }
}
