//! `cargo xtask install`, `uninstall` and `package`: chpox laid out as a
//! system tool (one program under four names, the eBPF object, man pages,
//! completions, a systemd unit), and the same files as a Debian package.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{run, workspace_root};

/// The names the one `chpox` program answers to (links to it).
const LINKS: &[&str] = &["chpoxctl", "ld-chpox", "chpox-agent"];

/// Every installed file is listed here, relative to PREFIX, so
/// `uninstall` removes exactly what `install` put.
const MANIFEST: &str = "lib/chpox/installed-files";

/// Shells whose completions are installed, and where each looks for them
/// (relative to PREFIX).
const SHELLS: &[(&str, &str)] = &[
    ("bash", "share/bash-completion/completions"),
    ("zsh", "share/zsh/site-functions"),
    ("fish", "share/fish/vendor_completions.d"),
];

/// Where the files go: PREFIX as the installed system sees it, under
/// DESTDIR while staging (a package, a test).
pub struct Layout {
    pub prefix: PathBuf,
    pub destdir: Option<PathBuf>,
}

impl Layout {
    /// `rel` (relative to PREFIX) on this machine now.
    fn staged(&self, rel: &str) -> PathBuf {
        let installed = self.prefix.join(rel);
        match &self.destdir {
            Some(d) => d.join(installed.strip_prefix("/").unwrap_or(&installed)),
            None => installed,
        }
    }
}

/// Which build to install.
pub struct Source {
    /// `target/release` or `target/debug`.
    pub bin_dir: PathBuf,
    pub ebpf_object: PathBuf,
}

/// The release build, built now (eBPF object and binaries).
pub fn build_release() -> Result<Source> {
    let release = crate::build_all()?;
    Ok(Source {
        ebpf_object: release.join("chpox-ebpf.o"),
        bin_dir: release,
    })
}

/// What is already built for `profile` (`release` or `debug`).
pub fn prebuilt(profile: &str) -> Result<Source> {
    let target = workspace_root().join("target");
    let bin_dir = target.join(profile);
    let ebpf_object = [bin_dir.join("chpox-ebpf.o"), target.join("chpox-ebpf.o")]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no eBPF object in {} or {}; run `cargo xtask build-ebpf` first",
                bin_dir.display(),
                target.display()
            )
        })?;
    if !bin_dir.join("chpox").is_file() {
        bail!(
            "no {}; build it first (`cargo build{} -p chpox-user`)",
            bin_dir.join("chpox").display(),
            if profile == "release" {
                " --release"
            } else {
                ""
            }
        );
    }
    Ok(Source {
        bin_dir,
        ebpf_object,
    })
}

/// Installs `src` into `layout`; returns the installed files (relative to
/// PREFIX) and their total size in bytes.
pub fn install(src: &Source, layout: &Layout) -> Result<(Vec<String>, u64)> {
    if !layout.prefix.is_absolute() {
        bail!(
            "--prefix {} must be an absolute path",
            layout.prefix.display()
        );
    }
    let mut files: Vec<String> = Vec::new();
    let put = |rel: String, files: &mut Vec<String>| -> Result<PathBuf> {
        let path = layout.staged(&rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        // Replacing, never writing through: a running agent keeps its old
        // program, and a link left where a file goes is not followed.
        match std::fs::symlink_metadata(&path) {
            Ok(_) => std::fs::remove_file(&path)
                .with_context(|| format!("cannot replace {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot see {}", path.display())),
        }
        files.push(rel);
        Ok(path)
    };

    // The program stripped: 7 MB instead of 68 (the release profile keeps
    // debug information for profiling; it stays in target/, where a
    // backtrace's addresses can be looked up).
    let program = put("bin/chpox".into(), &mut files)?;
    run(Command::new("objcopy")
        .arg("--strip-all")
        .arg(src.bin_dir.join("chpox"))
        .arg(&program))?;
    set_mode(&program, 0o755)?;
    for name in LINKS {
        let link = put(format!("bin/{name}"), &mut files)?;
        std::os::unix::fs::symlink("chpox", &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }

    let object = put("lib/chpox/chpox-ebpf.o".into(), &mut files)?;
    copy(&src.ebpf_object, &object, 0o644)?;

    // Man pages and completions come from the program itself: they say
    // what its --help says.
    let scratch = tempdir()?;
    let out = output(Command::new(&program).arg("man").arg(&scratch))?;
    for page in out.lines() {
        let page = Path::new(page);
        let (Some(name), Some(section)) = (
            page.file_name().and_then(|n| n.to_str()),
            page.extension().and_then(|e| e.to_str()),
        ) else {
            continue;
        };
        let dest = put(format!("share/man/man{section}/{name}"), &mut files)?;
        copy(page, &dest, 0o644)?;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    for (shell, dir) in SHELLS {
        for tool in ["chpox"].iter().chain(LINKS) {
            let script =
                output(Command::new(&program).args(["completions", shell, "--command", tool]))?;
            let file = match *shell {
                "zsh" => format!("_{tool}"),
                "fish" => format!("{tool}.fish"),
                _ => tool.to_string(),
            };
            let dest = put(format!("{dir}/{file}"), &mut files)?;
            write(&dest, script.as_bytes(), 0o644)?;
        }
    }

    let unit = std::fs::read_to_string(workspace_root().join("packaging/chpox-agent.service.in"))
        .context("cannot read packaging/chpox-agent.service.in")?
        .replace("@BINDIR@", &layout.prefix.join("bin").to_string_lossy());
    let dest = put("lib/systemd/system/chpox-agent.service".into(), &mut files)?;
    write(&dest, unit.as_bytes(), 0o644)?;

    let dest = put("share/doc/chpox/README.md".into(), &mut files)?;
    copy(&workspace_root().join("README.md"), &dest, 0o644)?;

    files.push(MANIFEST.into());
    let manifest = layout.staged(MANIFEST);
    write(&manifest, (files.join("\n") + "\n").as_bytes(), 0o644)?;

    let mut total = 0u64;
    for rel in &files {
        let meta = std::fs::symlink_metadata(layout.staged(rel))?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok((files, total))
}

/// Removes what `install` put into `layout` (as its manifest lists), and
/// the directories of chpox's own that are left empty.
pub fn uninstall(layout: &Layout) -> Result<usize> {
    let manifest = layout.staged(MANIFEST);
    let text = std::fs::read_to_string(&manifest).with_context(|| {
        format!(
            "{} not found: nothing installed there (or installed with another --prefix)",
            manifest.display()
        )
    })?;
    let mut removed = 0;
    for rel in text.lines().filter(|l| !l.is_empty()) {
        if rel.starts_with('/') || rel.split('/').any(|c| c == "..") {
            bail!("{} lists {rel:?}, not a path in PREFIX", manifest.display());
        }
        let path = layout.staged(rel);
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    for dir in ["lib/chpox", "share/doc/chpox"] {
        let _ = std::fs::remove_dir(layout.staged(dir));
    }
    Ok(removed)
}

/// Builds `chpox_VERSION_ARCH.deb` in `out_dir` from `src`, holding the
/// files `install --prefix /usr` lays out, compressed with `compression`
/// (as `dpkg-deb -Z` takes it); returns its path.
pub fn package(src: &Source, out_dir: &Path, compression: &str) -> Result<PathBuf> {
    // The tree dpkg-deb packs, staged next to the package.
    let root = out_dir.join("root");
    let _ = std::fs::remove_dir_all(&root);
    let layout = Layout {
        prefix: PathBuf::from("/usr"),
        destdir: Some(root.clone()),
    };
    let (_, bytes) = install(src, &layout)?;
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let debian = root.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    let control = format!(
        "Package: chpox\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: chpox developers <chpox@localhost>\n\
         Installed-Size: {}\n\
         Depends: {}\n\
         Section: admin\n\
         Priority: optional\n\
         Description: checkpoint and restore of Linux process trees\n \
         chpox writes a running process and all its descendants to an image\n \
         file while they keep running, and restores them from it, with their\n \
         PIDs, memory, threads, files and pipes. `kill -31 PID` checkpoints a\n \
         registered process: chpox-agent (a systemd service) sees the signal\n \
         through an eBPF program. Compatible with the old chpox's chpoxctl and\n \
         ld-chpox.\n",
        bytes.div_ceil(1024),
        depends(&src.bin_dir.join("chpox"))?
    );
    write(&debian.join("control"), control.as_bytes(), 0o644)?;
    // The service is not enabled by installing: an agent loading eBPF on
    // every node is the administrator's choice (`systemctl enable --now`).
    let postinst = "#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi\n";
    let prerm = "#!/bin/sh\nset -e\nif [ -d /run/systemd/system ] && [ \"$1\" = remove ]; then systemctl disable --now chpox-agent.service || true; fi\n";
    let postrm = postinst;
    for (name, text) in [("postinst", postinst), ("prerm", prerm), ("postrm", postrm)] {
        write(&debian.join(name), text.as_bytes(), 0o755)?;
    }
    // dpkg owns the manifest's job.
    std::fs::remove_file(layout.staged(MANIFEST))?;
    std::fs::create_dir_all(out_dir)?;
    let deb = out_dir.join(format!("chpox_{version}_{arch}.deb"));
    // stdout is for the package's path alone.
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(format!("-Z{compression}"))
        .arg(&root)
        .arg(&deb)
        .stdout(std::io::stderr()))?;
    Ok(deb)
}

/// The Debian packages of the shared libraries `program` links, each at
/// least the upstream version installed here.
fn depends(program: &Path) -> Result<String> {
    let ldd = output(Command::new("ldd").arg(program))?;
    let mut deps: Vec<String> = Vec::new();
    for lib in ldd.lines().filter_map(|l| {
        let path = l.split("=>").nth(1)?.split_whitespace().next()?;
        path.starts_with('/').then(|| path.to_string())
    }) {
        // With /usr merged, dpkg may know the file by either name.
        let names = [
            lib.clone(),
            std::fs::canonicalize(&lib).map_or(lib.clone(), |p| p.to_string_lossy().into_owned()),
            format!("/usr{lib}"),
        ];
        let Some(owner) = names
            .iter()
            .find_map(|n| output(Command::new("dpkg").args(["-S", n])).ok())
        else {
            continue;
        };
        let Some(pkg) = owner.split(':').next().map(str::trim) else {
            continue;
        };
        let version = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", pkg]))?;
        // The upstream version, not this machine's Debian revision of it.
        let upstream = version.trim().split(['-', '+', '~']).next().unwrap_or("");
        let dep = if upstream.is_empty() {
            pkg.to_string()
        } else {
            format!("{pkg} (>= {upstream})")
        };
        if !deps.contains(&dep) {
            deps.push(dep);
        }
    }
    if deps.is_empty() {
        bail!("cannot tell which packages {} needs", program.display());
    }
    Ok(deps.join(", "))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    set_mode(to, mode)
}

fn write(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    std::fs::write(to, bytes).with_context(|| format!("cannot write {}", to.display()))?;
    set_mode(to, mode)
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("chpox-install.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Sizes for the closing line: the program and everything together.
pub fn describe(layout: &Layout, files: &[String], total: u64) -> String {
    let program = std::fs::metadata(layout.staged("bin/chpox")).map_or(0, |m| m.len());
    format!(
        "{} files, {:.1} MB in all; bin/chpox {:.1} MB (chpoxctl, ld-chpox and chpox-agent are links to it)",
        files.len(),
        total as f64 / 1e6,
        program as f64 / 1e6
    )
}
