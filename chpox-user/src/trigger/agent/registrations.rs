//! Registrations: who is registered, with what, and their checkpoints' owner;
//! taken back after a restart.

use super::*;

/// `name` (a process's `comm`, a program's name: anything a process or a
/// user controls) as one safe file-name component for a path the agent
/// builds: ASCII letters, digits and `+ - . _` only (anything else, `/`
/// first of all, becomes `_`), no leading dot (so neither `.`, `..` nor a
/// hidden file), at most 64 bytes, never empty.
pub(super) fn safe_file_name(name: &str) -> String {
    let mapped: String = name
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match mapped.trim_start_matches('.') {
        "" => "process".to_string(),
        rest => rest.to_string(),
    }
}

impl Agent {
    pub(super) fn check_owner(caller: Caller, pid: i32) -> Result<u32, String> {
        let uid = crate::process::owner(pid)
            .map_err(|_| format!("no process with PID {pid}"))?
            .0;
        if caller.uid != 0 && caller.uid != uid {
            return Err(format!(
                "permission denied: PID {pid} belongs to uid {uid}; only root or its owner may register it"
            ));
        }
        Ok(uid)
    }

    /// The identity of a caller for file access: its process's groups too.
    pub(super) fn caller_creds(caller: Caller) -> UserCreds {
        caller
            .pid
            .and_then(|pid| UserCreds::of_process(pid).ok())
            .filter(|c| c.uid == caller.uid)
            .unwrap_or(UserCreds {
                uid: caller.uid,
                gid: caller.uid,
                groups: Vec::new(),
            })
    }

    /// Where a user's images go by default: a directory of their own.
    pub(super) fn default_image_dir(&self, creds: &UserCreds) -> Result<PathBuf, String> {
        if creds.is_root() {
            return Ok(self.config.image_dir.clone());
        }
        let dir = self.config.image_dir.join(creds.uid.to_string());
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .and_then(|()| std::os::unix::fs::chown(&dir, Some(creds.uid), Some(creds.gid)))
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        Ok(dir)
    }

    /// Check, with the user's own rights, that they may create files where
    /// their images are to go.
    pub(super) fn check_writable(creds: &UserCreds, output: &Path) -> Result<(), String> {
        if output.is_dir() {
            return Err(format!(
                "output {} is a directory; name the image file inside it",
                output.display()
            ));
        }
        let dir = output.parent().unwrap_or(Path::new("/"));
        let probe = dir.join(format!(".chpox-probe.{}", std::process::id()));
        crate::creds::as_user(creds, || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
                .and_then(|_| std::fs::remove_file(&probe))
        })
        .and_then(|r| r)
        .map_err(|e| {
            format!(
                "uid {} may not write images to {}: {e}; choose a directory you can write with -o",
                creds.uid,
                dir.display()
            )
        })
    }

    pub(super) fn register(
        &self,
        caller: Caller,
        req: RegisterRequest,
    ) -> Result<Response, String> {
        let RegisterRequest {
            pid,
            signal,
            flags,
            output,
            force,
            self_ignored,
            name,
            every_ms,
            keep,
            unsupported_fd_null,
            full_every,
        } = req;
        let every_ms = match every_ms {
            Some(ms) if Duration::from_millis(ms) < MIN_INTERVAL => {
                return Err(format!(
                    "--every {} is too short; the shortest interval is {}",
                    format_duration(Duration::from_millis(ms)),
                    format_duration(MIN_INTERVAL)
                ));
            }
            Some(ms) => Some(ms),
            None => self
                .config
                .default_interval
                .map(|d| d.as_millis().try_into().unwrap_or(u64::MAX)),
        };
        if keep.is_some_and(|k| k > MAX_KEEP) {
            return Err(format!(
                "--keep {} is too many; at most {MAX_KEEP}",
                keep.unwrap_or_default()
            ));
        }
        if !chpox_common::is_trigger_signal(signal) {
            return Err(format!(
                "signal {signal} cannot trigger checkpoints (1–64, not KILL or STOP)"
            ));
        }
        if flags & !flags::KNOWN != 0 {
            return Err(format!("unknown FLAGS bits in {flags}"));
        }
        crate::process::check_dumpable(pid).map_err(|e| e.to_string())?;
        let uid = Self::check_owner(caller, pid)?;
        let as_owner = caller.uid != 0;
        let owner_creds = if as_owner {
            Self::caller_creds(caller)
        } else {
            UserCreds {
                uid: 0,
                gid: 0,
                groups: Vec::new(),
            }
        };
        // A checkpoint hands the user what tracing the process would: only
        // a process the kernel would let them trace (a setuid program, or
        // one that dropped privileges and is not dumpable, is not). Checked
        // again at every checkpoint, while the process is frozen.
        crate::creds::may_checkpoint(pid, &owner_creds).map_err(|e| e.to_string())?;
        if self.lock().entries.contains_key(&pid) {
            return Err(format!(
                "PID {pid} is registered already; `chpox unregister {pid}` first to change it"
            ));
        }
        let start = start_time(pid).ok_or_else(|| format!("no process with PID {pid}"))?;
        // `chpox run` registers before exec: it names the program to come.
        let comm = name
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .unwrap_or_else(|| crate::process::thread_comm(pid, pid).unwrap_or_default());
        let output = match output {
            Some(p) if p.is_absolute() => p,
            Some(p) => return Err(format!("output {} must be an absolute path", p.display())),
            // The name is the process's to choose ("../../etc/x"): only a
            // safe file name of it goes into a path.
            None => self
                .default_image_dir(&owner_creds)?
                .join(format!("{}-{pid}.chpox", safe_file_name(&comm))),
        };
        // Root's too: a directory that does not exist is better said now
        // than at the first checkpoint.
        Self::check_writable(&owner_creds, &output)?;
        let signo = signal as i32;

        // Make the trigger harmless: SIG_IGN drops it at generation, after
        // the tracepoint has seen it.
        let previous_action = match signals::disposition(pid, signo).map_err(|e| e.to_string())? {
            Disposition::Ignored => None,
            _ if self_ignored => {
                return Err(format!(
                    "PID {pid} was to ignore signal {signal} itself but does not"
                ));
            }
            Disposition::Handled if !force => {
                return Err(format!(
                    "PID {pid} handles signal {signal} itself; register it with another --signal, or --force to take the signal over"
                ));
            }
            _ => Some(
                signals::set_action(pid, signals::ignore(signo)).map_err(|e| {
                    format!("cannot make signal {signal} harmless in PID {pid}: {e}")
                })?,
            ),
        };

        let mut state = self.lock();
        // Registered meanwhile by a concurrent request, which owns the
        // disposition now.
        if state.entries.contains_key(&pid) {
            return Err(format!("PID {pid} is registered already"));
        }
        let Some(slot) = state.free_slots.pop() else {
            drop(state);
            self.put_back(pid, previous_action);
            return Err(format!(
                "{MAX_REGISTRATIONS} processes are registered already"
            ));
        };
        let reg = Registration {
            signal,
            flags,
            slot,
            _pad: 0,
            start_time: start,
        };
        if let Err(e) = state.bpf.register(pid as u32, reg) {
            state.free_slots.push(slot);
            drop(state);
            self.put_back(pid, previous_action);
            return Err(e.to_string());
        }
        state.entries.insert(
            pid,
            Entry {
                pid,
                start_time: start,
                uid,
                comm: comm.clone(),
                signal,
                flags,
                output: output.clone(),
                previous_action,
                as_owner,
                gid: Some(owner_creds.gid),
                groups: owner_creds.groups.clone(),
                slot,
                checkpoints: 0,
                started: 0,
                last_checkpoint: None,
                last_error: None,
                children_not_saved: Vec::new(),
                warned_children: false,
                every_ms,
                keep,
                full_every,
                unsupported_fd_null,
                next_due: every_ms.map(|ms| Instant::now() + Duration::from_millis(ms)),
                timer_again: false,
                timer_ticks: 0,
                timer_checkpoints: 0,
                logged_error: None,
            },
        );
        drop(state);
        // The process may have exited between our checks and the insert; the
        // exit tracepoint would then have found nothing to remove. (Read
        // after the lock is released; only "no such process" counts.)
        let gone = matches!(liveness(pid, start), Liveness::Gone);
        let mut state = self.lock();
        if gone
            && state
                .entries
                .get(&pid)
                .is_some_and(|e| e.start_time == start)
        {
            state.release(pid, "the process exited", true);
            return Err(format!("PID {pid} exited while being registered"));
        }
        let snapshot = self.snapshot(&mut state);
        drop(state);
        self.write_snapshot(snapshot);
        self.timer_changed.notify_one();
        // Its mappings' flag patterns, so that its first freeze need not
        // walk smaps.
        self.learn_flags_soon(vec![pid]);
        if let Some(held) = self.log_registration(caller) {
            info!(pid, comm, uid, signal, flags, output = %output.display(), every = every_ms.map(|ms| format_duration(Duration::from_millis(ms))), unsupported_fd_null, suppressed = held, "registered");
        }
        Ok(Response::Registered {
            pid,
            signal,
            output,
        })
    }

    /// Whether to log a (un)registration by `caller`: always for root,
    /// rate-limited per user.
    pub(super) fn log_registration(&self, caller: Caller) -> Option<u64> {
        if caller.uid == 0 {
            return Some(0);
        }
        self.log_limit.allow_burst(
            &format!("registrations {}", caller.uid),
            REGISTRATION_LOG_BURST,
        )
    }

    /// Restore a disposition we changed, best effort.
    pub(super) fn put_back(&self, pid: i32, previous: Option<SigAction>) {
        if let Some(action) = previous
            && let Err(e) = signals::set_action(pid, action)
        {
            warn!(pid, error = %e, "could not restore the signal disposition");
        }
    }

    pub(super) fn unregister(&self, caller: Caller, pid: i32) -> Result<Response, String> {
        let entry = {
            let mut state = self.lock();
            let Some(entry) = state.entries.get(&pid) else {
                return Err(format!("PID {pid} is not registered"));
            };
            if caller.uid != 0 && caller.uid != entry.uid {
                return Err(format!(
                    "permission denied: PID {pid} belongs to uid {}",
                    entry.uid
                ));
            }
            let entry = state
                .release(pid, "the process was unregistered", true)
                .ok_or("vanished")?;
            let snapshot = self.snapshot(&mut state);
            drop(state);
            self.write_snapshot(snapshot);
            entry
        };
        if start_time(pid) == Some(entry.start_time) {
            self.put_back(pid, entry.previous_action);
        }
        if let Some(held) = self.log_registration(caller) {
            info!(pid, uid = caller.uid, suppressed = held, "unregistered");
        }
        Ok(Response::Ok)
    }

    pub(super) fn list(&self, caller: Caller) -> Response {
        let state = self.lock();
        let mut entries: Vec<ListEntry> = state
            .entries
            .values()
            .filter(|e| caller.uid == 0 || caller.uid == e.uid)
            .map(|e| {
                let slot = self.states.load(e.slot);
                ListEntry {
                    pid: e.pid,
                    comm: e.comm.clone(),
                    uid: e.uid,
                    signal: e.signal,
                    flags: e.flags,
                    output: e.output.clone(),
                    checkpoints: e.checkpoints,
                    last_checkpoint: e.last_checkpoint,
                    state: state_name(slot.state).to_string(),
                    signals: slot.signals,
                    coalesced: slot.coalesced,
                    last_error: e.last_error.clone(),
                    children_not_saved: e.children_not_saved.clone(),
                    every_ms: e.every_ms,
                    next_due_ms: e.next_due.map(|due| {
                        let left = due.saturating_duration_since(Instant::now());
                        unix_now_ms() + u64::try_from(left.as_millis()).unwrap_or(u64::MAX)
                    }),
                    keep: e.keep.unwrap_or(self.config.keep),
                    unsupported_fd_null: e.unsupported_fd_null,
                    timer_ticks: e.timer_ticks,
                    timer_checkpoints: e.timer_checkpoints,
                }
            })
            .collect();
        drop(state);
        // The name changes on exec (`chpox run` registers first); read
        // without the lock.
        for e in &mut entries {
            if let Ok(comm) = crate::process::thread_comm(e.pid, e.pid) {
                e.comm = comm;
            }
        }
        entries.sort_by_key(|e| e.pid);
        Response::List { entries }
    }

    /// Take back the registrations a previous agent saved.
    pub(super) fn restore_registrations(&self) {
        let path = self.config.run_dir.join(STATE_NAME);
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        let saved: Vec<Entry> = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, path = %path.display(), "ignoring unreadable saved registrations");
                return;
            }
        };
        let mut kept = Vec::new();
        for mut entry in saved {
            let alive = match liveness(entry.pid, entry.start_time) {
                Liveness::Same => true,
                Liveness::Gone => false,
                Liveness::Unknown(e) => {
                    warn!(pid = entry.pid, error = %e, "cannot tell whether a saved registration's process still runs; keeping it");
                    true
                }
            };
            let mut ignored = signals::disposition(entry.pid, entry.signal as i32)
                .is_ok_and(|d| d == Disposition::Ignored);
            // Set back to the default while no agent ran (as a watched
            // process would have been at once): ignored again.
            if alive
                && !ignored
                && signals::disposition(entry.pid, entry.signal as i32)
                    .is_ok_and(|d| d == Disposition::Default)
            {
                match signals::set_action(entry.pid, signals::ignore(entry.signal as i32)) {
                    Ok(old) => {
                        info!(pid = entry.pid, comm = %entry.comm, "the process set its trigger signal back to the default while no agent ran; ignored again");
                        entry.previous_action = Some(old);
                        ignored = true;
                    }
                    Err(e) => {
                        warn!(pid = entry.pid, error = %e, "cannot ignore the trigger signal again")
                    }
                }
            }
            if !alive || !ignored {
                warn!(pid = entry.pid, comm = %entry.comm, "registration lost: the process is gone or no longer ignores its signal");
                continue;
            }
            kept.push(entry);
        }
        let mut state = self.lock();
        for mut entry in kept {
            let Some(slot) = state.free_slots.pop() else {
                break;
            };
            entry.slot = slot;
            entry.next_due = entry
                .every_ms
                .map(|ms| Instant::now() + Duration::from_millis(ms));
            let reg = Registration {
                signal: entry.signal,
                flags: entry.flags,
                slot,
                _pad: 0,
                start_time: entry.start_time,
            };
            if let Err(e) = state.bpf.register(entry.pid as u32, reg) {
                warn!(pid = entry.pid, error = %e, "registration lost");
                state.free_slots.push(slot);
                continue;
            }
            info!(pid = entry.pid, comm = %entry.comm, "registration taken back after restart");
            state.entries.insert(entry.pid, entry);
        }
        // Saved again even if unchanged: the file gets mode 0600 if an
        // older agent left it readable by all.
        let snapshot = self.snapshot(&mut state);
        drop(state);
        self.write_snapshot(snapshot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_names_become_safe_file_names() {
        assert_eq!(safe_file_name("mempattern"), "mempattern");
        assert_eq!(safe_file_name("../../../etc/pw"), "_.._.._etc_pw");
        assert_eq!(safe_file_name(".."), "process");
        assert_eq!(safe_file_name(""), "process");
        assert_eq!(safe_file_name(".hidden"), "hidden");
        assert_eq!(safe_file_name("a b\n\u{1b}[0m"), "a_b___0m");
        assert_eq!(safe_file_name(&"x".repeat(300)).len(), 64);
        for name in ["../x", "/etc/passwd", "..", ".", "a/../../b"] {
            let safe = safe_file_name(name);
            assert!(
                !safe.contains('/') && !safe.starts_with('.'),
                "{name:?} -> {safe:?}"
            );
        }
    }
}
