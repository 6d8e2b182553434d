//! `scaling`: each peers server with 1, 2, 4, 8 workers on the server CPUs, one cell.

use clap::Parser;

use crate::chart::Series;
use crate::matrix::{self, Cell, ServerResults, ServerSpec};
use crate::report::Report;
use crate::{ChartSpec, CommonArgs, Setup};

/// `ringport-bench scaling`: messages/s and CPU per message against worker threads.
#[derive(Debug, Parser)]
// A negative number is read as a flag's value, so that the error names the flag.
#[command(
    allow_negative_numbers = true,
    name = "ringport-bench scaling",
    about = "every server with 1, 2, 4, 8 workers"
)]
struct ScalingArgs {
    #[command(flatten)]
    common: CommonArgs,

    /// Worker counts to measure; counts above the number of server CPUs are left out.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "1,2,4,8",
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    workers_list: Vec<u16>,

    #[command(flatten)]
    peer_buffer: crate::peers::PeerBuffer,
}

/// Runs `ringport-bench scaling ARGS` (arguments without the program and mode names) and
/// returns the exit code.
pub fn scaling_main(prog: &str, args: &[String]) -> i32 {
    crate::run_mode::<ScalingArgs>(&format!("{prog} scaling"), args, run)
}

/// Worker counts that fit on `cpus` server CPUs (each once, in the order given), and a note
/// about the others.
pub fn fitting_workers(list: &[u16], cpus: usize) -> (Vec<u16>, Option<String>) {
    let mut seen = Vec::with_capacity(list.len());
    let (fit, left): (Vec<u16>, Vec<u16>) = list
        .iter()
        .copied()
        .filter(|&w| {
            w > 0 && !seen.contains(&w) && {
                seen.push(w);
                true
            }
        })
        .partition(|&w| usize::from(w) <= cpus);
    let note = (!left.is_empty()).then(|| {
        format!(
            "{} worker(s) left out: only {cpus} server CPU(s) here",
            left.iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    });
    (fit, note)
}

fn run(args: &ScalingArgs) -> Result<i32, String> {
    let c = &args.common;
    for (flag, list) in [
        ("--connections", &c.connections),
        ("--sizes", &c.sizes),
        ("--pipelines", &c.pipelines),
    ] {
        if list.len() > 1 {
            return Err(format!(
                "{flag}: scaling measures one cell, so takes one value, not {}",
                list.len()
            ));
        }
    }
    let base = crate::peers::specs(1, args.peer_buffer);
    // Default: the CPUs --load-cpus leaves serve; without it, the first half of them serve and
    // the rest load.
    let pick = |m: &[usize]| match c.load_cpus {
        Some(_) => m.to_vec(),
        None => m[..(m.len() / 2).max(1)].to_vec(),
    };
    let setup = Setup::new(c, pick, &selectable(args))?;
    let (workers, note) = fitting_workers(&args.workers_list, setup.server_cpus.len());
    if workers.is_empty() {
        return Err(note.unwrap_or_else(|| "--workers-list is empty".to_owned()));
    }
    let mut notes = setup.notes.clone();
    notes.extend(note);
    notes.extend(args.peer_buffer.note());
    let specs = with_workers(&base, &workers);
    let (ready, skipped) = setup.resolve(c, &specs);
    if ready.is_empty() && skipped.is_empty() {
        return Err(format!(
            "--only {}: none of these runs with the worker counts that fit the server CPUs ({})",
            c.only.join(","),
            workers
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    let default_conns = if c.quick { 100 } else { 1000 };
    let cell = Cell::ping(
        c.connections.first().copied().unwrap_or(default_conns),
        c.sizes.first().copied().unwrap_or(64),
        c.pipelines.first().copied().unwrap_or(16),
    );
    let plan = setup.plan(c, vec![cell], c.idle.unwrap_or(0), c.cell_secs());
    let servers = matrix::run(&setup.harness, &ready, &plan);
    let report = Report {
        mode: "scaling".to_owned(),
        title: format!("ringport-bench scaling: worker threads, {}", cell.label()),
        plan,
        machine_cpus: setup.machine.clone(),
        clock_ticks_per_sec: crate::proc::clock_ticks_per_sec(),
        notes,
        warnings: setup.warnings.clone(),
        skipped,
        compare_same_workers: true,
        servers,
    };
    let charts = vec![
        ChartSpec {
            suffix: "msgs",
            title: format!(
                "scaling: messages/s vs workers, {} (higher is better)",
                cell.label()
            ),
            x_desc: "server workers",
            y_desc: "messages/s",
            series: by_workers(&report.servers, |s| s.msgs_per_s),
        },
        ChartSpec {
            suffix: "cpu",
            title: format!(
                "scaling: server CPU µs/msg vs workers, {} (lower is better)",
                cell.label()
            ),
            x_desc: "server workers",
            y_desc: "server CPU µs/msg",
            series: by_workers(&report.servers, |s| s.cpu_us_per_msg),
        },
    ];
    Ok(crate::finish(&report, &c.out, charts))
}

/// The servers `--only` may name: every peers server with every listed worker count, labelled
/// as the report labels them (`tokio w2`), and their groups (`tokio`).
fn selectable(args: &ScalingArgs) -> Vec<ServerSpec> {
    with_workers(
        &crate::peers::specs(1, args.peer_buffer),
        &args.workers_list,
    )
}

/// Each of `base` with each of `workers` workers, labelled `LABEL wN` (the group stays `LABEL`).
fn with_workers(base: &[ServerSpec], workers: &[u16]) -> Vec<ServerSpec> {
    base.iter()
        .flat_map(|s| {
            workers.iter().map(move |&w| {
                let mut spec = s.clone().workers(w);
                spec.label = format!("{} w{w}", s.label);
                spec
            })
        })
        .collect()
}

/// One line per server group (label without the worker count), x = workers; a worker count
/// whose cell failed is a gap (see [`Series::points`]).
fn by_workers(servers: &[ServerResults], y: fn(&matrix::Sample) -> f64) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for s in servers {
        let m = s.cells.first().and_then(matrix::CellResult::median);
        let point = (f64::from(s.spec.workers), m.map_or(f64::NAN, |m| y(&m)));
        match out.iter_mut().find(|x| x.label == s.spec.group) {
            Some(series) => series.points.push(point),
            None => out.push(Series {
                label: s.spec.group.clone(),
                points: vec![point],
            }),
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_counts_beyond_the_server_cpus_are_left_out() {
        let (fit, note) = fitting_workers(&[1, 2, 4, 8], 1);
        assert_eq!(fit, vec![1]);
        assert_eq!(
            note.unwrap(),
            "2, 4, 8 worker(s) left out: only 1 server CPU(s) here"
        );
        let (fit, note) = fitting_workers(&[2, 1, 2, 8, 8], 4);
        assert_eq!(fit, vec![2, 1], "each count once");
        assert_eq!(
            note.unwrap(),
            "8 worker(s) left out: only 4 server CPU(s) here"
        );
        let (fit, note) = fitting_workers(&[1, 2, 4, 8], 8);
        assert_eq!(fit, vec![1, 2, 4, 8]);
        assert_eq!(note, None);
    }

    /// A negative value is the flag's (the error names the flag), not an unknown flag.
    #[test]
    fn a_negative_value_is_refused_naming_its_flag() {
        let args = ["scaling", "--warmup-secs", "-0.5"];
        let parsed = ScalingArgs::try_parse_from(args).expect("a value");
        let err = crate::check_secs(&parsed.common).unwrap_err();
        assert!(err.starts_with("--warmup-secs -0.5:"), "{err}");
        for flag in ["--rounds", "--idle", "--connections"] {
            let err = ScalingArgs::try_parse_from(["scaling", flag, "-3"]).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{err}");
            assert!(err.to_string().contains(flag), "{err}");
        }
    }

    #[test]
    fn only_takes_the_labels_the_report_shows() {
        let parse = |args: &[&str]| {
            let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            crate::parse_args::<ScalingArgs>("scaling", &args).unwrap()
        };
        let args = parse(&["--only", "tokio w2,ringport-epoll"]);
        assert_eq!(
            crate::check_only(&args.common.only, &selectable(&args)),
            Ok(())
        );
        let args = parse(&["--only", "tokio w3", "--workers-list", "1,2"]);
        let err = crate::check_only(&args.common.only, &selectable(&args)).unwrap_err();
        assert!(err.starts_with("--only tokio w3: no such server"), "{err}");
        assert!(err.contains("tokio w2"), "{err}");
    }
}
