//! Generated requests and replies, framed into one stream and read back.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_agent::fuzz_harness::round_trip(data));
