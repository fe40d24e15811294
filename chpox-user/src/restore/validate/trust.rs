//! How far an image is trusted: the owner of the image file, and the
//! credentials a process of the image may claim when restored as them
//! (see the documentation of `validate`).

use std::fs::File;
use std::os::unix::fs::MetadataExt;

use crate::creds::UserCreds;
use crate::error::{Error, Result};
use crate::image::model::{Credentials, Metadata};

/// How far restore trusts an image: see the documentation of `validate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Everything the image says, within the restorer's own rights.
    Full,
    /// Root restoring another user's image: only what that user could have.
    Owner(Owner),
}

impl Trust {
    pub fn owner(&self) -> Option<&Owner> {
        match self {
            Trust::Full => None,
            Trust::Owner(o) => Some(o),
        }
    }
}

/// The user an image is restored as: the owner of the image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    /// The image file's group.
    pub gid: u32,
    /// Every group id the owner may hold: the file's group (its owner may
    /// give it only a group they are in), and the owner's primary and
    /// supplementary groups in the user database. Sorted.
    pub groups: Vec<u32>,
}

impl Owner {
    /// The owner of a file of uid `uid` and group `gid`, with their groups.
    pub fn new(uid: u32, gid: u32) -> Owner {
        let mut groups = vec![gid];
        if let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
            groups.push(user.gid.as_raw());
            if let Ok(name) = std::ffi::CString::new(user.name.as_bytes())
                && let Ok(list) = nix::unistd::getgrouplist(&name, user.gid)
            {
                groups.extend(list.iter().map(|g| g.as_raw()));
            }
        }
        groups.sort_unstable();
        groups.dedup();
        Owner { uid, gid, groups }
    }

    /// The owner's file identity, for checks that concern the whole image.
    pub fn file_creds(&self) -> UserCreds {
        UserCreds {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }

    /// The file identity of a process of the image, whose credentials
    /// [`check_owner_creds`] found to be the owner's.
    pub fn creds_of(creds: &Credentials) -> UserCreds {
        UserCreds {
            uid: creds.uid[3],
            gid: creds.gid[3],
            groups: creds.groups.clone(),
        }
    }

    fn may_have_gid(&self, gid: u32) -> bool {
        self.groups.binary_search(&gid).is_ok()
    }
}

/// The end of every refusal of something the image's owner may not have.
pub fn beyond_owner(owner: &Owner, what: &str) -> Error {
    Error::Other(format!(
        "{what}: more than uid {uid}, the owner of the image file, may have; root restores another user's image with that user's rights only (restore it as uid {uid}, or with --trust-image if you trust its content)",
        uid = owner.uid
    ))
}

/// How far to trust the image read from `image` (the file already open,
/// so what is judged is what is read).
pub fn trust(image: &File, trust_image: bool) -> Result<Trust> {
    if trust_image || !nix::unistd::geteuid().is_root() {
        return Ok(Trust::Full);
    }
    let md = image
        .metadata()
        .map_err(|e| Error::Other(format!("cannot tell who owns the image: {e}")))?;
    if md.mode() & 0o022 != 0 {
        return Err(Error::Other(format!(
            "the image file is writable by others than its owner (mode {:o}): anyone of them could have made it; make it writable by its owner only, or restore with --trust-image if you trust its content",
            md.mode() & 0o7777
        )));
    }
    if md.uid() == 0 {
        return Ok(Trust::Full);
    }
    Ok(Trust::Owner(Owner::new(md.uid(), md.gid())))
}

/// Root restoring another user's image: every process must have only
/// credentials that user could have.
pub fn check_owner_creds(meta: &Metadata, owner: &Owner) -> Result<()> {
    let ids = |ids: &[u32; 4]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join("/");
    for p in meta.processes() {
        let c = &p.process.creds;
        let pid = p.process.pid;
        if c.uid.iter().any(|&u| u != owner.uid) {
            return Err(beyond_owner(
                owner,
                &format!(
                    "PID {pid} of the image claims uids {} (real/effective/saved/filesystem)",
                    ids(&c.uid)
                ),
            ));
        }
        if c.gid.iter().any(|&g| !owner.may_have_gid(g)) {
            return Err(beyond_owner(
                owner,
                &format!(
                    "PID {pid} of the image claims gids {} (real/effective/saved/filesystem)",
                    ids(&c.gid)
                ),
            ));
        }
        if let Some(g) = c.groups.iter().find(|&&g| !owner.may_have_gid(g)) {
            return Err(beyond_owner(
                owner,
                &format!("PID {pid} of the image claims supplementary group {g}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil::sample_metadata;

    fn nobody() -> Owner {
        Owner {
            uid: 65534,
            gid: 65534,
            groups: vec![100, 65534],
        }
    }

    fn with_creds(uid: [u32; 4], gid: [u32; 4], groups: Vec<u32>) -> Metadata {
        let mut meta = sample_metadata();
        meta.root.process.creds = Credentials { uid, gid, groups };
        meta
    }

    #[test]
    fn a_users_image_may_claim_only_the_users_ids() {
        let owner = nobody();
        let ok = with_creds([65534; 4], [65534, 100, 100, 65534], vec![100]);
        assert!(check_owner_creds(&ok, &owner).is_ok());
        for (meta, shown) in [
            (
                with_creds([65534, 0, 0, 0], [65534; 4], vec![]),
                "uids 65534/0/0/0",
            ),
            (
                with_creds([65534; 4], [65534, 0, 65534, 65534], vec![]),
                "gids 65534/0/65534/65534",
            ),
            (
                with_creds([65534; 4], [65534; 4], vec![100, 0]),
                "supplementary group 0",
            ),
        ] {
            let err = check_owner_creds(&meta, &owner)
                .expect_err(shown)
                .to_string();
            assert!(err.contains(shown), "{err}");
            assert!(err.contains("--trust-image"), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }
}
