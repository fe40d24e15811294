use super::*;
use crate::image::model::ProcessImage;
use crate::image::testutil::write_sample_image_with;

/// The summary of the sample image after `change` (a sample process
/// whose pages are not stored is a cheap descendant).
fn summary_of(change: impl FnOnce(&mut Metadata, &ProcessImage)) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.img");
    write_sample_image_with(&path, false, |_, meta| {
        let mut bare = meta.root.clone();
        for v in &mut bare.vmas {
            v.pages.clear();
        }
        for fd in &mut bare.fds {
            if let FdKind::RegularFile { embedded, .. } = &mut fd.kind {
                *embedded = None;
            }
        }
        change(meta, &bare);
    });
    let reader = ImageReader::open(&path).expect("open");
    let checks = checksum_status(&reader);
    assert!(checks.ok, "{:?}", checks.error);
    summary(&reader, &checks)
}

fn child(bare: &ProcessImage, pid: i32, ppid: i32) -> ProcessImage {
    let mut p = bare.clone();
    p.process.pid = pid;
    p.process.ppid = ppid;
    p
}

fn process_lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| l.starts_with("process: ")).collect()
}

/// Words a person reads: what happened after the dump, each part of
/// the image, the descriptors' kinds in the tree, system calls by name.
#[test]
fn summary_speaks_in_words() {
    let s = summary_of(|_, _| {});
    assert!(s.contains("\nafter dump: left running\n"), "{s}");
    assert!(s.contains("\nimage parts: memory "), "{s}");
    let tree = s
        .lines()
        .find(|l| l.starts_with("  4242 "))
        .unwrap_or_else(|| panic!("no tree line: {s}"));
    assert!(tree.contains("fds: "), "{tree}");
    assert_eq!(syscall_name(libc::SYS_nanosleep as u64), "nanosleep");
    assert_eq!(syscall_name(100_000), "system call 100000");
    assert_eq!(
        restart_words(RestartKind::RestartBlock),
        "restarts with the time left"
    );
}

#[test]
fn ids_show_all_four_when_they_differ() {
    assert_eq!(ids("uid", [1001; 4]), "uid 1001");
    assert_eq!(
        ids("uid", [1001, 0, 0, 0]),
        "uids real 1001 effective 0 saved 0 fs 0"
    );
    assert_eq!(
        ids("gid", [5, 5, 5, 6]),
        "gids real 5 effective 5 saved 5 fs 6"
    );
}

/// A setuid-root process of uid 1001 (1001/0/0/0) does not pass for
/// uid 1001's, in every process of the tree.
#[test]
fn every_process_shows_its_real_effective_saved_and_fs_ids() {
    let s = summary_of(|meta, bare| {
        meta.root.process.creds.uid = [1001, 0, 0, 0];
        meta.root.process.creds.gid = [1001; 4];
        let mut c = child(bare, 5000, meta.root.process.pid);
        c.process.creds.uid = [1002; 4];
        c.process.creds.gid = [1002, 1002, 0, 1002];
        meta.descendants.push(c);
        let mut c = child(bare, 5001, 5000);
        c.process.creds.uid = [1003, 1003, 1003, 0];
        meta.descendants.push(c);
    });
    let lines = process_lines(&s);
    assert_eq!(lines.len(), 3, "{s}");
    assert!(
        lines[0].contains(" uids real 1001 effective 0 saved 0 fs 0 gid 1001,"),
        "{s}"
    );
    assert!(
        lines[1].contains(" uid 1002 gids real 1002 effective 1002 saved 0 fs 1002,"),
        "{s}"
    );
    assert!(
        lines[2].contains(" uids real 1003 effective 1003 saved 1003 fs 0 gid 1000,"),
        "{s}"
    );
}

/// The file table is the tree's, printed once, not once per process.
#[test]
fn files_are_listed_once() {
    let s = summary_of(|meta, bare| {
        for pid in 5000..5010 {
            meta.descendants
                .push(child(bare, pid, meta.root.process.pid));
        }
    });
    assert_eq!(
        s.lines().filter(|l| l.starts_with("files: ")).count(),
        1,
        "{s}"
    );
    assert_eq!(process_lines(&s).len(), 11, "{s}");
}

/// An image may claim any parent for any process: a cycle through the
/// root's PID, a process whose parent is not in the image, a chain
/// longer than any indentation. The tree is still printed, each process
/// once, in bounded width.
#[test]
fn any_claimed_parenthood_prints_in_bounded_space() {
    let root = 4242;
    let s = summary_of(|meta, bare| {
        assert_eq!(meta.root.process.pid, root);
        // 5000 under the root, and a second "4242" under 5000: the
        // children of 4242 include 5000 again.
        meta.descendants.push(child(bare, 5000, root));
        meta.descendants.push(child(bare, root, 5000));
        meta.descendants.push(child(bare, 6000, 999_999));
        // A chain of 200 below 5000.
        let mut parent = 5000;
        for pid in 7000..7200 {
            meta.descendants.push(child(bare, pid, parent));
            parent = pid;
        }
    });
    let tree: Vec<&str> = s
        .lines()
        .skip_while(|l| !l.starts_with("process tree: "))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect();
    let shown = |pid: i32| {
        tree.iter()
            .filter(|l| l.trim_start().starts_with(&format!("{pid} ")))
            .count()
    };
    assert_eq!(shown(5000), 1, "{s}");
    assert_eq!(shown(root), 2, "{s}");
    assert_eq!(shown(7199), 1, "{s}");
    assert_eq!(shown(6000), 1, "{s}");
    assert!(s.contains("  not under the root:\n"), "{s}");
    let widest = tree.iter().map(|l| l.len() - l.trim_start().len()).max();
    assert_eq!(widest, Some(2 * (MAX_INDENT + 1)), "{s}");
    assert!(
        tree.iter()
            .any(|l| l.trim_start().starts_with("7199 ") && l.ends_with("(depth 201)")),
        "{s}"
    );
    assert_eq!(process_lines(&s).len(), 204);
}
