//! Requests as the agent reads them from bytes a host sent.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_agent::fuzz_harness::agent_reads_requests(data));
