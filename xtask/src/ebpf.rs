//! Building the eBPF program (chpox-ebpf), and installing what that needs.
//!
//! chpox-ebpf is built apart from the workspace, with nightly Rust for the
//! `bpfel-unknown-none` target and `bpf-linker` (linked against LLVM 22) as
//! the linker:
//!
//! ```text
//! cd chpox-ebpf && cargo +nightly build -Z build-std=core --target bpfel-unknown-none --release
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::workspace_root;

/// Debian packages bpf-linker is built against.
const LLVM_PACKAGES: [&str; 2] = ["llvm-22-dev", "libpolly-22-dev"];
/// Where those packages put LLVM.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The bpf-linker release known to build against LLVM 22 (feature `llvm-22`).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The target triple of the eBPF object.
const BPF_TARGET: &str = "bpfel-unknown-none";

/// Environment variables that the outer `cargo xtask` (a stable cargo) sets,
/// or that a CI sets for the host build, and that would break or silently
/// change the nested nightly BPF build. A RUSTFLAGS, for one, would replace
/// the `-C target-cpu=v3` of chpox-ebpf/.cargo/config.toml.
const OUTER_CARGO_ENV: [&str; 9] = [
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "RUSTFLAGS",
    "RUSTUP_TOOLCHAIN",
    "CARGO",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_MAKEFLAGS",
];
/// Prefixes of more such variables: target dir, build target and flags,
/// per-target linkers, profile overrides.
const OUTER_CARGO_ENV_PREFIXES: [&str; 3] = ["CARGO_BUILD_", "CARGO_TARGET_", "CARGO_PROFILE_"];

/// A `cargo` command with the outer cargo's settings taken out.
fn clean_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    for var in OUTER_CARGO_ENV {
        cmd.env_remove(var);
    }
    for (var, _) in std::env::vars_os() {
        let Some(name) = var.to_str() else { continue };
        if OUTER_CARGO_ENV_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            cmd.env_remove(&var);
        }
    }
    cmd
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Run a command, echoing it; fail with `fix` as the advice if it fails.
fn run_step(cmd: &mut Command, fix: &str) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}; {fix}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}; {fix}");
    }
    Ok(())
}

/// Stdout of a command, or `None` if it cannot be started or fails.
fn output_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    // A RUSTUP_TOOLCHAIN from the outer cargo would pin every rustup call.
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn dpkg_installed(package: &str) -> bool {
    output_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.contains("install ok installed"))
}

fn cargo_home_bin() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .map(|home| home.join("bin"))
}

/// The bpf-linker that cargo will find: on PATH, or in ~/.cargo/bin.
fn find_bpf_linker() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("bpf-linker"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        cargo_home_bin()
            .map(|bin| bin.join("bpf-linker"))
            .filter(|candidate| candidate.is_file())
    })
}

/// Install the Debian packages of `packages` that are missing (one
/// `apt-get update` first), saying what it checks and does.
pub fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| {
            let installed = dpkg_installed(package);
            eprintln!(
                "xtask: checking Debian package {package}: {}",
                if installed { "installed" } else { "missing" }
            );
            !installed
        })
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "Debian packages {} are missing and installing them needs root; \
                 run `sudo apt-get install -y {}` or rerun this as root",
                missing.join(" "),
                missing.join(" ")
            );
        }
        let fix = "check that apt can reach the Debian archive (see /etc/apt/sources.list*)";
        run_step(Command::new("apt-get").arg("update"), fix)?;
        run_step(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y"])
                .args(&missing),
            &format!("install {} by hand and rerun", missing.join(" ")),
        )?;
    }
    Ok(())
}

/// Install what building chpox-ebpf needs, skipping whatever is there.
pub fn install_prerequisites() -> Result<()> {
    // 1. LLVM 22 development files (bpf-linker links against them).
    ensure_debian_packages(&LLVM_PACKAGES)?;

    // 2. Nightly Rust with rust-src (for -Z build-std=core).
    let toolchains = output_of(rustup().args(["toolchain", "list"])).context(
        "`rustup toolchain list` failed: chpox-ebpf needs rustup; install it from rustup.rs",
    )?;
    let has_nightly = toolchains.lines().any(|line| line.starts_with("nightly"));
    eprintln!(
        "xtask: checking the nightly Rust toolchain: {}",
        if has_nightly { "installed" } else { "missing" }
    );
    if !has_nightly {
        run_step(
            rustup().args(["toolchain", "install", "nightly", "--profile", "minimal"]),
            "install it by hand with `rustup toolchain install nightly --profile minimal`",
        )?;
    }
    ensure_nightly_component("rust-src")?;

    // 3. bpf-linker, built against LLVM 22.
    match find_bpf_linker() {
        Some(path) => {
            let version = output_of(Command::new(&path).arg("--version")).unwrap_or_default();
            eprintln!(
                "xtask: checking bpf-linker: found {} ({})",
                path.display(),
                version.trim()
            );
        }
        None => {
            eprintln!("xtask: checking bpf-linker: missing");
            let mut cmd = clean_cargo();
            run_step(
                cmd.env("LLVM_PREFIX", LLVM_PREFIX).args([
                    "install",
                    "bpf-linker",
                    "--locked",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ]),
                &format!(
                    "it needs {} from Debian; try by hand: LLVM_PREFIX={LLVM_PREFIX} cargo install \
                     bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22",
                    LLVM_PACKAGES.join(" and ")
                ),
            )?;
            if find_bpf_linker().is_none() {
                bail!(
                    "bpf-linker was installed but is neither on PATH nor in ~/.cargo/bin; \
                     add cargo's bin directory to PATH"
                );
            }
        }
    }
    Ok(())
}

/// The stable place of the eBPF object, where the agent looks for it.
pub fn object_copy_path() -> PathBuf {
    workspace_root().join("target").join("chpox-ebpf.o")
}

/// Install a component of the nightly toolchain if it is missing.
fn ensure_nightly_component(name: &str) -> Result<()> {
    let components =
        output_of(rustup().args(["component", "list", "--toolchain", "nightly", "--installed"]))
            .unwrap_or_default();
    let has = components.lines().any(|line| line.trim().starts_with(name));
    eprintln!(
        "xtask: checking the {name} component of nightly: {}",
        if has { "installed" } else { "missing" }
    );
    if !has {
        run_step(
            rustup().args(["component", "add", name, "--toolchain", "nightly"]),
            &format!("add it by hand with `rustup component add {name} --toolchain nightly`"),
        )?;
    }
    Ok(())
}

/// `cargo fmt --check` and `cargo clippy -D warnings` for the eBPF crate,
/// which the host workspace's lint does not reach.
pub fn lint_ebpf() -> Result<()> {
    install_prerequisites()?;
    ensure_nightly_component("clippy")?;
    ensure_nightly_component("rustfmt")?;
    let crate_dir = workspace_root().join("chpox-ebpf");
    run_step(
        clean_cargo()
            .current_dir(&crate_dir)
            .args(["+nightly", "fmt", "--", "--check"]),
        "run `cargo +nightly fmt` in chpox-ebpf",
    )?;
    run_step(
        ebpf_cargo()?.current_dir(&crate_dir).args([
            "+nightly",
            "clippy",
            "-Z",
            "build-std=core",
            "--target",
            BPF_TARGET,
            "--release",
            "--",
            "-D",
            "warnings",
        ]),
        "fix the warnings clippy names in chpox-ebpf",
    )
}

/// A clean cargo that finds bpf-linker even when ~/.cargo/bin is not on
/// PATH.
fn ebpf_cargo() -> Result<Command> {
    let mut cmd = clean_cargo();
    if let (Some(bin), Some(path)) = (cargo_home_bin(), std::env::var_os("PATH")) {
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        if !dirs.contains(&bin) {
            dirs.push(bin);
            cmd.env("PATH", std::env::join_paths(dirs)?);
        }
    }
    Ok(cmd)
}

/// Build chpox-ebpf; returns the object's path in chpox-ebpf/target and
/// copies it to `target/chpox-ebpf.o` in the workspace.
pub fn build_ebpf(release: bool) -> Result<PathBuf> {
    install_prerequisites()?;
    let crate_dir = workspace_root().join("chpox-ebpf");
    let mut cmd = ebpf_cargo()?;
    cmd.current_dir(&crate_dir).args([
        "+nightly",
        "build",
        "-Z",
        "build-std=core",
        "--target",
        BPF_TARGET,
    ]);
    if release {
        cmd.arg("--release");
    }
    run_step(
        &mut cmd,
        "see the compiler's messages above; `cargo xtask build-ebpf` rechecks the toolchain",
    )?;
    let object = crate_dir
        .join("target")
        .join(BPF_TARGET)
        .join(if release { "release" } else { "debug" })
        .join("chpox-ebpf");
    if !object.is_file() {
        bail!("the build succeeded but {} is not there", object.display());
    }
    let copy = object_copy_path();
    if let Some(dir) = copy.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::copy(&object, &copy)
        .with_context(|| format!("cannot copy {} to {}", object.display(), copy.display()))?;
    // An agent looks next to itself first: a copy an earlier `cargo xtask
    // build` left beside target/{debug,release}/chpox-agent would
    // otherwise be loaded, stale, instead of the object just built.
    for profile in ["debug", "release"] {
        let beside = workspace_root()
            .join("target")
            .join(profile)
            .join("chpox-ebpf.o");
        if beside.is_file() {
            std::fs::copy(&object, &beside).with_context(|| {
                format!("cannot copy {} to {}", object.display(), beside.display())
            })?;
        }
    }
    Ok(object)
}
