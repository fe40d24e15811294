//! Feeds arbitrary bytes to the image reader: parsing, verifying, reading
//! memory and printing must return errors, never panic or run out of
//! bounds.
//!
//! Run with `cargo +nightly fuzz run image_decode` from `chpox-user/`
//! (seed the corpus with a few small real images for depth).

#![no_main]

mod exercise;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    exercise::exercise(data.to_vec());
});
