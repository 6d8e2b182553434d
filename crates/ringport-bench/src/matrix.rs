//! The measurement machinery shared by every mode: server specs (a table of name to argv),
//! cells, interleaved rounds, medians, idle-connection memory and the progress line.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::proc::{self, ClientReport, Server};

/// Descriptors the harness and the client keep for themselves besides their connections.
pub const FD_HEADROOM: u64 = 2000;

/// How long the integrity check's client may run: 4 x 50 messages take milliseconds, and the
/// client gives up by itself after 30 s without a completion.
const INTEGRITY_LIMIT: Duration = Duration::from_secs(45);

/// Whether a server is the one under test or a baseline it is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Ratios are computed for it, against the best peer.
    Subject,
    /// A baseline.
    Peer,
}

/// One server of a comparison: how to start it and how to tell whether it can run here.
///
/// `args` may use the placeholders `{addr}` and `{workers}`.
#[derive(Debug, Clone, Serialize)]
pub struct ServerSpec {
    /// Row label, e.g. `ringport-uring`.
    pub label: String,
    /// Label without the worker count (for charts across worker counts).
    pub group: String,
    /// Subject or peer.
    pub role: Role,
    /// Binary name, looked up in the binary directory.
    pub program: String,
    /// Cargo package that builds `program`.
    pub package: String,
    /// Arguments, with placeholders.
    pub args: Vec<String>,
    /// Worker threads (substituted for `{workers}`).
    pub workers: u16,
    /// Flags that must appear in `program help_args` output; absent ones skip the server.
    pub needs_flags: Vec<String>,
    /// Arguments that print the help text to probe.
    pub help_args: Vec<String>,
}

impl ServerSpec {
    /// A spec; `args` may use `{addr}` and `{workers}`.
    pub fn new(label: &str, role: Role, program: &str, package: &str, args: &[&str]) -> Self {
        Self {
            label: label.to_owned(),
            group: label.to_owned(),
            role,
            program: program.to_owned(),
            package: package.to_owned(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            workers: 1,
            needs_flags: Vec::new(),
            help_args: vec!["--help".to_owned()],
        }
    }

    /// Requires `flags` to appear in the output of `program help_args`.
    pub fn needs(mut self, help_args: &[&str], flags: &[&str]) -> Self {
        self.help_args = help_args.iter().map(|s| (*s).to_owned()).collect();
        self.needs_flags = flags.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Sets the worker count.
    pub fn workers(mut self, n: u16) -> Self {
        self.workers = n;
        self
    }

    /// The arguments with `{addr}` and `{workers}` filled in.
    pub fn argv(&self, addr: &str) -> Vec<String> {
        self.args
            .iter()
            .map(|a| {
                a.replace("{addr}", addr)
                    .replace("{workers}", &self.workers.to_string())
            })
            .collect()
    }
}

/// A server that can run, with its binary found.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The spec.
    pub spec: ServerSpec,
    /// The binary.
    pub path: PathBuf,
}

/// A server that cannot run here, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// Row label.
    pub label: String,
    /// Subject or peer.
    pub role: Role,
    /// Why, e.g. `peer-monoio not found in target/release`.
    pub why: String,
}

/// Whether `bin_dir` is a Cargo `debug` profile directory (`target/debug`): its binaries are
/// unoptimised.
pub fn is_debug_dir(bin_dir: &Path) -> bool {
    bin_dir.file_name().is_some_and(|n| n == "debug")
}

/// The `cargo` arguments that build `package` into `bin_dir`'s profile: a plain `cargo build`
/// for a `debug` directory, `cargo build --release` otherwise.
pub fn build_args<'a>(bin_dir: &Path, package: &'a str) -> Vec<&'a str> {
    let mut args = vec!["build"];
    if !is_debug_dir(bin_dir) {
        args.push("--release");
    }
    args.extend(["-p", package]);
    args
}

/// Builds the missing binaries of `specs` (and the load generator) when `$CARGO` is set, in
/// the profile `bin_dir` holds (see [`build_args`]), so that they land where they are looked
/// for.
///
/// Each package is built on its own, so that one that does not compile does not hold back the
/// others.
pub fn build_missing(bin_dir: &Path, packages: &[(&str, &str)]) {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return;
    };
    let mut done = Vec::new();
    for &(program, package) in packages {
        if proc::find_binary(bin_dir, program).is_some() || done.contains(&package) {
            continue;
        }
        done.push(package);
        let args = build_args(bin_dir, package);
        errln!(
            "ringport-bench: {program} is missing: cargo {}",
            args.join(" ")
        );
        let status = std::process::Command::new(&cargo)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => errln!("ringport-bench: building {package} failed ({s})"),
            Err(e) => errln!("ringport-bench: cannot run cargo: {e}"),
        }
    }
}

/// Finds each spec's binary and probes its flags; returns the runnable and the skipped ones.
pub fn resolve(specs: &[ServerSpec], bin_dir: &Path) -> (Vec<Ready>, Vec<Skipped>) {
    let mut help_cache: HashMap<(PathBuf, Vec<String>), Result<String, String>> = HashMap::new();
    let mut ready = Vec::new();
    let mut skipped = Vec::new();
    for spec in specs {
        let Some(path) = proc::find_binary(bin_dir, &spec.program) else {
            skipped.push(Skipped {
                label: spec.label.clone(),
                role: spec.role,
                why: format!(
                    "{} not found in {} (build it: cargo {})",
                    spec.program,
                    bin_dir.display(),
                    build_args(bin_dir, &spec.package).join(" ")
                ),
            });
            continue;
        };
        if !spec.needs_flags.is_empty() {
            let help = help_cache
                .entry((path.clone(), spec.help_args.clone()))
                .or_insert_with(|| {
                    let args: Vec<&str> = spec.help_args.iter().map(String::as_str).collect();
                    proc::capture_output(&path, &args)
                });
            let missing: Vec<&str> = match help {
                Ok(text) => spec
                    .needs_flags
                    .iter()
                    .filter(|f| !has_flag(text, f))
                    .map(String::as_str)
                    .collect(),
                Err(e) => {
                    skipped.push(Skipped {
                        label: spec.label.clone(),
                        role: spec.role,
                        why: format!(
                            "probing `{} {}`: {e}",
                            spec.program,
                            spec.help_args.join(" ")
                        ),
                    });
                    continue;
                }
            };
            if !missing.is_empty() {
                skipped.push(Skipped {
                    label: spec.label.clone(),
                    role: spec.role,
                    why: format!(
                        "`{} {}` has no {} flag yet",
                        spec.program,
                        spec.help_args
                            .iter()
                            .filter(|a| *a != "--help")
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(" "),
                        missing.join(", ")
                    ),
                });
                continue;
            }
        }
        ready.push(Ready {
            spec: spec.clone(),
            path,
        });
    }
    (ready, skipped)
}

/// Whether help text documents `flag` (as a word: `--model` does not match `--models`).
fn has_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let next = help[i + flag.len()..].chars().next();
        !matches!(next, Some(c) if c.is_alphanumeric() || c == '-' || c == '_')
    })
}

/// What a cell sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Echo round trips, `pipeline` in flight per connection.
    PingPong,
    /// Large messages, reported as bytes per second.
    Bulk,
}

/// One load shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cell {
    /// Ping-pong or bulk.
    pub kind: Kind,
    /// Concurrent connections.
    pub connections: u32,
    /// Bytes per message.
    pub size: u32,
    /// Messages in flight per connection.
    pub pipeline: u32,
}

impl Cell {
    /// A ping-pong cell.
    pub fn ping(connections: u32, size: u32, pipeline: u32) -> Self {
        Self {
            kind: Kind::PingPong,
            connections,
            size,
            pipeline,
        }
    }

    /// A short label such as `50c 4KiB p16`.
    pub fn label(&self) -> String {
        format!(
            "{}c {} p{}",
            self.connections,
            crate::report::fmt_size(u64::from(self.size)),
            self.pipeline
        )
    }
}

/// Every combination of the three lists, connections varying slowest.
pub fn ping_cells(connections: &[u32], sizes: &[u32], pipelines: &[u32]) -> Vec<Cell> {
    let mut cells = Vec::new();
    for &c in connections {
        for &s in sizes {
            for &p in pipelines {
                cells.push(Cell::ping(c, s, p));
            }
        }
    }
    cells
}

/// Settings of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Cells, in order.
    pub cells: Vec<Cell>,
    /// Idle connections to open (none when 0).
    pub idle: u64,
    /// Rounds; each round runs every server once.
    pub rounds: usize,
    /// Seconds per cell.
    pub cell_secs: f64,
    /// Seconds of load before each cell's window.
    pub warmup_secs: f64,
    /// Seconds for bulk cells.
    pub bulk_secs: f64,
    /// CPUs the servers run on.
    pub server_cpus: Vec<usize>,
    /// CPUs the load generator runs on.
    pub load_cpus: Vec<usize>,
    /// Load-generator worker threads.
    pub client_workers: u16,
    /// The process's descriptor limit after raising it.
    pub nofile: u64,
}

/// The figures of one measured cell.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// Messages per second.
    pub msgs_per_s: f64,
    /// Verified megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Median round trip, microseconds.
    pub p50_us: f64,
    /// 99th percentile round trip, microseconds.
    pub p99_us: f64,
    /// Server CPU time (user + system) per message, microseconds.
    pub cpu_us_per_msg: f64,
    /// Server resident memory with the cell's connections open: the larger of the readings
    /// at the measured window's opening and closing marks, bytes.
    pub rss_bytes: f64,
    /// What `rss_bytes` gained over the reading just before the client started, per
    /// connection, bytes (NaN where it could not be read).
    pub rss_per_conn: f64,
}

impl Sample {
    /// The element-wise median of `samples`, or `None` when there are none.
    pub fn median(samples: &[Sample]) -> Option<Sample> {
        let m = |f: fn(&Sample) -> f64| median(&samples.iter().map(f).collect::<Vec<_>>());
        Some(Sample {
            msgs_per_s: m(|s| s.msgs_per_s)?,
            mb_per_s: m(|s| s.mb_per_s)?,
            p50_us: m(|s| s.p50_us)?,
            p99_us: m(|s| s.p99_us)?,
            // CPU time or memory that could not be read (no CPU time in any round: see
            // `run_cell`) leaves the other figures standing.
            cpu_us_per_msg: m(|s| s.cpu_us_per_msg).unwrap_or(f64::NAN),
            rss_bytes: m(|s| s.rss_bytes).unwrap_or(f64::NAN),
            rss_per_conn: m(|s| s.rss_per_conn).unwrap_or(f64::NAN),
        })
    }
}

/// The median of `values` (the mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// One round of one cell on one server.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    /// Measured.
    Ok {
        /// The figures.
        sample: Sample,
        /// The client's summary.
        client: ClientReport,
    },
    /// Could not be measured, and why; the client's summary when there was one.
    Failed {
        /// Why.
        why: String,
        /// The client's summary, if it printed one.
        client: Option<ClientReport>,
    },
}

/// All rounds of one cell on one server.
#[derive(Debug, Clone, Serialize)]
pub struct CellResult {
    /// The server's label.
    pub server: String,
    /// The cell.
    pub cell: Cell,
    /// One outcome per round run.
    pub rounds: Vec<Outcome>,
}

impl CellResult {
    /// The median over the rounds that were measured.
    pub fn median(&self) -> Option<Sample> {
        let ok: Vec<Sample> = self
            .rounds
            .iter()
            .filter_map(|o| match o {
                Outcome::Ok { sample, .. } => Some(*sample),
                Outcome::Failed { .. } => None,
            })
            .collect();
        Sample::median(&ok)
    }

    /// The distinct reasons of the failed rounds, and how many rounds failed.
    pub fn failures(&self) -> (usize, Vec<String>) {
        let mut whys: Vec<String> = Vec::new();
        let mut n = 0;
        for o in &self.rounds {
            if let Outcome::Failed { why, .. } = o {
                n += 1;
                if !whys.contains(why) {
                    whys.push(why.clone());
                }
            }
        }
        (n, whys)
    }
}

/// One round of the idle-connection measurement on one server.
#[derive(Debug, Clone, Serialize)]
pub struct IdleSample {
    /// Connections the harness tried to open.
    pub target: u64,
    /// Connections opened.
    pub opened: u64,
    /// Connections that echoed one byte back (the server holds them).
    pub answered: u64,
    /// Connections that answered with a byte other than the one sent.
    pub mismatched: u64,
    /// Connections the server closed or reset instead of answering.
    pub closed: u64,
    /// Server RSS before opening, bytes.
    pub rss_before: u64,
    /// Server RSS with every connection open, bytes.
    pub rss_after: u64,
    /// Why fewer were opened or answered than asked, if so.
    pub note: Option<String>,
}

impl IdleSample {
    /// Connections the server holds: those opened, less those it closed.
    pub fn held(&self) -> u64 {
        self.opened.saturating_sub(self.closed)
    }

    /// RSS growth per connection held (see [`IdleSample::held`]), in bytes; `None` when no
    /// connection was served (the server did not take part).
    ///
    /// The server's memory grows with every connection it accepts and keeps, whether or not
    /// it answered within the 5 s allowed (a thread-per-connection server may still be
    /// starting threads), so the growth is divided by the connections opened, not by the
    /// answered ones. A connection the server closed at once (the select model refuses
    /// descriptors >= `FD_SETSIZE`) costs it nothing, and counting it would make that server
    /// look lean: those are left out.
    pub fn bytes_per_conn(&self) -> Option<f64> {
        (self.answered > 0)
            .then(|| (self.rss_after as f64 - self.rss_before as f64) / self.held() as f64)
    }
}

/// Everything measured for one server.
#[derive(Debug, Clone, Serialize)]
pub struct ServerResults {
    /// The spec.
    pub spec: ServerSpec,
    /// The `listening on` line of its first start (it names the backend it really used).
    pub listen_line: Option<String>,
    /// Integrity-check failures, one per start that failed it.
    pub integrity_failures: Vec<String>,
    /// Whether any client saw a mismatched echo byte.
    pub mismatched: bool,
    /// Cells, in plan order.
    pub cells: Vec<CellResult>,
    /// Idle rounds (`Err` = why it could not be measured).
    pub idle: Vec<Result<IdleSample, String>>,
}

impl ServerResults {
    /// The idle rounds that measured bytes per connection.
    pub fn idle_measured(&self) -> Vec<&IdleSample> {
        self.idle
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .filter(|s| s.bytes_per_conn().is_some())
            .collect()
    }

    /// The median of `f` over the idle rounds that measured, or `None` when none did.
    pub fn idle_median(&self, f: impl Fn(&IdleSample) -> f64) -> Option<f64> {
        median(&self.idle_measured().into_iter().map(f).collect::<Vec<_>>())
    }

    /// Like [`CellResult::failures`]: the idle rounds that measured nothing (an error, or no
    /// connection served), and their distinct reasons.
    pub fn idle_failures(&self) -> (usize, Vec<String>) {
        let mut whys: Vec<String> = Vec::new();
        let mut n = 0;
        for r in &self.idle {
            let why = match r {
                Err(e) => e.clone(),
                Ok(s) if s.bytes_per_conn().is_none() => s
                    .note
                    .clone()
                    .unwrap_or_else(|| "no connection was served".to_owned()),
                Ok(_) => continue,
            };
            n += 1;
            if !whys.contains(&why) {
                whys.push(why);
            }
        }
        (n, whys)
    }

    /// The distinct notes of the idle rounds that measured (fewer connections than asked).
    pub fn idle_notes(&self) -> Vec<String> {
        let mut notes: Vec<String> = Vec::new();
        for n in self
            .idle_measured()
            .into_iter()
            .filter_map(|s| s.note.clone())
        {
            if !notes.contains(&n) {
                notes.push(n);
            }
        }
        notes
    }

    /// The result of `cell`, if it was planned.
    pub fn cell(&self, cell: &Cell) -> Option<&CellResult> {
        self.cells.iter().find(|c| &c.cell == cell)
    }
}

/// A one-line progress indicator on stderr (`\r`-updated on a terminal, plain lines otherwise).
#[derive(Debug)]
pub struct Progress {
    total: usize,
    done: usize,
    tty: bool,
    start: Instant,
}

impl Progress {
    /// A progress line for `total` steps.
    pub fn new(total: usize) -> Self {
        Self {
            total,
            done: 0,
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
        }
    }

    /// Shows `what` as the step now running.
    pub fn step(&mut self, what: &str) {
        self.done += 1;
        let width = 24;
        let filled = (self.done * width) / self.total.max(1);
        let bar: String = "#".repeat(filled) + &"-".repeat(width - filled.min(width));
        let line = format!(
            "[{bar}] {}/{} {:>5.0}s {what}",
            self.done,
            self.total,
            self.start.elapsed().as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Ends the line.
    pub fn finish(&self) {
        if self.tty {
            errln!();
        }
    }
}

/// The harness's context: where the binaries are.
#[derive(Debug, Clone)]
pub struct Harness {
    /// The load generator (`ringport`).
    pub client: PathBuf,
}

impl Harness {
    fn client_args(
        &self,
        addr: SocketAddr,
        cell: &Cell,
        until: &[String],
        workers: u16,
    ) -> Vec<String> {
        let mut args: Vec<String> = [
            "client",
            "--connect",
            &addr.to_string(),
            "--connections",
            &cell.connections.to_string(),
            "--size",
            &cell.size.to_string(),
            "--pipeline",
            &cell.pipeline.to_string(),
            "--workers",
            &workers.to_string(),
            "--json",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(until.iter().cloned());
        args
    }

    /// The integrity check: 4 connections x 50 messages of 4 KiB, 4 in flight; every byte
    /// must come back.
    fn integrity(&self, server: &Server, plan: &Plan) -> Result<(), (String, bool)> {
        let cell = Cell::ping(4, 4096, 4);
        let until = ["--messages".to_owned(), "50".to_owned()];
        let args = self.client_args(server.addr(), &cell, &until, 1);
        let run = proc::run_client(
            &self.client,
            &args,
            &plan.load_cpus,
            // Past the client's own stall limit, so that a server that stops echoing is
            // reported in the client's words.
            INTEGRITY_LIMIT,
            &|| Ok(0),
        )
        .map_err(|e| (e, false))?;
        match run.report {
            Ok(r) if r.mismatches > 0 => Err((
                format!(
                    "{} connections with a mismatched echo; {}",
                    r.mismatches,
                    r.describe_errors()
                ),
                true,
            )),
            Ok(r) if !r.ok || r.error_total > 0 => Err((r.describe_errors(), false)),
            Ok(r) if r.messages < 200 => {
                Err((format!("only {} of 200 messages echoed", r.messages), false))
            }
            Ok(_) => Ok(()),
            Err(e) => Err((e, false)),
        }
    }

    /// Starts a server and checks it echoes faithfully.
    fn start(&self, ready: &Ready, plan: &Plan, res: &mut ServerResults) -> Result<Server, String> {
        let argv = ready.spec.argv("127.0.0.1:0");
        let server = Server::spawn(
            &ready.path,
            &argv,
            &plan.server_cpus,
            Duration::from_secs(10),
        )
        .map_err(|e| format!("server did not start: {e}"))?;
        if res.listen_line.is_none() {
            res.listen_line = Some(server.listen_line().to_owned());
        }
        if let Err((why, mismatch)) = self.integrity(&server, plan) {
            errln!(
                "\nringport-bench: INTEGRITY CHECK FAILED for {}: {why}",
                ready.spec.label
            );
            res.integrity_failures.push(why.clone());
            res.mismatched |= mismatch;
            server.stop();
            return Err(format!("integrity check failed: {why}"));
        }
        Ok(server)
    }

    /// Runs one round: each cell on every server in turn (so that the servers' figures for a
    /// cell are taken within seconds of each other, whatever the machine does over minutes),
    /// in alternating order, then the idle measurement on each (a fresh process, the servers
    /// in alternating order from round to round).
    pub fn run_round(
        &self,
        servers: &[Ready],
        plan: &Plan,
        results: &mut [ServerResults],
        progress: &mut Progress,
        round: usize,
    ) {
        // Each server's process (started on its first cell) and why it could not start.
        let mut live: Vec<(Option<Server>, Option<String>)> =
            servers.iter().map(|_| (None, None)).collect();
        for (i, cell) in plan.cells.iter().enumerate() {
            // A cell this process cannot open is refused before any server takes it: those
            // running keep what earlier cells paged in, as in every other cell.
            if let Some(why) = lacks_descriptors(plan, cell) {
                for (ready, res) in servers.iter().zip(results.iter_mut()) {
                    progress.step(&format!(
                        "round {}/{} {} {}: refused",
                        round + 1,
                        plan.rounds,
                        ready.spec.label,
                        cell.label()
                    ));
                    res.cells[i].rounds.push(Outcome::Failed {
                        why: why.clone(),
                        client: None,
                    });
                }
                continue;
            }
            // Forward and backward in turn, from cell to cell and round to round: whatever the
            // machine drifts through during a cell's pass does not always fall on the same
            // server.
            let mut order: Vec<usize> = (0..servers.len()).collect();
            if (round + i) % 2 == 1 {
                order.reverse();
            }
            for k in order {
                let (ready, res) = (&servers[k], &mut results[k]);
                let (server, start_error) = &mut live[k];
                let label = &ready.spec.label;
                progress.step(&format!(
                    "round {}/{} {label} {}",
                    round + 1,
                    plan.rounds,
                    cell.label()
                ));
                let outcome = self.run_cell(ready, plan, res, server, start_error, cell);
                if matches!(outcome, Outcome::Failed { .. }) {
                    // A server that failed a cell may be stuck (stopped, deadlocked) or hold
                    // what that cell left: the next cell starts a fresh one.
                    if let Some(s) = server.take() {
                        s.stop();
                    }
                }
                if let Outcome::Ok { client, .. }
                | Outcome::Failed {
                    client: Some(client),
                    ..
                } = &outcome
                {
                    if client.mismatches > 0 {
                        res.mismatched = true;
                        errln!(
                            "\nringport-bench: {label} {}: MISMATCHED echo on {} connections",
                            cell.label(),
                            client.mismatches
                        );
                    }
                }
                res.cells[i].rounds.push(outcome);
            }
        }
        // A fresh server for the idle measurement, so that memory kept from the busy cells does
        // not hide the growth: the busy ones stop first.
        for (server, _) in &mut live {
            if let Some(s) = server.take() {
                s.stop();
            }
        }
        if plan.idle == 0 {
            return;
        }
        // In alternating order from round to round, as the cells.
        let mut order: Vec<usize> = (0..servers.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (ready, res) = (&servers[i], &mut results[i]);
            let (server, start_error) = &mut live[i];
            progress.step(&format!(
                "round {}/{} {} idle x{}",
                round + 1,
                plan.rounds,
                ready.spec.label,
                plan.idle
            ));
            let idle = match self.ensure_server(ready, plan, res, server, start_error) {
                Ok(s) => idle_connections(s, plan.idle),
                Err(e) => Err(e),
            };
            if let Ok(sample) = &idle {
                if sample.mismatched > 0 {
                    res.mismatched = true;
                    errln!(
                        "\nringport-bench: {} idle: MISMATCHED echo on {} connections",
                        ready.spec.label,
                        sample.mismatched
                    );
                }
            }
            res.idle.push(idle);
            if let Some(s) = server.take() {
                s.stop();
            }
        }
    }

    fn ensure_server<'a>(
        &self,
        ready: &Ready,
        plan: &Plan,
        res: &mut ServerResults,
        server: &'a mut Option<Server>,
        start_error: &mut Option<String>,
    ) -> Result<&'a mut Server, String> {
        if let Some(e) = start_error {
            // It failed once this round: do not retry for every cell.
            return Err(e.clone());
        }
        if server.is_none() {
            match self.start(ready, plan, res) {
                Ok(s) => *server = Some(s),
                Err(e) => {
                    *start_error = Some(e.clone());
                    return Err(e);
                }
            }
        }
        Ok(server.as_mut().expect("started above"))
    }

    fn run_cell(
        &self,
        ready: &Ready,
        plan: &Plan,
        res: &mut ServerResults,
        server: &mut Option<Server>,
        start_error: &mut Option<String>,
        cell: &Cell,
    ) -> Outcome {
        let failed = |why: String| Outcome::Failed { why, client: None };
        let s = match self.ensure_server(ready, plan, res, server, start_error) {
            Ok(s) => s,
            Err(e) => return failed(e),
        };
        let secs = if cell.kind == Kind::Bulk {
            plan.bulk_secs
        } else {
            plan.cell_secs
        };
        let until = [
            "--duration".to_owned(),
            format!("{secs}"),
            "--warmup".to_owned(),
            format!("{}", plan.warmup_secs),
            "--mark-window".to_owned(),
        ];
        let args = self.client_args(s.addr(), cell, &until, plan.client_workers);
        let timeout = Duration::from_secs_f64(
            secs + plan.warmup_secs + 30.0 + f64::from(cell.connections) / 500.0,
        );
        // Let the previous cell's connections close first.
        std::thread::sleep(Duration::from_millis(200));
        // The server's CPU time is read when the client opens and closes its measured window:
        // from the end of the warm-up (every connection open) to the deadline; its memory
        // before the client starts and at both marks.
        let pid = s.pid();
        let rss_start = s.rss_bytes();
        let sampler = move || {
            Ok(Mark {
                cpu_ns: proc::cpu_nanos(pid)?,
                rss: proc::rss_bytes(pid),
            })
        };
        let run = proc::run_client(&self.client, &args, &plan.load_cpus, timeout, &sampler);
        if let Some(why) = s.exited() {
            *server = None;
            let client = run.ok().and_then(|r| r.report.ok());
            return Outcome::Failed { why, client };
        }
        let run = match run {
            Ok(r) => r,
            Err(e) => return failed(e),
        };
        let report = match run.report {
            Ok(r) => r,
            Err(e) => return failed(e),
        };
        if report.mismatches > 0 {
            return Outcome::Failed {
                why: format!("{} connections with a mismatched echo", report.mismatches),
                client: Some(report),
            };
        }
        if report.error_total > 0 {
            return Outcome::Failed {
                why: report.describe_errors(),
                client: Some(report),
            };
        }
        if report.messages == 0 {
            return Outcome::Failed {
                why: "no message was echoed".to_owned(),
                client: Some(report),
            };
        }
        let (before, after) = match (run.window.open, run.window.closed) {
            (Some(Ok(before)), Some(Ok(after))) => (before, after),
            (Some(Err(e)), _) | (_, Some(Err(e))) => {
                return Outcome::Failed {
                    why: format!("cannot read the server's CPU time: {e}"),
                    client: Some(report),
                }
            }
            _ => {
                return Outcome::Failed {
                    why: "the client marked no measured window".to_owned(),
                    client: Some(report),
                }
            }
        };
        let cpu_us = after.cpu_ns.saturating_sub(before.cpu_ns) as f64 / 1e3;
        // Both marks find every connection open, though the client starts closing them as
        // the window closes: the larger reading is the one the teardown did not reach.
        let rss = before.rss.max(after.rss);
        let sample = Sample {
            msgs_per_s: report.msgs_per_s,
            mb_per_s: report.mb_per_s,
            p50_us: report.p50_us,
            p99_us: report.p99_us,
            // No CPU time at all is no reading (one in whole clock ticks over a short window):
            // shown as n/a rather than as infinitely lean.
            cpu_us_per_msg: if cpu_us > 0.0 {
                cpu_us / report.messages as f64
            } else {
                f64::NAN
            },
            rss_bytes: rss.map_or(f64::NAN, |r| r as f64),
            rss_per_conn: match (rss_start, rss) {
                (Some(start), Some(end)) => {
                    (end as f64 - start as f64) / f64::from(cell.connections)
                }
                _ => f64::NAN,
            },
        };
        Outcome::Ok {
            sample,
            client: report,
        }
    }
}

/// What is read from the server at the client's window marks.
struct Mark {
    cpu_ns: u64,
    rss: Option<u64>,
}

/// Opens up to `target` idle connections to `server`, checks each is served (one byte echoed),
/// and reads the server's RSS before and after.
fn idle_connections(server: &mut Server, target: u64) -> Result<IdleSample, String> {
    let addr = server.addr();
    // Let the previous cell's connections go first.
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = server
        .rss_bytes()
        .ok_or_else(|| "cannot read the server's VmRSS".to_owned())?;
    // Grown as connections open: the descriptor limit stops the loop long before a `--idle`
    // this large could be held.
    let mut conns: Vec<TcpStream> = Vec::with_capacity(target.min(1 << 16) as usize);
    let mut note = None;
    let sock_addr = socket2::SockAddr::from(addr);
    while (conns.len() as u64) < target {
        let sock = match socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) {
            Ok(s) => s,
            Err(e) => {
                note = Some(format!("stopped at {}: socket: {e}", conns.len()));
                break;
            }
        };
        // A SYN dropped while the listen backlog is momentarily full (a backlog of 128 fills in
        // microseconds) is sent again after 1 s, then 3 s: wait for both before giving up.
        if let Err(e) = sock.connect_timeout(&sock_addr, Duration::from_secs(4)) {
            note = Some(format!("stopped at {}: connect: {e}", conns.len()));
            break;
        }
        let _ = sock.set_tcp_nodelay(true);
        conns.push(sock.into());
    }
    let opened = conns.len() as u64;
    // One byte each: an answer proves the server accepted and serves the connection.
    let mut pending: Vec<usize> = Vec::new();
    let mut closed = 0u64;
    for (i, c) in conns.iter_mut().enumerate() {
        if std::io::Write::write_all(c, b"x").is_ok() {
            pending.push(i);
        } else {
            closed += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut answered = 0u64;
    let mut mismatched = 0u64;
    while !pending.is_empty() && Instant::now() < deadline {
        let fds: Vec<i32> = pending.iter().map(|&i| conns[i].as_raw_fd()).collect();
        let ready = proc::poll_readable(&fds, 200).map_err(|e| format!("poll: {e}"))?;
        let mut still = Vec::with_capacity(pending.len());
        let mut ready = ready.into_iter().peekable();
        for (k, &i) in pending.iter().enumerate() {
            if ready.peek() == Some(&k) {
                ready.next();
                let mut b = [0u8; 1];
                match conns[i].read(&mut b) {
                    Ok(1) if b[0] == b'x' => answered += 1,
                    Ok(1) => mismatched += 1,
                    // End of stream, or reset: the server let it go.
                    _ => closed += 1,
                }
            } else {
                still.push(i);
            }
        }
        pending = still;
    }
    if answered < opened {
        let late = opened.saturating_sub(answered + mismatched + closed);
        let mut why = Vec::new();
        if closed > 0 {
            why.push(format!(
                "{closed} of {opened} connections closed by the server"
            ));
        }
        if late > 0 {
            why.push(format!(
                "{late} of {opened} connections not served within 5 s"
            ));
        }
        if !why.is_empty() {
            let why = why.join("; ");
            // After the note of where opening stopped, if there is one.
            note = Some(match note {
                Some(stopped) => format!("{stopped}; {why}"),
                None => why,
            });
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let rss_after = server.rss_bytes();
    if let Some(why) = server.exited() {
        return Err(why);
    }
    drop(conns);
    Ok(IdleSample {
        target,
        opened,
        answered,
        mismatched,
        closed,
        rss_before,
        rss_after: rss_after.ok_or_else(|| "cannot read the server's VmRSS".to_owned())?,
        note,
    })
}

/// Runs `plan` on every server, interleaved: in each round, each cell on every server in turn.
pub fn run(harness: &Harness, servers: &[Ready], plan: &Plan) -> Vec<ServerResults> {
    let mut results: Vec<ServerResults> = servers
        .iter()
        .map(|r| ServerResults {
            spec: r.spec.clone(),
            listen_line: None,
            integrity_failures: Vec::new(),
            mismatched: false,
            cells: plan
                .cells
                .iter()
                .map(|c| CellResult {
                    server: r.spec.label.clone(),
                    cell: *c,
                    rounds: Vec::new(),
                })
                .collect(),
            idle: Vec::new(),
        })
        .collect();
    let steps = plan.rounds * servers.len() * (plan.cells.len() + usize::from(plan.idle > 0));
    let mut progress = Progress::new(steps);
    for round in 0..plan.rounds {
        harness.run_round(servers, plan, &mut results, &mut progress, round);
    }
    progress.finish();
    results
}

/// Why `cell` cannot be run under this process's `RLIMIT_NOFILE`, if it cannot: its
/// connections, the load generator's own reserve (`ringport client` refuses a load past it), and
/// room for the harness.
fn lacks_descriptors(plan: &Plan, cell: &Cell) -> Option<String> {
    let need = u64::from(cell.connections) + 16 + 3 * u64::from(plan.client_workers);
    (need + 64 > plan.nofile).then(|| {
        format!(
            "needs {need} descriptors, RLIMIT_NOFILE is {} (raise the hard limit)",
            plan.nofile
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.5]), Some(7.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0, 5.0]), Some(3.0));
    }

    #[test]
    fn sample_median_is_per_field() {
        let s = |m: f64, cpu: f64| Sample {
            msgs_per_s: m,
            mb_per_s: m / 10.0,
            p50_us: 1.0,
            p99_us: m,
            cpu_us_per_msg: cpu,
            rss_bytes: 100.0,
            rss_per_conn: f64::NAN,
        };
        let med = Sample::median(&[s(100.0, 9.0), s(300.0, 1.0), s(200.0, 5.0)]).unwrap();
        assert_eq!(med.msgs_per_s, 200.0);
        assert_eq!(med.cpu_us_per_msg, 5.0);
        assert_eq!(med.p99_us, 200.0);
        assert!(med.rss_per_conn.is_nan(), "unread memory stays unread");
        let mut one = s(1.0, 1.0);
        one.rss_per_conn = 48.0;
        let med = Sample::median(&[one, s(2.0, 2.0), s(3.0, 3.0)]).unwrap();
        assert_eq!(
            med.rss_per_conn, 48.0,
            "rounds without the figure are left out"
        );
        assert_eq!(Sample::median(&[]), None);
        let unread = Sample::median(&[s(1.0, f64::NAN), s(3.0, f64::NAN)])
            .expect("rounds measured without a CPU reading are still measured");
        assert_eq!(unread.msgs_per_s, 2.0);
        assert!(unread.cpu_us_per_msg.is_nan());
    }

    #[test]
    fn argv_placeholders_and_cells() {
        let spec = ServerSpec::new(
            "ringport-epoll",
            Role::Subject,
            "ringport",
            "ringport-cli",
            &["serve", "--listen", "{addr}", "--workers", "{workers}"],
        )
        .workers(4);
        assert_eq!(
            spec.argv("127.0.0.1:0"),
            ["serve", "--listen", "127.0.0.1:0", "--workers", "4"]
        );
        let cells = ping_cells(&[1, 50], &[64], &[1, 16]);
        assert_eq!(cells.len(), 4);
        assert_eq!(cells[3], Cell::ping(50, 64, 16));
        assert_eq!(cells[1].label(), "1c 64B p16");
        assert_eq!(Cell::ping(10_000, 4096, 1).label(), "10000c 4KiB p1");
    }

    #[test]
    fn help_flag_probe_matches_whole_flags() {
        let help =
            "Options:\n  --listen <ADDR>\n  --models <LIST>\n  --backend <NAME>  uring|epoll\n";
        assert!(has_flag(help, "--backend"));
        assert!(!has_flag(help, "--model"));
        assert!(has_flag(help, "--models"));
    }

    #[test]
    fn missing_binaries_are_built_in_the_bin_dirs_profile() {
        assert_eq!(
            build_args(Path::new("/w/target/debug"), "peer-tokio"),
            ["build", "-p", "peer-tokio"]
        );
        assert_eq!(
            build_args(Path::new("/w/target/release"), "peer-tokio"),
            ["build", "--release", "-p", "peer-tokio"]
        );
        assert!(is_debug_dir(Path::new(
            "target/x86_64-unknown-linux-gnu/debug"
        )));
        assert!(!is_debug_dir(Path::new("target/debug/deps")));
    }

    #[test]
    fn idle_bytes_per_connection_held() {
        let s = IdleSample {
            target: 100,
            opened: 100,
            answered: 80,
            mismatched: 0,
            closed: 0,
            rss_before: 1000,
            rss_after: 9000,
            note: None,
        };
        // 20 not answered in time are still held, and cost memory.
        assert_eq!(s.bytes_per_conn(), Some(80.0));
        // 20 closed by the server (select's descriptors >= FD_SETSIZE) cost nothing.
        let closed = IdleSample {
            closed: 20,
            ..s.clone()
        };
        assert_eq!(closed.bytes_per_conn(), Some(100.0));
        let none = IdleSample { answered: 0, ..s };
        assert_eq!(none.bytes_per_conn(), None);
    }
}
