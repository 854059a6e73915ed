//! Recipe text through the parser and the checker (src/recipe.rs).
#![no_main]

// recipe.rs belongs to the `kiln` binary crate, which has no library
// target: it is compiled here on its own, with the one function it takes
// from the rest of that crate.
mod tools {
    pub fn mirror() -> String {
        "http://deb.debian.org/debian".into()
    }
}

#[allow(dead_code)]
#[path = "../../../src/recipe.rs"]
mod recipe;

libfuzzer_sys::fuzz_target!(|data: &[u8]| recipe::fuzz_check(data));
