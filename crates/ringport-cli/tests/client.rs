//! `ringport client`: book mode, load mode with `--json`, and named errors against bad servers.

mod util;

use std::time::Duration;

use util::{
    json_num, json_report, number_between, run_cli, unused_port, BadServer, Json, Output, Running,
    Server, BOOK_MESSAGE, CLI_TIMEOUT, JSON_KEYS,
};

/// Hang guard for load runs (they take well under a second when things work).
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Stops `server` with SIGTERM and returns its `(served, echoed)` summary.
fn stop_and_summarize(server: Server) -> (u64, u64, Output) {
    server.signal(libc::SIGTERM);
    let output = server.wait_exit(Duration::from_secs(15));
    output.assert_no_panic();
    assert_eq!(output.code(), Some(0), "server exit\n{}", output.describe());
    let served = number_between(&output.stdout, "served ", " connections")
        .unwrap_or_else(|| panic!("no `served N connections`\n{}", output.describe()));
    let echoed = number_between(&output.stdout, "echoed ", " bytes")
        .unwrap_or_else(|| panic!("no `echoed B bytes`\n{}", output.describe()));
    (served, echoed, output)
}

fn count_lines(text: &str, line: &str) -> usize {
    text.lines().filter(|l| l.trim_end() == line).count()
}

/// The client's window marks (`--mark-window`) on stderr: one open, then one closed.
fn assert_window_marked(output: &Output) {
    let open = "ringport client: window open";
    let closed = "ringport client: window closed";
    let marks: Vec<&str> = output
        .stderr
        .lines()
        .map(str::trim_end)
        .filter(|l| *l == open || *l == closed)
        .collect();
    assert_eq!(marks, [open, closed], "window marks\n{}", output.describe());
}

fn assert_book_run(output: &Output, count: usize) {
    output.assert_no_panic();
    assert_eq!(output.code(), Some(0), "{}", output.describe());
    let sent = format!("Sent 26 bytes: '{BOOK_MESSAGE}'");
    let received = format!("Received 26 bytes: '{BOOK_MESSAGE}'");
    assert_eq!(
        count_lines(&output.stdout, &sent),
        count,
        "lines {sent:?} on stdout\n{}",
        output.describe()
    );
    assert_eq!(
        count_lines(&output.stdout, &received),
        count,
        "lines {received:?} on stdout\n{}",
        output.describe()
    );
}

fn book_mode_sends_and_receives_20_messages() {
    let server = Server::start();
    let addr = server.addr.to_string();
    let output = run_cli(&["client", "--connect", &addr], CLI_TIMEOUT);
    assert_book_run(&output, 20);
    let (served, echoed, summary) = stop_and_summarize(server);
    assert_eq!(
        (served, echoed),
        (1, 20 * 26),
        "server summary after one book client\n{}",
        summary.describe()
    );
}

/// `--connect` takes a host name: `localhost` (from the hosts file, no DNS) reaches the server
/// on 127.0.0.1 even where the name also has the IPv6 loopback, which nothing listens on.
fn book_mode_connects_to_a_host_name() {
    let server = Server::start();
    let addr = format!("localhost:{}", server.addr.port());
    let output = run_cli(&["client", "--connect", &addr, "--count", "2"], CLI_TIMEOUT);
    assert_book_run(&output, 2);
}

fn book_mode_honours_count() {
    let server = Server::start();
    let addr = server.addr.to_string();
    let output = run_cli(&["client", "--connect", &addr, "--count", "3"], CLI_TIMEOUT);
    assert_book_run(&output, 3);
}

fn assert_report_shape(report: &Json, output: &Output) {
    let missing: Vec<&str> = JSON_KEYS
        .iter()
        .copied()
        .filter(|k| report.get(k).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "JSON report lacks {missing:?}\n{}",
        output.describe()
    );
    assert!(
        matches!(report.get("errors"), Some(Json::Obj(_))),
        "\"errors\" is not an object\n{}",
        output.describe()
    );
    assert!(
        report.get("ok").and_then(Json::as_bool).is_some(),
        "\"ok\" is not a boolean\n{}",
        output.describe()
    );
}

fn load_mode_json_reports_every_message_verified() {
    let server = Server::start();
    let addr = server.addr.to_string();
    let output = run_cli(
        &[
            "client",
            "--connect",
            &addr,
            "--connections",
            "50",
            "--size",
            "512",
            "--messages",
            "200",
            "--pipeline",
            "4",
            "--json",
            "--mark-window",
        ],
        LOAD_TIMEOUT,
    );
    output.assert_no_panic();
    assert_eq!(output.code(), Some(0), "{}", output.describe());
    assert_window_marked(&output);
    let report = json_report(&output);
    assert_report_shape(&report, &output);
    let d = output.describe();
    assert_eq!(report.get("ok"), Some(&Json::Bool(true)), "{d}");
    assert_eq!(json_num(&report, "connections"), 50.0, "{d}");
    assert_eq!(json_num(&report, "messages"), (50 * 200) as f64, "{d}");
    // With a message count, every echo falls inside the window.
    assert_eq!(
        json_num(&report, "verified_bytes"),
        json_num(&report, "bytes"),
        "{d}"
    );
    assert_eq!(json_num(&report, "mismatches"), 0.0, "{d}");
    assert_eq!(json_num(&report, "error_total"), 0.0, "{d}");
    assert!(
        json_num(&report, "bytes") >= (50 * 200 * 512) as f64,
        "bytes below messages * size\n{d}"
    );
    assert!(
        json_num(&report, "p50_us") <= json_num(&report, "p99_us")
            && json_num(&report, "p99_us") <= json_num(&report, "p999_us")
            && json_num(&report, "p999_us") <= json_num(&report, "max_us"),
        "latency percentiles out of order\n{d}"
    );

    let (served, echoed, summary) = stop_and_summarize(server);
    assert_eq!(
        (served, echoed),
        (50, 50 * 200 * 512),
        "server summary after the load run\n{}",
        summary.describe()
    );
}

fn load_mode_duration_is_bounded() {
    let server = Server::start();
    let addr = server.addr.to_string();
    // A 1.25 s run. The client gives the last echoes and the server's close 10 s after the
    // deadline at most, so a run past 20 s did not stop at its duration (a guard far from any
    // scheduling delay, not a timing measurement).
    let output = run_cli(
        &[
            "client",
            "--connect",
            &addr,
            "--connections",
            "4",
            "--size",
            "256",
            "--duration",
            "1",
            "--warmup",
            "0.25",
            "--json",
            "--mark-window",
        ],
        Duration::from_secs(20),
    );
    output.assert_no_panic();
    assert_eq!(output.code(), Some(0), "{}", output.describe());
    assert_window_marked(&output);
    let report = json_report(&output);
    assert_report_shape(&report, &output);
    let d = output.describe();
    assert_eq!(report.get("ok"), Some(&Json::Bool(true)), "{d}");
    assert!(
        json_num(&report, "messages") > 0.0,
        "no messages in 1 s\n{d}"
    );
    // The window is the duration itself: opening the connections and the warm-up come before
    // it, and the echoes drained after the deadline are verified but not counted.
    assert!(
        (json_num(&report, "elapsed_s") - 1.0).abs() < 0.002,
        "the measured window is not the 1 s duration\n{d}"
    );
    assert!(
        (json_num(&report, "warmup_s") - 0.25).abs() < 0.002,
        "the warm-up is not the 0.25 s asked for\n{d}"
    );
    // The warm-up's echoes are verified, not counted.
    assert!(
        json_num(&report, "verified_bytes") > json_num(&report, "bytes"),
        "the warm-up's echoes were counted (or none came back)\n{d}"
    );
    assert_eq!(json_num(&report, "mismatches"), 0.0, "{d}");
    assert_eq!(json_num(&report, "connections"), 4.0, "{d}");
}

fn book_mode_names_connection_refused() {
    let (addr, _held) = unused_port();
    let addr = addr.to_string();
    let output = run_cli(&["client", "--connect", &addr], CLI_TIMEOUT);
    output.assert_no_panic();
    assert_ne!(output.code(), Some(0), "{}", output.describe());
    assert!(
        output.combined().contains("connection refused"),
        "output does not name \"connection refused\"\n{}",
        output.describe()
    );
}

fn load_mode_names_connection_refused() {
    let (addr, _held) = unused_port();
    let addr = addr.to_string();
    let output = run_cli(
        &[
            "client",
            "--connect",
            &addr,
            "--connections",
            "2",
            "--messages",
            "5",
            "--json",
        ],
        LOAD_TIMEOUT,
    );
    output.assert_no_panic();
    assert_ne!(output.code(), Some(0), "{}", output.describe());
    assert!(
        output.combined().contains("connection refused"),
        "output does not name \"connection refused\"\n{}",
        output.describe()
    );
    let report = json_report(&output);
    assert_eq!(
        report.get("server"),
        Some(&Json::Str(addr.clone())),
        "the report does not name the server\n{}",
        output.describe()
    );
}

fn book_mode_against_resetting_server_fails_and_names_the_reset() {
    let bad = BadServer::resetting();
    let addr = bad.addr.to_string();
    let output = run_cli(&["client", "--connect", &addr], CLI_TIMEOUT);
    output.assert_no_panic();
    assert_ne!(output.code(), Some(0), "{}", output.describe());
    assert!(
        output
            .combined()
            .contains("connection reset by peer (ECONNRESET)"),
        "output does not name the reset\n{}",
        output.describe()
    );
}

fn load_mode_counts_resets() {
    let bad = BadServer::resetting();
    let addr = bad.addr.to_string();
    let output = run_load_json(
        &addr,
        &[
            "--connections",
            "2",
            "--size",
            "64",
            "--messages",
            "10",
            "--pipeline",
            "1",
        ],
    );
    assert_ne!(output.code(), Some(0), "{}", output.describe());
    assert!(
        output
            .combined()
            .contains("connection reset by peer (ECONNRESET)"),
        "output does not name the reset\n{}",
        output.describe()
    );
    let report = json_report(&output);
    assert_report_shape(&report, &output);
    let d = output.describe();
    assert_eq!(report.get("ok"), Some(&Json::Bool(false)), "{d}");
    assert!(
        json_num(&report, "error_total") >= 1.0,
        "no errors counted\n{d}"
    );
    let counted = errors_named(&report, "");
    assert_eq!(
        counted,
        json_num(&report, "error_total"),
        "\"errors\" counts do not add up to \"error_total\"\n{d}"
    );
}

fn load_mode_detects_corrupted_echo() {
    let bad = BadServer::corrupting();
    let addr = bad.addr.to_string();
    let output = run_load_json(
        &addr,
        &[
            "--connections",
            "1",
            "--size",
            "512",
            "--messages",
            "10",
            "--pipeline",
            "1",
        ],
    );
    assert_ne!(output.code(), Some(0), "{}", output.describe());
    let report = json_report(&output);
    assert_report_shape(&report, &output);
    let d = output.describe();
    assert!(
        json_num(&report, "mismatches") > 0.0,
        "no mismatch counted\n{d}"
    );
    assert_eq!(report.get("ok"), Some(&Json::Bool(false)), "{d}");

    // Sixteen 16-byte messages in flight, echoed together: the six before the flipped byte
    // (offset 100) came back right, and count, however the reads fell.
    let output = run_load_json(
        &addr,
        &[
            "--connections",
            "1",
            "--size",
            "16",
            "--messages",
            "32",
            "--pipeline",
            "16",
        ],
    );
    let report = json_report(&output);
    let d = output.describe();
    assert_eq!(json_num(&report, "mismatches"), 1.0, "{d}");
    assert_eq!(
        (
            json_num(&report, "messages"),
            json_num(&report, "verified_bytes")
        ),
        (6.0, 100.0),
        "the echoes before the wrong byte\n{d}"
    );
}

/// Bytes the server sends once every echo is back are counted as a mismatch, in both of the
/// load generator's modes, and named.
fn load_mode_detects_bytes_after_the_last_echo() {
    let bad = BadServer::talking_after_close();
    let addr = bad.addr.to_string();
    for until in [["--messages", "5"], ["--duration", "0.3"]] {
        let mut args = vec![
            "client",
            "--connect",
            &addr,
            "--connections",
            "2",
            "--size",
            "64",
            "--workers",
            "1",
        ];
        args.extend(until);
        let output = run_cli(&args, LOAD_TIMEOUT);
        output.assert_no_panic();
        let d = output.describe();
        assert_ne!(output.code(), Some(0), "{d}");
        assert!(output.stdout.contains("mismatched:  2 connections"), "{d}");
        assert!(
            output
                .stdout
                .contains("more bytes came back than were sent"),
            "{d}"
        );
    }
}

/// A server that trickles its echo never lets the stall limit fire: `--timeout` ends the run
/// anyway, counting each unfinished connection as an error that names it.
fn load_mode_gives_up_at_the_overall_limit() {
    let bad = BadServer::trickling();
    let addr = bad.addr.to_string();
    // Without the limit: 2 x 3 messages of 64 bytes at 20 ms a byte, 3.8 s per connection.
    let output = run_load_json(
        &addr,
        &[
            "--connections",
            "2",
            "--size",
            "64",
            "--messages",
            "3",
            "--timeout",
            "0.5",
        ],
    );
    let d = output.describe();
    assert_ne!(output.code(), Some(0), "{d}");
    let report = json_report(&output);
    assert_report_shape(&report, &output);
    assert_eq!(errors_named(&report, "--timeout 0.5 s passed"), 2.0, "{d}");
}

/// A server slower than the whole window echoes nothing within it: the run fails, saying so,
/// even though the echoes that came after the deadline were checked.
fn load_mode_that_measures_nothing_fails() {
    let bad = BadServer::trickling();
    let addr = bad.addr.to_string();
    // One 16-byte message, echoed at 20 ms a byte: 0.32 s, past the 0.1 s window.
    let output = run_load_json(
        &addr,
        &["--connections", "1", "--size", "16", "--duration", "0.1"],
    );
    assert_fails_once_naming(&output, "nothing measured: no message was echoed");
}

/// A window too short for any connection to send checks nothing: the run fails, saying so,
/// rather than reporting a clean run of no messages.
fn load_mode_that_checks_nothing_fails() {
    let server = Server::start();
    let addr = server.addr.to_string();
    let output = run_load_json(&addr, &["--connections", "2", "--duration", "1e-9"]);
    assert_fails_once_naming(&output, "nothing checked: --duration");
}

/// The run failed (exit status 1, `ok` false) with one error whose kind contains `needle`.
fn assert_fails_once_naming(output: &Output, needle: &str) {
    let d = output.describe();
    assert_eq!(output.code(), Some(1), "{d}");
    let report = json_report(output);
    assert_report_shape(&report, output);
    assert_eq!(report.get("ok"), Some(&Json::Bool(false)), "{d}");
    assert_eq!(errors_named(&report, needle), 1.0, "{d}");
}

/// Runs `ringport client --connect addr ARGS --json` (checked not to panic).
fn run_load_json(addr: &str, args: &[&str]) -> Output {
    let mut all = vec!["client", "--connect", addr];
    all.extend_from_slice(args);
    all.push("--json");
    let output = run_cli(&all, LOAD_TIMEOUT);
    output.assert_no_panic();
    output
}

/// The errors a JSON report counts under kinds containing `needle` (all of them for "").
fn errors_named(report: &Json, needle: &str) -> f64 {
    let Some(Json::Obj(kinds)) = report.get("errors") else {
        panic!("the report has no \"errors\" object: {report:?}")
    };
    kinds
        .iter()
        .filter(|(k, _)| k.contains(needle))
        .filter_map(|(_, v)| v.as_f64())
        .sum()
}

/// A stop signal (SIGINT, SIGTERM) ends a load run early: the window closes then, the echoes
/// in flight are checked, the report covers what was measured, and the exit status (128 + the
/// signal) says the run was cut short. Both in a duration's window and with a message count.
fn load_mode_stops_early_on_a_signal_with_its_report() {
    let server = Server::start();
    let addr = server.addr.to_string();
    for (sig, until) in [
        (libc::SIGINT, ["--duration", "30", "--warmup", "0.2"]),
        (
            libc::SIGTERM,
            ["--messages", "100000000", "--warmup", "0.2"],
        ),
    ] {
        let output = signal_once_the_load_runs(load_run(&addr, &until), sig);
        let d = output.describe();
        assert_eq!(output.code(), Some(128 + sig), "{d}");
        assert!(output.stderr.contains("the load ended early"), "{d}");
        assert_window_marked(&output);
        let report = json_report(&output);
        assert_eq!(report.get("ok"), Some(&Json::Bool(true)), "{d}");
        assert!(json_num(&report, "messages") > 0.0, "{d}");
        assert_eq!(json_num(&report, "mismatches"), 0.0, "{d}");
        assert_eq!(json_num(&report, "error_total"), 0.0, "{d}");
    }
    server.terminate_cleanly(Duration::from_secs(15));
}

/// A stop signal during the warm-up ends the run with nothing measured, and says that the
/// signal is why (not the window).
fn load_mode_stopped_in_its_warm_up_says_so() {
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "-v"]);
    let addr = server.addr.to_string();
    let client = load_run(&addr, &["--warmup", "30", "--duration", "1"]);
    // Every connection open: the client is in its warm-up (or about to start it).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.stderr_so_far().matches(" connected").count() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the client's connections were not all accepted\n{}",
            server.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = signal_and_wait(client, libc::SIGINT);
    let d = output.describe();
    assert_eq!(output.code(), Some(1), "{d}");
    assert!(
        output
            .combined()
            .contains("signal 2 ended the load before any echo counted"),
        "{d}"
    );
    let report = json_report(&output);
    assert_eq!(report.get("ok"), Some(&Json::Bool(false)), "{d}");
    server.terminate_cleanly(Duration::from_secs(15));
}

/// A message count cut short by a signal gives what is in flight 10 s to come back, as a
/// duration's deadline does: a server that keeps the echo trickling in (never silent for the
/// 30 s stall limit) does not hold the client after the signal.
fn load_mode_stopped_gives_the_echo_in_flight_10_s() {
    let bad = BadServer::trickling();
    let addr = bad.addr.to_string();
    // 64 x 64 bytes in flight on each connection: 82 s at 20 ms a byte.
    let client = load_run(&addr, &["--messages", "100000", "--pipeline", "64"]);
    let output = signal_once_the_load_runs(client, libc::SIGINT);
    let d = output.describe();
    assert_eq!(output.code(), Some(1), "{d}");
    let report = json_report(&output);
    assert_eq!(
        errors_named(&report, "not finished 10 s after the stop signal"),
        4.0,
        "{d}"
    );
}

/// A report that cannot be written (here to `/dev/full`) is an error naming the output and
/// why, not a run that exits 0 with its result lost; so is the server's exit summary.
fn a_report_that_cannot_be_written_fails_the_run() {
    let full = || std::fs::File::create("/dev/full").expect("/dev/full");
    let server = Server::start_configured(&["--listen", "127.0.0.1:0"], |cmd| {
        cmd.stdout(full());
    });
    let addr = server.addr.to_string();
    for report in [&["--json"][..], &[]] {
        let mut args = vec!["client", "--connect", &addr, "--messages", "5"];
        args.extend_from_slice(report);
        let output = util::run_cli_configured(&args, LOAD_TIMEOUT, |cmd| {
            cmd.stdout(full());
        });
        assert_output_lost(&output);
    }
    server.signal(libc::SIGTERM);
    assert_output_lost(&server.wait_exit(Duration::from_secs(15)));
}

/// A run whose output could not be written (to `/dev/full`): exit 1, saying why.
fn assert_output_lost(output: &Output) {
    output.assert_no_panic();
    assert_eq!(output.code(), Some(1), "{}", output.describe());
    assert!(
        output
            .stderr
            .contains("writing output: no space left on device (ENOSPC)"),
        "{}",
        output.describe()
    );
}

/// `ringport client` against `addr` with 4 connections of 64 bytes, `--json --mark-window` and
/// `more`, running (to be stopped by a signal).
fn load_run(addr: &str, more: &[&str]) -> Running {
    let mut args = vec![
        "client",
        "--connect",
        addr,
        "--connections",
        "4",
        "--size",
        "64",
    ];
    args.extend_from_slice(&["--json", "--mark-window"]);
    args.extend_from_slice(more);
    Running::spawn(&args)
}

/// Sends `sig` to `client` 300 ms after its window opened (with `--messages`, once the load
/// started), and collects how it ended.
fn signal_once_the_load_runs(client: Running, sig: libc::c_int) -> Output {
    assert!(
        client.wait_for_stderr("window open", Duration::from_secs(20)),
        "the load did not start\n{}",
        client.stderr_so_far()
    );
    std::thread::sleep(Duration::from_millis(300));
    signal_and_wait(client, sig)
}

/// Sends `sig` to `client` and collects how it ended (killed should it not within 20 s).
fn signal_and_wait(client: Running, sig: libc::c_int) -> Output {
    client.signal(sig);
    let output = client.wait_exit(Duration::from_secs(20));
    output.assert_no_panic();
    output
}

per_backend!(
    load_mode_that_checks_nothing_fails,
    load_mode_that_measures_nothing_fails,
    load_mode_gives_up_at_the_overall_limit,
    load_mode_detects_bytes_after_the_last_echo,
    book_mode_sends_and_receives_20_messages,
    book_mode_honours_count,
    book_mode_connects_to_a_host_name,
    load_mode_json_reports_every_message_verified,
    load_mode_duration_is_bounded,
    book_mode_names_connection_refused,
    load_mode_names_connection_refused,
    book_mode_against_resetting_server_fails_and_names_the_reset,
    load_mode_counts_resets,
    load_mode_detects_corrupted_echo,
    load_mode_stops_early_on_a_signal_with_its_report,
    load_mode_stopped_in_its_warm_up_says_so,
    load_mode_stopped_gives_the_echo_in_flight_10_s,
    a_report_that_cannot_be_written_fails_the_run,
);
