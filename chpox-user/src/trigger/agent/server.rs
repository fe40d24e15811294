//! The control socket: admitting connections within the caps, reading
//! request lines, answering them.

use super::*;

/// What the connection caps come to on this machine.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// All connections together.
    pub(super) total: usize,
    /// All non-root connections together: `total` less root's reserve.
    pub(super) users: usize,
    /// One non-root user's connections.
    pub(super) per_user: usize,
    pub(super) idle: Duration,
}

impl Limits {
    /// The configured caps, lowered so that connections cannot take the
    /// descriptors a dump needs (`fd_limit`: the soft RLIMIT_NOFILE).
    pub(super) fn new(config: &AgentConfig, fd_limit: u64) -> Limits {
        let budget = usize::try_from(fd_limit.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX);
        let total = config.max_connections.min(budget).max(2);
        let reserve = ROOT_RESERVE.min(total / 2);
        let users = total - reserve;
        Limits {
            total,
            users,
            per_user: config.max_connections_per_user.clamp(1, users),
            idle: config.idle_timeout,
        }
    }
}

/// Connections open now, by whom.
#[derive(Debug, Default)]
pub(super) struct Connections {
    root: usize,
    users: usize,
    by_uid: HashMap<u32, usize>,
}

/// One admitted connection; its place is given back when it is dropped.
pub(super) struct ConnectionSlot {
    agent: Arc<Agent>,
    uid: u32,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = lock(&self.agent.connections);
        if self.uid == 0 {
            c.root = c.root.saturating_sub(1);
            return;
        }
        c.users = c.users.saturating_sub(1);
        if let Some(n) = c.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.by_uid.remove(&self.uid);
            }
        }
    }
}

impl Agent {
    /// Admit a connection from `uid`, or say why not: each user other than
    /// root may hold `per_user` connections, all users together `users`,
    /// and root the rest of `total`, so no user can lock the others or
    /// root out, nor run the agent out of descriptors.
    pub(super) fn admit_connection(self: &Arc<Self>, uid: u32) -> Result<ConnectionSlot, String> {
        let limits = self.limits;
        let mut c = lock(&self.connections);
        let open = c.root + c.users;
        if open >= limits.total {
            return Err(format!(
                "chpox-agent has {open} connections open, its most; try again shortly"
            ));
        }
        if uid == 0 {
            c.root += 1;
        } else {
            let mine = c.by_uid.get(&uid).copied().unwrap_or(0);
            if mine >= limits.per_user {
                return Err(format!(
                    "uid {uid} has {mine} connections to chpox-agent open already, the most one user may; close some"
                ));
            }
            if c.users >= limits.users {
                return Err(format!(
                    "chpox-agent has {} connections of users open, its most; try again shortly",
                    c.users
                ));
            }
            c.users += 1;
            *c.by_uid.entry(uid).or_default() += 1;
        }
        Ok(ConnectionSlot {
            agent: Arc::clone(self),
            uid,
        })
    }
}

/// Serve a new connection if its user may open one more, else tell it why
/// (if its socket takes the line at once: a refused client is never waited
/// for) and close it.
pub(super) fn admit(agent: &Arc<Agent>, stream: UnixStream) {
    let caller = match stream.peer_cred() {
        Ok(c) => Caller {
            uid: c.uid(),
            pid: c.pid(),
        },
        Err(e) => {
            if let Some(held) = agent.log_limit.allow("no credentials") {
                warn!(error = %e, suppressed = held, "no credentials on control connection");
            }
            return;
        }
    };
    match agent.admit_connection(caller.uid) {
        Ok(slot) => {
            tokio::spawn(serve_client(Arc::clone(agent), stream, caller, slot));
        }
        Err(message) => {
            if let Some(held) = agent.log_limit.allow(&format!("refused {}", caller.uid)) {
                warn!(uid = caller.uid, reason = %message, suppressed = held, "connection refused");
            }
            if let Ok(mut text) = serde_json::to_string(&Response::Error { message }) {
                text.push('\n');
                let _ = stream.try_write(text.as_bytes());
            }
        }
    }
}

/// Why a request line could not be read.
#[derive(Debug)]
pub(super) enum LineError {
    /// Longer than [`MAX_REQUEST_LINE`].
    TooLong,
    Io(io::Error),
}

/// One request line, without its newline; `None` at the end of the stream.
/// At most `max` bytes are ever held: a longer line is an error as soon as
/// that many have come, whatever the client still sends.
pub(super) async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, LineError> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await.map_err(LineError::Io)?;
        if buf.is_empty() {
            // A last line without its newline still counts.
            return Ok((!line.is_empty()).then_some(line));
        }
        let (chunk, used, complete) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        if line.len() + chunk.len() > max {
            return Err(LineError::TooLong);
        }
        line.extend_from_slice(chunk);
        reader.consume(used);
        if complete {
            return Ok(Some(line));
        }
    }
}

/// Send one response line, giving up after `timeout` (a client that does
/// not read its answers does not keep the connection for ever).
pub(super) async fn reply<W: tokio::io::AsyncWrite + Unpin>(
    write: &mut W,
    response: &Response,
    timeout: Duration,
) -> io::Result<()> {
    let mut text = serde_json::to_string(response).map_err(io::Error::other)?;
    text.push('\n');
    tokio::time::timeout(timeout, write.write_all(text.as_bytes()))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

pub(super) async fn serve_client(
    agent: Arc<Agent>,
    stream: UnixStream,
    caller: Caller,
    _slot: ConnectionSlot,
) {
    let idle = agent.limits.idle;
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    loop {
        // The whole line must come within the idle time: a client sending
        // a byte now and then holds a connection no longer than a silent one.
        let line = match tokio::time::timeout(idle, read_line(&mut reader, MAX_REQUEST_LINE)).await
        {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => return,
            Ok(Err(LineError::Io(e))) => {
                debug!(uid = caller.uid, error = %e, "control connection failed");
                return;
            }
            Err(_) => {
                debug!(
                    uid = caller.uid,
                    idle_s = idle.as_secs_f64(),
                    "closing an idle connection"
                );
                return;
            }
            Ok(Err(LineError::TooLong)) => {
                if let Some(held) = agent.log_limit.allow(&format!("too long {}", caller.uid)) {
                    warn!(
                        uid = caller.uid,
                        max_bytes = MAX_REQUEST_LINE,
                        suppressed = held,
                        "request line too long; connection closed"
                    );
                }
                let message = format!(
                    "request longer than {} KiB; connection closed",
                    MAX_REQUEST_LINE / 1024
                );
                let _ = reply(&mut write, &Response::Error { message }, idle).await;
                return;
            }
        };
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => agent.serve(caller, req).await,
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
        };
        if reply(&mut write, &response, idle).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_line_is_capped() {
        let mut input: &[u8] = b"{\"op\":\"list\"}\nlast";
        assert_eq!(
            read_line(&mut input, 64).await.expect("line"),
            Some(b"{\"op\":\"list\"}".to_vec())
        );
        assert_eq!(
            read_line(&mut input, 64).await.expect("line"),
            Some(b"last".to_vec())
        );
        assert_eq!(read_line(&mut input, 64).await.expect("eof"), None);
        let long = vec![b'x'; 1000];
        let mut input: &[u8] = &long;
        assert!(matches!(
            read_line(&mut input, 64).await,
            Err(LineError::TooLong)
        ));
    }
}
