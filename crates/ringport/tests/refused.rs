//! A kernel that refuses io_uring, as the port sees it (made to with
//! `RINGPORT_FAULT_URING_SETUP`, which is process-wide: this file's one test has the process
//! to itself).

use std::io;

use ringport::{Backend, Port, FAULT_URING_SETUP_ENV};

/// `Backend::Uring` fails, naming the error in its message, with the errno's kind but no raw
/// errno; `Backend::Auto` falls back to epoll.
#[test]
fn a_refused_io_uring_is_named_and_auto_falls_back() {
    for (errno, code, kind) in [
        ("EPERM", libc::EPERM, io::ErrorKind::PermissionDenied),
        ("ENOSYS", libc::ENOSYS, io::ErrorKind::Unsupported),
        ("ENOMEM", libc::ENOMEM, io::ErrorKind::OutOfMemory),
    ] {
        std::env::set_var(FAULT_URING_SETUP_ENV, errno);
        match Port::builder()
            .workers(1)
            .backend(Backend::Uring)
            .build::<(), ()>()
        {
            Ok(_) => panic!("{errno}: io_uring was not refused"),
            Err(e) => {
                assert_eq!(e.kind(), kind, "{errno}: {e}");
                assert_eq!(e.raw_os_error(), None, "{errno}: {e}");
                let named = io::Error::from_raw_os_error(code).to_string();
                assert!(e.to_string().contains(&named), "{errno}: {e}");
            }
        }
        let (port, workers) = Port::builder()
            .workers(1)
            .backend(Backend::Auto)
            .build::<(), ()>()
            .unwrap_or_else(|e| panic!("{errno}: auto: {e}"));
        assert_eq!((port.backend(), workers.len()), ("epoll", 1), "{errno}");
    }
    std::env::remove_var(FAULT_URING_SETUP_ENV);
}
