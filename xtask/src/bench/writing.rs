//! `cargo xtask bench`, writing part: a job that keeps writing its memory
//! while it is dumped, leaving it running (`cowwriters`: 4 threads, each
//! rewriting its quarter page after page with a short pause), which the
//! sizes above (`mempattern` sleeps) do not show. Each round dumps it with
//! the pre-copy and with the snapshot alone (`--no-precopy`), in turns,
//! with `dd` of the same bytes beside them: the freeze of each (the
//! pre-copy's reads only what was written after its last pass over the
//! pages written during the copy), their walls, and what the pre-copy
//! copied again and read while frozen.

use std::path::Path;

use anyhow::{Result, bail};

use super::targets::spawn_cowwriters;
use super::{DumpSample, bench_file, dd_secs, dump_with, median, percentile};

/// Threads of the job, and the pause after each page each of them writes.
const THREADS: u64 = 4;
const PAGE_PAUSE_US: u64 = 200;

/// `rounds` of each dump of a job of `mib` MiB that writes all the while.
pub fn run(mib: u64, rounds: usize, dir: &Path) -> Result<()> {
    let per_thread = (mib / THREADS).max(1);
    let bytes = (per_thread * THREADS) << 20;
    let (_target, pid) = spawn_cowwriters(THREADS, per_thread, PAGE_PAUSE_US)?;
    let image = bench_file(dir, "writing.img");
    let (mut precopied, mut snapshotted, mut dd) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let with_precopy = || dump_with(pid, &image, &[]);
        let snapshot_alone = || dump_with(pid, &image, &["--no-precopy"]);
        // Either dump goes first in every other round.
        let (p, s) = if round % 2 == 0 {
            let p = with_precopy()?;
            dd.push(dd_secs(dir, bytes)?);
            (p, snapshot_alone()?)
        } else {
            let s = snapshot_alone()?;
            dd.push(dd_secs(dir, bytes)?);
            (with_precopy()?, s)
        };
        let _ = std::fs::remove_file(&image);
        eprintln!(
            "writing job round {}: pre-copy frozen {:.1} ms (copied again {} pages, read frozen {}), wall {:.3} s; snapshot frozen {:.1} ms, wall {:.3} s; dd {:.3} s",
            round + 1,
            p.frozen * 1e3,
            p.copied_again,
            p.read_frozen,
            p.total,
            s.frozen * 1e3,
            s.total,
            dd[round]
        );
        if s.snapshots == 0 {
            bail!("the dump with --no-precopy took no snapshot");
        }
        precopied.push(p);
        snapshotted.push(s);
    }
    let dd = median(dd);
    let pre_copies = precopied.iter().filter(|p| p.snapshots == 0).count();
    println!(
        "job writing while dumped: {THREADS} threads × {per_thread} MiB, each rewriting its pages with {PAGE_PAUSE_US} µs pauses; medians over {rounds} rounds (p99 = the worst at this count), ×dd: / dd of the same bytes"
    );
    let line = |name: &str, samples: &[DumpSample], extra: String| {
        let frozen: Vec<f64> = samples.iter().map(|s| s.frozen * 1e3).collect();
        let total = median(samples.iter().map(|s| s.total).collect());
        println!(
            "  {name:<26} frozen {:>6.1}/{:>6.1} ms   wall {:.3} s ({:.2}×dd){extra}",
            median(frozen.clone()),
            percentile(frozen, 0.99),
            total,
            total / dd
        );
    };
    line(
        "pre-copy",
        &precopied,
        format!(
            "   pages copied again {:.0}, read while frozen {:.0}; pre-copied in {pre_copies} of {rounds}",
            median(precopied.iter().map(|p| p.copied_again as f64).collect()),
            median(precopied.iter().map(|p| p.read_frozen as f64).collect())
        ),
    );
    line("snapshot (--no-precopy)", &snapshotted, String::new());
    Ok(())
}
