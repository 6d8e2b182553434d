//! `ringport_bench`: compares echo servers that run as separate processes, driven by
//! `ringport client` (the verifying load generator) as another process.
//!
//! Every figure of a report is measured in the same run, on the same machine, and reported
//! next to ratios against the best peer of that run: the harness makes no claim about absolute
//! numbers, and it never asserts timings.
//!
//! | mode | servers | what varies |
//! |---|---|---|
//! | [`peers_main`] | `ringport serve` (io_uring, epoll), tokio, monoio, compio | connections x message size x pipeline depth; idle connections; bulk streaming |
//! | [`models_main`] | `ringport serve --model X` for six I/O models, and the completion port | connections x size x pipeline; idle connections |
//! | [`scaling_main`] | the peers servers | worker threads |
//!
//! For every cell it records messages per second, p50/p99 round trip, the server's CPU time
//! (user + system, from the process's CPU-time clock, or `/proc/PID/stat` where that cannot
//! be read) per message and its resident memory. Servers are
//! pinned to `--server-cpus`, the load generator to `--load-cpus`. Servers are interleaved:
//! in each round, each cell runs on every server in turn (their processes stay up through the
//! round), so a server's figures for a cell are taken within seconds of its peers'; the
//! report shows the median over rounds.
//! Before a server is measured, a short run checks that it echoes every byte faithfully.
//!
//! Each `*_main` takes the program name to show in usage and errors, parses its own arguments
//! (without the program or mode name) and returns the
//! process exit code: 0 when the harness ran (failed cells are reported, not fatal), 1 when a
//! server echoed a wrong byte, 2 when the harness itself failed or the project's own server
//! (`ringport serve`, the subject) was skipped or measured no cell.
//!
//! ```no_run
//! let code = ringport_bench::peers_main("ringport bench", &["--quick".to_owned()]);
//! std::process::exit(code);
//! ```

#![deny(missing_docs)]

/// Like `eprintln!`, but a reader that has gone away (`ringport bench peers 2>&1 | head`) is
/// not a panic: what cannot be written is dropped.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub mod chart;
pub mod matrix;
pub mod models;
pub mod peers;
pub mod proc;
pub mod report;
pub mod scaling;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Args, Parser};

use crate::matrix::{Cell, Harness, Kind, Plan, Ready, ServerResults, ServerSpec, Skipped};
use crate::report::Report;

pub use models::models_main;
pub use peers::peers_main;
pub use scaling::scaling_main;

/// Exit code: a server echoed a wrong byte.
pub const EXIT_MISMATCH: i32 = 1;
/// Exit code: the harness itself failed.
pub const EXIT_HARNESS: i32 = 2;

/// The shortest `--cell-secs` accepted: a millisecond (a shorter window would hold no round
/// trip to measure).
const MIN_CELL_SECS: f64 = 0.001;

/// Options every mode takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Directory of `ringport` and the peer binaries [default: the directory of this executable].
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,

    /// Where to write MODE.md, MODE.json and the SVG charts.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    pub out: PathBuf,

    /// CPUs the servers are pinned to, e.g. `0` or `0,2-3`.
    #[arg(long, value_name = "LIST")]
    pub server_cpus: Option<String>,

    /// CPUs the load generator is pinned to [default: every CPU not serving].
    #[arg(long, value_name = "LIST")]
    pub load_cpus: Option<String>,

    /// Seconds of load per cell [default: 3; 0.5 with --quick].
    #[arg(long, value_name = "SECS")]
    pub cell_secs: Option<f64>,

    /// Seconds of load before each cell's measured window opens (its echoes are verified, not
    /// counted): the load starts on every connection at once, and the burst takes time to
    /// settle (about 1 s at 10,000 connections with 64 KiB in flight on each) [default: 1; 0.1
    /// with --quick].
    #[arg(long, value_name = "SECS")]
    pub warmup_secs: Option<f64>,

    /// Rounds, interleaved across servers; the report shows the median [default: 3; 1 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: Option<u32>,

    /// A tiny matrix that runs in well under a minute (for CI); same report format.
    #[arg(long)]
    pub quick: bool,

    /// Load-generator worker threads [default: the number of load CPUs].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub client_workers: Option<u16>,

    /// Run only these servers (labels, comma-separated).
    #[arg(long, value_name = "LABELS", value_delimiter = ',')]
    pub only: Vec<String>,

    /// Connection counts to measure (comma-separated), instead of the mode's list (`scaling`
    /// measures one cell: one value).
    #[arg(long, value_name = "LIST", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub connections: Vec<u32>,

    /// Message sizes in bytes (comma-separated), instead of the mode's list (`scaling`: one
    /// value).
    #[arg(long, value_name = "LIST", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(1..=64 << 20))]
    pub sizes: Vec<u32>,

    /// Pipeline depths (comma-separated), instead of the mode's list (`scaling`: one value).
    #[arg(long, value_name = "LIST", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub pipelines: Vec<u32>,

    /// Idle connections to open; 0 skips the idle measurement [default: `peers` and `models`:
    /// as many as RLIMIT_NOFILE and the local port range (net.ipv4.ip_local_port_range: the
    /// connections all come from one address) allow, less 2000; 200 with --quick; `scaling`:
    /// 0].
    #[arg(long, value_name = "N")]
    pub idle: Option<u64>,
}

impl CommonArgs {
    fn rounds(&self) -> usize {
        self.rounds
            .map_or(if self.quick { 1 } else { 3 }, |r| r as usize)
    }

    fn cell_secs(&self) -> f64 {
        self.cell_secs.unwrap_or(if self.quick { 0.5 } else { 3.0 })
    }

    fn warmup_secs(&self) -> f64 {
        self.warmup_secs
            .unwrap_or(if self.quick { 0.1 } else { 1.0 })
    }

    /// `--connections` etc. when given (each value once, in the order given), else the mode's
    /// default.
    fn list(given: &[u32], default: &[u32]) -> Vec<u32> {
        if given.is_empty() {
            default.to_vec()
        } else {
            let mut once = Vec::with_capacity(given.len());
            for &v in given {
                if !once.contains(&v) {
                    once.push(v);
                }
            }
            once
        }
    }
}

/// Parses a mode's arguments and runs it; a harness failure is reported with the mode's name.
fn run_mode<T: Parser>(name: &str, args: &[String], run: fn(&T) -> Result<i32, String>) -> i32 {
    match parse_args(name, args) {
        Ok(args) => run(&args).unwrap_or_else(|e| {
            errln!("{name}: {e}");
            EXIT_HARNESS
        }),
        Err(code) => code,
    }
}

/// Parses `args` (without the program name) as `name`'s options; an `Err` is the exit code
/// after the message (or the help) has been printed.
fn parse_args<T: Parser>(name: &str, args: &[String]) -> Result<T, i32> {
    let argv = std::iter::once(OsString::from(name)).chain(args.iter().map(OsString::from));
    T::try_parse_from(argv).map_err(|e| {
        let _ = e.print();
        e.exit_code()
    })
}

/// Checks that every `--only` entry names a server's label or group in `specs`.
fn check_only(only: &[String], specs: &[ServerSpec]) -> Result<(), String> {
    if let Some(unknown) = only
        .iter()
        .find(|o| !specs.iter().any(|s| &&s.label == o || &&s.group == o))
    {
        let mut names: Vec<&str> = Vec::new();
        for name in specs
            .iter()
            .flat_map(|s| [s.group.as_str(), s.label.as_str()])
        {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        return Err(format!(
            "--only {unknown}: no such server (servers: {})",
            names.join(", ")
        ));
    }
    Ok(())
}

/// Checks `--cell-secs` and `--warmup-secs` as the client will read them: a number of seconds
/// up to a day, the cell at least [`MIN_CELL_SECS`], and a warm-up that is 0 or at least a
/// nanosecond (the client refuses one that would round to nothing).
fn check_secs(common: &CommonArgs) -> Result<(), String> {
    for (flag, secs, least) in [
        ("--cell-secs", common.cell_secs(), MIN_CELL_SECS),
        ("--warmup-secs", common.warmup_secs(), 0.0),
    ] {
        if !(secs.is_finite() && secs >= least && secs <= 86_400.0) {
            return Err(format!(
                "{flag} {secs}: must be a number of seconds from {least} to 86400"
            ));
        }
        if secs > 0.0 && std::time::Duration::try_from_secs_f64(secs).is_ok_and(|d| d.is_zero()) {
            return Err(format!(
                "{flag} {secs}: shorter than a nanosecond, which the load generator cannot time \
                 (use 0 for none)"
            ));
        }
    }
    Ok(())
}

/// What every mode needs before it measures: the binaries, the CPU sets, the descriptor limit.
#[derive(Debug, Clone)]
struct Setup {
    bin_dir: PathBuf,
    harness: Harness,
    machine: Vec<usize>,
    server_cpus: Vec<usize>,
    load_cpus: Vec<usize>,
    nofile: u64,
    notes: Vec<String>,
    warnings: Vec<String>,
}

/// Checks before any measurement that `--out` is a directory the results can be written to
/// (creating it), so that a long run does not lose them at its end.
fn check_out(dir: &Path) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("--out {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(format!(".ringport-bench-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)
}

/// The idle connections one client address can hold open to one server: the lesser of what
/// the descriptor limit `nofile` and the local port range (`ports`, when known) allow, each less
/// [`matrix::FD_HEADROOM`] (or halved, where that leaves too little).
fn default_idle(nofile: u64, ports: Option<u64>) -> u64 {
    let room = |n: u64| {
        if n > 2 * matrix::FD_HEADROOM {
            n - matrix::FD_HEADROOM
        } else {
            n / 2
        }
    };
    room(nofile).min(ports.map_or(u64::MAX, room))
}

/// Refuses an `--idle` that the descriptor limit `nofile` cannot hold: the harness holds those
/// connections itself, and would run out of descriptors before reading the server's memory.
fn check_idle(idle: Option<u64>, nofile: u64) -> Result<(), String> {
    let most = default_idle(nofile, None);
    match idle {
        Some(n) if n > most => Err(format!(
            "--idle {n}: the descriptor limit (RLIMIT_NOFILE {nofile}) allows at most {most} \
             idle connections, with room kept for the rest of the harness (raise the hard limit, \
             or ask for fewer)"
        )),
        _ => Ok(()),
    }
}

/// The warning for a binary directory of unoptimised (debug) builds, if `bin_dir` is one.
fn debug_build_warning(bin_dir: &Path) -> Option<String> {
    matrix::is_debug_dir(bin_dir).then(|| {
        format!(
            "the servers and the load generator in {} are debug (unoptimised) builds: their \
             figures say little about optimised code (build with `cargo build --release` and \
             pass --bin-dir target/release, or run from a release build)",
            bin_dir.display()
        )
    })
}

impl Setup {
    /// `default_server` is the mode's server CPU set when `--server-cpus` is absent.
    fn new(
        common: &CommonArgs,
        default_server: impl FnOnce(&[usize]) -> Vec<usize>,
        specs: &[ServerSpec],
    ) -> Result<Self, String> {
        check_only(&common.only, specs)?;
        check_secs(common)?;
        check_out(&common.out)?;
        let (_, nofile) = proc::raise_nofile_limit().map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
        check_idle(common.idle, nofile)?;
        let machine = proc::available_cpus().map_err(|e| format!("sched_getaffinity: {e}"))?;
        let mut notes = Vec::new();
        let server_cpus = match &common.server_cpus {
            Some(s) => proc::parse_cpu_list(s).map_err(|e| format!("--server-cpus {e}"))?,
            None => {
                // Chosen among the CPUs that --load-cpus leaves (a bad list is reported below).
                let load = common
                    .load_cpus
                    .as_deref()
                    .and_then(|s| proc::parse_cpu_list(s).ok())
                    .unwrap_or_default();
                let free: Vec<usize> = machine
                    .iter()
                    .copied()
                    .filter(|c| !load.contains(c))
                    .collect();
                default_server(if free.is_empty() { &machine } else { &free })
            }
        };
        let outside: Vec<usize> = server_cpus
            .iter()
            .copied()
            .filter(|c| !machine.contains(c))
            .collect();
        if !outside.is_empty() {
            return Err(format!(
                "--server-cpus: CPU(s) {} are not available here (this process may use {})",
                proc::format_cpu_list(&outside),
                proc::format_cpu_list(&machine)
            ));
        }
        let load_cpus = match &common.load_cpus {
            Some(s) => {
                let load = proc::parse_cpu_list(s).map_err(|e| format!("--load-cpus {e}"))?;
                let bad: Vec<usize> = load
                    .iter()
                    .copied()
                    .filter(|c| !machine.contains(c))
                    .collect();
                if !bad.is_empty() {
                    return Err(format!(
                        "--load-cpus: CPU(s) {} are not available here (this process may use {})",
                        proc::format_cpu_list(&bad),
                        proc::format_cpu_list(&machine)
                    ));
                }
                let shared: Vec<usize> = load
                    .iter()
                    .copied()
                    .filter(|c| server_cpus.contains(c))
                    .collect();
                if !shared.is_empty() {
                    return Err(format!(
                        "--server-cpus {} and --load-cpus {} overlap on {}",
                        proc::format_cpu_list(&server_cpus),
                        proc::format_cpu_list(&load),
                        proc::format_cpu_list(&shared)
                    ));
                }
                load
            }
            None => {
                let rest: Vec<usize> = machine
                    .iter()
                    .copied()
                    .filter(|c| !server_cpus.contains(c))
                    .collect();
                if rest.is_empty() {
                    notes.push(
                        "no CPU is left for the load generator: it shares the servers' CPUs, so \
                         the figures mix server and client work"
                            .to_owned(),
                    );
                    server_cpus.clone()
                } else {
                    rest
                }
            }
        };
        let bin_dir = match &common.bin_dir {
            Some(d) => d.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .ok_or_else(|| {
                    "cannot find this executable's directory: pass --bin-dir".to_owned()
                })?,
        };
        let mut packages: Vec<(&str, &str)> = vec![("ringport", "ringport-cli")];
        packages.extend(
            specs
                .iter()
                .map(|s| (s.program.as_str(), s.package.as_str())),
        );
        matrix::build_missing(&bin_dir, &packages);
        let client = proc::find_binary(&bin_dir, "ringport").ok_or_else(|| {
            format!(
                "the load generator `ringport` is not in {}: build it with `cargo {}` (or pass \
                 --bin-dir)",
                bin_dir.display(),
                matrix::build_args(&bin_dir, "ringport-cli").join(" ")
            )
        })?;
        let warnings: Vec<String> = debug_build_warning(&bin_dir).into_iter().collect();
        for w in &warnings {
            errln!("ringport-bench: WARNING: {w}");
        }
        // The harness's own threads (reading the client's output, waiting for it) stay off
        // the servers' CPUs; each server and client still gets its own CPUs when started.
        if !load_cpus.iter().any(|c| server_cpus.contains(c)) {
            if let Err(e) = proc::pin_self(&load_cpus) {
                notes.push(format!("the harness runs unpinned ({e})"));
            }
        }
        Ok(Self {
            bin_dir,
            harness: Harness { client },
            machine,
            server_cpus,
            load_cpus,
            nofile,
            notes,
            warnings,
        })
    }

    /// The idle-connection target: `--idle`, 200 with `--quick`, else what the descriptor limit
    /// and the local port range allow (see [`default_idle`]).
    fn idle_target(&self, common: &CommonArgs) -> u64 {
        common.idle.unwrap_or(if common.quick {
            200
        } else {
            default_idle(self.nofile, proc::local_ports())
        })
    }

    fn plan(&self, common: &CommonArgs, cells: Vec<Cell>, idle: u64, bulk_secs: f64) -> Plan {
        Plan {
            cells,
            idle,
            rounds: common.rounds(),
            cell_secs: common.cell_secs(),
            warmup_secs: common.warmup_secs(),
            bulk_secs,
            server_cpus: self.server_cpus.clone(),
            load_cpus: self.load_cpus.clone(),
            client_workers: common.client_workers.unwrap_or_else(|| {
                u16::try_from(self.load_cpus.len())
                    .unwrap_or(u16::MAX)
                    .max(1)
            }),
            nofile: self.nofile,
        }
    }

    /// Resolves `specs` (filtered by `--only`) into runnable and skipped servers.
    fn resolve(&self, common: &CommonArgs, specs: &[ServerSpec]) -> (Vec<Ready>, Vec<Skipped>) {
        let specs: Vec<ServerSpec> = specs
            .iter()
            .filter(|s| {
                common.only.is_empty() || common.only.iter().any(|o| o == &s.label || o == &s.group)
            })
            .cloned()
            .collect();
        let (ready, skipped) = matrix::resolve(&specs, &self.bin_dir);
        for s in &skipped {
            errln!("ringport-bench: skipped: {}: {}", s.label, s.why);
        }
        (ready, skipped)
    }
}

/// A chart to draw from the results: file suffix, title, axis names and how to read points.
struct ChartSpec {
    suffix: &'static str,
    title: String,
    x_desc: &'static str,
    y_desc: &'static str,
    series: Vec<chart::Series>,
}

/// The two standard charts (msgs/s and CPU per message) across connection counts, for the
/// 64 B, pipeline 16 cells.
fn connection_charts(mode: &str, servers: &[ServerResults]) -> Vec<ChartSpec> {
    let x = |c: &Cell| {
        (c.kind == Kind::PingPong && c.size == 64 && c.pipeline == 16)
            .then_some(f64::from(c.connections))
    };
    vec![
        ChartSpec {
            suffix: "msgs",
            title: format!("{mode}: messages/s, 64 B, pipeline 16 (higher is better)"),
            x_desc: "connections",
            y_desc: "messages/s",
            series: chart::series_by_cell(servers, x, |s| s.msgs_per_s),
        },
        ChartSpec {
            suffix: "cpu",
            title: format!(
                "{mode}: server CPU µs per message, 64 B, pipeline 16 (lower is better)"
            ),
            x_desc: "connections",
            y_desc: "server CPU µs/msg",
            series: chart::series_by_cell(servers, x, |s| s.cpu_us_per_msg),
        },
    ]
}

/// Prints the report, writes it and its charts to `--out`, and returns the exit code.
fn finish(report: &Report, out: &Path, charts: Vec<ChartSpec>) -> i32 {
    {
        // Like the progress lines: a reader that has gone away loses the table, not the files.
        use std::io::Write as _;
        let _ = std::io::stdout()
            .lock()
            .write_all(report.markdown().as_bytes());
    }
    // Every failure is reported; an echo that differs decides the exit code over the rest.
    let mut failed = false;
    let mut written = report.write(out).unwrap_or_else(|e| {
        errln!("ringport-bench: {e}");
        failed = true;
        Vec::new()
    });
    for c in charts {
        let path = out.join(format!("{}-{}.svg", report.mode, c.suffix));
        match chart::line_chart(&path, &c.title, c.x_desc, c.y_desc, &c.series) {
            Ok(true) => written.push(path),
            Ok(false) => {
                errln!(
                    "ringport-bench: {} not drawn: this run measured none of its cells ({})",
                    path.display(),
                    c.title
                );
                // An earlier run's chart would sit next to this run's report as if it were its.
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        errln!(
                            "ringport-bench: {}: an earlier run's chart, not removed: {e}",
                            path.display()
                        );
                        failed = true;
                    }
                    _ => {}
                }
            }
            Err(e) => {
                errln!("ringport-bench: chart {e}");
                failed = true;
            }
        }
    }
    for w in &written {
        errln!("ringport-bench: wrote {}", w.display());
    }
    let bad: Vec<&str> = report
        .servers
        .iter()
        .filter(|s| s.mismatched)
        .map(|s| s.spec.label.as_str())
        .collect();
    if !bad.is_empty() {
        errln!(
            "ringport-bench: ECHO INTEGRITY FAILURE: {} returned bytes that differ from what was sent",
            bad.join(", ")
        );
        return EXIT_MISMATCH;
    }
    if failed {
        return EXIT_HARNESS;
    }
    // This project's own completion-port server must run: one that was skipped or measured no
    // cell at all (it did not start, say) fails the run, so that `--quick` in CI keeps every
    // mode working. A peer that cannot run here (no io_uring for compio, say), or an I/O model
    // that fails by its documented limit (select at 1024 descriptors), is only reported.
    let dead = report.unmeasured_subjects();
    if dead.is_empty() {
        0
    } else {
        errln!(
            "ringport-bench: {} (the failures are in the report)",
            dead.join("; ")
        );
        EXIT_HARNESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(args: &[&str]) -> CommonArgs {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            common: CommonArgs,
        }
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        parse_args::<Cli>("test", &args).unwrap().common
    }

    #[test]
    fn an_out_directory_that_cannot_be_written_is_refused_up_front() {
        let dir = std::env::temp_dir().join(format!("ringport-bench-out-{}", std::process::id()));
        let nested = dir.join("a/b");
        assert_eq!(check_out(&nested), Ok(()), "created");
        assert!(nested.is_dir());
        assert_eq!(
            std::fs::read_dir(&nested).unwrap().count(),
            0,
            "the probe is gone"
        );
        // A file where the directory should be.
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = check_out(&file.join("sub")).unwrap_err();
        assert!(
            err.starts_with(&format!("--out {}", file.join("sub").display())),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A value given twice (`--connections 5,5`) is one cell, not the same cell measured twice.
    #[test]
    fn a_list_takes_each_value_once_in_the_order_given() {
        assert_eq!(CommonArgs::list(&[5, 5, 1, 5, 3], &[9]), [5, 1, 3]);
        assert_eq!(
            CommonArgs::list(&[], &[9, 9]),
            [9, 9],
            "the default as it is"
        );
    }

    #[test]
    fn an_idle_count_past_the_descriptor_limit_is_refused() {
        assert_eq!(check_idle(None, 1024), Ok(()));
        assert_eq!(check_idle(Some(512), 1024), Ok(()));
        assert_eq!(check_idle(Some(18_000), 20_000), Ok(()));
        let e = check_idle(Some(18_001), 20_000).unwrap_err();
        assert!(
            e.contains("--idle 18001") && e.contains("at most 18000"),
            "{e}"
        );
    }

    #[test]
    fn the_idle_default_fits_the_descriptor_limit_and_the_port_range() {
        // The usual local port range (32768-60999) and a large descriptor limit: the ports bound.
        let ports = proc::parse_port_range("32768\t60999\n");
        assert_eq!(ports, Some(28_232));
        assert_eq!(default_idle(1 << 20, ports), 26_232);
        // A smaller limit bounds it; the range unknown, the limit alone.
        assert_eq!(default_idle(20_000, ports), 18_000);
        assert_eq!(default_idle(20_000, None), 18_000);
        assert_eq!(default_idle(1024, ports), 512);
        assert_eq!(proc::parse_port_range("60999 32768"), None);
        assert_eq!(proc::parse_port_range("x"), None);
    }

    #[test]
    fn durations_the_client_cannot_time_are_refused_up_front() {
        let err = check_secs(&common(&["--warmup-secs", "1e-10"])).unwrap_err();
        assert!(
            err.starts_with("--warmup-secs 0.0000000001: shorter than a nanosecond"),
            "{err}"
        );
        assert_eq!(check_secs(&common(&["--warmup-secs", "0"])), Ok(()));
        assert_eq!(check_secs(&common(&["--warmup-secs", "1e-9"])), Ok(()));
        assert!(check_secs(&common(&["--warmup-secs=-1"])).is_err());
        assert!(check_secs(&common(&["--cell-secs", "1e-4"])).is_err());
        assert_eq!(check_secs(&common(&["--quick"])), Ok(()));
    }

    #[test]
    fn a_debug_bin_dir_is_a_warning() {
        let w = debug_build_warning(Path::new("/w/target/debug")).unwrap();
        assert!(
            w.contains("/w/target/debug are debug (unoptimised) builds"),
            "{w}"
        );
        assert_eq!(debug_build_warning(Path::new("/w/target/release")), None);
    }
}
