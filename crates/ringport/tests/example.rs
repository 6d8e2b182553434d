//! The book's echo server in `examples/echo.rs` (the crate's front-page example) echoes every
//! byte: its code, compiled in here, serves a client that checks them.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

#[allow(dead_code)] // Its `main`.
#[path = "../examples/echo.rs"]
mod echo;

#[test]
fn the_front_page_example_echoes_every_byte() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Serves until the test process ends.
    std::thread::spawn(move || echo::run(listener));
    for i in 0..3u32 {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // One message, then one larger than its 8 KiB buffer; then the end of the stream.
        let small = format!("hello from {i}").into_bytes();
        s.write_all(&small).unwrap();
        let mut back = vec![0u8; small.len()];
        s.read_exact(&mut back).expect("the echo");
        assert_eq!(back, small);
        let big: Vec<u8> = (0..100_000u32).map(|n| (n * 7 + i) as u8).collect();
        let mut writer = s.try_clone().unwrap();
        let sent = big.clone();
        let t = std::thread::spawn(move || {
            writer.write_all(&sent).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("the echo, then the end");
        t.join().unwrap();
        assert!(
            got == big,
            "connection {i}: {} bytes back of {}",
            got.len(),
            big.len()
        );
    }
}

/// Shut down while serving, with a connection open on each of two workers: every worker stops
/// (the accept and the receives come back cancelled, and nothing is started again), and
/// `serve_on` returns.
#[test]
fn the_front_page_example_stops_at_a_shutdown() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (port, workers) = ringport::Port::builder()
        .workers(2)
        .build::<(), ()>()
        .unwrap();
    let serving = port.clone();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(echo::serve_on(&serving, workers, listener).map_err(|e| e.to_string()));
    });
    let mut open = Vec::new();
    for i in 0..2u8 {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&[i]).unwrap();
        let mut back = [0u8; 1];
        s.read_exact(&mut back).expect("the echo");
        assert_eq!(back, [i]);
        open.push(s);
    }
    port.shutdown();
    // A bound for a hang, not a timing: the workers stop at once.
    let result = finished.recv_timeout(Duration::from_secs(30));
    assert_eq!(
        result,
        Ok(Ok(())),
        "the example did not stop at the shutdown"
    );
}
