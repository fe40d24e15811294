//! The old-style register FIFO.

use super::*;

/// The old-style register FIFO: `echo PID:SIG:FLAGS:FILE > /run/chpox/register`.
/// Root-only (mode 0600), so each line is handled as root's request.
///
/// The FIFO outlives the agent: a line written while no agent runs waits
/// in the writer (`echo` blocks) for the next agent, instead of landing in
/// a regular file nobody reads. Anything else found at its place (such a
/// regular file, from a writer before the FIFO existed) is moved aside.
pub(super) fn start_fifo(agent: Arc<Agent>, run_dir: &Path) -> anyhow::Result<()> {
    let path = run_dir.join(FIFO_NAME);
    prepare_fifo(&path)?;
    std::thread::Builder::new()
        .name("register-fifo".into())
        .spawn(move || {
            loop {
                // Blocks until a writer opens it; EOF when the writer closes.
                let file = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) => {
                        error!(error = %e, path = %path.display(), "register FIFO unusable");
                        return;
                    }
                };
                // Bytes, not lines of text: one line that is not UTF-8 is
                // rejected alone and the lines after it still count.
                let mut reader = BufReader::new(file);
                loop {
                    let bytes = match read_fifo_line(&mut reader) {
                        Ok(Some(bytes)) => bytes,
                        Ok(None) => break,
                        Err(e) => {
                            warn!(error = %e, "register line rejected");
                            continue;
                        }
                    };
                    match String::from_utf8(bytes) {
                        Ok(line) if line.trim().is_empty() => {}
                        Ok(line) => handle_register_line(&agent, &line),
                        Err(e) => warn!(
                            line = %String::from_utf8_lossy(e.as_bytes()),
                            reason = "not text",
                            "register line rejected"
                        ),
                    }
                }
            }
        })?;
    Ok(())
}

/// Make `path` our FIFO: keep one that is there (root's, 0600), move
/// anything else aside with a log line.
fn prepare_fifo(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_fifo() && meta.uid() == 0 => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| anyhow::anyhow!("cannot make {} root-only: {e}", path.display()))?;
            return Ok(());
        }
        Ok(meta) => {
            let aside =
                path.with_file_name(format!("{FIFO_NAME}.stray.{}", crate::process::unix_now()));
            std::fs::rename(path, &aside).map_err(|e| {
                anyhow::anyhow!("cannot move {} out of the way: {e}", path.display())
            })?;
            warn!(
                path = %path.display(),
                moved_to = %aside.display(),
                bytes = meta.len(),
                "something other than our FIFO was at the register FIFO's place (lines written while no agent ran?); moved aside"
            );
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("cannot look at {}: {e}", path.display()),
    }
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    Ok(())
}

pub(super) fn handle_register_line(agent: &Agent, line: &str) {
    match parse_register_line(line) {
        Err(reason) => warn!(line, reason, "register line rejected"),
        Ok(reg) => {
            let response = agent.handle(
                Caller::ROOT,
                Request::Register(RegisterRequest {
                    signal: reg.signal,
                    flags: reg.flags,
                    output: Some(reg.output),
                    ..RegisterRequest::new(reg.pid)
                }),
            );
            if let Handled::Now(Response::Error { message }) = response {
                warn!(line, reason = message, "register line rejected");
            }
        }
    }
}

/// One line of the register FIFO, without its newline; `None` at EOF. A
/// line longer than [`MAX_REQUEST_LINE`] is skipped whole and is an error:
/// no more than that is ever held.
pub(super) fn read_fifo_line(reader: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let limit = MAX_REQUEST_LINE as u64 + 1;
    if reader.take(limit).read_until(b'\n', &mut line)? == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(Some(line));
    }
    if line.len() <= MAX_REQUEST_LINE {
        return Ok(Some(line)); // the last line, without a newline
    }
    // Skip the rest of the line, a bounded piece at a time.
    loop {
        line.clear();
        let n = reader.take(limit).read_until(b'\n', &mut line)?;
        if n == 0 || line.last() == Some(&b'\n') {
            break;
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("line longer than {} KiB", MAX_REQUEST_LINE / 1024),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_fifo_line_is_skipped_and_the_next_one_read() {
        let mut data = vec![b'x'; MAX_REQUEST_LINE * 3];
        data.extend_from_slice(b"\n1:31:1:/tmp/f\n");
        let mut reader = BufReader::new(data.as_slice());
        assert!(read_fifo_line(&mut reader).is_err());
        assert_eq!(
            read_fifo_line(&mut reader).expect("next line"),
            Some(b"1:31:1:/tmp/f".to_vec())
        );
        assert_eq!(read_fifo_line(&mut reader).expect("eof"), None);
    }
}
