//! The report: a Markdown table of figures and ratios, and the raw results as JSON.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::matrix::{Kind, Plan, Role, Sample, ServerResults, Skipped};

/// Everything one run measured, as written to `MODE.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `peers`, `models` or `scaling`.
    pub mode: String,
    /// Heading of the Markdown report.
    pub title: String,
    /// The settings.
    pub plan: Plan,
    /// CPUs this process may use.
    pub machine_cpus: Vec<usize>,
    /// Clock ticks per second of the CPU-time readings.
    pub clock_ticks_per_sec: u64,
    /// Remarks about the run (e.g. worker counts left out).
    pub notes: Vec<String>,
    /// What makes the figures themselves doubtful (e.g. unoptimised binaries), shown first.
    pub warnings: Vec<String>,
    /// Servers that could not run, and why.
    pub skipped: Vec<Skipped>,
    /// Compare a subject only with peers running the same worker count.
    pub compare_same_workers: bool,
    /// The results.
    pub servers: Vec<ServerResults>,
}

/// Formats a byte count as `64B`, `4KiB`, `1MiB` (exact units only, else bytes).
pub fn fmt_size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{}KiB", bytes >> 10)
    } else {
        format!("{bytes}B")
    }
}

/// Formats a count with thousands separators: `1234567.8` as `1,234,568`.
pub fn fmt_count(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".to_owned();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

/// Formats bytes as MiB with one decimal, or `n/a` where memory could not be read.
pub fn fmt_mib(bytes: f64) -> String {
    if bytes.is_finite() {
        format!("{:.1}", bytes / (1u64 << 20) as f64)
    } else {
        "n/a".to_owned()
    }
}

/// Formats an axis value compactly: `1.2M`, `3.5k`, `2.5`.
pub fn fmt_count_short(x: f64) -> String {
    let a = x.abs();
    if a >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else if a >= 10.0 || a == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// Formats microseconds with about three significant digits (none after the point from 100).
pub fn fmt_us(x: f64) -> String {
    if !x.is_finite() {
        "n/a".to_owned()
    } else if x < 1.0 {
        format!("{x:.3}")
    } else if x < 10.0 {
        format!("{x:.2}")
    } else if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

/// `a / b`, when both are known and `b` is positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

/// Formats a ratio as `1.23x`, or `n/a`.
pub fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 100.0 => format!("{r:.0}x"),
        Some(r) => format!("{r:.2}x"),
        None => "n/a".to_owned(),
    }
}

/// Shortens `s` to `max` characters, marking the cut with `…`; `|` is escaped for tables.
fn cell_text(s: &str, max: usize) -> String {
    let s = s.replace('|', "/").replace('\n', " ");
    if s.chars().count() <= max {
        s
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    }
}

/// The best peer figure for a cell: the highest msgs/s and MB/s and the lowest CPU per
/// message, each with the peer's label.
#[derive(Debug, Clone, PartialEq)]
pub struct Best {
    /// Highest messages per second, and who.
    pub msgs: Option<(f64, String)>,
    /// Highest megabytes per second, and who.
    pub mb: Option<(f64, String)>,
    /// Lowest CPU microseconds per message, and who.
    pub cpu: Option<(f64, String)>,
}

/// Finds the best peer among `(label, sample)` pairs.
pub fn best_peer<'a>(peers: impl IntoIterator<Item = (&'a str, Sample)>) -> Best {
    let mut best = Best {
        msgs: None,
        mb: None,
        cpu: None,
    };
    for (label, s) in peers {
        if s.msgs_per_s.is_finite() && best.msgs.as_ref().is_none_or(|(m, _)| s.msgs_per_s > *m) {
            best.msgs = Some((s.msgs_per_s, label.to_owned()));
        }
        if s.mb_per_s.is_finite() && best.mb.as_ref().is_none_or(|(m, _)| s.mb_per_s > *m) {
            best.mb = Some((s.mb_per_s, label.to_owned()));
        }
        // A CPU time of zero is no measurement (a `/proc` reading in whole ticks over a short
        // window): it would be "best", and leave every ratio to it undefined.
        if s.cpu_us_per_msg.is_finite()
            && s.cpu_us_per_msg > 0.0
            && best.cpu.as_ref().is_none_or(|(c, _)| s.cpu_us_per_msg < *c)
        {
            best.cpu = Some((s.cpu_us_per_msg, label.to_owned()));
        }
    }
    best
}

/// What a `*` after a ratio means.
const PARTIAL_LEGEND: &str = "\\* some rounds of this measurement failed on the subject or on a \
     peer it is compared with: the ratio compares medians of fewer rounds, and a peer that \
     failed every round is left out of the best peer (the notes say why).";

impl Report {
    /// The peers `subject` is compared with (those with its worker count, where the report
    /// compares like with like).
    fn peers_of<'a>(
        &'a self,
        subject: &'a ServerResults,
    ) -> impl Iterator<Item = &'a ServerResults> + 'a {
        self.servers
            .iter()
            .filter(|s| s.spec.role == Role::Peer)
            .filter(|s| !self.compare_same_workers || s.spec.workers == subject.spec.workers)
    }

    fn best_for(&self, subject: &ServerResults, index: usize) -> Best {
        best_peer(
            self.peers_of(subject)
                .filter_map(|s| Some((s.spec.label.as_str(), s.cells.get(index)?.median()?))),
        )
    }

    /// Whether a round of cell `index` failed on `subject` or on any peer it is compared with
    /// (so its ratios compare medians of fewer rounds, or leave a peer out).
    fn partial(&self, subject: &ServerResults, index: usize) -> bool {
        self.failed_somewhere(subject, |s| {
            s.cells.get(index).is_some_and(|c| c.failures().0 > 0)
        })
    }

    /// Like [`Report::partial`], for the idle measurement.
    fn idle_partial(&self, subject: &ServerResults) -> bool {
        self.failed_somewhere(subject, |s| s.idle_failures().0 > 0)
    }

    /// Whether `failed` holds for `subject` or any peer it is compared with.
    fn failed_somewhere(
        &self,
        subject: &ServerResults,
        failed: impl Fn(&ServerResults) -> bool,
    ) -> bool {
        std::iter::once(subject)
            .chain(self.peers_of(subject))
            .any(failed)
    }

    fn subjects(&self) -> impl Iterator<Item = &ServerResults> {
        self.servers.iter().filter(|s| s.spec.role == Role::Subject)
    }

    /// The subjects (this project's own completion-port server, `ringport serve`, in every
    /// mode) that were skipped or measured no cell in any round, each with why: the run could
    /// not measure what it exists to measure. Peers (the I/O models included) are only
    /// reported: a model that fails a cell by its documented limit is a result.
    pub fn unmeasured_subjects(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .skipped
            .iter()
            .filter(|s| s.role == Role::Subject)
            .map(|s| format!("{}: skipped ({})", s.label, s.why))
            .collect();
        out.extend(
            self.subjects()
                .filter(|s| {
                    !s.cells.is_empty()
                        && !s
                            .cells
                            .iter()
                            .flat_map(|c| &c.rounds)
                            .any(|o| matches!(o, crate::matrix::Outcome::Ok { .. }))
                })
                .map(|s| format!("{}: no cell measured", s.spec.label)),
        );
        out
    }

    /// Renders the Markdown report.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let p = &self.plan;
        let _ = writeln!(md, "# {}\n", self.title);
        let _ = writeln!(
            md,
            "Median of {} interleaved round(s); {} s per cell{}, measured after {} s of warm-up \
             load; servers on CPU(s) {}, load \
             (`ringport client`, {} worker(s)) on CPU(s) {}; RLIMIT_NOFILE {}; server CPU time \
             from its CPU-time clock (or, where that cannot be read, `/proc` in {} Hz ticks). \
             All figures come from this run on this machine: compare them with \
             each other (the ratios), not with other machines.\n",
            p.rounds,
            p.cell_secs,
            if p.cells.iter().any(|c| c.kind == Kind::Bulk) {
                format!(" ({} s per bulk cell)", p.bulk_secs)
            } else {
                String::new()
            },
            p.warmup_secs,
            crate::proc::format_cpu_list(&p.server_cpus),
            p.client_workers,
            crate::proc::format_cpu_list(&p.load_cpus),
            p.nofile,
            self.clock_ticks_per_sec,
        );
        for w in &self.warnings {
            let _ = writeln!(md, "- **WARNING**: {w}");
        }
        for n in &self.notes {
            let _ = writeln!(md, "- note: {n}");
        }
        for s in &self.skipped {
            let _ = writeln!(md, "- skipped: {}: {}", s.label, s.why);
        }
        for s in &self.servers {
            let _ = writeln!(
                md,
                "- {} ({}): `{} {}`{}",
                s.spec.label,
                match s.spec.role {
                    Role::Subject => "subject",
                    Role::Peer => "peer",
                },
                s.spec.program,
                s.spec.argv("ADDR").join(" "),
                s.listen_line
                    .as_deref()
                    .and_then(|l| crate::proc::parse_key_value(l, "backend"))
                    .map(|b| format!(", server reports backend={b}"))
                    .unwrap_or_default(),
            );
            for f in &s.integrity_failures {
                let _ = writeln!(md, "  - **INTEGRITY CHECK FAILED**: {}", cell_text(f, 300));
            }
        }
        md.push('\n');
        self.ping_table(&mut md);
        self.ratio_table(&mut md);
        self.bulk_table(&mut md);
        self.idle_table(&mut md);
        md
    }

    fn ping_table(&self, md: &mut String) {
        let ping: Vec<usize> = (0..self.plan.cells.len())
            .filter(|&i| self.plan.cells[i].kind == Kind::PingPong)
            .collect();
        if ping.is_empty() || self.servers.is_empty() {
            return;
        }
        let _ = writeln!(md, "## Ping-pong\n");
        let _ = writeln!(
            md,
            "RSS B/conn: the server's resident memory in the window (the larger of the readings \
             at its two marks) less a reading taken just before the cell's load started, per \
             connection. A server's process serves every cell of a round, so what earlier cells \
             paged in is already in that reading: the column means most in the first cell and \
             at 1,000 and 10,000 connections.\n"
        );
        let _ = writeln!(
            md,
            "| cell | server | msgs/s | CPU µs/msg | p50 µs | p99 µs | RSS MiB | RSS B/conn | msgs/s ÷ \
             best peer (>1 faster) | CPU/msg ÷ best peer (<1 leaner) | note |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        let mut marked = false;
        for &i in &ping {
            let cell = self.plan.cells[i];
            for (k, s) in self.servers.iter().enumerate() {
                let r = &s.cells[i];
                let label = if k == 0 { cell.label() } else { String::new() };
                let (nfail, whys) = r.failures();
                let note = if nfail > 0 && !r.rounds.is_empty() {
                    format!("{nfail}/{} failed: {}", r.rounds.len(), whys.join("; "))
                } else {
                    String::new()
                };
                match r.median() {
                    Some(m) => {
                        let (rm, rc) = if s.spec.role == Role::Subject {
                            let best = self.best_for(s, i);
                            let partial = self.partial(s, i);
                            (
                                ratio_marked(
                                    Some(m.msgs_per_s),
                                    best.msgs.as_ref(),
                                    partial,
                                    &mut marked,
                                ),
                                ratio_marked(
                                    Some(m.cpu_us_per_msg),
                                    best.cpu.as_ref(),
                                    partial,
                                    &mut marked,
                                ),
                            )
                        } else {
                            (String::new(), String::new())
                        };
                        let _ = writeln!(
                            md,
                            "| {label} | {} | {} | {} | {} | {} | {} | {} | {rm} | {rc} | {} |",
                            s.spec.label,
                            fmt_count(m.msgs_per_s),
                            fmt_us(m.cpu_us_per_msg),
                            fmt_us(m.p50_us),
                            fmt_us(m.p99_us),
                            fmt_mib(m.rss_bytes),
                            fmt_count(m.rss_per_conn),
                            cell_text(&note, 120),
                        );
                    }
                    None => {
                        let why = whys.join("; ");
                        let _ = writeln!(
                            md,
                            "| {label} | {} | **failed** | | | | | | | | {} |",
                            s.spec.label,
                            cell_text(&why, 160)
                        );
                    }
                }
            }
        }
        if marked {
            let _ = writeln!(md, "\n{PARTIAL_LEGEND}");
        }
        md.push('\n');
    }

    fn ratio_table(&self, md: &mut String) {
        let subjects: Vec<&ServerResults> = self.subjects().collect();
        if subjects.is_empty() || !self.servers.iter().any(|s| s.spec.role == Role::Peer) {
            return;
        }
        let _ = writeln!(md, "## Ratios: subject ÷ best peer\n");
        if self.plan.cells.iter().any(|c| c.kind == Kind::Bulk) {
            let _ = writeln!(
                md,
                "In the bulk row the first column of each pair is the ratio of GB/s, and the \
                 second of CPU per MiB.\n"
            );
        }
        let mut head = String::from("| cell |");
        let mut rule = String::from("|---|");
        for s in &subjects {
            let _ = write!(head, " {0} msgs/s | {0} CPU/msg |", s.spec.label);
            rule.push_str("---:|---:|");
        }
        let _ = writeln!(md, "{head}\n{rule}");
        let mut marked = false;
        for (i, cell) in self.plan.cells.iter().enumerate() {
            let mut row = format!(
                "| {}{} |",
                cell.label(),
                if cell.kind == Kind::Bulk { " bulk" } else { "" }
            );
            for s in &subjects {
                let m = s.cells[i].median();
                let best = self.best_for(s, i);
                let partial = self.partial(s, i);
                // Bulk cells are compared by the figure their table shows.
                let (fast, best_fast) = if cell.kind == Kind::Bulk {
                    (m.map(|m| m.mb_per_s), best.mb.as_ref())
                } else {
                    (m.map(|m| m.msgs_per_s), best.msgs.as_ref())
                };
                let _ = write!(
                    row,
                    " {} | {} |",
                    ratio_marked(fast, best_fast, partial, &mut marked),
                    ratio_marked(
                        m.map(|m| m.cpu_us_per_msg),
                        best.cpu.as_ref(),
                        partial,
                        &mut marked
                    ),
                );
            }
            let _ = writeln!(md, "{row}");
        }
        if marked {
            let _ = writeln!(md, "\n{PARTIAL_LEGEND}");
        }
        md.push('\n');
    }

    fn bulk_table(&self, md: &mut String) {
        let bulk: Vec<usize> = (0..self.plan.cells.len())
            .filter(|&i| self.plan.cells[i].kind == Kind::Bulk)
            .collect();
        for &i in &bulk {
            let cell = self.plan.cells[i];
            let mut marked = false;
            let _ = writeln!(
                md,
                "## Bulk streaming: {} connections, {} messages, pipeline {}\n",
                cell.connections,
                fmt_size(u64::from(cell.size)),
                cell.pipeline
            );
            let _ = writeln!(md, "| server | GB/s | CPU µs/MiB | RSS MiB | GB/s ÷ best peer | CPU ÷ best peer | note |");
            let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---|");
            for s in &self.servers {
                let r = &s.cells[i];
                let (nfail, whys) = r.failures();
                let per_mib = f64::from(cell.size) / f64::from(1u32 << 20);
                match r.median() {
                    Some(m) => {
                        let best = self.best_for(s, i);
                        let partial = self.partial(s, i);
                        let subject = s.spec.role == Role::Subject;
                        let note = if nfail > 0 {
                            format!("{nfail}/{} failed: {}", r.rounds.len(), whys.join("; "))
                        } else {
                            String::new()
                        };
                        let _ = writeln!(
                            md,
                            "| {} | {:.2} | {} | {} | {} | {} | {} |",
                            s.spec.label,
                            m.mb_per_s / 1000.0,
                            fmt_us(m.cpu_us_per_msg / per_mib),
                            fmt_mib(m.rss_bytes),
                            if subject {
                                ratio_marked(
                                    Some(m.mb_per_s),
                                    best.mb.as_ref(),
                                    partial,
                                    &mut marked,
                                )
                            } else {
                                String::new()
                            },
                            if subject {
                                ratio_marked(
                                    Some(m.cpu_us_per_msg),
                                    best.cpu.as_ref(),
                                    partial,
                                    &mut marked,
                                )
                            } else {
                                String::new()
                            },
                            cell_text(&note, 120)
                        );
                    }
                    None => {
                        let _ = writeln!(
                            md,
                            "| {} | **failed** | | | | | {} |",
                            s.spec.label,
                            cell_text(&whys.join("; "), 160)
                        );
                    }
                }
            }
            if marked {
                let _ = writeln!(md, "\n{PARTIAL_LEGEND}");
            }
            md.push('\n');
        }
    }

    fn idle_table(&self, md: &mut String) {
        if self.plan.idle == 0 || self.servers.is_empty() {
            return;
        }
        let _ = writeln!(md, "## Idle connections (asked for {})\n", self.plan.idle);
        let _ = writeln!(
            md,
            "| server | opened | served | RSS before MiB | RSS after MiB | bytes/conn | ÷ best peer (<1 leaner) | note |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|");
        // The leanest peer (with the subject's worker count, where the report compares like
        // with like). One that grew by nothing leaves the ratio n/a rather than be passed over.
        let best_peer = |subject: &ServerResults| {
            self.peers_of(subject)
                .filter_map(|s| {
                    Some((
                        s.idle_median(|i| i.bytes_per_conn().unwrap_or(f64::NAN))?,
                        s.spec.label.clone(),
                    ))
                })
                .min_by(|a, b| a.0.total_cmp(&b.0))
        };
        let mut marked = false;
        for s in &self.servers {
            // Medians over the rounds that measured, as for the cells.
            let per_conn = s.idle_median(|i| i.bytes_per_conn().unwrap_or(f64::NAN));
            let (nfail, whys) = s.idle_failures();
            let r = if s.spec.role == Role::Subject {
                ratio_marked(
                    per_conn,
                    best_peer(s).as_ref(),
                    self.idle_partial(s),
                    &mut marked,
                )
            } else {
                String::new()
            };
            let med = |f: fn(&crate::matrix::IdleSample) -> u64| {
                s.idle_median(|i| f(i) as f64).unwrap_or(f64::NAN)
            };
            match per_conn {
                Some(b) => {
                    let mut notes = s.idle_notes();
                    if nfail > 0 {
                        notes.insert(
                            0,
                            format!("{nfail}/{} failed: {}", s.idle.len(), whys.join("; ")),
                        );
                    }
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} | {r} | {} |",
                        s.spec.label,
                        fmt_count(med(|i| i.opened)),
                        fmt_count(med(|i| i.answered)),
                        fmt_mib(med(|i| i.rss_before)),
                        fmt_mib(med(|i| i.rss_after)),
                        fmt_count(b),
                        cell_text(&notes.join("; "), 120)
                    );
                }
                None => {
                    let why = if whys.is_empty() {
                        "not measured".to_owned()
                    } else {
                        whys.join("; ")
                    };
                    let _ = writeln!(
                        md,
                        "| {} | **failed** | | | | | | {} |",
                        s.spec.label,
                        cell_text(&why, 160)
                    );
                }
            }
        }
        if marked {
            let _ = writeln!(md, "\n{PARTIAL_LEGEND}");
        }
        md.push('\n');
    }

    /// Writes `MODE.md` and `MODE.json` into `dir`; returns their paths.
    ///
    /// # Errors
    ///
    /// The directory or a file cannot be written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let md = dir.join(format!("{}.md", self.mode));
        std::fs::write(&md, self.markdown()).map_err(|e| format!("{}: {e}", md.display()))?;
        let json = dir.join(format!("{}.json", self.mode));
        let text = serde_json::to_string_pretty(self).map_err(|e| format!("JSON: {e}"))?;
        std::fs::write(&json, text + "\n").map_err(|e| format!("{}: {e}", json.display()))?;
        Ok(vec![md, json])
    }
}

/// [`ratio_with`], followed by ` *` when `partial` and a ratio is shown (and then `marked` is
/// set, for the legend).
fn ratio_marked(
    a: Option<f64>,
    best: Option<&(f64, String)>,
    partial: bool,
    marked: &mut bool,
) -> String {
    let text = ratio_with(a, best);
    if partial && ratio(a, best.map(|b| b.0)).is_some() {
        *marked = true;
        text + " *"
    } else {
        text
    }
}

/// `a ÷ best` formatted with the best peer's name, e.g. `1.10x (tokio)`.
fn ratio_with(a: Option<f64>, best: Option<&(f64, String)>) -> String {
    match (ratio(a, best.map(|b| b.0)), best) {
        (Some(r), Some((_, who))) => format!("{} ({who})", fmt_ratio(Some(r))),
        _ => fmt_ratio(None),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn ratios() {
        assert_eq!(fmt_ratio(ratio(Some(150.0), Some(100.0))), "1.50x");
        assert_eq!(fmt_ratio(ratio(Some(1.0), Some(3.0))), "0.33x");
        assert_eq!(fmt_ratio(ratio(Some(5000.0), Some(2.0))), "2500x");
        assert_eq!(fmt_ratio(ratio(Some(1.0), Some(0.0))), "n/a");
        assert_eq!(fmt_ratio(ratio(None, Some(1.0))), "n/a");
        assert_eq!(fmt_ratio(ratio(Some(f64::NAN), Some(1.0))), "n/a");
        assert_eq!(
            ratio_with(Some(90.0), Some(&(60.0, "tokio".to_owned()))),
            "1.50x (tokio)"
        );
        assert_eq!(ratio_with(Some(90.0), None), "n/a");
    }

    #[test]
    fn counts_sizes_and_micros() {
        assert_eq!(fmt_count(1_234_567.8), "1,234,568");
        assert_eq!(fmt_count(999.0), "999");
        assert_eq!(fmt_count(1000.0), "1,000");
        assert_eq!(fmt_count(0.2), "0");
        assert_eq!(fmt_count(-1500.0), "-1,500");
        assert_eq!(fmt_count(f64::NAN), "n/a");
        assert_eq!(fmt_size(64), "64B");
        assert_eq!(fmt_size(512), "512B");
        assert_eq!(fmt_size(4096), "4KiB");
        assert_eq!(fmt_size(1 << 20), "1MiB");
        assert_eq!(fmt_size(1500), "1500B");
        assert_eq!(fmt_us(12.345), "12.3");
        assert_eq!(fmt_count_short(1_240_000.0), "1.2M");
        assert_eq!(fmt_count_short(35_000.0), "35k");
        assert_eq!(fmt_count_short(3_500.0), "3.5k");
        assert_eq!(fmt_count_short(2.5), "2.50");
        assert_eq!(fmt_count_short(0.0), "0");
        assert_eq!(fmt_us(1234.5), "1234");
        assert_eq!(fmt_us(0.4321), "0.432");
        assert_eq!(fmt_us(2.345_6), "2.35");
    }

    #[test]
    fn best_peer_picks_fastest_and_leanest_separately() {
        let s = |m: f64, c: f64| Sample {
            msgs_per_s: m,
            mb_per_s: 0.0,
            p50_us: 0.0,
            p99_us: 0.0,
            cpu_us_per_msg: c,
            rss_bytes: 0.0,
            rss_per_conn: 0.0,
        };
        let best = best_peer([
            ("tokio", s(100.0, 3.0)),
            ("monoio", s(120.0, 4.0)),
            ("compio", s(90.0, 2.5)),
        ]);
        assert_eq!(best.msgs, Some((120.0, "monoio".to_owned())));
        assert_eq!(best.cpu, Some((2.5, "compio".to_owned())));
        assert_eq!(best_peer([]).msgs, None);
        // A peer whose CPU time read as zero is not the leanest.
        let best = best_peer([("tokio", s(100.0, 0.0)), ("monoio", s(90.0, 2.0))]);
        assert_eq!(best.cpu, Some((2.0, "monoio".to_owned())));
    }

    use crate::matrix::{Cell, CellResult, IdleSample, Outcome, ServerSpec};

    /// A measured round: `msgs` msgs/s, `mb` MB/s, `cpu` µs per message, `per_conn` RSS bytes
    /// per connection.
    fn ok(msgs: f64, mb: f64, cpu: f64, per_conn: f64) -> Outcome {
        Outcome::Ok {
            sample: Sample {
                msgs_per_s: msgs,
                mb_per_s: mb,
                p50_us: 1.0,
                p99_us: 2.0,
                cpu_us_per_msg: cpu,
                rss_bytes: f64::from(1u32 << 20),
                rss_per_conn: per_conn,
            },
            client: crate::proc::ClientReport {
                backend: "io_uring".to_owned(),
                connections: 100,
                messages: 1000,
                bytes: 64_000,
                elapsed_s: 1.0,
                msgs_per_s: msgs,
                mb_per_s: mb,
                p50_us: 1.0,
                p99_us: 2.0,
                p999_us: 3.0,
                max_us: 4.0,
                errors: std::collections::BTreeMap::new(),
                error_total: 0,
                mismatches: 0,
                ok: true,
            },
        }
    }

    fn failed(why: &str) -> Outcome {
        Outcome::Failed {
            why: why.to_owned(),
            client: None,
        }
    }

    /// A server of `program` with `rounds[i]` as the rounds of `cells[i]` (also for the
    /// chart's tests).
    pub(crate) fn server(
        label: &str,
        role: Role,
        program: &str,
        cells: &[Cell],
        rounds: Vec<Vec<Outcome>>,
    ) -> ServerResults {
        ServerResults {
            spec: ServerSpec::new(label, role, program, program, &[]),
            listen_line: None,
            integrity_failures: Vec::new(),
            mismatched: false,
            cells: cells
                .iter()
                .zip(rounds)
                .map(|(&cell, rounds)| CellResult {
                    server: label.to_owned(),
                    cell,
                    rounds,
                })
                .collect(),
            idle: Vec::new(),
        }
    }

    fn report(cells: Vec<Cell>, servers: Vec<ServerResults>) -> Report {
        Report {
            mode: "peers".to_owned(),
            title: "test".to_owned(),
            plan: Plan {
                cells,
                idle: 0,
                rounds: 3,
                cell_secs: 1.0,
                warmup_secs: 0.0,
                bulk_secs: 1.0,
                server_cpus: vec![0],
                load_cpus: vec![1],
                client_workers: 1,
                nofile: 1024,
            },
            machine_cpus: vec![0, 1],
            clock_ticks_per_sec: 100,
            notes: Vec::new(),
            warnings: Vec::new(),
            skipped: Vec::new(),
            compare_same_workers: false,
            servers,
        }
    }

    /// A report of one ping-pong cell: a subject and a peer, `failed` of the subject's three
    /// rounds failed.
    fn one_cell_report(failed_rounds: usize) -> Report {
        let cells = [Cell::ping(100, 64, 1)];
        let mut subject = vec![ok(1000.0, 0.064, 4.0, 130.0); 3];
        for r in subject.iter_mut().take(failed_rounds) {
            *r = failed("the server exited");
        }
        report(
            cells.to_vec(),
            vec![
                server("ringport", Role::Subject, "ringport", &cells, vec![subject]),
                server(
                    "tokio",
                    Role::Peer,
                    "peer-tokio",
                    &cells,
                    vec![vec![ok(1000.0, 0.064, 5.0, 9000.0); 3]],
                ),
            ],
        )
    }

    #[test]
    fn ratios_resting_on_fewer_rounds_are_marked_and_memory_per_connection_shown() {
        let whole = one_cell_report(0).markdown();
        assert!(whole.contains("| 0.80x (tokio) |"), "{whole}");
        assert!(!whole.contains("fewer rounds"), "{whole}");
        // Bytes per connection in the ping-pong table, next to the total.
        assert!(whole.contains("| 1.0 | 130 |"), "{whole}");
        assert!(whole.contains("| 1.0 | 9,000 |"), "{whole}");

        let partial = one_cell_report(2).markdown();
        assert!(partial.contains("| 0.80x (tokio) * |"), "{partial}");
        assert!(partial.contains("fewer rounds"), "{partial}");
        assert!(partial.contains("2/3 failed"), "{partial}");
    }

    #[test]
    fn a_peer_that_failed_every_round_marks_the_ratios() {
        let mut r = one_cell_report(0);
        let cells = r.plan.cells.clone();
        r.servers.push(server(
            "monoio",
            Role::Peer,
            "peer-monoio",
            &cells,
            vec![vec![failed("connection refused"); 3]],
        ));
        let md = r.markdown();
        // The ping-pong table and the ratio table mark it alike, and say what it means.
        assert_eq!(md.matches("| 0.80x (tokio) * |").count(), 2, "{md}");
        assert_eq!(md.matches("| 1.00x (tokio) * |").count(), 2, "{md}");
        assert_eq!(
            md.matches("is left out of the best peer").count(),
            2,
            "{md}"
        );
    }

    #[test]
    fn bulk_ratio_is_of_the_figure_shown_and_the_header_gives_its_duration() {
        let bulk = Cell {
            kind: Kind::Bulk,
            connections: 4,
            size: 1 << 20,
            pipeline: 1,
        };
        let cells = [bulk];
        // Same messages per second, twice the verified bytes.
        let mut r = report(
            cells.to_vec(),
            vec![
                server(
                    "ringport",
                    Role::Subject,
                    "ringport",
                    &cells,
                    vec![vec![ok(100.0, 2000.0, 4.0, 0.0); 3]],
                ),
                server(
                    "tokio",
                    Role::Peer,
                    "peer-tokio",
                    &cells,
                    vec![vec![ok(100.0, 1000.0, 4.0, 0.0); 3]],
                ),
            ],
        );
        r.plan.cell_secs = 0.5;
        r.plan.bulk_secs = 2.5;
        let md = r.markdown();
        // In the bulk table and in the ratio table.
        assert!(
            md.contains("| ringport | 2.00 | 4.00 | 1.0 | 2.00x (tokio) | 1.00x (tokio) |"),
            "{md}"
        );
        assert!(
            md.contains("| 4c 1MiB p1 bulk | 2.00x (tokio) | 1.00x (tokio) |"),
            "{md}"
        );
        assert!(md.contains("0.5 s per cell (2.5 s per bulk cell)"), "{md}");
        // Without a bulk cell, no bulk duration.
        assert!(!one_cell_report(0).markdown().contains("bulk cell"));
    }

    #[test]
    fn idle_rows_count_failed_rounds_and_keep_notes_of_the_measured_ones() {
        let mut r = one_cell_report(0);
        r.plan.idle = 100;
        let round = |answered: u64, growth: u64, note: Option<&str>| {
            Ok(IdleSample {
                target: 100,
                opened: 100,
                answered,
                mismatched: 0,
                closed: 0,
                rss_before: 1 << 20,
                rss_after: (1 << 20) + growth,
                note: note.map(str::to_owned),
            })
        };
        r.servers[0].idle = vec![
            round(100, 10_000, None),
            Err("the server exited".to_owned()),
            round(100, 30_000, Some("stopped at 100: connect: timed out")),
        ];
        // The last round served nothing: it failed, and its note is no longer "the" note.
        r.servers[1].idle = vec![
            round(100, 50_000, None),
            round(100, 70_000, None),
            round(0, 0, Some("100 of 100 connections not served within 5 s")),
        ];
        let md = r.markdown();
        assert!(
            md.contains(
                "| ringport | 100 | 100 | 1.0 | 1.0 | 200 | 0.33x (tokio) * | 1/3 failed: the \
                 server exited; stopped at 100: connect: timed out |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| tokio | 100 | 100 | 1.0 | 1.1 | 600 |  | 1/3 failed: 100 of 100 connections \
                 not served within 5 s |"
            ),
            "{md}"
        );
        r.servers[1].idle = vec![Err("cannot start".to_owned()); 2];
        let md = r.markdown();
        assert!(
            md.contains("| tokio | **failed** | | | | | | cannot start |"),
            "{md}"
        );
    }

    #[test]
    fn only_a_subject_that_was_skipped_or_measured_nothing_fails_the_run() {
        let cells = [Cell::ping(2000, 64, 1)];
        let models = |subject: Vec<Outcome>| {
            report(
                cells.to_vec(),
                vec![
                    // The select model refuses descriptors >= FD_SETSIZE: a result, not a failure.
                    server(
                        "select",
                        Role::Peer,
                        "ringport",
                        &cells,
                        vec![vec![failed("connection reset"); 3]],
                    ),
                    server(
                        "completion-port",
                        Role::Subject,
                        "ringport",
                        &cells,
                        vec![subject],
                    ),
                ],
            )
        };
        assert_eq!(
            models(vec![ok(1.0, 1.0, 1.0, 1.0); 3]).unmeasured_subjects(),
            Vec::<String>::new()
        );
        assert_eq!(
            models(vec![failed("x"); 3]).unmeasured_subjects(),
            ["completion-port: no cell measured"]
        );
        let mut r = models(vec![ok(1.0, 1.0, 1.0, 1.0); 3]);
        r.skipped.push(Skipped {
            label: "ringport-epoll".to_owned(),
            role: Role::Subject,
            why: "ringport not found in target/debug".to_owned(),
        });
        r.skipped.push(Skipped {
            label: "monoio".to_owned(),
            role: Role::Peer,
            why: "peer-monoio not found in target/debug".to_owned(),
        });
        assert_eq!(
            r.unmeasured_subjects(),
            ["ringport-epoll: skipped (ringport not found in target/debug)"]
        );
    }

    #[test]
    fn warnings_head_the_report() {
        let mut r = one_cell_report(0);
        r.warnings.push("debug builds".to_owned());
        assert!(r.markdown().contains("\n- **WARNING**: debug builds\n"));
    }

    #[test]
    fn long_notes_are_cut_and_pipes_escaped() {
        assert_eq!(cell_text("a|b", 10), "a/b");
        assert_eq!(cell_text("abcdef", 3), "abc…");
    }
}
