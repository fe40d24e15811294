//! The checkpoint image: one file, versioned header, 4 KiB-aligned bulk data,
//! checksummed CBOR metadata. See `format.rs` for the byte layout.

pub mod crc;
pub mod error;
pub mod format;
pub mod model;
pub mod model_fds;
pub mod model_sockets;
pub mod reader;
pub mod writer;

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;

pub use error::ImageError;
pub use format::Header;
pub use reader::{ImageReader, VerifyReport};
pub use writer::{AllocateAhead, ClosedArea, ImageWriter, MappedArea, SpareFile, WriteOptions};
