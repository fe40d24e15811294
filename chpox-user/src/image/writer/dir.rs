//! The directory an image is written in: opening it without following
//! links others could have planted, the temporary file there, and
//! cleaning up the temporary files of writers that died.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use crate::image::error::ImageError;

/// Distinguishes temporary files of several writers in one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Longest part of the final name kept in the temporary name, so that the
/// temporary name stays under NAME_MAX (255) with its prefix and suffix.
const MAX_NAME_IN_TEMP: usize = 180;

/// The directory to create the image in and the image's name there.
pub(super) fn split_path(final_path: &Path) -> Result<(PathBuf, OsString), ImageError> {
    // `file_name` is None for "/", "..", "x/..": no file to create.
    let Some(name) = final_path.file_name() else {
        return Err(ImageError::InvalidPath {
            path: final_path.to_path_buf(),
        });
    };
    let dir = match final_path.parent() {
        // A bare name ("img") has an empty parent: the current directory.
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name.to_os_string()))
}

/// Removes temporary files of earlier dumps to the same name whose writer
/// died without cleaning up (SIGKILL, power loss): `.<name>.chpox-tmp.<pid>.*`
/// where no process `<pid>` exists any more. Best effort; a failure here
/// never fails the dump. Lists and unlinks in `dir` itself, never by path.
pub(super) fn remove_stale_temps(dir: &File, final_name: &OsStr) {
    let name_bytes = final_name.as_bytes();
    let short = name_bytes.get(..MAX_NAME_IN_TEMP).unwrap_or(name_bytes);
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(short);
    prefix.extend_from_slice(b".chpox-tmp.");
    let Ok(mut listing) = nix::dir::Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let names: Vec<OsString> = listing
        .iter()
        .flatten()
        .map(|entry| OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string())
        .filter(|name| name.as_bytes().starts_with(&prefix))
        .collect();
    for name in names {
        let Some(rest) = name.as_bytes().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        let pid = rest
            .split(|&b| b == b'.')
            .next()
            .and_then(|p| std::str::from_utf8(p).ok())
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if nix::unistd::unlinkat(dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir).is_ok() {
            tracing::info!(file = ?name, "removed a temporary file left by an interrupted dump");
        }
    }
}

/// Most symbolic links followed while resolving one path (the kernel's
/// MAXSYMLINKS).
const MAX_SYMLINKS: u32 = 40;

/// Opens the directory `path` to write an image in, as `acting_uid` (the
/// caller's file identity), one component at a time, and follows a
/// symbolic link only where nobody but `acting_uid` and root could have put
/// it there ([`may_follow`]).
///
/// Root writing a user's image under a directory that user controls must
/// not be led elsewhere (`/etc`) by a link the user swaps in for a path
/// component between registration and checkpoint. Every step opens one
/// name relative to the directory reached so far, with `O_NOFOLLOW`, and
/// the link's own target is walked the same way, so each directory is the
/// one the previous step found; the caller then acts only relative to the
/// descriptor returned.
pub(super) fn open_dir(path: &Path, acting_uid: u32) -> io::Result<File> {
    use std::collections::VecDeque;
    use std::os::unix::ffi::OsStringExt as _;
    use std::path::Component;

    let open_start = |p: &str| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(p)
    };
    let push = |queue: &mut VecDeque<OsString>, p: &Path, front: bool| -> bool {
        let mut names: Vec<OsString> = Vec::new();
        let mut absolute = false;
        for c in p.components() {
            match c {
                Component::RootDir => absolute = true,
                Component::ParentDir => names.push("..".into()),
                Component::Normal(n) => names.push(n.to_os_string()),
                Component::CurDir | Component::Prefix(_) => {}
            }
        }
        if front {
            for n in names.into_iter().rev() {
                queue.push_front(n);
            }
        } else {
            queue.extend(names);
        }
        absolute
    };

    let mut queue = VecDeque::new();
    let mut cur = if push(&mut queue, path, false) {
        open_start("/")?
    } else {
        open_start(".")?
    };
    // The path walked so far, for messages.
    let mut shown = if path.is_absolute() {
        PathBuf::from("/")
    } else {
        PathBuf::from(".")
    };
    let mut links = 0u32;
    while let Some(name) = queue.pop_front() {
        let next = File::from(nix::fcntl::openat(
            &cur,
            name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?);
        let st = nix::sys::stat::fstat(&next)?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                cur = next;
                shown.push(&name);
            }
            libc::S_IFLNK => {
                let dir = nix::sys::stat::fstat(&cur)?;
                shown.push(&name);
                if let Err(why) = may_follow(&dir, &st, acting_uid) {
                    return Err(io::Error::other(format!(
                        "{} is a symbolic link in a directory {why}; chpox does not follow it \
                         (a link there may be changed to point anywhere): name the real directory",
                        shown.display()
                    )));
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Errno::ELOOP.into());
                }
                // Empty name: the link this O_PATH descriptor is open on.
                let target = nix::fcntl::readlinkat(&next, "")?;
                let target = PathBuf::from(OsString::from_vec(target.into_vec()));
                shown.pop();
                if push(&mut queue, &target, true) {
                    cur = open_start("/")?;
                    shown = PathBuf::from("/");
                }
            }
            _ => return Err(Errno::ENOTDIR.into()),
        }
    }
    Ok(File::from(nix::fcntl::openat(
        &cur,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?))
}

/// Whether a symbolic link `link` in directory `dir` may be followed by
/// `acting_uid`: only if nobody else could have put it there or replaced
/// it. The directory must belong to root or to `acting_uid` and be
/// writable by nobody else; in a sticky directory others may write to
/// (`/tmp`), the link must belong to `acting_uid` or to the directory's
/// owner, whose entries others cannot replace (the kernel's own rule for
/// `fs.protected_symlinks`). Otherwise says who controls the directory.
fn may_follow(
    dir: &nix::sys::stat::FileStat,
    link: &nix::sys::stat::FileStat,
    acting_uid: u32,
) -> Result<(), String> {
    if dir.st_uid != 0 && dir.st_uid != acting_uid {
        return Err(format!("uid {} controls", dir.st_uid));
    }
    if dir.st_mode & 0o022 == 0 {
        return Ok(());
    }
    if dir.st_mode & libc::S_ISVTX != 0 && (link.st_uid == acting_uid || link.st_uid == dir.st_uid)
    {
        return Ok(());
    }
    Err(format!(
        "others may write to, owned by uid {} (the link by uid {})",
        dir.st_uid, link.st_uid
    ))
}

/// Creates `.<name>.chpox-tmp.<pid>.<n>` in `dir`, readable and writable
/// by its owner alone.
///
/// O_EXCL|O_NOFOLLOW: an existing file or a link planted under the temporary
/// name makes the open fail instead of redirecting our writes; we then try
/// the next name.
pub(super) fn create_temp(dir: &File, final_name: &OsStr) -> io::Result<(File, OsString)> {
    with_temp_name(final_name, |temp| {
        nix::fcntl::openat(
            dir,
            temp,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map(File::from)
    })
}

/// Gives `file`, an unnamed file (`O_TMPFILE`) made in `dir`, a temporary
/// name next to `final_name` there, as [`create_temp`] would have.
pub(super) fn link_temp(dir: &File, file: &File, final_name: &OsStr) -> io::Result<OsString> {
    use std::os::fd::AsRawFd;
    // An unnamed file is linked through its /proc/self/fd link (followed);
    // `AT_EMPTY_PATH` would need CAP_DAC_READ_SEARCH, which a writer
    // acting as a user does not have.
    let own = format!("/proc/self/fd/{}", file.as_raw_fd());
    let ((), temp) = with_temp_name(final_name, |temp| {
        nix::unistd::linkat(
            nix::fcntl::AT_FDCWD,
            own.as_str(),
            dir,
            temp,
            nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
        )
    })?;
    Ok(temp)
}

/// Calls `make` with temporary names for `final_name`
/// (`.<name>.chpox-tmp.<pid>.<n>`) until one is not taken (EEXIST: a link
/// neither follows nor replaces what is there).
fn with_temp_name<T>(
    final_name: &OsStr,
    mut make: impl FnMut(&OsStr) -> Result<T, Errno>,
) -> io::Result<(T, OsString)> {
    let name_bytes = final_name.as_bytes();
    let short = name_bytes.get(..MAX_NAME_IN_TEMP).unwrap_or(name_bytes);
    let pid = std::process::id();
    let mut last_err = io::Error::from(io::ErrorKind::AlreadyExists);
    for _ in 0..64 {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut temp = b".".to_vec();
        temp.extend_from_slice(short);
        temp.extend_from_slice(format!(".chpox-tmp.{pid}.{n}").as_bytes());
        let temp = OsString::from_vec(temp);
        match make(temp.as_os_str()) {
            Ok(made) => return Ok((made, temp)),
            Err(Errno::EEXIST) => last_err = Errno::EEXIST.into(),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_paths() {
        let split = |p: &str| split_path(Path::new(p)).ok();
        assert_eq!(split("img"), Some((".".into(), "img".into())));
        assert_eq!(split("./img"), Some((".".into(), "img".into())));
        assert_eq!(split("/a/b/img"), Some(("/a/b".into(), "img".into())));
        assert_eq!(split("/img"), Some(("/".into(), "img".into())));
        assert_eq!(split("/"), None);
        assert_eq!(split("a/.."), None);
    }

    fn same_dir(a: &File, b: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (a.metadata().unwrap(), std::fs::metadata(b).unwrap());
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    }

    #[test]
    fn links_where_only_we_write_are_followed() {
        let me = nix::unistd::geteuid().as_raw();
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir_all(real.join("deeper")).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("real/deeper/..", tmp.path().join("rel")).unwrap();
        std::os::unix::fs::symlink("loop", tmp.path().join("loop")).unwrap();
        for via in ["abs", "rel", "abs/deeper/..", "./rel/."] {
            let dir = open_dir(&tmp.path().join(via), me).unwrap();
            assert!(same_dir(&dir, &real), "{via}");
        }
        let e = open_dir(&tmp.path().join("loop"), me).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        std::fs::write(tmp.path().join("file"), "x").unwrap();
        let e = open_dir(&tmp.path().join("file"), me).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
        let e = open_dir(&tmp.path().join("none"), me).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn links_others_could_have_planted_are_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            return; // giving files to another uid needs root
        }
        let nobody = 65534;
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let dir_with_link = |name: &str, mode: u32, owner: u32, link_owner: u32| {
            let d = tmp.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(&d, Some(owner), Some(owner)).unwrap();
            std::os::unix::fs::symlink(&real, d.join("link")).unwrap();
            std::os::unix::fs::lchown(d.join("link"), Some(link_owner), Some(link_owner)).unwrap();
            d.join("link")
        };
        // Another user's directory: refused to root, followed for its owner.
        let theirs = dir_with_link("theirs", 0o755, nobody, 0);
        let e = open_dir(&theirs.join("."), 0).unwrap_err();
        assert!(e.to_string().contains("uid 65534 controls"), "{e}");
        assert!(e.to_string().contains("theirs/link"), "{e}");
        assert!(same_dir(&open_dir(&theirs, nobody).unwrap(), &real));
        // Root's directory others may write to, not sticky: refused.
        let open = dir_with_link("open", 0o777, 0, 0);
        let e = open_dir(&open, 0).unwrap_err();
        assert!(e.to_string().contains("others may write"), "{e}");
        // Sticky (/tmp): a link of the directory's owner or our own is
        // followed, another user's is not.
        let sticky_root = dir_with_link("sticky-root", 0o1777, 0, 0);
        assert!(same_dir(&open_dir(&sticky_root, 0).unwrap(), &real));
        let sticky_theirs = dir_with_link("sticky-theirs", 0o1777, 0, nobody);
        assert!(open_dir(&sticky_theirs, 0).is_err());
        assert!(same_dir(&open_dir(&sticky_theirs, nobody).unwrap(), &real));
        // A real directory under another user's is fine: only links are
        // refused.
        let plain = tmp.path().join("theirs/plain");
        std::fs::create_dir(&plain).unwrap();
        assert!(same_dir(&open_dir(&plain, 0).unwrap(), &plain));
    }

    #[test]
    fn temp_name_fits_name_max() {
        let dir = tempfile::tempdir().unwrap();
        let d = File::open(dir.path()).unwrap();
        let long = OsString::from("x".repeat(255));
        let (_f, name) = create_temp(&d, &long).unwrap();
        assert!(name.len() <= 255, "{}", name.len());
        assert!(name.as_bytes().starts_with(b".xxx"));
    }
}
