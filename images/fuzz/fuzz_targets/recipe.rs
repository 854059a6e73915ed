//! Recipe text through the parser and the checker (src/image/recipe.rs).
#![no_main]

// recipe.rs belongs to the `kiln` binary crate, which has no library
// target: it is compiled here on its own, with what it takes from the rest
// of that crate at the same paths.
mod sandbox {
    pub mod tools {
        pub fn mirror() -> String {
            "http://deb.debian.org/debian".into()
        }
    }
}
#[allow(dead_code)]
#[path = "../../../src/util/size.rs"]
mod size;
mod util {
    pub(crate) use super::size;
}

#[allow(dead_code)]
#[path = "../../../src/image/recipe.rs"]
mod recipe;

libfuzzer_sys::fuzz_target!(|data: &[u8]| recipe::fuzz_check(data));
