//! Parsers for the values users type: trigger signals by name or number,
//! and the FLAGS bits of old chpox.

use chpox_common::flags;

/// A trigger signal as typed: a number (`31`), a name with or without
/// `SIG` in any case (`SYS`, `SIGUSR1`, `usr2`), or a real-time signal
/// (`RTMIN+3`, `SIGRTMAX-1`).
pub fn parse_signal(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let n = if let Ok(n) = t.parse::<u32>() {
        n
    } else {
        let upper = t.to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        by_name(name).ok_or_else(|| {
            format!("{s:?} is not a signal: give a number (31) or a name (SYS, SIGUSR1, RTMIN+2)")
        })?
    };
    if !chpox_common::is_trigger_signal(n) {
        return Err(format!(
            "signal {t} cannot trigger checkpoints: it must be 1–64 and not KILL or STOP"
        ));
    }
    Ok(n)
}

fn by_name(name: &str) -> Option<u32> {
    let rt = |base: i32, rest: &str| -> Option<u32> {
        let n = if rest.is_empty() {
            base
        } else if let Some(k) = rest.strip_prefix('+') {
            base + k.parse::<i32>().ok()?
        } else if let Some(k) = rest.strip_prefix('-') {
            base - k.parse::<i32>().ok()?
        } else {
            return None;
        };
        (libc::SIGRTMIN()..=libc::SIGRTMAX())
            .contains(&n)
            .then_some(n as u32)
    };
    if let Some(rest) = name.strip_prefix("RTMIN") {
        return rt(libc::SIGRTMIN(), rest);
    }
    if let Some(rest) = name.strip_prefix("RTMAX") {
        return rt(libc::SIGRTMAX(), rest);
    }
    nix::sys::signal::Signal::iterator()
        .find(|sig| sig.as_str().strip_prefix("SIG") == Some(name))
        .map(|sig| sig as i32 as u32)
}

/// What each FLAGS bit means, for errors and `--help`.
pub const FLAG_BITS: &[(u32, &str)] = &[
    (flags::REGISTERED, "registered (plain)"),
    (flags::EMBED_EXE, "embed the executable"),
    (
        flags::EMBED_LIBS,
        "embed the libraries added with `chpoxctl addlib`",
    ),
    (flags::INCLUDE_CHILDREN, "include the descendants"),
    (
        flags::TCP_ESTABLISHED,
        "keep established TCP connections (`--tcp-established`)",
    ),
    (
        flags::TCP_CLOSE,
        "restore established TCP connections reset (`--tcp-close`)",
    ),
];

/// FLAGS as typed (decimal, or hex with `0x`): only the bits chpox knows.
pub fn parse_flags(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let n = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse::<u32>(),
    }
    .map_err(|_| format!("FLAGS {s:?} is not a number; {}", valid_bits()))?;
    if n & !flags::KNOWN != 0 {
        return Err(format!(
            "FLAGS {n} has bits chpox does not know ({:#x}); {}",
            n & !flags::KNOWN,
            valid_bits()
        ));
    }
    Ok(n)
}

fn valid_bits() -> String {
    let bits: Vec<String> = FLAG_BITS
        .iter()
        .map(|(bit, what)| format!("{bit} = {what}"))
        .collect();
    format!("valid bits, added up: {}", bits.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("31"), Ok(31));
        assert_eq!(parse_signal("SYS"), Ok(libc::SIGSYS as u32));
        assert_eq!(parse_signal("SIGSYS"), Ok(libc::SIGSYS as u32));
        assert_eq!(parse_signal("sigusr1"), Ok(libc::SIGUSR1 as u32));
        assert_eq!(parse_signal("Usr2"), Ok(libc::SIGUSR2 as u32));
        assert_eq!(parse_signal("RTMIN"), Ok(libc::SIGRTMIN() as u32));
        assert_eq!(parse_signal("SIGRTMIN+2"), Ok(libc::SIGRTMIN() as u32 + 2));
        assert_eq!(parse_signal("RTMAX-1"), Ok(libc::SIGRTMAX() as u32 - 1));
        for bad in ["KILL", "SIGSTOP", "9", "0", "65", "NOPE", "RTMAX+1", ""] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_reject_unknown_bits_listing_the_valid_ones() {
        assert_eq!(parse_flags("9"), Ok(9));
        assert_eq!(parse_flags("0xf"), Ok(15));
        assert_eq!(parse_flags("25"), Ok(25));
        let e = parse_flags("64").expect_err("64");
        assert!(
            e.contains("1 = registered") && e.contains("32 = restore established TCP"),
            "{e}"
        );
        assert!(parse_flags("x").is_err());
    }
}
