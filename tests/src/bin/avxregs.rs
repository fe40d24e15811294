//! `avxregs`
//!
//! Holds known values in registers while spinning, so a dump catches them:
//!
//! * `ymm<k>` (k = 0..15): byte `j` (0..31) = `(k*32 + j) as u8 ^ 0x5A`
//! * `r12` = `0x1234_5678_9ABC_DEF0`, `r13` = `0x0FED_CBA9_8765_4321`
//! * with AVX-512 (`avx512=1`, which needs both AVX512F and AVX512BW, the
//!   latter for 64-bit opmasks):
//!   * `zmm<k>` (k = 16..31): byte `j` (0..63) = `(k*64 + j) as u8 ^ 0xA5`
//!   * `k<k>` (k = 1..7) = `0x1111_1111_1111_1111 * k`
//!
//! Prints `READY avx512=<0|1>` before loading them (printing would clobber
//! them), then spins in `pause` until SIGUSR1 sets a flag in memory. After
//! that it stores the registers and compares: prints `REGS OK` and exits 0,
//! or `REGS BAD reg=<name>` and exits 1.

use std::arch::asm;
use std::mem::offset_of;

use chpox_tests::{STOP, say, stop_on_signal};

const R12: u64 = 0x1234_5678_9ABC_DEF0;
const R13: u64 = 0x0FED_CBA9_8765_4321;

/// Register file image: what is loaded, and what is read back.
#[repr(C)]
struct Regs {
    ymm: [[u8; 32]; 16],
    /// zmm16..zmm31.
    zmm: [[u8; 64]; 16],
    /// k1..k7.
    k: [u64; 7],
    /// r12, r13.
    gpr: [u64; 2],
}

// The asm below uses these offsets literally.
const _: () = assert!(offset_of!(Regs, ymm) == 0);
const _: () = assert!(offset_of!(Regs, zmm) == 512);
const _: () = assert!(offset_of!(Regs, k) == 1536);
const _: () = assert!(offset_of!(Regs, gpr) == 1592);

impl Regs {
    fn zeroed() -> Self {
        Regs {
            ymm: [[0; 32]; 16],
            zmm: [[0; 64]; 16],
            k: [0; 7],
            gpr: [0; 2],
        }
    }

    fn expected() -> Self {
        let mut r = Self::zeroed();
        for (k, reg) in r.ymm.iter_mut().enumerate() {
            for (j, b) in reg.iter_mut().enumerate() {
                *b = (k * 32 + j) as u8 ^ 0x5A;
            }
        }
        for (i, reg) in r.zmm.iter_mut().enumerate() {
            let k = i + 16;
            for (j, b) in reg.iter_mut().enumerate() {
                *b = (k * 64 + j) as u8 ^ 0xA5;
            }
        }
        for (i, m) in r.k.iter_mut().enumerate() {
            *m = 0x1111_1111_1111_1111u64 * (i as u64 + 1);
        }
        r.gpr = [R12, R13];
        r
    }

    /// Name of the first register that differs from `want`.
    fn first_difference(&self, want: &Regs, avx512: bool) -> Option<String> {
        for k in 0..16 {
            if self.ymm[k] != want.ymm[k] {
                return Some(format!("ymm{k}"));
            }
        }
        if self.gpr[0] != want.gpr[0] {
            return Some("r12".into());
        }
        if self.gpr[1] != want.gpr[1] {
            return Some("r13".into());
        }
        if avx512 {
            for i in 0..16 {
                if self.zmm[i] != want.zmm[i] {
                    return Some(format!("zmm{}", i + 16));
                }
            }
            for i in 0..7 {
                if self.k[i] != want.k[i] {
                    return Some(format!("k{}", i + 1));
                }
            }
        }
        None
    }
}

/// Loads ymm0..15, r12, r13 from `want`, spins until [`STOP`] is set, then
/// stores them into `got`.
///
/// # Safety
/// The CPU must support AVX.
#[target_feature(enable = "avx")]
unsafe fn hold_avx(want: &Regs, got: &mut Regs) {
    // SAFETY: only reads `want` and STOP, writes `got`; every register it
    // changes is declared.
    unsafe {
        asm!(
            "vmovdqu ymm0, [{src} + 0]",
            "vmovdqu ymm1, [{src} + 32]",
            "vmovdqu ymm2, [{src} + 64]",
            "vmovdqu ymm3, [{src} + 96]",
            "vmovdqu ymm4, [{src} + 128]",
            "vmovdqu ymm5, [{src} + 160]",
            "vmovdqu ymm6, [{src} + 192]",
            "vmovdqu ymm7, [{src} + 224]",
            "vmovdqu ymm8, [{src} + 256]",
            "vmovdqu ymm9, [{src} + 288]",
            "vmovdqu ymm10, [{src} + 320]",
            "vmovdqu ymm11, [{src} + 352]",
            "vmovdqu ymm12, [{src} + 384]",
            "vmovdqu ymm13, [{src} + 416]",
            "vmovdqu ymm14, [{src} + 448]",
            "vmovdqu ymm15, [{src} + 480]",
            "mov r12, [{src} + 1592]",
            "mov r13, [{src} + 1600]",
            "2:",
            "pause",
            "cmp dword ptr [{stop}], 0",
            "je 2b",
            "vmovdqu [{dst} + 0], ymm0",
            "vmovdqu [{dst} + 32], ymm1",
            "vmovdqu [{dst} + 64], ymm2",
            "vmovdqu [{dst} + 96], ymm3",
            "vmovdqu [{dst} + 128], ymm4",
            "vmovdqu [{dst} + 160], ymm5",
            "vmovdqu [{dst} + 192], ymm6",
            "vmovdqu [{dst} + 224], ymm7",
            "vmovdqu [{dst} + 256], ymm8",
            "vmovdqu [{dst} + 288], ymm9",
            "vmovdqu [{dst} + 320], ymm10",
            "vmovdqu [{dst} + 352], ymm11",
            "vmovdqu [{dst} + 384], ymm12",
            "vmovdqu [{dst} + 416], ymm13",
            "vmovdqu [{dst} + 448], ymm14",
            "vmovdqu [{dst} + 480], ymm15",
            "mov [{dst} + 1592], r12",
            "mov [{dst} + 1600], r13",
            "vzeroupper",
            src = in(reg) want as *const Regs,
            dst = in(reg) got as *mut Regs,
            stop = in(reg) STOP.as_ptr(),
            out("r12") _, out("r13") _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
            out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
            options(nostack),
        );
    }
}

/// [`hold_avx`] plus zmm16..31 and k1..k7.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW.
#[target_feature(enable = "avx,avx2,avx512f,avx512bw")]
unsafe fn hold_avx512(want: &Regs, got: &mut Regs) {
    // SAFETY: as in hold_avx.
    unsafe {
        asm!(
            "vmovdqu ymm0, [{src} + 0]",
            "vmovdqu ymm1, [{src} + 32]",
            "vmovdqu ymm2, [{src} + 64]",
            "vmovdqu ymm3, [{src} + 96]",
            "vmovdqu ymm4, [{src} + 128]",
            "vmovdqu ymm5, [{src} + 160]",
            "vmovdqu ymm6, [{src} + 192]",
            "vmovdqu ymm7, [{src} + 224]",
            "vmovdqu ymm8, [{src} + 256]",
            "vmovdqu ymm9, [{src} + 288]",
            "vmovdqu ymm10, [{src} + 320]",
            "vmovdqu ymm11, [{src} + 352]",
            "vmovdqu ymm12, [{src} + 384]",
            "vmovdqu ymm13, [{src} + 416]",
            "vmovdqu ymm14, [{src} + 448]",
            "vmovdqu ymm15, [{src} + 480]",
            "vmovdqu64 zmm16, [{src} + 512]",
            "vmovdqu64 zmm17, [{src} + 576]",
            "vmovdqu64 zmm18, [{src} + 640]",
            "vmovdqu64 zmm19, [{src} + 704]",
            "vmovdqu64 zmm20, [{src} + 768]",
            "vmovdqu64 zmm21, [{src} + 832]",
            "vmovdqu64 zmm22, [{src} + 896]",
            "vmovdqu64 zmm23, [{src} + 960]",
            "vmovdqu64 zmm24, [{src} + 1024]",
            "vmovdqu64 zmm25, [{src} + 1088]",
            "vmovdqu64 zmm26, [{src} + 1152]",
            "vmovdqu64 zmm27, [{src} + 1216]",
            "vmovdqu64 zmm28, [{src} + 1280]",
            "vmovdqu64 zmm29, [{src} + 1344]",
            "vmovdqu64 zmm30, [{src} + 1408]",
            "vmovdqu64 zmm31, [{src} + 1472]",
            "kmovq k1, [{src} + 1536]",
            "kmovq k2, [{src} + 1544]",
            "kmovq k3, [{src} + 1552]",
            "kmovq k4, [{src} + 1560]",
            "kmovq k5, [{src} + 1568]",
            "kmovq k6, [{src} + 1576]",
            "kmovq k7, [{src} + 1584]",
            "mov r12, [{src} + 1592]",
            "mov r13, [{src} + 1600]",
            "2:",
            "pause",
            "cmp dword ptr [{stop}], 0",
            "je 2b",
            "vmovdqu [{dst} + 0], ymm0",
            "vmovdqu [{dst} + 32], ymm1",
            "vmovdqu [{dst} + 64], ymm2",
            "vmovdqu [{dst} + 96], ymm3",
            "vmovdqu [{dst} + 128], ymm4",
            "vmovdqu [{dst} + 160], ymm5",
            "vmovdqu [{dst} + 192], ymm6",
            "vmovdqu [{dst} + 224], ymm7",
            "vmovdqu [{dst} + 256], ymm8",
            "vmovdqu [{dst} + 288], ymm9",
            "vmovdqu [{dst} + 320], ymm10",
            "vmovdqu [{dst} + 352], ymm11",
            "vmovdqu [{dst} + 384], ymm12",
            "vmovdqu [{dst} + 416], ymm13",
            "vmovdqu [{dst} + 448], ymm14",
            "vmovdqu [{dst} + 480], ymm15",
            "vmovdqu64 [{dst} + 512], zmm16",
            "vmovdqu64 [{dst} + 576], zmm17",
            "vmovdqu64 [{dst} + 640], zmm18",
            "vmovdqu64 [{dst} + 704], zmm19",
            "vmovdqu64 [{dst} + 768], zmm20",
            "vmovdqu64 [{dst} + 832], zmm21",
            "vmovdqu64 [{dst} + 896], zmm22",
            "vmovdqu64 [{dst} + 960], zmm23",
            "vmovdqu64 [{dst} + 1024], zmm24",
            "vmovdqu64 [{dst} + 1088], zmm25",
            "vmovdqu64 [{dst} + 1152], zmm26",
            "vmovdqu64 [{dst} + 1216], zmm27",
            "vmovdqu64 [{dst} + 1280], zmm28",
            "vmovdqu64 [{dst} + 1344], zmm29",
            "vmovdqu64 [{dst} + 1408], zmm30",
            "vmovdqu64 [{dst} + 1472], zmm31",
            "kmovq [{dst} + 1536], k1",
            "kmovq [{dst} + 1544], k2",
            "kmovq [{dst} + 1552], k3",
            "kmovq [{dst} + 1560], k4",
            "kmovq [{dst} + 1568], k5",
            "kmovq [{dst} + 1576], k6",
            "kmovq [{dst} + 1584], k7",
            "mov [{dst} + 1592], r12",
            "mov [{dst} + 1600], r13",
            "vzeroupper",
            src = in(reg) want as *const Regs,
            dst = in(reg) got as *mut Regs,
            stop = in(reg) STOP.as_ptr(),
            out("r12") _, out("r13") _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
            out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
            out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
            out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
            out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
            out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            out("k1") _, out("k2") _, out("k3") _, out("k4") _,
            out("k5") _, out("k6") _, out("k7") _,
            options(nostack),
        );
    }
}

fn main() {
    assert!(is_x86_feature_detected!("avx"), "avxregs needs AVX");
    let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
    stop_on_signal(libc::SIGUSR1);

    let want = Regs::expected();
    let mut got = Regs::zeroed();
    say!("READY avx512={}", u8::from(avx512));

    // SAFETY: the features each function needs were detected above.
    unsafe {
        if avx512 {
            hold_avx512(&want, &mut got);
        } else {
            hold_avx(&want, &mut got);
        }
    }

    match got.first_difference(&want, avx512) {
        None => say("REGS OK"),
        Some(reg) => {
            say!("REGS BAD reg={reg}");
            std::process::exit(1);
        }
    }
}
