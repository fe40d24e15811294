//! `cargo xtask install`, `uninstall` and `package`: the installed layout,
//! each command by each of its names, the systemd unit, man pages,
//! completions, and the Debian package, all made from the build under test
//! (`--no-build --profile debug`): nothing here rebuilds the release.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{path_str, profile_dir, show, tempdir};

/// The xtask program, built by `cargo xtask` itself (or `cargo build
/// --workspace`).
fn xtask() -> PathBuf {
    let p = profile_dir().join("xtask");
    assert!(
        p.is_file(),
        "{} not found; build it with `cargo build -p xtask` (`cargo xtask test` does)",
        p.display()
    );
    p
}

/// `target/debug` → `debug`.
fn profile() -> String {
    profile_dir()
        .file_name()
        .and_then(|n| n.to_str())
        .expect("profile directory name")
        .to_string()
}

fn xtask_ok(args: &[&str]) -> String {
    let out = Command::new(xtask())
        .args(args)
        .args(["--no-build", "--profile", &profile()])
        .output()
        .expect("run xtask");
    assert!(out.status.success(), "xtask {args:?}: {}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Files (and links) under `root`, relative to it.
fn files_under(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let t = e.file_type().expect("file type");
            if t.is_dir() {
                dirs.push(e.path());
            } else {
                let rel = e.path().strip_prefix(root).expect("under root").to_owned();
                out.insert(rel.to_string_lossy().into_owned());
            }
        }
    }
    out
}

const COMMANDS: [&str; 4] = ["chpox", "chpoxctl", "ld-chpox", "chpox-agent"];

/// What any install must hold (relative to PREFIX).
fn expected_files() -> Vec<String> {
    let mut want: Vec<String> = vec![
        "lib/chpox/chpox-ebpf.o".into(),
        "lib/chpox/installed-files".into(),
        "lib/systemd/system/chpox-agent.service".into(),
        "share/doc/chpox/README.md".into(),
        "share/man/man1/chpox.1".into(),
        "share/man/man1/chpox-dump.1".into(),
        "share/man/man1/chpox-restore.1".into(),
        "share/man/man1/chpox-check.1".into(),
        "share/man/man1/chpoxctl.1".into(),
        "share/man/man1/chpoxctl-add.1".into(),
        "share/man/man1/ld-chpox.1".into(),
        "share/man/man8/chpox-agent.8".into(),
    ];
    for c in COMMANDS {
        want.push(format!("bin/{c}"));
        want.push(format!("share/bash-completion/completions/{c}"));
        want.push(format!("share/zsh/site-functions/_{c}"));
        want.push(format!("share/fish/vendor_completions.d/{c}.fish"));
    }
    want
}

#[test]
fn install_lays_out_every_file_and_each_command_runs_by_its_name() {
    let dir = tempdir();
    let dest = dir.path().join("dest");
    xtask_ok(&["install", "--prefix", "/usr", "--destdir", path_str(&dest)]);
    let prefix = dest.join("usr");
    let have = files_under(&prefix);
    for f in expected_files() {
        assert!(have.contains(&f), "{f} not installed; installed: {have:#?}");
    }
    // The manifest lists exactly what is there.
    let manifest: BTreeSet<String> =
        std::fs::read_to_string(prefix.join("lib/chpox/installed-files"))
            .expect("manifest")
            .lines()
            .map(str::to_string)
            .collect();
    assert_eq!(manifest, have);

    // One program; the other names link to it, and each answers as itself.
    let program = prefix.join("bin/chpox");
    let meta = std::fs::symlink_metadata(&program).expect("bin/chpox");
    assert!(meta.is_file());
    for c in COMMANDS {
        let path = prefix.join("bin").join(c);
        if c != "chpox" {
            assert_eq!(
                std::fs::read_link(&path).expect("a link"),
                Path::new("chpox"),
                "{c}"
            );
        }
        let out = run(Command::new(&path).arg("--version"));
        assert!(out.status.success(), "{c} --version: {}", show(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{c} {}", env!("CARGO_PKG_VERSION")),
            "{c}"
        );
    }
    // Debug information stays behind in target/.
    let sections = run(Command::new("readelf").arg("-S").arg(&program));
    assert!(
        !String::from_utf8_lossy(&sections.stdout).contains(".debug_info"),
        "{} still has debug information",
        program.display()
    );
    // The unit runs the agent where it was installed.
    let unit = std::fs::read_to_string(prefix.join("lib/systemd/system/chpox-agent.service"))
        .expect("unit");
    assert!(unit.contains("\nExecStart=/usr/bin/chpox-agent "), "{unit}");

    // The installed agent loads the installed eBPF object.
    installed_agent_loads(&prefix);

    // Uninstall takes all of it away, and only it.
    let mine = prefix.join("share/man/man1/someone-else.1");
    std::fs::write(&mine, "not chpox's").expect("write");
    let out = run(Command::new(xtask())
        .args(["uninstall", "--prefix", "/usr", "--destdir"])
        .arg(&dest));
    assert!(out.status.success(), "uninstall: {}", show(&out));
    assert_eq!(
        files_under(&prefix),
        BTreeSet::from(["share/man/man1/someone-else.1".to_string()])
    );
}

/// The agent, run by its installed name, finds the eBPF object in
/// PREFIX/lib/chpox and says so in its --help.
#[test]
fn agent_help_says_where_it_looks_for_the_ebpf_object() {
    let out = run(Command::new(common::agent::tool("chpox-agent")).arg("--help"));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("PREFIX/lib/chpox/chpox-ebpf.o"), "{help}");
}

#[test]
fn service_unit_passes_systemd_analyze_verify() {
    let dir = tempdir();
    // Installed at a real prefix (no DESTDIR), so the ExecStart= program
    // exists where the unit says.
    let prefix = dir.path().join("prefix");
    xtask_ok(&["install", "--prefix", path_str(&prefix)]);
    let unit = prefix.join("lib/systemd/system/chpox-agent.service");
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        // Documentation=man:… pages are looked up: the installed ones.
        .env(
            "MANPATH",
            format!("{}:", prefix.join("share/man").display()),
        )
        .current_dir(dir.path()));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify {}: {}",
        unit.display(),
        show(&out)
    );
    let text = std::fs::read_to_string(&unit).expect("unit");
    for line in [
        "RuntimeDirectory=chpox",
        "RuntimeDirectoryPreserve=yes",
        "StateDirectory=chpox",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
    ] {
        assert!(text.contains(line), "{line} missing from {text}");
    }
}

#[test]
fn man_pages_render() {
    let dir = tempdir();
    let out = run(Command::new(common::chpox_bin()).arg("man").arg(dir.path()));
    assert!(out.status.success(), "chpox man: {}", show(&out));
    let pages = files_under(dir.path());
    assert!(pages.len() >= 12, "{pages:?}");
    for page in &pages {
        let out = run(Command::new("man")
            .arg("-l")
            .arg(dir.path().join(page))
            .env("MANWIDTH", "80")
            .env_remove("MAN_KEEP_FORMATTING"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "man -l {page}: {}", show(&out));
        assert!(out.stderr.is_empty(), "man -l {page} warns: {}", show(&out));
        let name = page.rsplit_once('.').expect("section").0;
        for want in ["NAME", "SYNOPSIS", "OPTIONS", name] {
            assert!(text.contains(want), "{page} lacks {want}:\n{text}");
        }
    }
}

/// Completion scripts for bash, zsh and fish: each parses in its shell,
/// and bash's completes a subcommand.
#[test]
fn completions_for_three_shells() {
    let dir = tempdir();
    for (shell, check) in [
        ("bash", vec!["-n"]),
        ("zsh", vec!["-n"]),
        ("fish", vec!["--no-execute"]),
    ] {
        for c in COMMANDS {
            let out =
                run(Command::new(common::chpox_bin()).args(["completions", shell, "--command", c]));
            assert!(
                out.status.success(),
                "completions {shell} {c}: {}",
                show(&out)
            );
            let script = dir.path().join(format!("{c}.{shell}"));
            std::fs::write(&script, &out.stdout).expect("write");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(c), "{shell} {c}: {text}");
            let parsed = run(Command::new(shell).args(&check).arg(&script));
            assert!(
                parsed.status.success(),
                "{shell} rejects the completions of {c}: {}",
                show(&parsed)
            );
        }
    }
    // bash completes `chpox du` to `dump` and `chpox dump --emb` to the
    // --embed-* options.
    let script = dir.path().join("chpox.bash");
    let out = run(Command::new("bash").arg("-c").arg(format!(
        "source {}; COMP_WORDS=(chpox du); COMP_CWORD=1; _chpox chpox du chpox; \
         echo \"${{COMPREPLY[*]}}\"; \
         COMP_WORDS=(chpox dump --emb); COMP_CWORD=2; _chpox chpox --emb dump; \
         echo \"${{COMPREPLY[*]}}\"",
        script.display()
    )));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first().copied(), Some("dump"), "{}", show(&out));
    assert!(
        lines
            .get(1)
            .is_some_and(|l| l.contains("--embed-exe") && l.contains("--embed-all-libs")),
        "{}",
        show(&out)
    );
}

#[test]
fn package_holds_the_installed_files() {
    let dir = tempdir();
    let out_dir = dir.path().join("out");
    // Uncompressed: compressing a debug build costs a minute, tells nothing.
    let deb = xtask_ok(&[
        "package",
        "--out",
        path_str(&out_dir),
        "--compression",
        "none",
    ]);
    let deb = PathBuf::from(deb.trim());
    assert!(deb.is_file(), "{}", deb.display());
    let name = deb.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(
        name.starts_with(&format!("chpox_{}_", env!("CARGO_PKG_VERSION")))
            && name.ends_with(".deb"),
        "{name}"
    );
    let field = |f: &str| {
        let out = run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f));
        assert!(out.status.success(), "{}", show(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "chpox");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert!(
        field("Depends").contains("libc6 (>= "),
        "{}",
        field("Depends")
    );

    let out = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    assert!(out.status.success(), "{}", show(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    let in_deb: BTreeSet<String> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| {
            let path = l.split_whitespace().nth(5)?;
            Some(path.strip_prefix("./usr/")?.to_string())
        })
        .collect();
    for f in expected_files() {
        if f == "lib/chpox/installed-files" {
            // dpkg keeps that list itself.
            assert!(!in_deb.contains(&f));
            continue;
        }
        assert!(in_deb.contains(&f), "{f} not in the package:\n{listing}");
    }
    // Everything belongs to root.
    assert!(
        listing.lines().all(|l| l.contains(" root/root ")),
        "{listing}"
    );
}

/// The capabilities the unit leaves the agent are enough: an agent started
/// with exactly its CapabilityBoundingSet= (and no new privileges, as the
/// unit says) loads its eBPF program and writes a checkpoint on request.
#[test]
fn agent_checkpoints_with_only_the_units_capabilities() {
    use common::agent::{scratch, tool};
    use std::time::{Duration, Instant};

    let unit_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/chpox-agent.service.in");
    let unit = std::fs::read_to_string(&unit_in).expect("unit template");
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet=")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(unit.contains("\nNoNewPrivileges=yes\n"));
    let s = scratch();
    let log = s.logs.join("agent.log");
    let mut agent = Command::new("setpriv")
        .arg(format!("--bounding-set=-all,{}", caps.join(",")))
        .arg("--no-new-privs")
        .arg(tool("chpox-agent"))
        .arg("--run-dir")
        .arg(&s.run)
        .arg("--image-dir")
        .arg(&s.images)
        .env_remove("CHPOX_LOG")
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("setpriv chpox-agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    let socket = s.run.join("agent.sock");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    while !(socket.exists() && log_text().contains("chpox-agent ready")) {
        if let Ok(Some(status)) = agent.try_wait() {
            panic!(
                "the agent exited ({status}) with the unit's capabilities:\n{}",
                log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "agent not ready:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.id())).expect("status");
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .expect("CapBnd")
        .trim()
        .to_string();
    assert_ne!(bounding, "000001ffffffffff", "the set was not applied");

    let t = common::Target::spawn("sleeper", &[], &s.logs);
    let img = s.path("img");
    let chpox = |args: &[&str]| {
        let out = run(Command::new(common::chpox_bin())
            .args(args)
            .env("CHPOX_RUN_DIR", &s.run));
        assert!(
            out.status.success(),
            "chpox {args:?}: {}\n--- agent log ---\n{}",
            show(&out),
            log_text()
        );
        out
    };
    chpox(&["register", &t.pid.to_string(), "-o", path_str(&img)]);
    chpox(&["checkpoint", &t.pid.to_string()]);
    chpox(&["inspect", path_str(&img)]);
    // By default the agent logs one plain line per checkpoint.
    let pid = t.pid.to_string();
    let text = log_text();
    let about: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("checkpoint") && l.contains(&pid))
        .collect();
    assert_eq!(about.len(), 1, "{text}");
    assert!(
        about[0].contains(" INFO ") && about[0].contains(" frozen_us="),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "{text:?}");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// Starts PREFIX/bin/chpox-agent until it is ready, and checks it loaded
/// PREFIX/lib/chpox/chpox-ebpf.o.
fn installed_agent_loads(prefix: &Path) {
    use std::time::{Duration, Instant};
    let s = common::agent::scratch();
    let log = s.logs.join("installed-agent.log");
    let mut agent = Command::new(prefix.join("bin/chpox-agent"))
        .arg("--run-dir")
        .arg(&s.run)
        .arg("--image-dir")
        .arg(&s.images)
        .env("CHPOX_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start the installed chpox-agent");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !text().contains("chpox-agent ready") {
        if let Ok(Some(status)) = agent.try_wait() {
            panic!("the installed agent exited ({status}):\n{}", text());
        }
        assert!(Instant::now() < deadline, "not ready:\n{}", text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let object = prefix.join("lib/chpox/chpox-ebpf.o");
    assert!(
        text().contains(&format!("object={}", object.display())),
        "the agent did not load {}:\n{}",
        object.display(),
        text()
    );
}
