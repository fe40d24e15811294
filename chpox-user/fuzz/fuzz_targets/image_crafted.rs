//! Images made to exhaust the reader's memory (see `craft.rs`): the bytes
//! are a recipe (which value of a real metadata to replace, with how many
//! elements of what kind under which declared length, compressed or not,
//! with which lies in the header), so every input is such an image rather
//! than whatever survives the checksums. The reader must refuse them in
//! bounded memory and time, or decode them if they are within its limits.
//!
//! `CHPOX_CRAFTED_OUT=FILE` writes the image built from the one input run
//! (how the `crafted-*` seeds were made; see the README).

#![no_main]

mod craft;
mod exercise;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = craft::image_from_recipe(data);
    if let Some(out) = std::env::var_os("CHPOX_CRAFTED_OUT") {
        std::fs::write(out, &bytes).expect("write CHPOX_CRAFTED_OUT");
    }
    exercise::exercise(bytes);
});
