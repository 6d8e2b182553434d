//! Processes: spawning servers and load generators pinned to CPU sets, stopping them, and the
//! few `/proc` readings the harness needs (CPU time, resident memory).
//!
//! Every raw system call of the harness lives in this module.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Lines of a server's stderr kept for failure reports.
const LOG_LINES: usize = 20;

/// Parses a kernel CPU list such as `0,2-3` into sorted, distinct CPU numbers.
///
/// # Errors
///
/// An empty list, a malformed number or a range whose end is below its start.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |t: &str| {
            let n = t
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("`{s}`: `{t}` is not a CPU number"))?;
            // The most a CPU set (`cpu_set_t`) can name.
            if n >= libc::CPU_SETSIZE as usize {
                return Err(format!(
                    "`{s}`: CPU {n} is beyond the {} a CPU set can name",
                    libc::CPU_SETSIZE
                ));
            }
            Ok(n)
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if b < a {
                    return Err(format!("`{s}`: range {part} ends before it starts"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    if cpus.is_empty() {
        return Err(format!("`{s}`: empty CPU list"));
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Formats CPU numbers in the kernel's list format, e.g. `[0, 2, 3]` as `0,2-3`.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// Returns the CPUs this process may run on.
///
/// # Errors
///
/// The error of `sched_getaffinity(2)`.
pub fn available_cpus() -> io::Result<Vec<usize>> {
    let mut set = empty_cpu_set();
    // SAFETY: `set` is a valid, writable cpu_set_t and the size passed is its size.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, so CPU_ISSET reads inside the set.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

fn empty_cpu_set() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array, for which all zeroes is the empty set.
    unsafe { std::mem::zeroed() }
}

/// The set of `cpus` (those below `CPU_SETSIZE`).
fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    let mut set = empty_cpu_set();
    for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: `c` is below CPU_SETSIZE, so CPU_SET writes inside the set.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

/// Makes the calling thread run only on `cpus`, and with it the threads and processes it
/// starts afterwards (call it before starting any, for the whole process).
///
/// # Errors
///
/// The error of `sched_setaffinity(2)` (for instance, none of `cpus` is allowed here).
pub fn pin_self(cpus: &[usize]) -> io::Result<()> {
    let set = cpu_set(cpus);
    // SAFETY: the set is a live local of the size passed.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `cmd`'s process run only on `cpus` (anywhere when `cpus` is empty), and die with the
/// thread that starts it: a harness killed outright (a CI timeout, `kill -9`) leaves no server
/// serving on, pinned to the server CPUs, under the next run.
fn pin(cmd: &mut Command, cpus: &[usize]) {
    let set = (!cpus.is_empty()).then(|| cpu_set(cpus));
    // SAFETY: getpid(2) only returns a number.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the hook runs in the child between fork and exec. It makes only async-signal-safe
    // system calls (prctl(2), getppid(2), sched_setaffinity(2)) on values built before the
    // fork; it does not allocate or take locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the request was made.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            match &set {
                Some(set)
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set)
                        != 0 =>
                {
                    Err(io::Error::last_os_error())
                }
                _ => Ok(()),
            }
        });
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit; returns `(soft, hard)` after.
///
/// Children inherit the raised limit.
///
/// # Errors
///
/// The error of `getrlimit(2)` or `setrlimit(2)`.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct passed by pointer, which is valid and writable.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct passed by pointer, which is valid.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// How many local ports `net.ipv4.ip_local_port_range` (its text: `LOW HIGH`) gives outgoing
/// connections: the most one address can open to one server address and port.
pub fn parse_port_range(text: &str) -> Option<u64> {
    let mut it = text.split_whitespace().map(|w| w.parse::<u64>().ok());
    let (low, high) = (it.next()??, it.next()??);
    (high >= low).then(|| high - low + 1)
}

/// The local port range's size, from `/proc`; `None` where it cannot be read.
pub fn local_ports() -> Option<u64> {
    parse_port_range(&std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?)
}

/// Returns the clock ticks per second that `/proc/PID/stat` times are counted in.
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// CPU time of a process, from `/proc/PID/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTicks {
    /// User time (field 14).
    pub utime: u64,
    /// System time (field 15).
    pub stime: u64,
}

impl CpuTicks {
    /// User plus system time.
    pub fn total(self) -> u64 {
        self.utime + self.stime
    }
}

/// Parses the contents of `/proc/PID/stat`.
///
/// The command name (field 2) is in parentheses and may itself hold spaces and parentheses, so
/// the fields are counted from the last `)`.
///
/// # Errors
///
/// Text that is not in that format.
pub fn parse_stat(text: &str) -> Result<CpuTicks, String> {
    let close = text
        .rfind(')')
        .ok_or_else(|| "/proc/PID/stat: no `)` after the command name".to_owned())?;
    // After the `)`, the first field is field 3 (state); utime is field 14, stime field 15.
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64, String> {
        let raw = fields
            .get(n - 3)
            .ok_or_else(|| format!("/proc/PID/stat: no field {n}"))?;
        raw.parse()
            .map_err(|_| format!("/proc/PID/stat: field {n} `{raw}` is not a number"))
    };
    Ok(CpuTicks {
        utime: field(14)?,
        stime: field(15)?,
    })
}

/// Parses `VmRSS` out of the contents of `/proc/PID/status`, in bytes.
///
/// Returns `None` when the line is absent (a zombie has none) or malformed.
pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    let unit = match words.next() {
        Some("kB") | None => 1024,
        Some("mB" | "MB") => 1 << 20,
        Some(_) => return None,
    };
    Some(n * unit)
}

/// Returns the address after `listening on ` in a log line, if the line has one.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let at = line.find("listening on ")?;
    let token = line[at + "listening on ".len()..]
        .split_whitespace()
        .next()?;
    token
        .trim_end_matches([',', ';', '.'])
        .trim_start_matches("http://")
        .parse()
        .ok()
}

/// Returns the value of a `key=value` token in a log line.
pub fn parse_key_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Reads a process's CPU time in clock ticks.
///
/// # Errors
///
/// The process is gone or its stat file is malformed.
pub fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    parse_stat(&text).map(CpuTicks::total)
}

/// Reads a process's CPU time (all its threads, those that have ended included) in
/// nanoseconds, from its CPU-time clock; where that clock cannot be read, from
/// `/proc/PID/stat`'s ticks (the kernel rounds its user and system times down to a tick each,
/// 10 ms here: up to 20 ms off a window, against nothing for the clock).
///
/// # Errors
///
/// The process is gone.
pub fn cpu_nanos(pid: u32) -> Result<u64, String> {
    if let Some(ns) = libc::pid_t::try_from(pid).ok().and_then(cpu_clock_nanos) {
        return Ok(ns);
    }
    let per_tick = 1_000_000_000 / clock_ticks_per_sec();
    cpu_ticks(pid).map(|t| t.saturating_mul(per_tick))
}

/// The process's CPU-time clock (`clock_getcpuclockid`), read.
fn cpu_clock_nanos(pid: libc::pid_t) -> Option<u64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a live local the call writes the clock id into.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live local the call writes the time into.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Reads a process's resident set size in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    parse_vmrss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Sends `signal` to `pid`.
fn send_signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child,
        // not yet reaped, so it cannot name another process.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Stops a child: SIGTERM, then SIGKILL after `grace`; reaps it.
fn stop_child(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    send_signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// An echo server running in its own process, pinned, with its stderr collected.
#[derive(Debug)]
pub struct Server {
    child: Child,
    addr: SocketAddr,
    listen_line: String,
    log: Arc<Mutex<VecDeque<String>>>,
    exited: Option<ExitStatus>,
}

impl Server {
    /// Starts `program args` on `cpus` and waits for it to log `listening on ADDR`.
    ///
    /// # Errors
    ///
    /// The process cannot be started, exits, or does not log its address within `timeout`;
    /// the message includes the end of its stderr.
    pub fn spawn(
        program: &Path,
        args: &[String],
        cpus: &[usize],
        timeout: Duration,
    ) -> Result<Self, String> {
        let mut child = start(program, args, cpus, Stdio::null())?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        let thread_log = Arc::clone(&log);
        let reader = thread::Builder::new()
            .name("server-log".into())
            .spawn(move || {
                let mut tx = Some(tx);
                // To the end: a server whose log is not read blocks once the pipe fills.
                for_each_line(stderr, |line| {
                    if let Some(addr) = parse_listening(line) {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send((addr, line.to_owned()));
                        }
                    }
                    let mut log = thread_log.lock().unwrap_or_else(|e| e.into_inner());
                    if log.len() == LOG_LINES {
                        log.pop_front();
                    }
                    log.push_back(line.to_owned());
                });
            });
        if let Err(e) = reader {
            stop_child(&mut child, Duration::from_millis(500));
            return Err(no_thread("the server's log", &e));
        }
        match rx.recv_timeout(timeout) {
            Ok((addr, listen_line)) => Ok(Self {
                child,
                addr,
                listen_line,
                log,
                exited: None,
            }),
            Err(e) => {
                let status = if matches!(e, mpsc::RecvTimeoutError::Timeout) {
                    stop_child(&mut child, Duration::from_millis(500));
                    format!("did not log `listening on ADDR` within {timeout:?}")
                } else {
                    // Its log ended: it is exiting, or closed stderr and may serve on (then
                    // it is stopped after a grace).
                    match wait_or_kill(&mut child, Duration::from_millis(500)) {
                        Some(s) => format!("exited ({s}) before listening"),
                        None => "closed its log before listening".to_owned(),
                    }
                };
                thread::sleep(Duration::from_millis(50));
                Err(format!("{status}{}", tail(&log)))
            }
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's `listening on` log line.
    pub fn listen_line(&self) -> &str {
        &self.listen_line
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns `Some(why)` when the server has exited.
    pub fn exited(&mut self) -> Option<String> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        let status = self.exited?;
        thread::sleep(Duration::from_millis(50));
        Some(format!("server exited ({status}){}", tail(&self.log)))
    }

    /// Resident set size in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(self.pid())
    }

    /// Stops the server (SIGTERM, then SIGKILL after a second) and reaps it.
    pub fn stop(mut self) {
        stop_child(&mut self.child, Duration::from_secs(1));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Formats the end of a log as an indented suffix, or nothing when it is empty.
fn tail(log: &Mutex<VecDeque<String>>) -> String {
    let log = log.lock().unwrap_or_else(|e| e.into_inner());
    if log.is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = log.iter().rev().take(4).map(String::as_str).collect();
    let lines: Vec<&str> = lines.into_iter().rev().collect();
    format!("; stderr: {}", lines.join(" | "))
}

/// The summary line that `ringport client --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientReport {
    /// The client's own port backend.
    pub backend: String,
    /// Connections opened.
    pub connections: u64,
    /// Messages echoed back in full.
    pub messages: u64,
    /// Bytes echoed and verified.
    pub bytes: u64,
    /// Wall-clock time of the run.
    pub elapsed_s: f64,
    /// Messages per second.
    pub msgs_per_s: f64,
    /// Verified megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Median round trip.
    pub p50_us: f64,
    /// 99th percentile round trip.
    pub p99_us: f64,
    /// 99.9th percentile round trip.
    pub p999_us: f64,
    /// Slowest round trip.
    pub max_us: f64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// All failures.
    pub error_total: u64,
    /// Echoed bytes that differed from what was sent.
    pub mismatches: u64,
    /// No errors and no mismatches.
    pub ok: bool,
}

impl ClientReport {
    /// Describes the errors, most frequent first, e.g. `976 errors (connection reset ×976)`.
    pub fn describe_errors(&self) -> String {
        let mut kinds: Vec<(&String, &u64)> = self.errors.iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(a.1));
        let kinds: Vec<String> = kinds
            .iter()
            .take(3)
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect();
        format!("{} client errors ({})", self.error_total, kinds.join(", "))
    }
}

/// Finds and parses the JSON summary line in the client's stdout (the last line that is an
/// object).
///
/// # Errors
///
/// No such line, or one that lacks a key.
pub fn parse_client_json(stdout: &str) -> Result<ClientReport, String> {
    let line = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| "the client printed no JSON line".to_owned())?;
    serde_json::from_str(line).map_err(|e| format!("the client's JSON line: {e}: {line}"))
}

/// Printed by `ringport client --mark-window` on stderr when its measured window opens.
pub const WINDOW_OPEN: &str = "ringport client: window open";
/// Printed by `ringport client --mark-window` on stderr when its measured window closes.
pub const WINDOW_CLOSED: &str = "ringport client: window closed";

/// What a load-generator process did.
#[derive(Debug)]
pub struct ClientRun<T> {
    /// The parsed summary, or why there is none.
    pub report: Result<ClientReport, String>,
    /// How it exited; `None` when it was killed for running too long.
    pub status: Option<ExitStatus>,
    /// The end of its stderr.
    pub stderr_tail: String,
    /// What the sampler returned at the client's window marks.
    pub window: Window<T>,
}

/// What a sampler returned when the client marked its measured window open and closed (`None`
/// for a mark the client did not print).
#[derive(Debug)]
pub struct Window<T> {
    /// At [`WINDOW_OPEN`].
    pub open: Option<Result<T, String>>,
    /// At [`WINDOW_CLOSED`].
    pub closed: Option<Result<T, String>>,
}

impl<T> Default for Window<T> {
    fn default() -> Self {
        Window {
            open: None,
            closed: None,
        }
    }
}

/// Starts `program` pinned to `cpus`, stdin closed, stderr piped, `stdout` as given.
///
/// Its log level is the default one, whatever `RUST_LOG` says here: `ringport serve` says where it
/// listens at that level, and a more verbose one would charge its logging to the server's
/// figures (the peers log nothing either way).
fn start(program: &Path, args: &[String], cpus: &[usize], stdout: Stdio) -> Result<Child, String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    pin(&mut cmd, cpus);
    cmd.spawn()
        .map_err(|e| format!("{}: cannot start: {e}", program.display()))
}

/// Calls `sample` when the client prints [`WINDOW_OPEN`] or [`WINDOW_CLOSED`] on stderr (with
/// `--mark-window`), so that what the server spent can be read around the measured window.
///
/// # Errors
///
/// It cannot be started.
pub fn run_client<T: Send>(
    program: &Path,
    args: &[String],
    cpus: &[usize],
    timeout: Duration,
    sample: &(dyn Fn() -> Result<T, String> + Sync),
) -> Result<ClientRun<T>, String> {
    let mut child = start(program, args, cpus, Stdio::piped())?;
    let out = match read_all_in_thread(child.stdout.take()) {
        Ok(out) => out,
        Err(e) => {
            stop_child(&mut child, Duration::from_millis(500));
            return Err(no_thread("the client's output", &e));
        }
    };
    let stderr_pipe = child.stderr.take();
    let scoped = thread::scope(|scope| {
        let err = thread::Builder::new().spawn_scoped(scope, move || {
            let mut text = String::new();
            let mut window = Window::default();
            let Some(pipe) = stderr_pipe else {
                return (text, window);
            };
            for_each_line(pipe, |line| match line {
                WINDOW_OPEN => window.open = Some(sample()),
                WINDOW_CLOSED => window.closed = Some(sample()),
                _ => {
                    text.push_str(line);
                    text.push('\n');
                }
            });
            (text, window)
        });
        let err = match err {
            Ok(err) => err,
            Err(e) => {
                // Without a reader the client could block on a full stderr pipe.
                stop_child(&mut child, Duration::from_millis(500));
                return Err(no_thread("the client's stderr", &e));
            }
        };
        let status = wait_or_kill(&mut child, timeout);
        let (stderr, window) = err.join().unwrap_or_default();
        Ok((status, stderr, window))
    });
    let stdout = out.join().unwrap_or_default();
    let (status, stderr, window) = scoped?;
    let stderr_tail: Vec<&str> = stderr.lines().rev().take(3).collect();
    let stderr_tail = stderr_tail
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join(" | ");
    let report = match status {
        None => Err(format!("the client ran past {timeout:?} and was killed")),
        Some(_) => parse_client_json(&stdout).map_err(|e| {
            format!(
                "{e} (exit {}){}",
                status.map_or_else(|| "?".into(), |s| s.to_string()),
                if stderr_tail.is_empty() {
                    String::new()
                } else {
                    format!("; stderr: {stderr_tail}")
                }
            )
        }),
    };
    Ok(ClientRun {
        report,
        status,
        stderr_tail,
        window,
    })
}

/// Waits for `child` to exit; after `timeout`, kills it and returns `None`.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Calls `f` with each line of `pipe` (without its line end) until the end or an error. Read as
/// bytes and decoded lossily: a stray byte that is not UTF-8 must not end the reading.
fn for_each_line(pipe: impl Read, mut f: impl FnMut(&str)) {
    let mut pipe = BufReader::new(pipe);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match pipe.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => return,
            Ok(_) => f(String::from_utf8_lossy(&raw).trim_end()),
        }
    }
}

fn read_all_in_thread<R: Read + Send + 'static>(
    r: Option<R>,
) -> io::Result<thread::JoinHandle<String>> {
    thread::Builder::new().spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    })
}

/// The error for a helper thread the system refused to start.
fn no_thread(what: &str, e: &io::Error) -> String {
    format!("cannot start a thread to read {what}: {e}")
}

/// Returns `dir/name` when it is a file.
pub fn find_binary(dir: &Path, name: &str) -> Option<PathBuf> {
    let path = dir.join(name);
    path.is_file().then_some(path)
}

/// Runs `program args` and returns its stdout and stderr together (for `--help` probes).
///
/// # Errors
///
/// It cannot be started or runs past five seconds.
pub fn capture_output(program: &Path, args: &[&str]) -> Result<String, String> {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let mut cmd = Command::new(program);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: cannot start: {e}", program.display()))?;
    let readers = read_all_in_thread(child.stdout.take())
        .and_then(|out| Ok((out, read_all_in_thread(child.stderr.take())?)));
    let (out, err) = match readers {
        Ok(readers) => readers,
        Err(e) => {
            stop_child(&mut child, Duration::from_millis(500));
            return Err(format!(
                "{}: {}",
                program.display(),
                no_thread("its output", &e)
            ));
        }
    };
    if wait_or_kill(&mut child, Duration::from_secs(5)).is_none() {
        return Err(format!(
            "{} {}: timed out",
            program.display(),
            args.join(" ")
        ));
    }
    Ok(out.join().unwrap_or_default() + &err.join().unwrap_or_default())
}

/// Polls `fds` for readability for up to `timeout_ms`; returns the indexes that are readable
/// or hung up.
///
/// # Errors
///
/// The error of `poll(2)`.
pub fn poll_readable(fds: &[i32], timeout_ms: i32) -> io::Result<Vec<usize>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs that poll may write.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfds
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents != 0)
        .map(|(i, _)| i)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parentheses_in_the_name() {
        let text = "4242 (my (weird) srv) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    731 88 0 0 20 0 3 0 123456 1000000 250 18446744073709551615 1 1 0 0 0 0 0 \
                    0 0 0 0 0 17 0 0 0 0 0 0\n";
        let t = parse_stat(text).unwrap();
        assert_eq!(
            t,
            CpuTicks {
                utime: 731,
                stime: 88
            }
        );
        assert_eq!(t.total(), 819);
    }

    /// The CPU-time clock of a process agrees with its `/proc` ticks (which lag it by at most
    /// two ticks) and counts time spent.
    #[test]
    fn cpu_nanos_agree_with_the_ticks_and_grow() {
        let pid = std::process::id();
        let before = cpu_nanos(pid).unwrap();
        // Spend some CPU time: until the clock shows a millisecond more (within 5 s).
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_nanos(pid).unwrap() < before + 1_000_000 && start.elapsed().as_secs() < 5 {
            for i in 0..10_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
        }
        let after = cpu_nanos(pid).unwrap();
        assert!(after >= before + 1_000_000, "{before} -> {after}");
        let tick = 1_000_000_000 / clock_ticks_per_sec();
        // The ticks read between two readings of the clock (other tests' threads of this
        // process spend CPU time meanwhile): at most a tick past the later one, at most three
        // ticks behind the earlier one.
        let early = cpu_nanos(pid).unwrap();
        let ticks = cpu_ticks(pid).unwrap() * tick;
        let late = cpu_nanos(pid).unwrap();
        assert!(
            ticks <= late + tick && early <= ticks + 3 * tick,
            "ticks {ticks} ns against the clock's {early}..{late} ns"
        );
    }

    #[test]
    fn stat_of_this_process_parses() {
        // The count is live: it grows while this thread spins (bounded; a tick is 10 ms).
        let before = cpu_ticks(std::process::id()).unwrap();
        let give_up = Instant::now() + Duration::from_secs(30);
        let mut x = 0u64;
        while cpu_ticks(std::process::id()).unwrap() == before {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            assert!(
                Instant::now() < give_up,
                "the CPU time did not grow in 30 s"
            );
        }
    }

    #[test]
    fn stat_that_is_cut_short_is_an_error() {
        assert!(parse_stat("1 (a) S 1 2 3")
            .unwrap_err()
            .contains("field 14"));
        assert!(parse_stat("garbage").is_err());
        assert!(parse_stat("1 (a) S 1 1 1 0 -1 0 0 0 0 0 x 5 0")
            .unwrap_err()
            .contains("`x`"));
    }

    #[test]
    fn vmrss_in_bytes() {
        let status = "Name:\tringport\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\nThreads:\t2\n";
        assert_eq!(parse_vmrss(status), Some(5120 * 1024));
        assert_eq!(parse_vmrss("Name:\tzombie\nState:\tZ (zombie)\n"), None);
        assert_eq!(parse_vmrss("VmRSS:\t  lots kB\n"), None);
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,2-3").unwrap(), vec![0, 2, 3]);
        assert_eq!(parse_cpu_list("5").unwrap(), vec![5]);
        assert_eq!(parse_cpu_list(" 3-4, 1 ,4").unwrap(), vec![1, 3, 4]);
        assert!(parse_cpu_list("3-1").unwrap_err().contains("ends before"));
        assert!(parse_cpu_list("a").is_err());
        // Beyond what a CPU set can name: an error, not a huge list.
        assert!(parse_cpu_list("0-18446744073709551615")
            .unwrap_err()
            .contains("beyond"));
        assert!(parse_cpu_list("1024").is_err());
        assert!(parse_cpu_list("").is_err());
        assert_eq!(format_cpu_list(&[0, 2, 3, 4, 7]), "0,2-4,7");
        assert_eq!(format_cpu_list(&[1]), "1");
    }

    #[test]
    fn listening_line() {
        let line = "2026-01-01T00:00:00Z  INFO ringport::serve: listening on 127.0.0.1:40123 \
                    backend=io_uring workers=1";
        assert_eq!(
            parse_listening(line),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        assert_eq!(parse_key_value(line, "backend"), Some("io_uring"));
        assert_eq!(parse_key_value(line, "workers"), Some("1"));
        assert_eq!(parse_key_value(line, "model"), None);
        assert_eq!(
            parse_listening("listening on [::1]:5150"),
            Some("[::1]:5150".parse().unwrap())
        );
        assert_eq!(parse_listening("listening soon"), None);
    }

    #[test]
    fn client_json_line() {
        let out = "noise\n{\"backend\":\"io_uring\",\"connections\":4,\"messages\":200,\
                   \"bytes\":819200,\"elapsed_s\":0.5,\"msgs_per_s\":400.0,\"mb_per_s\":1.6384,\
                   \"p50_us\":12.5,\"p99_us\":40.0,\"p999_us\":41.0,\"max_us\":41.5,\
                   \"errors\":{\"connection reset\":2,\"echo mismatch\":1},\"error_total\":3,\
                   \"mismatches\":7,\"ok\":false}\n";
        let r = parse_client_json(out).unwrap();
        assert_eq!(r.backend, "io_uring");
        assert_eq!(r.messages, 200);
        assert_eq!(r.bytes, 819_200);
        assert_eq!(r.msgs_per_s, 400.0);
        assert_eq!(r.p99_us, 40.0);
        assert_eq!(r.errors.get("connection reset"), Some(&2));
        assert_eq!(r.mismatches, 7);
        assert!(!r.ok);
        assert_eq!(
            r.describe_errors(),
            "3 client errors (connection reset ×2, echo mismatch ×1)"
        );
        assert!(parse_client_json("no json here\n")
            .unwrap_err()
            .contains("no JSON"));
        assert!(parse_client_json("{\"backend\":\"x\"}")
            .unwrap_err()
            .contains("missing field"));
    }
}
