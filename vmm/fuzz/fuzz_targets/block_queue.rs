//! virtio-blk request parsing: guest memory holding a queue and its buffers.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_vmm::fuzz_harness::block_queue(data));
