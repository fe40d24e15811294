//! Sockets, one file per family as for every other kind:
//!
//! - [`unix`]: UNIX sockets, dumped there and restored in
//!   [`unix_restore`]; [`unix_pair`] restores the pairs of images of
//!   earlier versions; [`scm_rights`]: descriptors in flight in a queue;
//! - [`inet`]: TCP and UDP; established TCP connections through
//!   [`tcp_repair`];
//! - [`sock_diag`]: what both families share (the kernel's socket
//!   diagnostics, options, addresses), and [`unix_diag`], what the
//!   diagnostics say of UNIX sockets; [`tables`]: both asked for once,
//!   when a dump meets a socket.

pub mod inet;
pub mod scm_rights;
pub mod sock_diag;
pub mod tables;
pub mod tcp_repair;
pub mod unix;
pub mod unix_diag;
pub mod unix_pair;
pub mod unix_restore;
