//! The public API: names, parsing, the stop, the types that cross threads.

mod util;

use std::os::fd::AsRawFd;

use ringport_models::{Config, Model, ParseModelError, Stats, Stop};

const fn assert_send_sync<T: Send + Sync>() {}
const _: () = assert_send_sync::<Stop>();
const _: () = assert_send_sync::<Model>();
const _: () = assert_send_sync::<Config>();
const _: () = assert_send_sync::<Stats>();

#[test]
fn names_round_trip() {
    let names: Vec<String> = Model::ALL.iter().map(Model::to_string).collect();
    assert_eq!(
        names,
        ["blocking", "select", "sigio", "poll", "epoll", "uring"]
    );
    for m in Model::ALL {
        assert_eq!(m.to_string().parse::<Model>(), Ok(m));
    }
}

#[test]
fn unknown_name_is_an_error_that_lists_the_models() {
    let err: ParseModelError = "iocp".parse::<Model>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown I/O model `iocp` (expected one of: blocking, select, sigio, poll, epoll, uring)"
    );
    let io: std::io::Error = err.into();
    assert_eq!(io.kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
fn stop_is_shared_by_clones_and_its_fd_becomes_readable() {
    let stop = Stop::new().expect("Stop::new");
    let clone = stop.clone();
    assert!(!readable(&stop));
    assert!(!clone.is_triggered());
    clone.trigger();
    clone.trigger();
    assert!(stop.is_triggered());
    assert!(readable(&stop), "triggered: readable");
    assert!(readable(&stop), "and stays readable");
}

fn readable(stop: &Stop) -> bool {
    let mut pfd = libc::pollfd {
        fd: stop.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live `pollfd`, and its count; a zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    n == 1
}

/// `sigio` makes the listener signal-driven; the caller's own descriptor of the same open file
/// (a `try_clone`) must not go on raising that signal once `serve` has returned, when nothing
/// blocks it any more (its default action ends the process).
#[test]
fn sigio_gives_the_listener_back_without_signal_driven_io() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let kept = listener.try_clone().expect("try_clone");
    let stop = Stop::new().expect("Stop::new");
    let server_stop = stop.clone();
    let (done, served) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(ringport_models::serve(
            Model::Sigio,
            listener,
            &Config::default(),
            &server_stop,
        ));
    });
    // One echo, so that the server is surely running (and has set the listener up) first.
    // Every wait is bounded.
    let wait = std::time::Duration::from_secs(20);
    let addr = kept.local_addr().expect("local_addr");
    let mut c = std::net::TcpStream::connect_timeout(&addr, wait).expect("connect");
    c.set_read_timeout(Some(wait)).expect("read timeout");
    c.set_write_timeout(Some(wait)).expect("write timeout");
    std::io::Write::write_all(&mut c, b"x").expect("write");
    let mut b = [0u8; 1];
    std::io::Read::read_exact(&mut c, &mut b).expect("read the echo");
    drop(c);
    stop.trigger();
    served
        .recv_timeout(wait)
        .expect("the server stops within 20 s of its stop")
        .expect("serve");
    // SAFETY: `F_GETFL` on a descriptor `kept` owns; it takes no argument.
    let flags = unsafe { libc::fcntl(kept.as_raw_fd(), libc::F_GETFL) };
    assert!(flags >= 0, "F_GETFL: {}", std::io::Error::last_os_error());
    assert_eq!(
        flags & libc::O_ASYNC,
        0,
        "O_ASYNC is still set on the listener"
    );
}

/// The `uring` model serves on a thread of its own: when its ring is torn down, the kernel
/// interrupts the threads that used it, and the caller's next blocking call with a timeout
/// would fail with `EINTR` had the caller used the ring itself.
#[test]
fn serving_with_io_uring_leaves_the_calling_thread_uninterrupted() {
    if let Some(why) = util::unsupported(Model::Uring) {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let stop = Stop::new().expect("Stop::new");
    stop.trigger();
    ringport_models::serve(Model::Uring, listener, &Config::default(), &stop).expect("serve");
    peer_common::uring_check::assert_timed_reads_time_out("serving");
}
