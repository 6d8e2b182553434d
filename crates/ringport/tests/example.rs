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
