//! The book's completion-port echo server on ringport, in a page: `cargo run -p ringport
//! --example echo [ADDR]` (default 127.0.0.1:5150), then `cargo run -- client` from the
//! workspace root.

use ringport::{Handle, Op, OpKind, Port, WaitError, Worker};
use std::net::TcpListener;
use std::time::Duration;

fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1);
    let listener = TcpListener::bind(addr.as_deref().unwrap_or("127.0.0.1:5150"))?;
    println!("listening on {}", listener.local_addr()?);
    run(listener)
}

/// Serves `listener` until a worker fails, and returns its error (the others stop with it).
pub fn run(listener: TcpListener) -> std::io::Result<()> {
    // Completion key and per-I/O data: none needed beyond the socket and the operation.
    let (port, workers) = Port::builder().build::<(), ()>()?;
    serve_on(&port, workers, listener)
}

/// Serves `listener` with `workers` until one fails, or the port is shut down.
pub fn serve_on(
    port: &Port<(), ()>,
    workers: Vec<Worker<(), ()>>,
    listener: TcpListener,
) -> std::io::Result<()> {
    let listener = port.associate(listener, ())?;
    let mut threads = Vec::new();
    for mut worker in workers {
        let listener = listener.clone();
        threads.push(std::thread::spawn(move || {
            if worker.index() == listener.worker() {
                worker.submit(Op::accept(&listener), ());
            }
            let served = serve(&mut worker, &listener);
            if served.is_err() {
                // The sockets at home on this worker could not go on without it.
                worker.port().shutdown();
            }
            served
        }));
    }
    let mut first_failure = Ok(());
    for t in threads {
        let served = t.join().expect("worker panicked");
        if first_failure.is_ok() {
            first_failure = served;
        }
    }
    first_failure
}

fn serve(worker: &mut Worker<(), ()>, listener: &Handle<()>) -> std::io::Result<()> {
    let port = worker.port();
    loop {
        let c = match worker.dequeue(None) {
            Ok(c) => c,
            // Another worker failed, and shut the port down (or the owner of the port did).
            Err(WaitError::Shutdown) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        // Cancelled: the port is shutting down (another worker failed). Nothing is started
        // again: the worker answers `Shutdown` once its operations are all back.
        if c.result
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::ECANCELED))
        {
            continue;
        }
        if c.kind == OpKind::Timeout {
            // The pause after a failed accept is over.
            worker.submit(Op::accept(listener), ());
            continue;
        }
        let Some(handle) = c.handle.clone() else {
            continue;
        };
        match (c.kind, c.result) {
            (OpKind::Accept, Ok(_)) => {
                worker.submit(Op::accept(&handle), ());
                if let Some(stream) = c.accepted {
                    let conn = port.associate(stream, ())?;
                    worker.submit(Op::recv(&conn, Vec::with_capacity(8192)), ());
                }
            }
            // Out of descriptors, say: accept again after a pause (not at once, which would
            // spin; not never, which would stop the server accepting for good).
            (OpKind::Accept, Err(e)) => {
                eprintln!("accept: {e}; trying again in 100 ms");
                worker.submit(Op::timeout(Duration::from_millis(100)), ());
            }
            // Something arrived: echo it back.
            (OpKind::Recv, Ok(n)) if n > 0 => {
                let buf = c.buf.expect("a receive gives its buffer back");
                worker.submit(Op::send(&handle, buf, 0), ());
            }
            // All sent (a send completes once all of it has gone out): receive again, into
            // the same buffer.
            (OpKind::Send, Ok(n)) if n == c.buf.as_ref().map_or(0, Vec::len) => {
                let mut buf = c.buf.expect("a send gives its buffer back");
                buf.clear();
                worker.submit(Op::recv(&handle, buf), ());
            }
            // Peer closed (0 bytes), an error, or a send cut short by one: close this socket
            // only.
            (OpKind::Recv | OpKind::Send, _) => {
                worker.submit(Op::close(&handle), ());
            }
            _ => {}
        }
    }
}
