//! memfd (`memfd_create`): its name, content, size, owner, permission
//! bits and seals. Descriptors of one memfd (several opens, several processes) are
//! one file again after restore: the restorer makes each memfd once and
//! opens each description of it anew, with its own access mode and offset.
//!
//! The content is read, as a deleted file's, with the image user's file
//! rights. A memfd mapped into memory comes back with the mapping's own
//! copy (`memory`), not shared with the descriptor.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::stat::Mode;

use super::restore::{Descriptions, Key, Making, file_err, key, open_flags, seek, write_bytes};
use super::{Embed, Kind, Probe, no_key};
use crate::error::{Error, Result};
use crate::image::model::{FdEntry, FdKind};

pub static KIND: Kind = Kind {
    probe,
    classify: None,
    embed: Some(embed),
    key: no_key,
    // Its description, and the memfd once.
    needs: |pid, e| {
        let mut needs = vec![(key(pid, e), 1)];
        if let FdKind::Memfd { inode, .. } = e.kind {
            needs.push((Key::Object("memfd", inode, 0), 1));
        }
        needs
    },
    make,
};

fn probe(p: &Probe<'_>) -> Result<Option<FdKind>> {
    let Some(m) = p.meta else {
        return Ok(None);
    };
    let Some(name) = p
        .target
        .strip_prefix("/memfd:")
        .and_then(|n| n.strip_suffix(" (deleted)"))
    else {
        return Ok(None);
    };
    if !m.file_type().is_file() || m.nlink() != 0 {
        return Ok(None);
    }
    let copy = super::unix::steal(p.pid, p.fd)?;
    let seals = fcntl(&copy, FcntlArg::F_GET_SEALS).map_err(|e| Error::File {
        path: format!("/proc/{}/fd/{} ({})", p.pid, p.fd, p.target),
        source: e.into(),
    })?;
    Ok(Some(FdKind::Memfd {
        name: name.to_string(),
        inode: m.ino(),
        pos: p.info.pos,
        mode: m.mode() & 0o7777,
        seals: seals as u32,
        size: m.len(),
        content: None,
        uid: m.uid(),
        gid: m.gid(),
    }))
}

/// The content of each memfd, once, with the first entry of its inode.
fn embed(e: &mut Embed<'_>) -> Result<()> {
    let mut done = std::collections::HashSet::new();
    for p in e.procs.iter_mut() {
        let pid = p.process.pid;
        for entry in &mut p.fds {
            let FdKind::Memfd {
                name,
                inode,
                content,
                ..
            } = &mut entry.kind
            else {
                continue;
            };
            if !done.insert(*inode) {
                continue;
            }
            let link = std::path::PathBuf::from(format!("/proc/{pid}/fd/{}", entry.fd));
            let shown = format!("memfd:{name} (fd {} of PID {pid})", entry.fd);
            let opened = crate::files::open_all_as(e.reader, std::slice::from_ref(&link))
                .map_err(|err| crate::files::embed_err(&shown, e.reader, err))?;
            let mut file = opened
                .into_iter()
                .next()
                .ok_or_else(|| Error::Other(format!("internal: {shown} not opened")))?
                .map_err(|err| crate::files::embed_err(&shown, e.reader, err))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).map_err(|err| Error::File {
                path: shown.clone(),
                source: err,
            })?;
            if !bytes.is_empty() {
                *content = Some(e.writer.add_data(&bytes)?);
            }
        }
    }
    Ok(())
}

/// The memfd of `inode`, made once: content, size, mode, then seals.
fn make_memfd(d: &mut Descriptions, m: &mut Making<'_>, e: &FdEntry) -> Result<()> {
    let FdKind::Memfd {
        name,
        inode,
        mode,
        seals,
        size,
        uid,
        gid,
        ..
    } = &e.kind
    else {
        return Ok(());
    };
    let k = Key::Object("memfd", *inode, 0);
    if d.has(&k) {
        return Ok(());
    }
    let shown = format!("memfd:{name}");
    let content = m
        .meta
        .processes()
        .flat_map(|p| &p.fds)
        .find_map(|x| match &x.kind {
            FdKind::Memfd {
                inode: i,
                content: Some(c),
                ..
            } if i == inode => Some(*c),
            _ => None,
        });
    let seals = *seals as i32;
    // Without MFD_ALLOW_SEALING a memfd is born sealed with F_SEAL_SEAL.
    let sealable = seals != libc::F_SEAL_SEAL;
    let mut flags = MFdFlags::MFD_CLOEXEC;
    if sealable {
        flags |= MFdFlags::MFD_ALLOW_SEALING;
    }
    let clean: String = name.chars().filter(|&c| c != '\0').take(249).collect();
    let fd = memfd_create(clean.as_str(), flags).map_err(file_err(&shown))?;
    if let Some(c) = content {
        let bytes = m.reader.read_data(&c)?;
        write_bytes(&fd, &bytes, || shown.clone())?;
    }
    nix::unistd::ftruncate(&fd, *size as i64).map_err(file_err(&shown))?;
    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(*mode)).map_err(file_err(&shown))?;
    // Its owner's again (the restorer made it); a user restoring their own
    // image makes it theirs already.
    if let Err(err) = nix::unistd::fchown(
        &fd,
        Some(nix::unistd::Uid::from_raw(*uid)),
        Some(nix::unistd::Gid::from_raw(*gid)),
    ) {
        super::restore::note(
            m.warnings,
            format!("{shown} comes back owned by the restorer, not {uid}:{gid} ({err})"),
        );
    }
    if sealable && seals != 0 {
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(SealFlag::from_bits_retain(seals)),
        )
        .map_err(file_err(&shown))?;
    }
    d.insert(k, fd);
    Ok(())
}

fn make(d: &mut Descriptions, m: &mut Making<'_>, e: &FdEntry) -> Result<bool> {
    let FdKind::Memfd {
        name, inode, pos, ..
    } = &e.kind
    else {
        return Ok(false);
    };
    make_memfd(d, m, e)?;
    let shown = format!("memfd:{name}");
    let memfd = d
        .lookup(&Key::Object("memfd", *inode, 0))
        .ok_or_else(|| Error::Other(format!("internal: {shown} not made")))?;
    // A description of its own, with the saved access mode.
    let again = format!("/proc/self/fd/{}", memfd.as_raw_fd());
    let fd: OwnedFd = nix::fcntl::open(again.as_str(), open_flags(e.flags), Mode::empty())
        .map_err(file_err(&shown))?;
    seek(&fd, *pos, &shown)?;
    d.insert(key(m.pid, e), fd);
    Ok(true)
}

/// For `inspect`.
pub fn describe(kind: &FdKind) -> Option<String> {
    match kind {
        FdKind::Memfd {
            name,
            size,
            mode,
            seals,
            pos,
            ..
        } => Some(format!(
            "memfd:{name}, {size} bytes, mode {mode:o}, seals {seals:#x}, at offset {pos}"
        )),
        _ => None,
    }
}
