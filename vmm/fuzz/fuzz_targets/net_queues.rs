//! virtio-net: guest memory holding both queues and their buffers, and a
//! peer sending frames (and broken framing) cut from the same bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_vmm::fuzz_harness::net_queues(data));
