//! Backend choice and fallback: where io_uring is refused (the fault hook, or a real seccomp
//! filter), `--backend auto` runs on epoll and says why, and `--backend uring` exits 1 naming the
//! problem; an unknown backend is a usage error.
//!
//! Backend-specific by nature, so these tests are not run once per backend.

mod util;

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use util::{echo_exact, json_report, pattern, run_cli, run_cli_configured, Server, CLI_TIMEOUT};

/// The environment variable that makes the io_uring probe fail as if refused.
const FAULT_ENV: &str = "RINGPORT_FAULT_URING_SETUP";
/// Hang guard for the exit after SIGTERM (default drain timeout plus margin).
const EXIT_GUARD: Duration = Duration::from_secs(15);

/// `--backend auto` on a system that refuses io_uring (as `configure` arranges): it must warn
/// why, listen on epoll, and echo.
fn auto_falls_back_to_epoll(what: &str, configure: impl FnOnce(&mut Command)) {
    let server =
        Server::start_configured(&["--listen", "127.0.0.1:0", "--backend", "auto"], configure);
    assert!(
        util::strip_ansi(&server.listening_line).contains("backend=epoll"),
        "{what}: --backend auto did not fall back to epoll: {}",
        server.listening_line
    );
    let stderr = util::strip_ansi(&server.stderr_so_far());
    let warning = stderr
        .lines()
        .find(|l| l.contains("io_uring is not available"))
        .unwrap_or_else(|| panic!("{what}: no `io_uring is not available` warning\n{stderr}"));
    assert!(
        warning.contains("WARN") && warning.contains("using the epoll backend"),
        "{what}: the fallback warning does not say what happens instead: {warning}"
    );
    println!("{what}: {warning}");
    echo_exact(server.addr, &pattern(1, 256 * 1024));
    server.terminate_cleanly(EXIT_GUARD);
}

/// `--backend uring` on a system that refuses io_uring: exit 1, naming the problem and the way out.
fn uring_refused_exits_1(what: &str, configure: impl FnOnce(&mut Command)) {
    let output = run_cli_configured(
        &["serve", "--listen", "127.0.0.1:0", "--backend", "uring"],
        CLI_TIMEOUT,
        configure,
    );
    output.assert_no_panic();
    assert_eq!(output.code(), Some(1), "{what}\n{}", output.describe());
    let stderr = util::strip_ansi(&output.stderr);
    assert!(
        stderr.contains("io_uring is not available") && stderr.contains("--backend epoll"),
        "{what}: the error does not name the problem and the way out\n{}",
        output.describe()
    );
    assert!(
        !stderr.contains("listening on"),
        "{what}: listened although io_uring was refused\n{}",
        output.describe()
    );
}

#[test]
fn fault_hook_auto_falls_back_to_epoll() {
    for errno in ["EPERM", "ENOSYS", "ENOMEM"] {
        auto_falls_back_to_epoll(&format!("{FAULT_ENV}={errno}"), |cmd| {
            cmd.env(FAULT_ENV, errno);
        });
    }
}

#[test]
fn fault_hook_uring_exits_1() {
    for errno in ["EPERM", "ENOSYS", "ENOMEM"] {
        uring_refused_exits_1(&format!("{FAULT_ENV}={errno}"), |cmd| {
            cmd.env(FAULT_ENV, errno);
        });
    }
}

#[test]
fn fault_hook_client_load_mode_reports_epoll() {
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--backend", "epoll"]);
    let addr = server.addr.to_string();
    let output = run_cli_configured(
        &[
            "client",
            "--connect",
            &addr,
            "--backend",
            "auto",
            "--connections",
            "2",
            "--messages",
            "50",
            "--json",
        ],
        CLI_TIMEOUT,
        |cmd| {
            cmd.env(FAULT_ENV, "EPERM");
        },
    );
    output.assert_no_panic();
    assert_eq!(output.code(), Some(0), "{}", output.describe());
    let report = json_report(&output);
    assert_eq!(
        report.get("backend"),
        Some(&util::Json::Str("epoll".into())),
        "client report: {report:?}"
    );
    assert_eq!(report.get("ok").and_then(util::Json::as_bool), Some(true));
    server.terminate_cleanly(EXIT_GUARD);
}

/// `AUDIT_ARCH_X86_64` from `<linux/audit.h>` (not in the libc crate).
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// `io_uring_setup(2)` on x86_64.
#[cfg(target_arch = "x86_64")]
const SYS_IO_URING_SETUP: u32 = 425;

/// A classic BPF seccomp program: on x86_64, `io_uring_setup` fails with `EPERM` (as under
/// Docker's default profile); every other system call is allowed.
#[cfg(target_arch = "x86_64")]
fn deny_io_uring_filter() -> [libc::sock_filter; 6] {
    fn stmt(code: u32, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        }
    }
    fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        }
    }
    // Offsets into `struct seccomp_data { int nr; __u32 arch; ... }`.
    let nr = std::mem::offset_of!(libc::seccomp_data, nr) as u32;
    let arch = std::mem::offset_of!(libc::seccomp_data, arch) as u32;
    [
        // Another ABI's numbers mean other calls: allow them.
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, arch),
        jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            AUDIT_ARCH_X86_64,
            0,
            3,
        ),
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, nr),
        jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            SYS_IO_URING_SETUP,
            0,
            1,
        ),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Makes the child refuse io_uring the way a container's seccomp profile does.
#[cfg(target_arch = "x86_64")]
fn with_seccomp(cmd: &mut Command) {
    let filter = deny_io_uring_filter();
    // SAFETY: the hook runs in the forked child before exec and only makes two prctl(2) calls
    // (async-signal-safe), allocating nothing. `prog` points at `filter`, which the closure owns
    // and which therefore lives (in the child's copy of our memory) for both calls; the kernel
    // copies the program during the second call.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            // Needed to install a filter without CAP_SYS_ADMIN; inherited across exec.
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn seccomp_refusal_auto_runs_on_epoll() {
    #[cfg(target_arch = "x86_64")]
    auto_falls_back_to_epoll("seccomp denies io_uring_setup", with_seccomp);
    #[cfg(not(target_arch = "x86_64"))]
    println!(
        "SKIPPED seccomp_refusal_auto_runs_on_epoll: the filter is written for x86_64's \
         system call numbers"
    );
}

#[test]
fn seccomp_refusal_uring_exits_1() {
    #[cfg(target_arch = "x86_64")]
    uring_refused_exits_1("seccomp denies io_uring_setup", with_seccomp);
    #[cfg(not(target_arch = "x86_64"))]
    println!(
        "SKIPPED seccomp_refusal_uring_exits_1: the filter is written for x86_64's system call \
         numbers"
    );
}

#[test]
fn auto_uses_io_uring_where_it_is_available() {
    let uring = match Server::try_start_with(&["--listen", "127.0.0.1:0", "--backend", "uring"]) {
        Ok(server) => server,
        // Skipped only where the kernel refuses io_uring (never under
        // RINGPORT_TEST_URING=require): any other failure to start is a failure.
        Err(output) if util::uring_refused().is_some() => {
            println!(
                "SKIPPED auto_uses_io_uring_where_it_is_available: io_uring is refused on this \
                 machine\n{}",
                output.describe()
            );
            return;
        }
        Err(output) => panic!(
            "ringport serve --backend uring did not start\n{}",
            output.describe()
        ),
    };
    drop(uring);
    let server = Server::start_with(&["--listen", "127.0.0.1:0", "--backend", "auto"]);
    assert!(
        util::strip_ansi(&server.listening_line).contains("backend=io_uring"),
        "--backend auto did not pick io_uring where it works: {}",
        server.listening_line
    );
    assert!(
        !server.stderr_so_far().contains("not available"),
        "a fallback warning although io_uring works\n{}",
        server.stderr_so_far()
    );
    server.terminate_cleanly(EXIT_GUARD);
}

#[test]
fn unknown_backend_is_a_usage_error() {
    let output = run_cli(
        &["serve", "--listen", "127.0.0.1:0", "--backend", "bogus"],
        CLI_TIMEOUT,
    );
    output.assert_no_panic();
    assert_eq!(output.code(), Some(2), "{}", output.describe());
    assert!(
        output.stderr.contains("bogus"),
        "the error does not name the bad value\n{}",
        output.describe()
    );
    // The same through the environment variable.
    let output = run_cli_configured(&["serve", "--listen", "127.0.0.1:0"], CLI_TIMEOUT, |cmd| {
        cmd.env("RINGPORT_BACKEND", "bogus");
    });
    output.assert_no_panic();
    assert_eq!(output.code(), Some(2), "{}", output.describe());
    assert!(
        output.stderr.contains("RINGPORT_BACKEND=bogus"),
        "the error does not say the value came from the environment\n{}",
        output.describe()
    );
}

/// `RINGPORT_BACKEND` is read only where a backend is used: set but empty, it is as if unset
/// (`auto`); the chapter's other models do not read it, nor does the book's client.
#[test]
fn the_backend_variable_is_read_only_where_a_backend_is_used() {
    let server = Server::start_configured(&["--listen", "127.0.0.1:0"], |cmd| {
        cmd.env("RINGPORT_BACKEND", "");
    });
    echo_exact(server.addr, b"empty is unset");
    server.terminate_cleanly(EXIT_GUARD);
    let server = Server::start_configured(&["--listen", "127.0.0.1:0", "--model", "poll"], |cmd| {
        cmd.env("RINGPORT_BACKEND", "bogus");
    });
    echo_exact(server.addr, b"not read by the poll model");
    let addr = server.addr.to_string();
    let book = run_cli_configured(
        &["client", "--connect", &addr, "--count", "2"],
        CLI_TIMEOUT,
        |cmd| {
            cmd.env("RINGPORT_BACKEND", "bogus");
        },
    );
    book.assert_no_panic();
    assert_eq!(
        book.code(),
        Some(0),
        "the book's client\n{}",
        book.describe()
    );
    let load = run_cli_configured(
        &["client", "--connect", &addr, "--messages", "2"],
        CLI_TIMEOUT,
        |cmd| {
            cmd.env("RINGPORT_BACKEND", "bogus");
        },
    );
    assert_eq!(
        load.code(),
        Some(2),
        "the load generator\n{}",
        load.describe()
    );
    assert!(
        load.stderr.contains("RINGPORT_BACKEND=bogus"),
        "{}",
        load.describe()
    );
    server.terminate_cleanly(EXIT_GUARD);
}
