//! `memchurn REPORT [MIB]`
//!
//! A process whose memory changes a little at each step, in every way an
//! incremental checkpoint must follow. It maps a main region of MIB MiB
//! (default 32) and fills it, then on each SIGUSR1 takes one step:
//! rewrites about 1 % of the pages of every region, discards a few pages
//! with `MADV_DONTNEED` (and reads one back as the zero page) and one the
//! step before wrote, maps a new
//! region, unmaps an old one, moves one with `mremap` (to a fixed place
//! on even steps, growing it in place or elsewhere on odd ones), and grows
//! the program break. Every page's content is a function of its region,
//! its index and the step that last wrote it (zero if none), which the
//! process keeps in its own memory.
//!
//! On SIGUSR2 it checks every word of every region against that and
//! appends `VERIFY step=N ok=1 sum=HEX` (`ok=0 bad=ADDR` at the first wrong
//! word) to REPORT; each step appends `STEP N`; start-up appends `READY` (and prints it).
//! The sum covers every word of every region in order: two processes with
//! the same sum after the same steps have the same memory.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chpox_tests::{install_handler, mmap_anon, say};

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;

static STEPS_ASKED: AtomicU32 = AtomicU32::new(0);
static VERIFIES_ASKED: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    STEPS_ASKED.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_usr2(_: libc::c_int) {
    VERIFIES_ASKED.fetch_add(1, Ordering::SeqCst);
}

struct Region {
    addr: usize,
    id: u64,
    /// Step that last wrote each page; 0: never written, or discarded.
    version: Vec<u32>,
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

fn word(id: u64, page: usize, version: u32, w: usize) -> u64 {
    if version == 0 {
        return 0;
    }
    mix(id << 40 ^ (page as u64) << 12 ^ (version as u64) << 56 ^ w as u64) | 1
}

impl Region {
    fn page_ptr(&self, p: usize) -> *mut u64 {
        (self.addr + p * PAGE) as *mut u64
    }

    fn write(&mut self, p: usize, version: u32) {
        self.version[p] = version;
        for w in 0..WORDS {
            // SAFETY: page p lies inside this live read-write mapping.
            unsafe {
                self.page_ptr(p)
                    .add(w)
                    .write_volatile(word(self.id, p, version, w))
            };
        }
    }

    fn discard(&mut self, p: usize, n: usize) {
        // SAFETY: pages inside this mapping; their content is ours to drop.
        let rc = unsafe {
            libc::madvise(
                (self.addr + p * PAGE) as *mut _,
                n * PAGE,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0, "madvise");
        self.version[p..p + n].fill(0);
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self, below: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        (mix(self.0) % below.max(1) as u64) as usize
    }
}

fn new_region(regions: &mut Vec<Region>, next_id: &mut u64, pages: usize, step: u32) {
    let addr = mmap_anon(pages * PAGE, 0) as usize;
    let mut r = Region {
        addr,
        id: *next_id,
        version: vec![0; pages],
    };
    *next_id += 1;
    for p in 0..pages {
        r.write(p, step);
    }
    regions.push(r);
}

fn step(regions: &mut Vec<Region>, next_id: &mut u64, brk: &mut Region, k: u32) {
    let mut rng = Rng(k as u64 * 7919);
    for r in regions.iter_mut().chain(std::iter::once(&mut *brk)) {
        let n = r.version.len();
        for _ in 0..(n / 100).max(1) {
            if n > 0 {
                let p = rng.next(n);
                r.write(p, k);
            }
        }
    }
    // Discard a few pages of a region, and read one of them back.
    let i = rng.next(regions.len());
    let n = regions[i].version.len();
    if n >= 8 {
        let p = rng.next(n - 4);
        regions[i].discard(p, 4);
        // SAFETY: inside the mapping; reads the zero page in.
        let v = unsafe { regions[i].page_ptr(p + 1).read_volatile() };
        assert_eq!(v, 0);
    }
    // A page the step before wrote, discarded without being written
    // since: however an increment read it before, it stores a hole.
    if k > 1
        && let Some((i, p)) = regions
            .iter()
            .enumerate()
            .find_map(|(i, r)| Some((i, r.version.iter().position(|&v| v == k - 1)?)))
    {
        regions[i].discard(p, 1);
    }
    // A new region; every third step a larger one.
    let pages = if k.is_multiple_of(3) {
        256
    } else {
        1 + rng.next(32)
    };
    new_region(regions, next_id, pages, k);
    // Unmap an old one (never the main region).
    if regions.len() > 4 {
        let i = 1 + rng.next(regions.len() - 1);
        let r = regions.remove(i);
        // SAFETY: the whole mapping, which nothing refers to any more.
        let rc = unsafe { libc::munmap(r.addr as *mut _, r.version.len() * PAGE) };
        assert_eq!(rc, 0, "munmap");
    }
    // Move or grow one (never the main region).
    if regions.len() > 1 {
        let i = 1 + rng.next(regions.len() - 1);
        let r = &mut regions[i];
        let old = r.version.len() * PAGE;
        let (new_len, new_addr) = if k.is_multiple_of(2) {
            // To a fixed place, reserved first.
            let at = mmap_anon(old, 0) as usize;
            // SAFETY: moving our own mapping over our own reservation.
            let got = unsafe {
                libc::mremap(
                    r.addr as *mut _,
                    old,
                    old,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    at as *mut libc::c_void,
                )
            };
            (old, got)
        } else {
            let grow = (1 + rng.next(8)) * PAGE;
            // SAFETY: growing our own mapping; it may move.
            let got =
                unsafe { libc::mremap(r.addr as *mut _, old, old + grow, libc::MREMAP_MAYMOVE) };
            (old + grow, got)
        };
        assert_ne!(new_addr, libc::MAP_FAILED, "mremap");
        r.addr = new_addr as usize;
        r.version.resize(new_len / PAGE, 0);
        let last = r.version.len() - 1;
        r.write(last, k);
    }
    // Grow the break by a few pages and write some of them.
    let grow = 1 + rng.next(16);
    // SAFETY: sbrk extends the data segment; the pages are ours.
    let old = unsafe { libc::sbrk((grow * PAGE) as libc::intptr_t) };
    assert_ne!(old as isize, -1, "sbrk");
    assert_eq!(
        old as usize,
        brk.addr + brk.version.len() * PAGE,
        "someone else moved the break"
    );
    let from = brk.version.len();
    brk.version.resize(from + grow, 0);
    for p in (from..from + grow).step_by(2) {
        brk.write(p, k);
    }
}

fn verify(regions: &[Region], brk: &Region) -> Result<u64, usize> {
    let mut sum = 0u64;
    for r in regions.iter().chain(std::iter::once(brk)) {
        for (p, &v) in r.version.iter().enumerate() {
            for w in 0..WORDS {
                // SAFETY: inside the live mapping.
                let got = unsafe { r.page_ptr(p).add(w).read_volatile() };
                if got != word(r.id, p, v, w) {
                    return Err(r.addr + p * PAGE + w * 8);
                }
                sum = sum.wrapping_mul(31).wrapping_add(got);
            }
        }
    }
    Ok(sum)
}

fn report(path: &str, line: &str) {
    chpox_tests::append_line(path, line);
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: memchurn REPORT [MIB]");
    let mib: usize = std::env::args()
        .nth(2)
        .map_or(32, |a| a.parse().expect("MIB"));
    // malloc must leave the break to us: its heap grows by mmap, and it
    // never gives memory back by lowering the break.
    // SAFETY: plain allocator tuning, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        libc::mallopt(libc::M_TOP_PAD, 0);
    }
    install_handler(libc::SIGUSR1, on_usr1, libc::SA_RESTART, &[]);
    install_handler(libc::SIGUSR2, on_usr2, libc::SA_RESTART, &[]);
    let mut regions = Vec::with_capacity(64);
    let mut next_id = 1;
    new_region(&mut regions, &mut next_id, mib * 256, 1);
    // The program break, page aligned, as a region of its own.
    // SAFETY: sbrk(0) only reads the break; the second call aligns it.
    let brk_start = unsafe {
        let cur = libc::sbrk(0) as usize;
        let aligned = cur.next_multiple_of(PAGE);
        libc::sbrk((aligned - cur) as libc::intptr_t);
        aligned
    };
    let mut brk = Region {
        addr: brk_start,
        id: 1000,
        version: Vec::with_capacity(4096),
    };
    let mut done = 0u32;
    let mut verified = 0u32;
    report(&path, "READY");
    say!("READY");
    loop {
        let asked = STEPS_ASKED.load(Ordering::SeqCst);
        while done < asked {
            done += 1;
            step(&mut regions, &mut next_id, &mut brk, done + 1);
            report(&path, &format!("STEP {done}"));
        }
        let asked = VERIFIES_ASKED.load(Ordering::SeqCst);
        if verified < asked {
            verified = asked;
            match verify(&regions, &brk) {
                Ok(sum) => report(&path, &format!("VERIFY step={done} ok=1 sum={sum:x}")),
                Err(at) => report(&path, &format!("VERIFY step={done} ok=0 bad={at:#x}")),
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
