//! Just enough of a BTF reader to find, in the running kernel's own type
//! information (/sys/kernel/btf/vmlinux), where the guard's fields lie in
//! `task_struct`, `sighand_struct` and `k_sigaction`: the offsets CO-RE
//! relocations would give a C program, handed to ours as a global.
//!
//! Format: the kernel's Documentation/bpf/btf.rst (a header, then types
//! numbered from 1, each a 12-byte `btf_type` and a kind-specific tail,
//! then the string section).

use chpox_common::{TaskOffsets, TaskStateOffsets, VmaOffsets};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {VMLINUX}: {0}")]
    Read(#[from] std::io::Error),
    #[error("{VMLINUX} is not BTF this reader understands: {0}")]
    Format(&'static str),
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
}

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    ty: u32,
    /// In bits.
    offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name: u32,
    kind: u32,
    /// Size (structs, unions, ints…) or the referred type (typedefs, …).
    size_or_type: u32,
    members: Vec<Member>,
}

pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Format("truncated"))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Btf::parse(&std::fs::read(VMLINUX)?)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Format("no little-endian BTF magic"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_at = hdr_len + type_off;
        let type_data = data
            .get(types_at..types_at + type_len)
            .ok_or(BtfError::Format("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Format("string section out of bounds"))?
            .to_vec();
        // Type 0 is void.
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            size_or_type: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < type_data.len() {
            let name = u32_at(type_data, at)?;
            let info = u32_at(type_data, at + 4)?;
            let size_or_type = u32_at(type_data, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let bitfields = info >> 31 == 1;
            let mut members = Vec::new();
            let tail = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => {
                    // The element type, kept as a member for type_size.
                    members.push(Member {
                        name: 0,
                        ty: u32_at(type_data, at)?,
                        offset: u32_at(type_data, at + 8)?,
                    });
                    12
                }
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(type_data, m + 8)?;
                        members.push(Member {
                            name: u32_at(type_data, m)?,
                            ty: u32_at(type_data, m + 4)?,
                            offset: if bitfields {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    12 * vlen
                }
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                2 | 7 | 8..=12 | 16 | 18 => 0,
                _ => return Err(BtfError::Format("unknown kind of type")),
            };
            at += tail;
            types.push(Type {
                name,
                kind,
                size_or_type,
                members,
            });
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// The struct (or union) named `name`.
    fn named(&self, name: &str) -> Result<u32, BtfError> {
        self.types
            .iter()
            .position(|t| {
                matches!(t.kind, KIND_STRUCT | KIND_UNION)
                    && !t.members.is_empty()
                    && self.name(t.name) == name.as_bytes()
            })
            .map(|i| i as u32)
            .ok_or_else(|| BtfError::Missing(format!("struct {name}")))
    }

    /// Through typedefs and qualifiers to the type itself.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_or_type
                }
                _ => break,
            }
        }
        id
    }

    /// `member` of struct `id`, looking into anonymous structs and unions
    /// as C does: its offset in bits (bitfields too) and its type.
    fn member(&self, id: u32, member: &str, depth: u32) -> Option<(u32, u32)> {
        let t = self.types.get(self.resolve(id) as usize)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) || depth > 8 {
            return None;
        }
        for m in &t.members {
            let name = self.name(m.name);
            if name == member.as_bytes() {
                return Some((m.offset, m.ty));
            }
            if name.is_empty()
                && let Some((inner, ty)) = self.member(m.ty, member, depth + 1)
            {
                return Some((m.offset + inner, ty));
            }
        }
        None
    }

    /// Byte offset of `member` in struct `id` (None for a bitfield).
    fn member_offset(&self, id: u32, member: &str) -> Option<u32> {
        let (bits, _) = self.member(id, member, 0)?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// Byte offset of a path of members: `real_timer.node.expires` of
    /// `signal_struct` is `["real_timer", "node", "expires"]`.
    fn path_offset(&self, strukt: &str, path: &[&str]) -> Result<u32, BtfError> {
        let missing = || BtfError::Missing(format!("{strukt}.{}", path.join(".")));
        let mut id = self.named(strukt)?;
        let mut total = 0;
        for (i, member) in path.iter().enumerate() {
            total += self.member_offset(id, member).ok_or_else(missing)?;
            if i + 1 < path.len() {
                id = self.member(id, member, 0).ok_or_else(missing)?.1;
            }
        }
        Ok(total)
    }

    fn offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = self.named(strukt)?;
        self.member_offset(id, member)
            .ok_or_else(|| BtfError::Missing(format!("{strukt}.{member}")))
    }

    fn size(&self, strukt: &str) -> Result<u32, BtfError> {
        let id = self.named(strukt)?;
        Ok(self.types[id as usize].size_or_type)
    }

    /// Where the guard reads a signal target's process id and disposition.
    pub fn task_offsets(&self) -> Result<TaskOffsets, BtfError> {
        Ok(TaskOffsets {
            tgid: self.offset("task_struct", "tgid")?,
            pid: self.offset("task_struct", "pid")?,
            sighand: self.offset("task_struct", "sighand")?,
            action: self.offset("sighand_struct", "action")?,
            ksigaction_size: self.size("k_sigaction")?,
            handler: self.offset("k_sigaction", "sa")? + self.offset("sigaction", "sa_handler")?,
            valid: 1,
            _pad: 0,
        })
    }
}

impl Btf {
    /// Where the `task` iterator reads what remote syscalls would ask.
    pub fn task_state_offsets(&self) -> Result<TaskStateOffsets, BtfError> {
        let subreaper = {
            let id = self.named("signal_struct")?;
            self.member(id, "is_child_subreaper", 0)
                .ok_or_else(|| BtfError::Missing("signal_struct.is_child_subreaper".into()))?
                .0
        };
        let sa = self.offset("k_sigaction", "sa")?;
        Ok(TaskStateOffsets {
            pid: self.offset("task_struct", "pid")?,
            tgid: self.offset("task_struct", "tgid")?,
            mm: self.offset("task_struct", "mm")?,
            signal: self.offset("task_struct", "signal")?,
            sighand: self.offset("task_struct", "sighand")?,
            pdeath_signal: self.offset("task_struct", "pdeath_signal")?,
            clear_child_tid: self.offset("task_struct", "clear_child_tid")?,
            sas_ss_sp: self.offset("task_struct", "sas_ss_sp")?,
            sas_ss_size: self.offset("task_struct", "sas_ss_size")?,
            sas_ss_flags: self.offset("task_struct", "sas_ss_flags")?,
            action: self.offset("sighand_struct", "action")?,
            ksigaction_size: self.size("k_sigaction")?,
            sa_handler: sa + self.offset("sigaction", "sa_handler")?,
            sa_flags: sa + self.offset("sigaction", "sa_flags")?,
            sa_restorer: sa + self.offset("sigaction", "sa_restorer")?,
            sa_mask: sa + self.offset("sigaction", "sa_mask")?,
            brk: self.offset("mm_struct", "brk")?,
            // An unsigned long before 6.18, a struct of one bitmap since:
            // its first word holds the same bits either way.
            mm_flags: self.offset("mm_struct", "flags")?,
            subreaper_word: subreaper / 32 * 4,
            subreaper_bit: subreaper % 32,
            real_expires: self.path_offset("signal_struct", &["real_timer", "node", "expires"])?,
            real_incr: self.offset("signal_struct", "it_real_incr")?,
            cpu_itimers: self.offset("signal_struct", "it")?,
            oom_score_adj: self.offset("signal_struct", "oom_score_adj")?,
            rlim: self.offset("signal_struct", "rlim")?,
            personality: self.offset("task_struct", "personality")?,
            seccomp_mode: self.path_offset("task_struct", &["seccomp", "mode"])?,
            comm: self.offset("task_struct", "comm")?,
            _pad: 0,
            valid: 1,
        })
    }

    /// Where the `task_vma` iterator reads a mapping's bounds and flags.
    pub fn vma_offsets(&self) -> Result<VmaOffsets, BtfError> {
        Ok(VmaOffsets {
            vm_start: self.offset("vm_area_struct", "vm_start")?,
            vm_end: self.offset("vm_area_struct", "vm_end")?,
            vm_flags: self.offset("vm_area_struct", "vm_flags")?,
            valid: 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made BTF: `struct inner { int a; int b; }` and `struct
    /// outer { long x; struct { int pad; int y; }; struct inner in; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0a\0b\0inner\0x\0pad\0y\0in\0outer\0".to_vec();
        let s = |name: &str| -> u32 {
            let needle = [name.as_bytes(), b"\0"].concat();
            strings
                .windows(needle.len())
                .enumerate()
                .find(|(i, w)| *w == needle.as_slice() && strings[i - 1] == 0)
                .map(|(i, _)| i as u32)
                .expect("string")
        };
        let mut t = Vec::new();
        let mut push = |v: u32| t.extend_from_slice(&v.to_le_bytes());
        // 1: int (size 4)
        push(s("int"));
        push(KIND_INT << 24);
        push(4);
        push(32);
        // 2: struct inner { int a @0; int b @32 }
        push(s("inner"));
        push(KIND_STRUCT << 24 | 2);
        push(8);
        for (n, off) in [("a", 0), ("b", 32)] {
            push(s(n));
            push(1);
            push(off);
        }
        // 3: anonymous struct { int pad @0; int y @32 }
        push(0);
        push(KIND_STRUCT << 24 | 2);
        push(8);
        for (n, off) in [("pad", 0), ("y", 32)] {
            push(s(n));
            push(1);
            push(off);
        }
        // 4: struct outer { x @0 (int, say); anon @64; inner in @128 }
        push(s("outer"));
        push(KIND_STRUCT << 24 | 3);
        push(24);
        push(s("x"));
        push(1);
        push(0);
        push(0);
        push(3);
        push(64);
        push(s("in"));
        push(2);
        push(128);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&t);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn members_are_found_through_anonymous_structs() {
        let btf = Btf::parse(&sample()).expect("parse");
        assert_eq!(btf.offset("outer", "x").expect("x"), 0);
        assert_eq!(btf.offset("outer", "y").expect("y"), 12);
        assert_eq!(btf.offset("outer", "in").expect("in"), 16);
        assert_eq!(btf.offset("inner", "b").expect("b"), 4);
        assert_eq!(btf.size("outer").expect("size"), 24);
        assert!(btf.offset("outer", "nope").is_err());
        assert!(btf.offset("nothing", "x").is_err());
    }

    #[test]
    fn garbage_is_refused() {
        assert!(Btf::parse(b"not btf at all, no").is_err());
        let mut cut = sample();
        cut.truncate(40);
        assert!(Btf::parse(&cut).is_err());
    }

    #[test]
    fn this_kernel_has_the_fields_the_guard_reads() {
        // Only where the kernel publishes its BTF (every kernel with the
        // BPF LSM does).
        let Ok(btf) = Btf::from_sys_fs() else {
            return;
        };
        let off = btf.task_offsets().expect("offsets");
        assert!(off.ksigaction_size >= 24, "{off:?}");
        assert_ne!(off.tgid, off.pid);
    }

    #[test]
    fn this_kernel_has_the_fields_the_task_state_iterator_reads() {
        let Ok(btf) = Btf::from_sys_fs() else {
            return;
        };
        let off = btf.task_state_offsets().expect("offsets");
        assert_eq!(off.valid, 1);
        assert!(
            off.subreaper_bit < 32 && off.subreaper_word % 4 == 0,
            "{off:?}"
        );
        // sa_handler, sa_flags, sa_restorer, sa_mask: one word each, in order.
        assert_eq!(
            (off.sa_flags, off.sa_restorer, off.sa_mask),
            (off.sa_handler + 8, off.sa_handler + 16, off.sa_handler + 24),
            "{off:?}"
        );
        assert!(off.sa_mask + 8 <= off.ksigaction_size, "{off:?}");
        // The timer's expiry lies inside the real timer, before the interval.
        assert!(off.real_expires < off.real_incr && off.real_incr < off.cpu_itimers);
        assert_eq!(
            (off.sas_ss_size, off.sas_ss_flags),
            (off.sas_ss_sp + 8, off.sas_ss_sp + 16)
        );
    }

    #[test]
    fn this_kernel_has_the_fields_the_vma_iterator_reads() {
        let Ok(btf) = Btf::from_sys_fs() else {
            return;
        };
        let off = btf.vma_offsets().expect("offsets");
        // vm_start and vm_end are the first two words (inside an
        // anonymous union with an rcu_head since 6.x).
        assert_eq!((off.vm_start, off.vm_end), (0, 8), "{off:?}");
        assert!(off.vm_flags > 8, "{off:?}");
    }
}
