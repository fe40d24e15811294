//! Descriptors of the kernel's event and notification objects (anonymous
//! inodes, no path to reopen): each file holds how its kind is read from a
//! frozen process and how it is made again in the restored one.

pub mod epoll;
pub mod eventfd;
pub mod inotify;
pub mod pidfd;
pub mod signalfd;
pub mod timerfd;
pub mod uring;
