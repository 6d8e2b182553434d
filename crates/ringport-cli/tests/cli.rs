//! Command-line surface: help, version, bad input (exit 2), address in use (exit 1), log format.

mod util;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use util::{run_cli, Output, Server, CLI_TIMEOUT};

fn assert_usage_error(args: &[&str]) {
    let output = run_cli(args, CLI_TIMEOUT);
    output.assert_no_panic();
    assert_eq!(
        output.code(),
        Some(2),
        "`ringport {}` should be a usage error (exit 2)\n{}",
        args.join(" "),
        output.describe()
    );
    assert!(
        !output.stderr.trim().is_empty(),
        "`ringport {}`: no error message on stderr\n{}",
        args.join(" "),
        output.describe()
    );
}

/// [`assert_usage_error`], and the message names `flag`.
fn assert_usage_error_naming(args: &[&str], flag: &str) {
    assert_usage_error(args);
    let output = run_cli(args, CLI_TIMEOUT);
    assert!(
        output.stderr.contains(flag),
        "the error names {flag}\n{}",
        output.describe()
    );
}

fn serve_unparsable_listen_address_is_exit_2() {
    assert_usage_error(&["serve", "--listen", "nonsense"]);
}

fn serve_listen_address_without_port_is_exit_2() {
    assert_usage_error_naming(&["serve", "--listen", "1.2.3.4"], "has no port");
}

/// `--listen` takes an IP address: a host name is refused, saying so (the client's
/// `--connect` resolves one).
fn serve_listen_host_name_is_exit_2_saying_so() {
    assert_usage_error_naming(
        &["serve", "--listen", "localhost:5150"],
        "`localhost` is not an IP address",
    );
}

fn serve_non_numeric_workers_is_exit_2() {
    assert_usage_error(&["serve", "--listen", "127.0.0.1:0", "--workers", "abc"]);
}

fn serve_zero_workers_is_exit_2() {
    assert_usage_error(&["serve", "--listen", "127.0.0.1:0", "--workers", "0"]);
}

fn serve_pool_size_out_of_range_is_exit_2_naming_the_flag() {
    for size in ["1000", "1073741824", "lots"] {
        let args = ["serve", "--listen", "127.0.0.1:0", "--pool-size", size];
        assert_usage_error_naming(&args, "--pool-size");
    }
}

fn serve_pool_working_set_out_of_range_is_exit_2_naming_the_flag() {
    for size in ["-1", "268435457", "4MiB"] {
        let args = [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pool-working-set",
            size,
        ];
        assert_usage_error_naming(&args, "--pool-working-set");
    }
}

fn serve_keepalive_out_of_range_is_exit_2_naming_the_flag() {
    for secs in ["-1", "32768", "5m", "0.5"] {
        let args = ["serve", "--listen", "127.0.0.1:0", "--keepalive", secs];
        assert_usage_error_naming(&args, "--keepalive");
    }
}

fn serve_non_numeric_drain_timeout_is_exit_2() {
    for secs in ["soon", "5ss"] {
        assert_usage_error_naming(
            &["serve", "--listen", "127.0.0.1:0", "--drain-timeout", secs],
            "--drain-timeout",
        );
    }
}

fn serve_unknown_flag_is_exit_2() {
    assert_usage_error(&["serve", "--listen", "127.0.0.1:0", "--no-such-flag"]);
}

fn unknown_top_level_flag_is_exit_2() {
    assert_usage_error(&["--no-such-flag"]);
}

fn client_unknown_flag_is_exit_2() {
    assert_usage_error(&["client", "--no-such-flag"]);
}

fn client_unparsable_connect_address_is_exit_2() {
    assert_usage_error(&["client", "--connect", "nonsense"]);
    assert_usage_error_naming(&["client", "--connect", "localhost"], "has no port");
    assert_usage_error_naming(&["client", "--connect", ":5150"], "has no host");
    // Port 0 is no server's: refused as such, not tried and refused by the kernel.
    assert_usage_error_naming(&["client", "--connect", "127.0.0.1:0"], "port 0");
    assert_usage_error_naming(&["client", "--connect", "localhost:0"], "port 0");
}

/// A message size and pipeline that put more than 1 GiB into one connection's send are a
/// bad pair of flags, whatever the machine: exit 2, naming them.
fn client_size_times_pipeline_over_1_gib_is_exit_2() {
    assert_usage_error_naming(
        &["client", "--size", "16385", "--pipeline", "65536"],
        "--size 16385 x --pipeline 65536",
    );
}

/// More in flight at once than any machine here has memory for: refused before anything is
/// opened, naming the flags, instead of the process being killed for memory.
fn client_more_in_flight_than_memory_is_refused() {
    // Nothing listens there: should the refusal ever fail, the client connects to nothing.
    let (addr, _held) = util::unused_port();
    let addr = addr.to_string();
    let output = run_cli(
        &[
            "client",
            "--connect",
            &addr,
            "--connections",
            "1000000",
            "--size",
            "67108864",
            "--duration",
            "1",
        ],
        CLI_TIMEOUT,
    );
    output.assert_no_panic();
    assert_ne!(output.code(), Some(0), "{}", output.describe());
    assert!(
        output
            .stderr
            .contains("--connections 1000000 x --size 67108864"),
        "the error does not name the flags\n{}",
        output.describe()
    );
    // One-byte messages, but each one's send time is kept too: about 1.2 TB in flight.
    let output = run_cli(
        &[
            "client",
            "--connect",
            &addr,
            "--connections",
            "1000000",
            "--size",
            "1",
            "--pipeline",
            "65536",
            "--duration",
            "1",
        ],
        CLI_TIMEOUT,
    );
    output.assert_no_panic();
    assert!(
        output
            .stderr
            .contains("--connections 1000000 x --size 1 x --pipeline 65536"),
        "the error does not name the flags\n{}",
        output.describe()
    );
}

/// A flag the chosen mode would not read is refused, naming it, rather than ignored.
fn flags_the_mode_would_ignore_are_exit_2_naming_them() {
    assert_usage_error_naming(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "blocking",
            "--udp",
        ],
        "--udp",
    );
    assert_usage_error_naming(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "poll",
            "--workers",
            "2",
        ],
        "--workers",
    );
    assert_usage_error_naming(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "select",
            "--backend",
            "epoll",
        ],
        "--backend",
    );
    assert_usage_error_naming(
        &["client", "--connections", "3", "--send-only"],
        "--send-only",
    );
    assert_usage_error_naming(&["client", "--count", "5", "--duration", "1"], "--count");
    assert_usage_error_naming(&["client", "--count", "3", "--backend", "epoll"], "--count");
    assert_usage_error_naming(
        &["client", "--send-only", "--backend", "uring"],
        "--send-only",
    );
    assert_usage_error_naming(
        &["client", "--message", "hi", "--backend", "auto"],
        "--message",
    );
    // A `--timeout` that would end every duration run before its window closes.
    for timeout in ["3", "2.5"] {
        assert_usage_error_naming(
            &[
                "client",
                "--duration",
                "2",
                "--warmup",
                "1",
                "--timeout",
                timeout,
            ],
            "--timeout",
        );
    }
}

/// A book run that would check nothing: no message, or an empty one.
fn client_book_run_that_checks_nothing_is_exit_2() {
    assert_usage_error_naming(&["client", "--count", "0"], "--count");
    assert_usage_error_naming(&["client", "--message", ""], "--message");
}

/// `--backend` on the command line picks the load generator (the book's client has no
/// backend); from `RINGPORT_BACKEND` it does not.
fn client_backend_flag_means_load_mode() {
    let (addr, _held) = util::unused_port();
    let addr = addr.to_string();
    let output = run_cli(
        &["client", "--connect", &addr, "--backend", "epoll"],
        CLI_TIMEOUT,
    );
    output.assert_no_panic();
    assert_ne!(output.code(), Some(0), "{}", output.describe());
    assert!(
        output.stdout.contains("connect: connection refused"),
        "not the load generator's summary\n{}",
        output.describe()
    );
    let output = run_cli(&["client", "--connect", &addr], CLI_TIMEOUT);
    assert!(
        output
            .stderr
            .contains(&format!("{addr}: connection refused")),
        "not the book's client\n{}",
        output.describe()
    );
}

/// A negative number is read as the flag's value, and the error names the flag.
fn negative_numbers_are_exit_2_naming_the_flag() {
    assert_usage_error_naming(&["client", "--duration", "-1"], "--duration");
    assert_usage_error_naming(
        &["serve", "--listen", "127.0.0.1:0", "--conn-buffer", "-1"],
        "--conn-buffer",
    );
}

/// A misspelt `--only` names no server: exit 2, naming it, and no report written over the
/// last one.
fn bench_only_naming_no_server_is_exit_2() {
    let out = std::env::temp_dir().join(format!(
        "ringport-bench-only-{}-{}",
        std::process::id(),
        util::backend()
    ));
    std::fs::create_dir_all(&out).unwrap();
    let report = out.join("peers.md");
    std::fs::write(&report, "the last run's report").unwrap();
    let out_arg = out.to_string_lossy().into_owned();
    let args = [
        "bench", "peers", "--quick", "--only", "tokoi", "--out", &out_arg,
    ];
    assert_usage_error_naming(&args, "--only tokoi");
    let kept = std::fs::read_to_string(&report).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    assert_eq!(
        kept, "the last run's report",
        "the last report was written over"
    );
    assert_usage_error_naming(&["bench", "peers", "--quick", "--sizes", "64,0"], "--sizes");
}

fn client_warmup_without_duration_is_exit_2() {
    assert_usage_error(&["client", "--connections", "2", "--warmup", "1"]);
}

fn address_in_use_is_exit_1_with_named_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let output = run_cli(&["serve", "--listen", &addr.to_string()], CLI_TIMEOUT);
    output.assert_no_panic();
    assert_eq!(output.code(), Some(1), "{}", output.describe());
    let want = format!("127.0.0.1:{}: address already in use", addr.port());
    assert!(
        output.stderr.contains(&want),
        "stderr lacks {want:?}\n{}",
        output.describe()
    );
    drop(taken);
}

fn help(args: &[&str]) -> Output {
    let output = run_cli(args, CLI_TIMEOUT);
    output.assert_no_panic();
    assert_eq!(
        output.code(),
        Some(0),
        "`ringport {}`\n{}",
        args.join(" "),
        output.describe()
    );
    output
}

fn assert_mentions(output: &Output, what: &str, words: &[&str]) {
    let text = output.combined();
    let missing: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| !text.contains(w))
        .collect();
    assert!(
        missing.is_empty(),
        "{what} does not mention {missing:?}\n{}",
        output.describe()
    );
}

fn top_level_help_lists_subcommands() {
    let output = help(&["--help"]);
    assert_mentions(&output, "`ringport --help`", &["serve", "client"]);
}

fn bench_mode_help_lists_the_mode_options() {
    let output = help(&["bench", "--help"]);
    assert_mentions(
        &output,
        "`ringport bench --help`",
        &["models", "peers", "scaling"],
    );
    for mode in ["models", "peers", "scaling"] {
        let output = help(&["bench", mode, "--help"]);
        let what = format!("`ringport bench {mode} --help`");
        assert_mentions(&output, &what, &["--quick", "--cell-secs", "--server-cpus"]);
    }
    assert_usage_error(&["bench", "no-such-mode"]);
    assert_usage_error(&["bench", "peers", "--no-such-flag"]);
    assert_usage_error(&["bench", "peers", "--cell-secs", "0"]);
    assert_usage_error(&["bench", "peers", "--warmup-secs", "nan"]);
    // Too short for the load generator to measure: refused before anything starts.
    assert_usage_error_naming(&["bench", "peers", "--cell-secs", "1e-10"], "--cell-secs");
    // Scaling measures one cell: a list is refused rather than cut to its first value.
    assert_usage_error_naming(
        &["bench", "scaling", "--connections", "10,20"],
        "--connections",
    );
}

fn serve_help_lists_flags_and_default_port() {
    let output = help(&["serve", "--help"]);
    assert_mentions(
        &output,
        "`ringport serve --help`",
        &["--listen", "--workers", "--drain-timeout", "5150"],
    );
}

fn client_help_lists_flags_and_default_port() {
    let output = help(&["client", "--help"]);
    assert_mentions(
        &output,
        "`ringport client --help`",
        &[
            "--connect",
            "--count",
            "--connections",
            "--size",
            "--messages",
            "--duration",
            "--pipeline",
            "--json",
            "5150",
        ],
    );
}

fn version_prints_name_and_version() {
    let output = run_cli(&["--version"], CLI_TIMEOUT);
    assert_eq!(output.code(), Some(0), "{}", output.describe());
    assert_eq!(
        output.stdout.trim(),
        format!("ringport {}", env!("CARGO_PKG_VERSION")),
        "{}",
        output.describe()
    );
}

fn listening_line_reports_actual_port_without_colours() {
    let server = Server::start();
    assert_ne!(
        server.addr.port(),
        0,
        "reported port 0: {}",
        server.listening_line
    );
    assert!(
        server.addr.ip().is_loopback(),
        "reported {} for --listen 127.0.0.1:0",
        server.addr
    );
    assert!(
        !server.listening_line.contains('\u{1b}'),
        "ANSI escapes in the log although stderr is not a tty: {:?}",
        server.listening_line
    );
    // The reported address is the one that accepts connections.
    util::echo_exact(server.addr, b"ping");
}

fn serve_accepts_verbose_flags() {
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "-v", "-v"]);
    util::echo_exact(server.addr, b"verbose");
}

/// The latest `--stats` line's (open, accepted, echoed) once `want` accepts it, waiting at
/// most 10 s.
fn stats_until(server: &Server, want: impl Fn((u64, u64, u64)) -> bool) -> (u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        let err = util::strip_ansi(&server.stderr_so_far());
        if let Some(line) = err.lines().rev().find(|l| l.contains("stats: open ")) {
            let n = |prefix, suffix| util::number_between(line, prefix, suffix);
            let got = (
                n("open ", ",").expect("open"),
                n("accepted ", " (").expect("accepted"),
                n("echoed ", " bytes").expect("echoed"),
            );
            if want(got) {
                return got;
            }
            last = Some(line.to_string());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no --stats line as wanted within 10 s; the last: {last:?}");
}

fn stats_lines_count_connections_and_bytes_echoed() {
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--stats", "0.1"]);
    let mut s = util::connect(server.addr);
    util::round_trip(&mut s, &util::pattern(1, 1000));
    let (open, accepted, echoed) = stats_until(&server, |(open, _, _)| open == 1);
    assert_eq!((open, accepted), (1, 1));
    assert!(echoed <= 1000, "echoed {echoed} of 1000 bytes");
    let (_, _, echoed) = stats_until(&server, |(_, _, echoed)| echoed >= 1000);
    assert_eq!(echoed, 1000, "bytes echoed");
    drop(s);
    let (open, accepted, _) = stats_until(&server, |(open, _, _)| open == 0);
    assert_eq!(
        (open, accepted),
        (0, 1),
        "the closed connection is not open"
    );
    server.terminate_cleanly(Duration::from_secs(10));
}

fn serve_bad_stats_period_is_exit_2_naming_the_flag() {
    let args = ["serve", "--listen", "127.0.0.1:0", "--stats", "often"];
    assert_usage_error_naming(&args, "--stats");
    // A period so short the server would do nothing else.
    for flag in ["--stats", "--idle-timeout"] {
        let args = ["serve", "--listen", "127.0.0.1:0", flag, "1e-9"];
        assert_usage_error_naming(&args, flag);
        // Shorter than a nanosecond: not read as 0, which is "off".
        let args = ["serve", "--listen", "127.0.0.1:0", flag, "1e-10"];
        assert_usage_error_naming(&args, flag);
    }
}

/// The UDP rates mean nothing without `--udp`: refused rather than ignored.
fn serve_udp_rates_need_udp() {
    for flag in ["--udp-rate", "--udp-rate-total"] {
        let args = ["serve", "--listen", "127.0.0.1:0", flag, "10"];
        assert_usage_error_naming(&args, "--udp");
    }
}

/// Receives end at `--conn-buffer` by default; `--strict-conn-buffer`, from when they did not,
/// is still accepted, and cannot be given with `--no-strict-conn-buffer`.
fn serve_conn_buffer_limit_flags() {
    for flag in ["--strict-conn-buffer", "--no-strict-conn-buffer"] {
        let server = Server::start_with(&["--listen", "127.0.0.1:0", flag]);
        util::echo_exact(server.addr, b"served");
        server.terminate_cleanly(Duration::from_secs(10));
    }
    assert_usage_error(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--strict-conn-buffer",
        "--no-strict-conn-buffer",
    ]);
    // No room at all is not a limit it can keep (any other value is held to one pool buffer
    // at least, an eighth of the pool at most, as logged).
    assert_usage_error_naming(
        &["serve", "--listen", "127.0.0.1:0", "--conn-buffer", "0"],
        "--conn-buffer",
    );
}

per_backend!(
    serve_conn_buffer_limit_flags,
    stats_lines_count_connections_and_bytes_echoed,
    serve_bad_stats_period_is_exit_2_naming_the_flag,
    serve_udp_rates_need_udp,
    serve_unparsable_listen_address_is_exit_2,
    serve_listen_address_without_port_is_exit_2,
    serve_listen_host_name_is_exit_2_saying_so,
    serve_non_numeric_workers_is_exit_2,
    serve_zero_workers_is_exit_2,
    serve_pool_size_out_of_range_is_exit_2_naming_the_flag,
    serve_pool_working_set_out_of_range_is_exit_2_naming_the_flag,
    serve_keepalive_out_of_range_is_exit_2_naming_the_flag,
    serve_non_numeric_drain_timeout_is_exit_2,
    serve_unknown_flag_is_exit_2,
    unknown_top_level_flag_is_exit_2,
    client_unknown_flag_is_exit_2,
    client_unparsable_connect_address_is_exit_2,
    client_warmup_without_duration_is_exit_2,
    client_more_in_flight_than_memory_is_refused,
    client_size_times_pipeline_over_1_gib_is_exit_2,
    flags_the_mode_would_ignore_are_exit_2_naming_them,
    client_book_run_that_checks_nothing_is_exit_2,
    negative_numbers_are_exit_2_naming_the_flag,
    client_backend_flag_means_load_mode,
    bench_only_naming_no_server_is_exit_2,
    address_in_use_is_exit_1_with_named_error,
    top_level_help_lists_subcommands,
    bench_mode_help_lists_the_mode_options,
    serve_help_lists_flags_and_default_port,
    client_help_lists_flags_and_default_port,
    version_prints_name_and_version,
    listening_line_reports_actual_port_without_colours,
    serve_accepts_verbose_flags,
);

/// `ringport bench peers ... 2>&1 | head` where the reader has gone before the harness reports
/// an error: the report is lost, but the exit status still says what happened (2, a harness
/// error), not a panic (101).
#[test]
fn bench_error_with_its_output_readers_gone_is_exit_2() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::process::{Command, Stdio};

    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`, which has room for both.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and nothing else owns them.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let mut child = Command::new(util::BIN)
        // No such CPU: the harness fails before it starts anything.
        .args(["bench", "peers", "--quick", "--server-cpus", "100000"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(write.try_clone().expect("dup the pipe")))
        .stderr(Stdio::from(write))
        .spawn()
        .expect("run ringport bench");
    let guard = std::time::Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait on ringport bench") {
            break status;
        }
        if std::time::Instant::now() >= guard {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ringport bench did not exit within {CLI_TIMEOUT:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(2), "{status}");
}

/// The harness starts the servers at their default log level whatever `RUST_LOG` says (at
/// `warn`, `ringport serve` would not say where it listens, and the harness would wait for
/// that), and a chart this run does not draw is not left from an earlier run beside its report.
#[test]
fn bench_runs_under_any_rust_log_and_leaves_no_stale_chart() {
    let out = std::env::temp_dir().join(format!("ringport-bench-rust-log-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let stale = out.join("peers-msgs.svg");
    std::fs::write(&stale, "<svg>an earlier run's</svg>").unwrap();
    let out_arg = out.to_string_lossy().into_owned();
    let output = util::run_cli_configured(
        &[
            "bench",
            "peers",
            "--quick",
            "--only",
            "ringport-epoll",
            "--connections",
            "2",
            "--sizes",
            "64",
            "--pipelines",
            "1",
            "--idle",
            "0",
            "--no-bulk",
            "--cell-secs",
            "0.3",
            "--warmup-secs",
            "0.05",
            "--out",
            &out_arg,
        ],
        Duration::from_secs(60),
        |cmd| {
            cmd.env("RUST_LOG", "warn");
        },
    );
    let report = std::fs::read_to_string(out.join("peers.md")).unwrap_or_default();
    let stale_left = stale.exists();
    let _ = std::fs::remove_dir_all(&out);
    output.assert_no_panic();
    assert_eq!(output.code(), Some(0), "{}\n{report}", output.describe());
    assert!(
        report.contains("| 2c 64B p1 | ringport-epoll |"),
        "{report}"
    );
    assert!(!stale_left, "an earlier run's chart was left in --out");
}
