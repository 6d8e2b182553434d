//! `ringport-bench`: dispatches `peers`, `models` and `scaling` to the `ringport_bench` library.

use std::io::Write as _;
use std::process::ExitCode;

const USAGE: &str = "usage: ringport-bench <peers|models|scaling> [OPTIONS]   (--help after a mode for its options)

  peers    ringport serve (io_uring, epoll) vs tokio, monoio, compio echo servers
  models   ringport serve --model X (blocking, select, sigio, poll, epoll, uring) vs the completion port
  scaling  every peers server with 1, 2, 4, 8 worker threads

Every mode takes --quick for a tiny matrix that runs in well under a minute.";

fn main() -> ExitCode {
    let mut args = Vec::new();
    for a in std::env::args_os().skip(1) {
        match a.into_string() {
            Ok(a) => args.push(a),
            Err(a) => {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "ringport-bench: argument {a:?} is not valid UTF-8"
                );
                return ExitCode::from(2);
            }
        }
    }
    let code = match args.first().map(String::as_str) {
        Some("peers") => ringport_bench::peers_main("ringport-bench", &args[1..]),
        Some("models") => ringport_bench::models_main("ringport-bench", &args[1..]),
        Some("scaling") => ringport_bench::scaling_main("ringport-bench", &args[1..]),
        Some("-h" | "--help" | "help") => {
            // A reader that has gone away is not an error here.
            let _ = writeln!(std::io::stdout().lock(), "{USAGE}");
            0
        }
        other => {
            if let Some(o) = other {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "ringport-bench: unknown mode `{o}`"
                );
            }
            let _ = writeln!(std::io::stderr().lock(), "{USAGE}");
            ringport_bench::EXIT_HARNESS
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
