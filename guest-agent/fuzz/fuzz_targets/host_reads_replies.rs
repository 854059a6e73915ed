//! Replies as the host reads them from bytes a guest sent.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_agent::fuzz_harness::host_reads_replies(data));
