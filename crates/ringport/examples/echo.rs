//! The book's completion-port echo server on ringport, in a page: `cargo run -p ringport --example echo`,
//! then `cargo run -- client` from the workspace root.

use ringport::{Handle, Op, OpKind, Port, Worker};
use std::net::TcpListener;
use std::time::Duration;

fn main() -> std::io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:5150")?;
    // Completion key: none needed beyond the socket; per-I/O data: bytes already sent.
    let (port, workers) = Port::builder().build::<(), usize>()?;
    let listener = port.associate(listener, ())?;
    let mut threads = Vec::new();
    for mut worker in workers {
        let listener = listener.clone();
        threads.push(std::thread::spawn(move || {
            if worker.index() == listener.worker() {
                worker.submit(Op::accept(&listener), 0);
            }
            serve(&mut worker, &listener)
        }));
    }
    for t in threads {
        t.join().expect("worker panicked")?;
    }
    Ok(())
}

fn serve(worker: &mut Worker<(), usize>, listener: &Handle<()>) -> std::io::Result<()> {
    let port = worker.port();
    loop {
        let c = worker.dequeue(None)?;
        if c.kind == OpKind::Timeout {
            // The pause after a failed accept is over.
            worker.submit(Op::accept(listener), 0);
            continue;
        }
        let Some(handle) = c.handle.clone() else {
            continue;
        };
        match (c.kind, c.result) {
            (OpKind::Accept, Ok(_)) => {
                worker.submit(Op::accept(&handle), 0);
                if let Some(stream) = c.accepted {
                    let conn = port.associate(stream, ())?;
                    worker.submit(Op::recv(&conn, Vec::with_capacity(8192)), 0);
                }
            }
            // Out of descriptors, say: accept again after a pause (not at once, which would
            // spin; not never, which would stop the server accepting for good).
            (OpKind::Accept, Err(e)) => {
                eprintln!("accept: {e}; trying again in 100 ms");
                worker.submit(Op::timeout(Duration::from_millis(100)), 0);
            }
            // Something arrived: echo it back.
            (OpKind::Recv, Ok(n)) if n > 0 => {
                let buf = c.buf.expect("a receive gives its buffer back");
                worker.submit(Op::send(&handle, buf, 0), 0);
            }
            // A short send: post the rest.
            (OpKind::Send, Ok(n)) if c.data + n < c.buf.as_ref().map_or(0, Vec::len) => {
                let buf = c.buf.expect("a send gives its buffer back");
                worker.submit(Op::send(&handle, buf, c.data + n), c.data + n);
            }
            // All sent: receive again, into the same buffer.
            (OpKind::Send, Ok(_)) => {
                let mut buf = c.buf.expect("a send gives its buffer back");
                buf.clear();
                worker.submit(Op::recv(&handle, buf), 0);
            }
            // Peer closed (0 bytes) or an error: close this socket only.
            (OpKind::Recv | OpKind::Send, _) => {
                worker.submit(Op::close(&handle), 0);
            }
            _ => {}
        }
    }
}
