//! The single-process table of `cargo xtask bench`: dumps (leaving the
//! process running, `--compress`, `--kill`) and restores at each size,
//! each against the bounds measured in the same run.

use std::path::Path;

use anyhow::Result;

use super::{
    DumpSample, dd_secs, dump_once, dump_with, first_touch_gbps, median, memcpy_gbps, percentile,
    restore_once, spawn_mempattern, start_mempattern,
};

/// What to measure at each size of the single-process table.
pub struct SizeOptions {
    pub rounds: usize,
    /// Also dump with `--compress`.
    pub compress: bool,
    /// Also dump with `--kill` (a fresh process each round).
    pub kill: bool,
}

/// Every sample of one size: dumps leaving the process running, with
/// `--compress`, with `--kill`, restores, and the bounds of the same run.
pub struct SizeCase {
    mib: u64,
    running: Vec<DumpSample>,
    compressed: Vec<DumpSample>,
    killed: Vec<f64>,
    /// dd beside each `--kill` dump, in its round: those dumps come last,
    /// after the running ones, and the VM's speed drifts meanwhile.
    killed_dd: Vec<f64>,
    restores: Vec<f64>,
    dd: Vec<f64>,
    memcpy: Vec<f64>,
    touch: Vec<f64>,
}

/// `rounds` of each measurement for one process with `mib` MiB. Dumps
/// leaving it running alternate with dd; the `--kill` dumps come last, on
/// fresh processes, once the first is gone (so that at most one big process
/// and one image exist at a time besides a restore).
pub fn run_size(mib: u64, opts: &SizeOptions, dir: &Path) -> Result<SizeCase> {
    let bytes = mib << 20;
    let image = crate::bench::bench_file(dir, "img");
    let zimage = crate::bench::bench_file(dir, "zstd.img");
    let mut case = SizeCase {
        mib,
        running: Vec::new(),
        compressed: Vec::new(),
        killed: Vec::new(),
        killed_dd: Vec::new(),
        restores: Vec::new(),
        dd: Vec::new(),
        memcpy: Vec::new(),
        touch: Vec::new(),
    };
    {
        let (_target, pid) = spawn_mempattern(mib)?;
        for round in 0..opts.rounds {
            // Each dump and the dd beside it go first in every other
            // round; so do the plain and the compressed dump, which are
            // compared with each other (what a dump follows, a dd's
            // 4 GiB freed or a restore's, moves its times).
            let compressed = |case: &mut SizeCase| -> Result<()> {
                if opts.compress {
                    case.compressed
                        .push(dump_with(pid, &zimage, &["--compress"])?);
                    let _ = std::fs::remove_file(&zimage);
                }
                Ok(())
            };
            if round % 2 == 0 {
                case.running.push(dump_once(pid, &image)?);
                case.dd.push(dd_secs(dir, bytes)?);
                compressed(&mut case)?;
            } else {
                compressed(&mut case)?;
                case.dd.push(dd_secs(dir, bytes)?);
                case.running.push(dump_once(pid, &image)?);
            }
            case.restores.push(restore_once(&image)?);
            case.memcpy.push(memcpy_gbps());
            case.touch.push(first_touch_gbps(bytes as usize));
            let last = &case.running[round];
            eprintln!(
                "{mib} MiB round {}: dump {:.3} s (frozen {:.1} ms, reap {:.2} ms), dd {:.3} s, restore {:.3} s{}",
                round + 1,
                last.total,
                last.frozen * 1e3,
                last.reap_pause * 1e3,
                case.dd[round],
                case.restores[round],
                case.compressed
                    .get(round)
                    .map(|c| format!(
                        ", --compress {:.3} s (frozen {:.1} ms)",
                        c.total,
                        c.frozen * 1e3
                    ))
                    .unwrap_or_default()
            );
        }
    }
    let _ = std::fs::remove_file(&image);
    if opts.kill {
        for round in 0..opts.rounds {
            let (child, pid) = start_mempattern(mib)?;
            // The dump kills it; we, its parent, reap it meanwhile, or the
            // dump would wait for it to go.
            let reaper = std::thread::spawn(move || {
                let mut child = child;
                child.wait()
            });
            // The dd right before the dump, beside the same fresh process:
            // a dd after it would have the memory the killed process and
            // the removed image just freed, which this VM hands out again
            // far faster than memory it has to get back from the host
            // (4 GiB: 3.7 s after against 6.0–10.2 s before, in one run).
            let result = dd_secs(dir, bytes).and_then(|dd| {
                case.killed_dd.push(dd);
                dump_with(pid, &image, &["--kill"])
            });
            if result.is_err() {
                // SAFETY: kill has no memory-safety preconditions; the PID
                // is our unreaped child, so it cannot have been reused.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = reaper.join();
            let _ = std::fs::remove_file(&image);
            let dump = result?;
            eprintln!(
                "{mib} MiB --kill round {}: dump {:.3} s, dd {:.3} s",
                round + 1,
                dump.total,
                case.killed_dd[round]
            );
            case.killed.push(dump.total);
        }
    }
    Ok(case)
}

/// The table of the single-process sizes: every time with its ratio to
/// the bound measured in the same run (dd for dump walls, memcpy of the
/// same bytes for the freeze, first touch of the same bytes for restore).
pub fn size_table(cases: &[SizeCase]) {
    let med = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            median(v.to_vec())
        }
    };
    println!(
        "single process: medians over {} rounds (p99 of frozen = the worst round at this count); ratios to bounds measured in the same run",
        cases.first().map_or(0, |c| c.running.len())
    );
    println!(
        "  {:>6} | {:>22} | {:>9} | {:>15} | {:>20} | {:>20} | {:>20} | {:>7} | {:>40} | {:>17}",
        "MiB",
        "frozen med/p99 ms",
        "reap ms",
        "attach med/p99",
        "dump wall running s",
        "dump wall --kill s",
        "restore wall s",
        "dd s",
        "--compress wall s, size",
        "--compress frozen"
    );
    for c in cases {
        let bytes = (c.mib << 20) as f64;
        let dd = med(&c.dd);
        let memcpy_s = bytes / (med(&c.memcpy) * 1e9);
        let touch_s = bytes / (med(&c.touch) * 1e9);
        let frozen: Vec<f64> = c.running.iter().map(|d| d.frozen).collect();
        let frozen_med = med(&frozen);
        let frozen_p99 = percentile(frozen, 0.99);
        let reap = med(&c.running.iter().map(|d| d.reap_pause).collect::<Vec<_>>());
        let attach: Vec<f64> = c.running.iter().map(|d| d.precopy_pause).collect();
        let (attach_med, attach_p99) = (med(&attach), percentile(attach, 0.99));
        let running = med(&c.running.iter().map(|d| d.total).collect::<Vec<_>>());
        let killed = med(&c.killed);
        let killed_dd = med(&c.killed_dd);
        let restore = med(&c.restores);
        let compressed = med(&c.compressed.iter().map(|d| d.total).collect::<Vec<_>>());
        let zratio = c.compressed.first().map_or(f64::NAN, |d| {
            d.image_bytes as f64 / d.stored_bytes.max(1) as f64
        });
        let zfrozen: Vec<f64> = c.compressed.iter().map(|d| d.frozen).collect();
        let (zfrozen_med, zfrozen_p99) = if zfrozen.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            (med(&zfrozen), percentile(zfrozen, 0.99))
        };
        println!(
            "  {:>6} | {:>7.1}/{:>6.1} ({:>4.2}×mc) | {:>9.2} | {:>6.1}/{:>6.1} ms | {:>8.3} ({:>5.2}×dd) | {:>8.3} ({:>5.2}×dd) | {:>8.3} ({:>4.2}×ft) | {:>7.3} | {:>7.3} ({:>5.2}×dd, {:>4.2}×plain), {:>5.3} | {:>6.1}/{:>6.1} ms",
            c.mib,
            frozen_med * 1e3,
            frozen_p99 * 1e3,
            frozen_med / memcpy_s,
            reap * 1e3,
            attach_med * 1e3,
            attach_p99 * 1e3,
            running,
            running / dd,
            killed,
            killed / killed_dd,
            restore,
            restore / touch_s,
            dd,
            compressed,
            compressed / dd,
            compressed / running,
            zratio,
            zfrozen_med * 1e3,
            zfrozen_p99 * 1e3
        );
    }
    println!(
        "  (×mc: frozen / memcpy of the same bytes; ×dd: / dd of the same bytes into the same directory (for --kill, the dd of the --kill rounds, which come last); ×ft: restore / first touch of the same bytes; ×plain: / the uncompressed dump wall; size: compressed image / stored pages; --compress frozen: med/p99 of the compressed dumps' freeze; reap: the second, brief freeze in which the process reaps its snapshot; attach: the brief freeze before a pre-copy)"
    );
    let dumps: Vec<&DumpSample> = cases.iter().flat_map(|c| &c.running).collect();
    println!(
        "  state from the kernel's structures (an agent's iterator) in {} of {} dumps leaving the process running",
        dumps.iter().filter(|d| d.state_from_kernel > 0).count(),
        dumps.len()
    );
}
