//! virtio-rng: fills the guest's buffers from the host's random source.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{Queue, Writer};

use super::{
    single_queue, ActivateError, DeviceState, IrqLine, Served, VirtioDevice, VIRTIO_F_VERSION_1,
};

pub const QUEUE_SIZE: u16 = 64;
/// At most this much entropy per request, so one request cannot keep the
/// device busy.
const MAX_REQUEST: usize = 64 * 1024;

pub struct Rng {
    source: File,
    state: DeviceState,
}

impl Rng {
    /// A device reading from `source` (normally /dev/urandom).
    pub fn new(source: File) -> Rng {
        Rng {
            source,
            state: DeviceState::Inactive,
        }
    }

    /// Serves every available request; returns how many.
    pub fn process_queue(&mut self) -> usize {
        let Some(active) = self.state.active_mut() else {
            return 0;
        };
        let source = &mut self.source;
        let done = active.serve(0, |mem, chain| {
            let Ok(mut w) = Writer::new(mem, chain) else {
                return Served::more(0);
            };
            let n = w.available_bytes().min(MAX_REQUEST);
            let mut buf = vec![0u8; n];
            Served::more(match source.read_exact(&mut buf) {
                Ok(()) => std::io::Write::write_all(&mut w, &buf).map_or(0, |()| n as u32),
                Err(_) => 0,
            })
        });
        active.signal_used();
        done
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<IrqLine>,
    ) -> Result<(), ActivateError> {
        let queue = single_queue(&mem, queues)?;
        self.state = DeviceState::activated(mem, vec![queue], irq);
        Ok(())
    }

    fn queue_notify(&mut self, index: u32) {
        if index == 0 {
            self.process_queue();
        }
    }

    fn reset(&mut self) {
        self.state = DeviceState::Inactive;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{add_chain, memory};
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_writable_buffers_and_skips_bad_ones() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut rng = Rng::new(File::open("/dev/urandom").expect("urandom"));
        let irq = Arc::new(IrqLine::new().expect("irq"));
        rng.activate(
            mem.clone(),
            vec![vq.create_queue().expect("queue")],
            irq.clone(),
        )
        .expect("activate");
        add_chain(&vq, 0, &[(0x10_0000, 64, true), (0x10_1000, 64, true)]);
        assert_eq!(rng.process_queue(), 1);
        let used = vq.used().ring().ref_at(0).expect("used").load();
        assert_eq!(used.len(), 128);
        let mut a = [0u8; 64];
        mem.read_slice(&mut a, GuestAddress(0x10_0000))
            .expect("read");
        assert!(a.iter().any(|&b| b != 0), "no entropy written");
        // A device-readable buffer gets nothing; one outside memory neither.
        add_chain(&vq, 2, &[(0x10_2000, 64, false)]);
        add_chain(&vq, 3, &[(0xFFFF_FFFF_F000, 64, true)]);
        assert_eq!(rng.process_queue(), 2);
        assert_eq!(vq.used().ring().ref_at(1).expect("used").load().len(), 0);
        assert_eq!(vq.used().ring().ref_at(2).expect("used").load().len(), 0);
        assert_ne!(irq.status() & VIRTIO_MMIO_INT_VRING, 0);
    }
}
