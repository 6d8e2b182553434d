//! `models`: the classic I/O models (`ringport serve --model X`, one worker each) against the
//! completion port (`ringport serve --workers N`).

use clap::Parser;

use crate::matrix::{self, Role, ServerSpec};
use crate::report::Report;
use crate::{CommonArgs, Setup};

/// The models `ringport serve --model` is asked to run, in report order.
pub const MODELS: [&str; 6] = ["blocking", "select", "sigio", "poll", "epoll", "uring"];

/// `ringport-bench models`: I/O models against the completion port.
#[derive(Debug, Parser)]
// A negative number is read as a flag's value, so that the error names the flag.
#[command(
    allow_negative_numbers = true,
    name = "ringport-bench models",
    about = "ringport serve --model X against the completion port"
)]
struct ModelsArgs {
    #[command(flatten)]
    common: CommonArgs,

    /// Worker threads of the completion port [default: the number of server CPUs].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
}

/// The model table: one server per model (each runs one thread and takes no `--workers`), then
/// the completion port with `workers` workers.
pub fn specs(workers: u16) -> Vec<ServerSpec> {
    let mut specs: Vec<ServerSpec> = MODELS
        .iter()
        .map(|m| {
            ServerSpec::new(
                m,
                Role::Peer,
                "ringport",
                "ringport-cli",
                &["serve", "--listen", "{addr}", "--model", m],
            )
            .needs(&["serve", "--help"], &["--model"])
        })
        .collect();
    specs.push(
        ServerSpec::new(
            "completion-port",
            Role::Subject,
            "ringport",
            "ringport-cli",
            &["serve", "--listen", "{addr}", "--workers", "{workers}"],
        )
        .workers(workers),
    );
    specs
}

/// Runs `ringport-bench models ARGS` (arguments without the program and mode names) and
/// returns the exit code. The `ringport` CLI offers it as `ringport bench models`.
pub fn models_main(prog: &str, args: &[String]) -> i32 {
    crate::run_mode::<ModelsArgs>(&format!("{prog} models"), args, run)
}

fn run(args: &ModelsArgs) -> Result<i32, String> {
    let c = &args.common;
    let probe = specs(1);
    let setup = Setup::new(c, |m| m.iter().copied().take(1).collect(), &probe)?;
    let workers = args
        .workers
        .unwrap_or_else(|| u16::try_from(setup.server_cpus.len()).unwrap_or(u16::MAX));
    let specs = specs(workers);
    let (ready, skipped) = setup.resolve(c, &specs);
    let (conns, sizes, pipes): (&[u32], &[u32], &[u32]) = if c.quick {
        (&[1, 50], &[64], &[1, 16])
    } else {
        (&[1, 100, 1000, 10_000], &[64, 4096], &[1, 16])
    };
    let cells = matrix::ping_cells(
        &CommonArgs::list(&c.connections, conns),
        &CommonArgs::list(&c.sizes, sizes),
        &CommonArgs::list(&c.pipelines, pipes),
    );
    let plan = setup.plan(c, cells, setup.idle_target(c), c.cell_secs());
    let servers = matrix::run(&setup.harness, &ready, &plan);
    let report = Report {
        mode: "models".to_owned(),
        title: format!(
            "ringport-bench models: I/O models (1 worker each) vs the completion port ({workers} worker(s))"
        ),
        plan,
        machine_cpus: setup.machine.clone(),
        clock_ticks_per_sec: crate::proc::clock_ticks_per_sec(),
        notes: setup.notes.clone(),
        warnings: setup.warnings.clone(),
        skipped,
        compare_same_workers: false,
        servers,
    };
    let charts = crate::connection_charts("models", &report.servers);
    Ok(crate::finish(&report, &c.out, charts))
}
