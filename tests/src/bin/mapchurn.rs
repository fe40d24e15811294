//! `mapchurn`
//!
//! Changes its address space without pause: maps small regions
//! (1–64 pages) and fills them, unmaps them, zaps single pages
//! (`MADV_DONTNEED`, which reads back as zeros) and writes them again. It
//! keeps its bookkeeping in a table of its own mapping, written around
//! each change so that, at any instant, the table and the memory agree:
//!
//! - [`SLOTS`] slots of [`SLOT_BYTES`]: `addr` (0: empty), `pages`, `id`,
//!   then one state byte per page: 0 every word holds the pattern, 1 being
//!   zapped (all pattern or all zero), 2 zapped (all zero), 3 being
//!   written (each word the pattern or zero);
//! - the pattern of word `w` of region `id` is `id << 32 | w`.
//!
//! A copy of the table and the regions taken at one instant passes that
//! check; one assembled from different instants does not (a region reused
//! from before its unmapping, a zapped page's old content).
//!
//! Prints `READY table=0x<hex> slots=<n> slot_bytes=<n>`, runs until
//! SIGUSR1, then prints `DONE changes=<n>`.

use std::sync::atomic::{Ordering, compiler_fence};
use std::time::Duration;

use chpox_tests::{
    mmap_anon, mmap_anon_isolated, say, sleep_interruptible, stop_on_signal, stop_requested,
};

pub const SLOTS: usize = 64;
pub const SLOT_BYTES: usize = 128;
const MAX_PAGES: u64 = 64;
const PAGE: usize = 4096;

fn pattern(id: u64, w: u64) -> u64 {
    id << 32 | w
}

struct Table(*mut u8);

impl Table {
    fn word(&self, slot: usize, i: usize) -> *mut u64 {
        // SAFETY: within the table mapping (slot < SLOTS, i < 3).
        unsafe { self.0.add(slot * SLOT_BYTES + i * 8).cast() }
    }

    fn get(&self, slot: usize, i: usize) -> u64 {
        // SAFETY: see `word`.
        unsafe { self.word(slot, i).read_volatile() }
    }

    fn set(&self, slot: usize, i: usize, v: u64) {
        compiler_fence(Ordering::SeqCst);
        // SAFETY: see `word`.
        unsafe { self.word(slot, i).write_volatile(v) };
        compiler_fence(Ordering::SeqCst);
    }

    fn set_state(&self, slot: usize, page: usize, state: u8) {
        compiler_fence(Ordering::SeqCst);
        // SAFETY: within the slot's state bytes (page < MAX_PAGES).
        unsafe {
            self.0
                .add(slot * SLOT_BYTES + 24 + page)
                .write_volatile(state)
        };
        compiler_fence(Ordering::SeqCst);
    }
}

fn fill(addr: u64, page: usize, id: u64) {
    let words = PAGE / 8;
    for w in 0..words {
        let index = (page * words + w) as u64;
        // SAFETY: the page lies in a region this program mapped.
        unsafe {
            ((addr as usize + page * PAGE) as *mut u64)
                .add(w)
                .write_volatile(pattern(id, index))
        };
    }
}

fn main() {
    let table = Table(mmap_anon_isolated(SLOTS * SLOT_BYTES, 0));
    stop_on_signal(libc::SIGUSR1);
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut next_id = 1u64;
    let mut changes = 0u64;
    let mut ready = false;
    while !stop_requested() {
        let slot = (next() % SLOTS as u64) as usize;
        let addr = table.get(slot, 0);
        if addr == 0 {
            let pages = 1 + next() % MAX_PAGES;
            let region = mmap_anon(pages as usize * PAGE, 0) as u64;
            let id = next_id;
            next_id += 1;
            for p in 0..pages as usize {
                fill(region, p, id);
                table.set_state(slot, p, 0);
            }
            table.set(slot, 1, pages);
            table.set(slot, 2, id);
            table.set(slot, 0, region);
        } else {
            let pages = table.get(slot, 1);
            let id = table.get(slot, 2);
            let page = (next() % pages) as usize;
            match next() % 3 {
                0 => {
                    table.set(slot, 0, 0);
                    // SAFETY: a region this program mapped, no longer used.
                    unsafe { libc::munmap(addr as *mut libc::c_void, pages as usize * PAGE) };
                }
                1 => {
                    table.set_state(slot, page, 1);
                    // SAFETY: one page of a region this program mapped.
                    unsafe {
                        libc::madvise(
                            (addr as usize + page * PAGE) as *mut libc::c_void,
                            PAGE,
                            libc::MADV_DONTNEED,
                        )
                    };
                    table.set_state(slot, page, 2);
                }
                _ => {
                    table.set_state(slot, page, 3);
                    fill(addr, page, id);
                    table.set_state(slot, page, 0);
                }
            }
        }
        changes += 1;
        if !ready && changes >= 4 * SLOTS as u64 {
            ready = true;
            say!(
                "READY table={:#x} slots={SLOTS} slot_bytes={SLOT_BYTES}",
                table.0 as usize
            );
        }
        if changes.is_multiple_of(64) {
            sleep_interruptible(Duration::from_micros(100));
        }
    }
    say!("DONE changes={changes}");
}
