//! `peers`: ringport serve (io_uring and epoll) against tokio, monoio and compio echo servers,
//! each pinned to the server CPUs with one worker.

use clap::Parser;

use crate::matrix::{self, Cell, Kind, Role, ServerSpec};
use crate::report::Report;
use crate::{CommonArgs, Setup};

/// `ringport-bench peers`: the peer matrix.
#[derive(Debug, Parser)]
// A negative number is read as a flag's value, so that the error names the flag.
#[command(
    allow_negative_numbers = true,
    name = "ringport-bench peers",
    about = "ringport serve against tokio, monoio and compio echo servers"
)]
struct PeersArgs {
    #[command(flatten)]
    common: CommonArgs,

    /// Worker threads of every server.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: u16,

    /// Skip the bulk-streaming measurement.
    #[arg(long)]
    no_bulk: bool,

    #[command(flatten)]
    peer_buffer: PeerBuffer,
}

/// The peers' receive buffer.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct PeerBuffer {
    /// Receive buffer of each peer connection, in bytes (the peers' `--buffer`) [default: the
    /// peers' own, 8192]. `ringport serve` receives into 64 KiB pool buffers that its
    /// connections share, and sends what piled up in one gathering send: 65536 gives the peers
    /// reads of that size (at 64 KiB of memory per connection).
    #[arg(long, value_name = "BYTES",
          value_parser = clap::value_parser!(u32).range(512..=16 << 20))]
    pub peer_buffer: Option<u32>,
}

impl PeerBuffer {
    /// What the report says of the peers' reads.
    pub fn note(self) -> Option<String> {
        Some(match self.peer_buffer {
            None => "the peers read 8192 bytes at a time (their default), ringport serve into \
                     64 KiB pool buffers: --peer-buffer 65536 gives the peers reads of that size"
                .to_owned(),
            Some(b) => format!("the peers read {b} bytes at a time (--peer-buffer)"),
        })
    }
}

/// The peer table: label, role, binary, package and argv of each server.
pub fn specs(workers: u16, peer_buffer: PeerBuffer) -> Vec<ServerSpec> {
    let buffer = peer_buffer.peer_buffer.map(|b| b.to_string());
    let serve = |backend: &str, label: &str| {
        ServerSpec::new(
            label,
            Role::Subject,
            "ringport",
            "ringport-cli",
            &[
                "serve",
                "--listen",
                "{addr}",
                "--workers",
                "{workers}",
                "--backend",
                backend,
            ],
        )
        .needs(&["serve", "--help"], &["--backend"])
        .workers(workers)
    };
    let peer = |name: &str| {
        let program = format!("peer-{name}");
        let mut argv = vec!["--listen", "{addr}", "--workers", "{workers}"];
        if let Some(b) = &buffer {
            argv.extend(["--buffer", b.as_str()]);
        }
        let spec = ServerSpec::new(name, Role::Peer, &program, &program, &argv).workers(workers);
        if buffer.is_some() {
            spec.needs(&["--help"], &["--buffer"])
        } else {
            spec
        }
    };
    vec![
        serve("uring", "ringport-uring"),
        serve("epoll", "ringport-epoll"),
        peer("tokio"),
        peer("monoio"),
        peer("compio"),
    ]
}

/// Refuses more workers than server CPUs: the figures would measure the workers' contention
/// for a core, which the runtimes handle differently, more than the servers.
fn check_workers(workers: u16, server_cpus: &[usize]) -> Result<(), String> {
    if usize::from(workers) > server_cpus.len() {
        return Err(format!(
            "--workers {workers}: more than the {} server CPU(s) ({}); give --server-cpus as \
             many",
            server_cpus.len(),
            crate::proc::format_cpu_list(server_cpus)
        ));
    }
    Ok(())
}

/// Runs `ringport-bench peers ARGS` (arguments without the program and mode names) and returns
/// the exit code.
pub fn peers_main(prog: &str, args: &[String]) -> i32 {
    crate::run_mode::<PeersArgs>(&format!("{prog} peers"), args, run)
}

fn run(args: &PeersArgs) -> Result<i32, String> {
    let c = &args.common;
    let specs = specs(args.workers, args.peer_buffer);
    let setup = Setup::new(c, |m| m.iter().copied().take(1).collect(), &specs)?;
    check_workers(args.workers, &setup.server_cpus)?;
    let (ready, skipped) = setup.resolve(c, &specs);
    let (conns, sizes, pipes): (&[u32], &[u32], &[u32]) = if c.quick {
        (&[1, 50], &[64], &[1, 16])
    } else {
        (&[1, 50, 1000, 10_000], &[64, 512, 4096], &[1, 16])
    };
    let mut cells = matrix::ping_cells(
        &CommonArgs::list(&c.connections, conns),
        &CommonArgs::list(&c.sizes, sizes),
        &CommonArgs::list(&c.pipelines, pipes),
    );
    if !args.no_bulk {
        cells.push(Cell {
            kind: Kind::Bulk,
            connections: 4,
            size: 1 << 20,
            pipeline: 1,
        });
    }
    // --quick's half-second cells are too short for a bulk figure; a given --cell-secs holds.
    let bulk_secs = match c.cell_secs {
        None if c.quick => 1.0,
        _ => c.cell_secs(),
    };
    let plan = setup.plan(c, cells, setup.idle_target(c), bulk_secs);
    let servers = matrix::run(&setup.harness, &ready, &plan);
    let report = Report {
        mode: "peers".to_owned(),
        title: format!(
            "ringport-bench peers: ringport serve vs tokio, monoio, compio ({} worker(s) each)",
            args.workers
        ),
        plan,
        machine_cpus: setup.machine.clone(),
        clock_ticks_per_sec: crate::proc::clock_ticks_per_sec(),
        notes: setup
            .notes
            .iter()
            .cloned()
            .chain(args.peer_buffer.note())
            .collect(),
        warnings: setup.warnings.clone(),
        skipped,
        compare_same_workers: false,
        servers,
    };
    let charts = crate::connection_charts("peers", &report.servers);
    Ok(crate::finish(&report, &c.out, charts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_workers_than_server_cpus_are_refused() {
        assert_eq!(check_workers(1, &[0]), Ok(()));
        assert_eq!(check_workers(2, &[0, 3]), Ok(()));
        let e = check_workers(4, &[0, 1]).unwrap_err();
        assert!(
            e.starts_with("--workers 4: more than the 2 server CPU(s) (0-1)"),
            "{e}"
        );
    }

    #[test]
    fn the_report_says_how_the_peers_read() {
        let default = PeerBuffer { peer_buffer: None }.note().unwrap();
        assert!(
            default.contains("8192") && default.contains("--peer-buffer 65536"),
            "{default}"
        );
        let given = PeerBuffer {
            peer_buffer: Some(65536),
        }
        .note()
        .unwrap();
        assert!(given.contains("65536 bytes at a time"), "{given}");
    }
}
