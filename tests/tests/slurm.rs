//! `chpox job` under a real Slurm (Debian's slurm-wlm 22.05 and munge): a
//! one-node cluster on this machine, started here and torn down after,
//! even when the test fails.
//!
//! A job with a 2-minute limit gets SIGSYS 60 s before it
//! (`--signal=B:31@60`), which `chpox job --requeue` turns into a
//! checkpoint and a requeue; the job needs 70 s of work, so it takes two
//! runs. It must end COMPLETED, requeued at least once, with
//! the output of an uninterrupted run.
//!
//! What Slurm does here (measured on 22.05): the signal comes up to 60 s
//! earlier than asked; a requeued job waits `cred_expire` + 1 s plus a
//! scheduler pass before it starts again (here about 35 s, with
//! `cred_expire=30` and `sched_interval=5`). The whole test takes about
//! 2 minutes, most of it waiting.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::agent::{Agent, scratch_with_out};
use common::{bin, chmod, chpox_bin, path_str, show};

/// Steps of one second: more than one run can do (the signal comes at
/// most 60 s into a run); as measured (37–58 s in), two runs.
const STEPS: u32 = 70;
/// The whole job, requeues included.
const JOB_TIMEOUT: Duration = Duration::from_secs(480);

/// A program Slurm needs, or a clear failure.
fn need(program: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(program);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{program} not found: install Debian's slurm-wlm and munge (`cargo xtask test` installs them)"
    );
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

fn short_hostname() -> String {
    let name = nix::unistd::gethostname().expect("gethostname");
    let name = name.to_string_lossy();
    name.split('.').next().unwrap_or(&name).to_string()
}

/// munged, slurmctld and slurmd with everything in one directory. Dropping
/// it cancels the jobs, stops the daemons and kills whatever still holds a
/// file in that directory (a job's processes, a slurmstepd).
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let munged = need("munged");
        let slurmctld = need("slurmctld");
        let slurmd = need("slurmd");
        need("sbatch");
        need("scontrol");
        fs::create_dir_all(dir).expect("mkdir cluster");
        chmod(dir, 0o755);
        let munge = dir.join("munge");
        fs::create_dir(&munge).expect("mkdir munge");
        // munged wants its socket's directory traversable by all and
        // writable by nobody else.
        chmod(&munge, 0o711);
        let key = munge.join("munge.key");
        let mut bytes = vec![0u8; 1024];
        let mut random = fs::File::open("/dev/urandom").expect("open /dev/urandom");
        std::io::Read::read_exact(&mut random, &mut bytes).expect("read /dev/urandom");
        fs::write(&key, &bytes).expect("write munge key");
        chmod(&key, 0o400);
        for d in ["state", "spool", "log"] {
            fs::create_dir(dir.join(d)).expect("mkdir");
        }
        let socket = munge.join("munge.socket");
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            conf: dir.join("slurm.conf"),
        };
        // From here on, Drop tears down whatever started.
        let d = |name: &str| path_str(&dir.join(name)).to_string();
        run_ok(
            Command::new(&munged)
                .arg("--force")
                .arg(format!("--socket={}", path_str(&socket)))
                .arg(format!("--key-file={}", path_str(&key)))
                .arg(format!("--pid-file={}", d("munge/munged.pid")))
                .arg(format!("--log-file={}", d("munge/munged.log")))
                .arg(format!("--seed-file={}", d("munge/munged.seed"))),
        );
        cluster.wait("munged's socket", Duration::from_secs(20), || {
            socket.exists().then_some(())
        });
        let host = short_hostname();
        let conf = format!(
            "ClusterName=chpoxtest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket},cred_expire=30
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={ctld_pid}
SlurmdPidFile={d_pid}
SlurmctldLogFile={ctld_log}
SlurmdLogFile={d_log}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={jobcomp}
SchedulerParameters=bf_interval=5,sched_interval=5
MinJobAge=3600
KillWait=30
ReturnToService=2
MpiDefault=none
SlurmdParameters=config_overrides
NodeName={host} CPUs=1 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
",
            ctld_port = free_port(),
            d_port = free_port(),
            socket = path_str(&socket),
            state = d("state"),
            spool = d("spool"),
            ctld_pid = d("slurmctld.pid"),
            d_pid = d("slurmd.pid"),
            ctld_log = d("log/slurmctld.log"),
            d_log = d("log/slurmd.log"),
            jobcomp = d("log/jobcomp.log"),
        );
        fs::write(&cluster.conf, conf).expect("write slurm.conf");
        run_ok(
            Command::new(&slurmctld)
                .arg("-f")
                .arg(&cluster.conf)
                .arg("-i"),
        );
        run_ok(Command::new(&slurmd).arg("-f").arg(&cluster.conf));
        cluster.wait("the node to be idle", Duration::from_secs(60), || {
            let out = cluster
                .slurm("sinfo")
                .args(["-h", "-o", "%T"])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .eq("idle")
                .then_some(())
        });
        cluster
    }

    /// A Slurm client command for this cluster.
    fn slurm(&self, program: &str) -> Command {
        let mut cmd = Command::new(need(program));
        cmd.env("SLURM_CONF", &self.conf).stdin(Stdio::null());
        cmd
    }

    /// `scontrol show job ID` as `key=value` pairs.
    fn job(&self, id: &str) -> std::collections::HashMap<String, String> {
        let out = self
            .slurm("scontrol")
            .args(["show", "job", id, "-o"])
            .output()
            .expect("run scontrol");
        common::parse_kv(&String::from_utf8_lossy(&out.stdout))
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for name in ["log/slurmctld.log", "log/slurmd.log", "munge/munged.log"] {
            let body = fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let tail = &body[body.len().saturating_sub(4000)..];
            text.push_str(&format!("--- {name} (end) ---\n{tail}\n"));
        }
        text
    }

    fn wait<T>(&self, what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
        common::agent::poll(what, timeout, || self.logs(), f)
    }

    fn pid_of(&self, file: &str) -> Option<i32> {
        fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Processes with a descriptor, working directory or executable in
    /// our directory (ours: this test process excluded).
    fn holders(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        let mut found = Vec::new();
        let Ok(procs) = fs::read_dir("/proc") else {
            return found;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let inside =
                |link: PathBuf| fs::read_link(link).is_ok_and(|t| t.starts_with(&self.dir));
            let holds = inside(p.path().join("cwd"))
                || fs::read_dir(p.path().join("fd"))
                    .map(|fds| fds.flatten().any(|fd| inside(fd.path())))
                    .unwrap_or(false);
            if holds {
                found.push(pid);
            }
        }
        found
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Jobs first, so slurmd ends their steps itself; then the daemons.
        let _ = self
            .slurm("scancel")
            .args(["--full", "--user", "root"])
            .output();
        std::thread::sleep(Duration::from_secs(1));
        for pidfile in ["slurmd.pid", "slurmctld.pid", "munge/munged.pid"] {
            if let Some(pid) = self.pid_of(pidfile) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let deadline = Instant::now() + Duration::from_secs(10);
                while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        // Whatever is left (a daemon that would not stop, a slurmstepd, a
        // job's process) holds something of ours: it goes.
        for _ in 0..3 {
            let left = self.holders();
            if left.is_empty() {
                break;
            }
            for pid in left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run a Slurm command");
    assert!(out.status.success(), "{cmd:?} {}", show(&out));
    out
}

#[test]
fn a_slurm_job_is_checkpointed_before_its_time_limit_requeued_and_completes() {
    let s = scratch_with_out();
    // The agent outlives the cluster (dropped after it).
    let agent = Agent::start(&s);
    let cluster = Cluster::start(&s.path("slurm"));

    // Inside the cluster's directory: whatever of the job outlives the
    // test is found there and killed.
    let work = &cluster.dir.join("work");
    fs::create_dir(work).expect("mkdir work");
    let image = work.join("job.chpox");
    let out_file = work.join("job.out");
    let err_file = work.join("job.err");
    let script = work.join("job.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh
#SBATCH --time=2 --signal=B:31@60 --requeue --open-mode=append
#SBATCH --output={out} --error={err}
echo \"run $SLURM_RESTART_COUNT starts\" >&2
exec {chpox} job --image {image} --requeue -- {steps} {STEPS} 1000
",
            out = path_str(&out_file),
            err = path_str(&err_file),
            chpox = path_str(&chpox_bin()),
            image = path_str(&image),
            steps = path_str(&bin("steps")),
        ),
    )
    .expect("write the job script");
    chmod(&script, 0o755);
    let submitted = run_ok(
        cluster
            .slurm("sbatch")
            .arg("--parsable")
            .arg(format!("--chdir={}", path_str(work)))
            .arg(&script)
            .env("CHPOX_RUN_DIR", &agent.run_dir),
    );
    let id = String::from_utf8_lossy(&submitted.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        !id.is_empty(),
        "sbatch printed no job id {}",
        show(&submitted)
    );

    let describe = || {
        format!(
            "--- job.err ---\n{}\n--- job.out (end) ---\n{}\n{}\n{}",
            fs::read_to_string(&err_file).unwrap_or_default(),
            fs::read_to_string(&out_file)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n"),
            cluster.logs(),
            agent.describe()
        )
    };
    let started = Instant::now();
    let job = common::agent::poll(
        &format!("Slurm job {id} to end"),
        JOB_TIMEOUT,
        describe,
        || {
            let job = cluster.job(&id);
            let state = job.get("JobState")?;
            matches!(
                state.as_str(),
                "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT" | "NODE_FAIL" | "OUT_OF_MEMORY"
            )
            .then_some(job)
        },
    );
    let took = started.elapsed();
    assert_eq!(
        job.get("JobState").map(String::as_str),
        Some("COMPLETED"),
        "{job:?}\n{}",
        describe()
    );
    let restarts: u32 = job
        .get("Restarts")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    assert!(
        restarts >= 1,
        "the job was never requeued ({job:?})\n{}",
        describe()
    );
    let err = fs::read_to_string(&err_file).unwrap_or_default();
    assert!(
        err.contains("requeued") && err.contains("restored from"),
        "{}",
        describe()
    );

    // The output of an uninterrupted run, each line once.
    let mut expected = vec![format!("READY steps={STEPS}")];
    let plain = Command::new(bin("steps"))
        .args([&STEPS.to_string(), "0"])
        .output()
        .expect("run steps");
    expected.extend(
        String::from_utf8_lossy(&plain.stdout)
            .lines()
            .skip(1)
            .map(str::to_string),
    );
    let got: Vec<String> = fs::read_to_string(&out_file)
        .expect("read job.out")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(got, expected, "{}", describe());
    eprintln!(
        "slurm job {id}: {restarts} requeue(s), {:.0} s from submission to completion",
        took.as_secs_f64()
    );
    drop(cluster);
    drop(agent);
}
