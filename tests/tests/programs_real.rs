//! Real programs nobody wrote for chpox, as students and batch jobs run
//! them, checkpointed mid-work (`chpox dump --kill`, or `kill -31` through
//! the agent followed by a crash of the whole tree) and restored: each must
//! end with the result of an uninterrupted run.
//!
//! - A parallel build: `make -j2` of a generated C project whose libraries
//!   are built by sub-makes sharing the top make's jobserver pipe, each
//!   compilation a `gcc -pipe` tree (cc → cc1 | as). The binary must be
//!   identical, byte for byte.
//! - Python `multiprocessing.Pool` with the `forkserver` and `spawn` start
//!   methods: a resource tracker, a fork server with its UNIX socket,
//!   workers fed through pipes, locks that are POSIX semaphores in
//!   /dev/shm (which the dump says come back as copies: a worker started
//!   after the restore, opening them by name, would not share them).
//! - Node.js worker threads: V8 isolates in threads, message ports and a
//!   SharedArrayBuffer.
//! - A bash script with a coprocess, a `while read` loop fed by a process
//!   substitution, then `sort` with temporary files and `xargs -P2`.
//! - A Go program under `chpox run` (its runtime handles every signal),
//!   checkpointed through the agent on SIGHUP.
//! - A build without `-pipe` checkpointed while `cc1` writes its temporary
//!   assembler file, restored after the build removed it: refused, naming
//!   the file and what to do, before any process exists.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::agent::{Agent, SIGSYS, no_core, poll, scratch, send};
use common::procs::{Guard, kill_tree, tree, tree_pids};
use common::restore::restore_and_wait_within;
use common::{Target, chpox_bin, chpox_ok, only_stdio, path_str, tempdir, wait_pid_free};

const BUILD_TIMEOUT: Duration = Duration::from_secs(120);
/// A whole run of one of these programs (CPU-bound: minutes on a machine
/// loaded by other jobs, seconds otherwise).
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// A parallel build

/// Units per library, functions per unit: enough for each `cc1` to take a
/// moment at -O2, little enough for the whole build to take seconds.
const UNITS: usize = 4;
const FUNCTIONS: usize = 30;

/// One C unit `lib_i.c` defining `unit_lib_i`, a chain of small loops.
fn unit_source(lib: &str, i: usize) -> String {
    let mut s = String::from("#include <stdint.h>\n");
    s.push_str(&format!("uint64_t unit_{lib}{i}(uint64_t x);\n"));
    for j in 0..FUNCTIONS {
        s.push_str(&format!(
            "static uint64_t f_{lib}{i}_{j}(uint64_t x) {{ for (int k = 0; k < {}; k++) {{ \
             x = x * 6364136223846793005ULL + {}; x ^= x >> {}; if (x % 7 == {}) x += k * {j}; }} \
             return x; }}\n",
            j + 3,
            i * 100 + j,
            j % 31 + 1,
            j % 7
        ));
    }
    s.push_str(&format!("uint64_t unit_{lib}{i}(uint64_t x) {{\n"));
    for j in 0..FUNCTIONS {
        s.push_str(&format!("  x = f_{lib}{i}_{j}(x);\n"));
    }
    s.push_str("  return x;\n}\n");
    s
}

/// A project in `dir`: libraries `a` and `b`, each built by a sub-make,
/// and `prog` linked from `main.c` and both. `cflags` go to every
/// compilation.
fn write_project(dir: &Path, cflags: &str) {
    let libs = ["a", "b"];
    let mut decls = String::new();
    let mut calls = String::new();
    for lib in libs {
        let d = dir.join(lib);
        fs::create_dir_all(&d).expect("mkdir lib");
        for i in 0..UNITS {
            fs::write(d.join(format!("{lib}{i}.c")), unit_source(lib, i)).expect("write unit");
            decls.push_str(&format!("uint64_t unit_{lib}{i}(uint64_t);\n"));
            calls.push_str(&format!("  x = unit_{lib}{i}(x);\n"));
        }
        fs::write(
            d.join("Makefile"),
            format!(
                "OBJS := $(patsubst %.c,%.o,$(wildcard *.c))\n\
                 lib{lib}.a: $(OBJS)\n\tar rcD $@ $^\n\
                 %.o: %.c\n\t$(CC) {cflags} -c -o $@ $<\n"
            ),
        )
        .expect("write lib Makefile");
    }
    fs::write(
        dir.join("main.c"),
        format!(
            "#include <stdio.h>\n#include <stdint.h>\n{decls}\
             int main(void) {{\n  uint64_t x = 3;\n{calls}  \
             printf(\"%llx\\n\", (unsigned long long)x);\n  return 0;\n}}\n"
        ),
    )
    .expect("write main.c");
    fs::write(
        dir.join("Makefile"),
        format!(
            "prog: main.c a/liba.a b/libb.a\n\t$(CC) {cflags} -o $@ main.c a/liba.a b/libb.a\n\
             a/liba.a: FORCE\n\t$(MAKE) -C a\n\
             b/libb.a: FORCE\n\t$(MAKE) -C b\n\
             FORCE:\n\
             clean:\n\trm -f prog */*.o */*.a\n"
        ),
    )
    .expect("write Makefile");
}

/// `sh -c 'echo READY; exec make -C DIR -j2 -s'`: the make tree under the
/// PID of the returned command, with nothing of the test runner's make or
/// cargo jobserver. `TMPDIR` is `DIR/tmp`.
fn make_command(program: &Path, pre: &[&str], dir: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(pre)
        .args(["sh", "-c", "echo READY; exec make -C \"$0\" -j2 -s"])
        .arg(dir);
    for var in ["MAKEFLAGS", "MFLAGS", "MAKELEVEL", "CARGO_MAKEFLAGS"] {
        cmd.env_remove(var);
    }
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp).expect("mkdir tmp");
    cmd.env("TMPDIR", &tmp);
    cmd
}

/// What the build in `dir` made: the binary's bytes and what it prints.
fn build_result(dir: &Path) -> (Vec<u8>, String) {
    let prog = dir.join("prog");
    let bytes = fs::read(&prog).expect("read prog");
    let out = Command::new(&prog).output().expect("run prog");
    assert!(out.status.success(), "prog: {}", common::show(&out));
    (bytes, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The build in `dir`, uninterrupted: its result, then `make clean`.
fn reference_build(dir: &Path, logs: &Path) -> (Vec<u8>, String) {
    let mut cmd = make_command(Path::new("env"), &[], dir);
    only_stdio(&mut cmd);
    let mut t = Target::spawn_command(cmd, "make-ref", logs);
    t.wait_success(BUILD_TIMEOUT);
    let result = build_result(dir);
    let clean = Command::new("make")
        .args(["-s", "-C"])
        .arg(dir)
        .arg("clean")
        .stdin(Stdio::null())
        .output()
        .expect("make clean");
    assert!(clean.status.success(), "{}", common::show(&clean));
    result
}

/// Waits until the make tree of `root` is mid-build: some objects made,
/// and a compiler proper (`cc1`) at work; returns its PID.
fn wait_mid_build(t: &Target, dir: &Path) -> i32 {
    let objects = || {
        ["a", "b"]
            .iter()
            .filter_map(|l| fs::read_dir(dir.join(l)).ok())
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".o"))
            .filter(|e| e.metadata().is_ok_and(|m| m.len() > 0))
            .count()
    };
    let root = t.pid;
    poll(
        "the build to be mid-way (2 objects made, cc1 running)",
        BUILD_TIMEOUT,
        || format!("{} objects; {}", objects(), t.stderr()),
        || {
            if objects() < 2 {
                return None;
            }
            tree(root).into_iter().find_map(|s| {
                let comm = fs::read_to_string(format!("/proc/{}/comm", s.pid)).ok()?;
                (comm.trim_end() == "cc1").then_some(s.pid)
            })
        },
    )
}

#[test]
fn a_parallel_make_dumped_and_killed_restores_to_the_same_binary() {
    let dir = tempdir();
    let src = dir.path().join("src");
    write_project(&src, "-O2 -pipe");
    let want = reference_build(&src, dir.path());

    let mut cmd = make_command(Path::new("env"), &[], &src);
    only_stdio(&mut cmd);
    let mut t = Target::spawn_command(cmd, "make", dir.path());
    wait_mid_build(&t, &src);
    let image = dir.path().join("make.img");
    // The jobserver pipe, the sub-makes and every cc | cc1 | as pipeline.
    common::dump_kill(&mut t, &image, &[]);

    let (code, stderr) = restore_and_wait_within(&image, &[], dir.path(), EXIT_TIMEOUT);
    assert_eq!(code, 0, "restore: {stderr}\nmake's stderr: {}", t.stderr());
    assert_eq!(t.stderr(), "", "make's stderr");
    let got = build_result(&src);
    assert_eq!(got.1, want.1, "what prog prints");
    assert!(
        got.0 == want.0,
        "the binary differs from the uninterrupted build's"
    );
}

/// `chpox restore IMAGE` against `agent`, waited for; its exit code and
/// stderr.
fn restore_with_agent(agent: &Agent, image: &Path, logs: &Path) -> (i32, String) {
    let err = logs.join("restore.stderr");
    let mut child = agent
        .client(chpox_bin())
        .arg("restore")
        .arg(image)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err).expect("restore stderr file"))
        .spawn()
        .expect("spawn chpox restore");
    let root = chpox::image::ImageReader::open(image).map_or(0, |r| r.metadata().root.process.pid);
    let status = poll(
        "the restored job to finish",
        BUILD_TIMEOUT,
        || {
            format!(
                "{}\n--- the restored tree ---\n{}{}",
                fs::read_to_string(&err).unwrap_or_default(),
                common::tree::describe_waits(root),
                agent.describe()
            )
        },
        || child.try_wait().expect("try_wait chpox restore"),
    );
    (
        status.code().unwrap_or(-1),
        fs::read_to_string(&err).unwrap_or_default(),
    )
}

/// `kill -31` of a job started with `chpox run`, then the crash of its
/// whole tree (the job ran on after the checkpoint: it has to be gone
/// before its image comes back under the same PIDs).
fn checkpoint_then_crash(agent: &Agent, t: &mut Target) -> PathBuf {
    let pids_before = tree_pids(t.pid);
    send(t.pid, SIGSYS);
    let entry = agent.wait_checkpoints(t.pid, 1);
    assert_eq!(entry["last_error"], serde_json::Value::Null, "{entry}");
    let image = common::agent::output_of(&entry);
    let mut pids = kill_tree(t.pid);
    t.child.wait().expect("reap the job");
    pids.extend(pids_before);
    for pid in &pids {
        wait_pid_free(*pid);
    }
    agent.wait_gone(t.pid);
    image
}

#[test]
fn a_parallel_make_checkpointed_by_the_agent_and_crashed_restores_to_the_same_binary() {
    let s = scratch();
    let agent = Agent::start(&s);
    let src = s.logs.join("src");
    write_project(&src, "-O2 -pipe");
    let want = reference_build(&src, &s.logs);

    let image = s.logs.join("make.chpox");
    let mut cmd = make_command(
        &chpox_bin(),
        &["run", "-o", path_str(&image), "--", "env"],
        &src,
    );
    cmd.env("CHPOX_RUN_DIR", &agent.run_dir);
    no_core(&mut cmd, &s.logs);
    let mut t = Target::spawn_command(cmd, "make", &s.logs);
    wait_mid_build(&t, &src);
    let image_made = checkpoint_then_crash(&agent, &mut t);
    assert_eq!(image_made, image);

    let mut guard = Guard::default();
    let (code, stderr) = restore_with_agent(&agent, &image, &s.logs);
    guard.watch_tree(t.pid);
    assert_eq!(code, 0, "restore: {stderr}\nmake's stderr: {}", t.stderr());
    assert_eq!(t.stderr(), "", "make's stderr");
    let got = build_result(&src);
    assert_eq!(got.1, want.1, "what prog prints");
    assert!(
        got.0 == want.0,
        "the binary differs from the uninterrupted build's"
    );
}

/// A build without `-pipe`: `cc1` writes its assembler output to a
/// temporary file that `gcc` removes once `as` has read it. An image taken
/// meanwhile, restored after the build ended, cannot bring that file back:
/// the restore says so, naming it, before any process exists.
#[test]
fn a_build_whose_temporary_file_is_gone_is_refused_by_name() {
    let dir = tempdir();
    let src = dir.path().join("src");
    write_project(&src, "-O2");
    let mut cmd = make_command(Path::new("env"), &[], &src);
    only_stdio(&mut cmd);
    let mut t = Target::spawn_command(cmd, "make", dir.path());
    wait_mid_build(&t, &src);
    // Until a process of the tree has a temporary file open (cc1 writing
    // it, or as reading it).
    let tmpdir = src.join("tmp");
    poll(
        "a process of the build to hold a temporary file",
        BUILD_TIMEOUT,
        || t.stderr(),
        || {
            tree(t.pid).into_iter().find_map(|p| {
                let fds = fs::read_dir(format!("/proc/{}/fd", p.pid)).ok()?;
                fds.flatten()
                    .filter_map(|fd| fs::read_link(fd.path()).ok())
                    .any(|target| target.starts_with(&tmpdir))
                    .then_some(())
            })
        },
    );
    let image = dir.path().join("make.img");
    // Leaving it running: the build goes on and removes its temporary files.
    let out = common::run_chpox(&["dump", &t.pid.to_string(), "-o", path_str(&image)]);
    assert!(out.status.success(), "dump: {}", common::show(&out));
    t.wait_success(BUILD_TIMEOUT);
    let tmp: BTreeSet<_> = fs::read_dir(src.join("tmp"))
        .expect("read TMPDIR")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(tmp.is_empty(), "the build left {tmp:?}");

    let (code, stderr) = restore_and_wait_within(&image, &[], dir.path(), EXIT_TIMEOUT);
    assert_ne!(code, 0, "the restore went on: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("no longer exists"))
        .unwrap_or_else(|| panic!("no line says the file is gone: {stderr}"));
    assert!(
        line.contains(&format!("file {}/", path_str(&tmpdir))),
        "{line}"
    );
    assert!(line.contains("start the job over"), "{line}");
    assert!(line.contains(" of PID "), "{line}");
}

// ---------------------------------------------------------------------------
// Python multiprocessing

/// A pool of two workers hashing; `METHOD` is the start method.
const POOL: &str = r#"
import hashlib, multiprocessing as mp, sys, time
def work(i):
    h = hashlib.sha256(str(i).encode())
    for _ in range(20000):
        h = hashlib.sha256(h.digest())
    time.sleep(0.05)
    return i, h.hexdigest()[:16]
if __name__ == "__main__":
    ctx = mp.get_context(sys.argv[1])
    with ctx.Pool(2) as pool:
        print("READY", flush=True)
        for i, d in pool.imap(work, range(60)):
            print(i, d, flush=True)
    print("DONE", flush=True)
"#;

/// The pool's output in an uninterrupted run with start method `method`.
fn pool_output(method: &str, dir: &Path) -> Vec<String> {
    let mut plain = common::python(POOL, &[method], dir);
    plain.wait_success(EXIT_TIMEOUT);
    let lines = plain.lines_after_ready();
    assert_eq!(lines.len(), 61, "uninterrupted run: {lines:?}");
    lines
}

#[test]
fn a_python_pool_with_a_fork_server_dumped_and_killed_finishes_the_same() {
    let dir = tempdir();
    let want = pool_output("forkserver", dir.path());
    let mut t = common::python(POOL, &["forkserver"], dir.path());
    t.wait_for_line("10 ", EXIT_TIMEOUT);
    let image = dir.path().join("pool.img");
    let pids = tree_pids(t.pid);
    let out = common::run_chpox(&["dump", &t.pid.to_string(), "-o", path_str(&image), "--kill"]);
    assert!(out.status.success(), "dump: {}", common::show(&out));
    // The pool's locks are semaphores sem_open made: mapped under a name
    // removed, linked under another, which the dump finds.
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !said.contains("still linked under another name"),
        "the dump did not find a semaphore's name: {said}"
    );
    t.wait_exit(EXIT_TIMEOUT);
    for pid in pids {
        wait_pid_free(pid);
    }
    let (code, stderr) = restore_and_wait_within(&image, &[], dir.path(), EXIT_TIMEOUT);
    assert_eq!(
        code,
        0,
        "restore: {stderr}\npython's stderr: {}",
        t.stderr()
    );
    assert_eq!(t.lines_after_ready(), want, "{}", t.stderr());
    assert_eq!(t.stderr(), "", "python's stderr");
}

#[test]
fn a_python_pool_of_spawned_workers_checkpointed_by_the_agent_finishes_the_same() {
    let s = scratch();
    let agent = Agent::start(&s);
    let want = pool_output("spawn", &s.logs);
    let script = s.logs.join("pool.py");
    fs::write(&script, POOL).expect("write the script");
    let image = s.logs.join("pool.chpox");
    let mut cmd = agent.client(chpox_bin());
    cmd.args(["run", "-o", path_str(&image), "--", "python3", "-u"])
        .arg(&script)
        .arg("spawn");
    no_core(&mut cmd, &s.logs);
    let mut t = Target::spawn_command(cmd, "pool", &s.logs);
    t.wait_for_line("10 ", EXIT_TIMEOUT);
    let image_made = checkpoint_then_crash(&agent, &mut t);
    assert_eq!(image_made, image);
    // The output file is not part of the image: what the job wrote after
    // its checkpoint goes (the image's root wrote `pos` bytes by then).
    cut_output_to_image(&t, &image);

    let mut guard = Guard::default();
    let (code, stderr) = restore_with_agent(&agent, &image, &s.logs);
    guard.watch_tree(t.pid);
    assert_eq!(
        code,
        0,
        "restore: {stderr}\npython's stderr: {}",
        t.stderr()
    );
    assert_eq!(t.lines_after_ready(), want, "{}", t.stderr());
}

/// Cuts the target's stdout back to where the image's root had written it.
fn cut_output_to_image(t: &Target, image: &Path) {
    let out = chpox_ok(&["inspect", path_str(image), "--json"]);
    let img: serde_json::Value = serde_json::from_str(&out).expect("inspect --json");
    let pos = img["fds"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["fd"] == 1)
        .and_then(|e| e["kind"]["RegularFile"]["pos"].as_u64())
        .unwrap_or_else(|| panic!("the root's stdout is no file in the image: {}", img["fds"]));
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&t.stdout_path)
        .expect("open stdout");
    f.set_len(pos).expect("cut stdout");
}

// ---------------------------------------------------------------------------
// A shell script

const SCRIPT: &str = r#"
set -e
coproc SQ { while read -r n; do echo $((n * n)); done; }
echo READY
total=0
while read -r i; do
    echo "$i" >&"${SQ[1]}"
    read -r sq <&"${SQ[0]}"
    total=$((total + sq))
    echo "line $i $sq $total"
    sleep 0.02
done < <(seq 1 150)
exec {SQ[1]}>&-
wait
seq 1 200000 | awk '{ print ($1 * 7919) % 1000003, $1 }' > nums
sort -n -k1,1 -k2,2 -S 1M -T . nums | md5sum
seq 1 40 | xargs -P2 -I{} sh -c 'sleep 0.02; echo $(( {} * 3 ))' | sort -n | md5sum
echo "END $total"
"#;

/// `program SCRIPT` in `dir`, its stdout and stderr to files named after
/// `name`, until its READY line.
fn run_script(program: &str, script: &Path, dir: &Path, name: &str) -> Target {
    let mut cmd = Command::new(program);
    cmd.arg(script).current_dir(dir);
    only_stdio(&mut cmd);
    Target::spawn_command(cmd, name, dir)
}

#[test]
fn a_bash_script_with_a_coprocess_and_pipelines_finishes_the_same() {
    let dir = tempdir();
    let script = dir.path().join("job.sh");
    fs::write(&script, SCRIPT).expect("write the script");
    let run = |name: &str| run_script("bash", &script, dir.path(), name);
    let mut plain = run("plain");
    plain.wait_success(EXIT_TIMEOUT);
    let want = plain.lines_after_ready();
    assert_eq!(want.len(), 153, "{want:?}");
    assert_eq!(plain.stderr(), "", "bash's stderr, uninterrupted");

    let mut t = run("job");
    t.wait_for_line("line 40 ", EXIT_TIMEOUT);
    let image = dir.path().join("job.img");
    // bash, the coprocess's subshell and the process substitution's seq
    // (or the pipe it filled, once it is done).
    common::dump_kill(&mut t, &image, &[]);
    let (code, stderr) = restore_and_wait_within(&image, &[], dir.path(), EXIT_TIMEOUT);
    assert_eq!(code, 0, "restore: {stderr}\nbash's stderr: {}", t.stderr());
    assert_eq!(t.lines_after_ready(), want, "{}", t.stderr());
    assert_eq!(t.stderr(), "", "bash's stderr");
}

// ---------------------------------------------------------------------------
// Node.js worker threads

/// Two worker threads (each a V8 isolate with its own event loop) hashing
/// what the main thread hands them through message ports, counting in a
/// SharedArrayBuffer. Which worker answers first varies: the lines are
/// compared sorted, the digest of all results in order is not.
const WORKERS: &str = r#"
const { Worker, isMainThread, parentPort } = require('worker_threads');
const crypto = require('crypto');
if (isMainThread) {
  const results = [];
  let next = 0, done = 0;
  const N = 60;
  const workers = [0, 1].map(() => new Worker(__filename));
  const shared = new Int32Array(new SharedArrayBuffer(4));
  console.log('READY');
  for (const w of workers) {
    w.postMessage({ shared });
    w.on('message', ([i, h]) => {
      results[i] = h;
      done++;
      console.log('got', i, h);
      if (next < N) w.postMessage({ i: next++ });
      else w.postMessage({ stop: true });
      if (done === N) {
        const all = crypto.createHash('sha256').update(results.join()).digest('hex');
        console.log('DONE', all.slice(0, 16), Atomics.load(shared, 0));
      }
    });
  }
  for (const w of workers) w.postMessage({ i: next++ });
} else {
  let shared;
  parentPort.on('message', (m) => {
    if (m.shared) { shared = m.shared; return; }
    if (m.stop) { parentPort.close(); return; }
    let h = Buffer.from(String(m.i));
    for (let k = 0; k < 20000; k++) h = crypto.createHash('sha256').update(h).digest();
    Atomics.add(shared, 0, 1);
    setTimeout(() => parentPort.postMessage([m.i, h.toString('hex').slice(0, 16)]), 30);
  });
}
"#;

#[test]
fn node_worker_threads_dumped_and_killed_finish_the_same() {
    let dir = tempdir();
    let script = dir.path().join("workers.js");
    fs::write(&script, WORKERS).expect("write the script");
    let run = |name: &str| run_script("node", &script, dir.path(), name);
    let sorted = |t: &Target| {
        let mut lines = t.lines_after_ready();
        lines.sort();
        lines
    };
    let mut plain = run("plain");
    plain.wait_success(EXIT_TIMEOUT);
    let want = sorted(&plain);
    assert_eq!(want.len(), 61, "{want:?}");

    let mut t = run("node");
    t.wait_for_line("got 15 ", EXIT_TIMEOUT);
    let image = dir.path().join("node.img");
    common::dump_kill(&mut t, &image, &[]);
    let (code, stderr) = restore_and_wait_within(&image, &[], dir.path(), EXIT_TIMEOUT);
    assert_eq!(code, 0, "restore: {stderr}\nnode's stderr: {}", t.stderr());
    assert_eq!(sorted(&t), want, "{}", t.stderr());
    assert_eq!(t.stderr(), "", "node's stderr");
}

// ---------------------------------------------------------------------------
// A job in a pseudo-terminal of its own

/// `script` runs the job on a pseudo-terminal it made: it holds the master
/// side (/dev/ptmx), the job the slave. chpox saves neither the pair nor
/// what is queued in it, and neither the restorer's terminal nor a new pty
/// would stand in for it: the dump is refused, naming the master, and the
/// job runs on untouched. With `--unsupported-fd=null` it is recorded as
/// /dev/null, as the message says.
#[test]
fn a_job_on_a_pseudo_terminal_of_its_own_is_refused_by_name() {
    let dir = tempdir();
    let mut cmd = Command::new("script");
    cmd.args([
        "-q",
        "-c",
        "echo READY; for i in $(seq 1 300); do echo tick $i; sleep 0.1; done",
        "/dev/null",
    ])
    .current_dir(dir.path());
    only_stdio(&mut cmd);
    let mut t = Target::spawn_command(cmd, "script", dir.path());
    let master = fs::read_dir(format!("/proc/{}/fd", t.pid))
        .expect("read script's fds")
        .flatten()
        .find(|e| fs::read_link(e.path()).is_ok_and(|l| l.ends_with("ptmx")))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .expect("script holds a pty master");
    let image = dir.path().join("script.img");
    let out = common::run_chpox(&["dump", &t.pid.to_string(), "-o", path_str(&image)]);
    common::dumps::assert_dump_error(&out, t.pid, &[&format!("fd {master} ("), "ptmx)"]);
    assert!(!image.exists(), "an image was written");
    common::dumps::assert_running_untraced(t.pid);
    t.wait_for_line("tick 3", EXIT_TIMEOUT);

    let out = common::run_chpox(&[
        "dump",
        &t.pid.to_string(),
        "-o",
        path_str(&image),
        "--unsupported-fd=null",
    ]);
    assert!(out.status.success(), "{}", common::show(&out));
    let img: serde_json::Value =
        serde_json::from_str(&chpox_ok(&["inspect", path_str(&image), "--json"]))
            .expect("inspect --json");
    let fd = img["fds"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["fd"].as_i64().is_some_and(|n| n.to_string() == master))
        .unwrap_or_else(|| panic!("no fd {master} in {}", img["fds"]));
    assert!(
        fd["kind"]["ReplacedByNull"]["was"]
            .as_str()
            .is_some_and(|w| w.ends_with("ptmx")),
        "{fd}"
    );
}

// ---------------------------------------------------------------------------
// A Go program through the agent

/// Goroutines on two threads (GOMAXPROCS=2) rewriting a 64 MiB heap while
/// the collector runs; what it prints depends only on the rounds done.
const GO_HEAP: &str = r#"
package main

import (
	"fmt"
	"sync"
	"time"
)

func main() {
	const blocks = 64
	live := make([][]uint64, blocks)
	for i := range live {
		live[i] = make([]uint64, 131072)
		for j := range live[i] {
			live[i][j] = uint64(i*j) ^ 0x9e3779b97f4a7c15
		}
	}
	fmt.Println("READY")
	for round := 0; round < 60; round++ {
		var wg sync.WaitGroup
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				for i := g; i < blocks; i += 4 {
					if (i+round)%5 == 0 {
						b := make([]uint64, 131072)
						for j := range b {
							b[j] = live[i][j]*6364136223846793005 + uint64(round)
						}
						live[i] = b
					}
				}
			}(g)
		}
		wg.Wait()
		var sum uint64
		for i := range live {
			for j := 0; j < len(live[i]); j += 512 {
				sum += live[i][j]
			}
		}
		fmt.Printf("round %d %x\n", round, sum)
		time.Sleep(50 * time.Millisecond)
	}
	fmt.Println("DONE")
}
"#;

/// The Go program built in `dir`.
fn go_heap_binary(dir: &Path) -> PathBuf {
    let src = dir.join("heap.go");
    fs::write(&src, GO_HEAP).expect("write the Go program");
    let bin = dir.join("goheap");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(&src)
        .current_dir(dir)
        .env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", dir.join("gopath"))
        .env("GO111MODULE", "off")
        .output()
        .expect("run go build (Debian package golang-go)");
    assert!(out.status.success(), "go build: {}", common::show(&out));
    bin
}

/// A Go program started with `chpox run`: the Go runtime installs a handler
/// for every signal, the trigger signal too, and the agent gives it back
/// (a handler the process installs itself is left alone). The agent's own
/// call that gives it back was seen as the process resetting its signal
/// again, and again: the process was frozen over and over and most often
/// left stopped for good. Then `--signal HUP`, whose inherited SIG_IGN Go
/// keeps: `kill -HUP` checkpoints it, and after a crash the restored
/// program ends as an uninterrupted run does.
#[test]
fn a_go_program_under_chpox_run_runs_free_and_checkpoints_on_sighup() {
    let s = scratch();
    let agent = Agent::start(&s);
    let bin = go_heap_binary(&s.logs);
    let run = |name: &str, chpox_args: &[&str]| {
        let mut cmd = agent.client(chpox_bin());
        cmd.arg("run").args(chpox_args).arg("--").arg(&bin);
        cmd.env("GOMAXPROCS", "2");
        no_core(&mut cmd, &s.logs);
        Target::spawn_command(cmd, name, &s.logs)
    };
    let image = s.logs.join("go.chpox");

    // Registered with the default trigger: it must run to its end.
    let mut plain = run("plain", &["-o", path_str(&image)]);
    plain.wait_success(EXIT_TIMEOUT);
    let want = plain.lines_after_ready();
    assert_eq!(want.len(), 61, "{want:?}");

    let mut t = run("go", &["--signal", "HUP", "-o", path_str(&image)]);
    t.wait_for_line("round 10 ", EXIT_TIMEOUT);
    let pids_before = tree_pids(t.pid);
    send(t.pid, libc::SIGHUP);
    let entry = agent.wait_checkpoints(t.pid, 1);
    assert_eq!(entry["last_error"], serde_json::Value::Null, "{entry}");
    kill_tree(t.pid);
    t.child.wait().expect("reap the job");
    for pid in pids_before {
        wait_pid_free(pid);
    }
    agent.wait_gone(t.pid);
    cut_output_to_image(&t, &image);

    let mut guard = Guard::default();
    let (code, stderr) = restore_with_agent(&agent, &image, &s.logs);
    guard.watch_tree(t.pid);
    assert_eq!(code, 0, "restore: {stderr}\nGo's stderr: {}", t.stderr());
    assert_eq!(t.lines_after_ready(), want, "{}", t.stderr());
}

// ---------------------------------------------------------------------------
// Named POSIX semaphores

/// Waits on a named semaphore (sem_open through ctypes) three times,
/// printing each wake-up, then removes the name.
const SEM_WAITER: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.sem_open.restype = ctypes.c_void_p
libc.sem_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_uint]
libc.sem_wait.argtypes = [ctypes.c_void_p]
name = sys.argv[1].encode()
sem = libc.sem_open(name, os.O_CREAT | os.O_EXCL, 0o600, 0)
if not sem:
    sys.exit("sem_open: errno %d" % ctypes.get_errno())
print("READY", flush=True)
for i in range(3):
    while libc.sem_wait(sem) != 0:
        pass
    print("got", i, flush=True)
libc.sem_unlink(name)
"#;

/// Opens the named semaphore (it must exist) and posts it once.
const SEM_POSTER: &str = r#"
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.sem_open.restype = ctypes.c_void_p
libc.sem_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.sem_post.argtypes = [ctypes.c_void_p]
sem = libc.sem_open(sys.argv[1].encode(), 0)
if not sem or libc.sem_post(sem) != 0:
    sys.exit("sem_open/sem_post: errno %d" % ctypes.get_errno())
"#;

fn post(name: &str) {
    let out = Command::new("python3")
        .args(["-c", SEM_POSTER, name])
        .output()
        .expect("run python3");
    assert!(out.status.success(), "post: {}", common::show(&out));
}

/// glibc's sem_open makes the semaphore under a temporary name and links
/// it as `/dev/shm/sem.NAME`: the process maps a file whose mapping says
/// "deleted". After `--kill` and restore, a process that opens the name
/// (as a pool's new worker does) must reach the restored process's
/// semaphore, not the file the killed run left behind.
#[test]
fn a_named_semaphore_opened_after_the_restore_is_the_restored_one() {
    let dir = tempdir();
    let name = format!("/chpox-test-sem-{}", std::process::id());
    let shm = PathBuf::from(format!("/dev/shm/sem.{}", &name[1..]));
    let _ = fs::remove_file(&shm);
    /// A failed run leaves no semaphore behind.
    struct Removed(PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }
    let _removed = Removed(shm.clone());
    let mut t = common::python(SEM_WAITER, &[&name], dir.path());
    let mut guard = Guard::default();
    guard.watch_tree(t.pid);
    post(&name);
    t.wait_for_line("got 0", EXIT_TIMEOUT);

    let image = dir.path().join("sem.img");
    let out = common::run_chpox(&["dump", &t.pid.to_string(), "-o", path_str(&image), "--kill"]);
    assert!(out.status.success(), "dump: {}", common::show(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("still linked"), "{said}");
    t.wait_exit(EXIT_TIMEOUT);
    wait_pid_free(t.pid);
    // The killed run's file is still there under the name.
    assert!(shm.exists(), "{} is gone", shm.display());

    let restored = common::tree::restore_detached(&image, &[], dir.path());
    guard.watch_tree(restored);
    post(&name);
    post(&name);
    poll(
        "the restored process to wake up twice more",
        Duration::from_secs(10),
        || t.stdout(),
        || t.lines().iter().any(|l| l == "got 2").then_some(()),
    );
    poll(
        "the restored process to exit",
        EXIT_TIMEOUT,
        || t.stdout(),
        || (!Path::new(&format!("/proc/{restored}")).exists()).then_some(()),
    );
    assert_eq!(t.lines_after_ready(), ["got 0", "got 1", "got 2"]);
    assert!(
        !shm.exists(),
        "the restored process did not remove the name"
    );
}
