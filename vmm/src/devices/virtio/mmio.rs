//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2), shared by
//! every device.
//!
//! The driver's register accesses arrive here as (offset, bytes). Queue
//! configuration is kept in `Queue` objects until the driver sets
//! DRIVER_OK; then the device gets them. Accesses the spec does not allow
//! in the current state are ignored (reads give zero), so a confused or
//! hostile driver can only confuse itself.

use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};

use super::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};

/// MagicValue: "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4e4c_494b; // "KILN"
/// Where device configuration space starts in the window.
const CONFIG: u64 = VIRTIO_MMIO_CONFIG as u64;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqLine>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: Arc<IrqLine>) -> Self {
        let queues = Self::fresh_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may be written only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            self.device.read_config(offset - CONFIG, data);
            return;
        }
        // Below CONFIG, so the offset fits.
        let value = match u32::try_from(offset) {
            Ok(offset) if data.len() == 4 && offset % 4 == 0 => self.read_reg(offset),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.irq.status(),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            if self.status & VIRTIO_CONFIG_S_DRIVER != 0 {
                self.device.write_config(offset - CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let Ok(offset) = u32::try_from(offset) else {
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                // Features are negotiated after DRIVER and before FEATURES_OK.
                if self.status & VIRTIO_CONFIG_S_DRIVER == 0
                    || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
                {
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if self.queue_config_allowed() => {
                if let Some(q) = self.selected_queue() {
                    // Queue refuses sizes that are not a power of two or
                    // exceed the maximum, keeping the old size.
                    q.set_size(v as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if self.queue_config_allowed() => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                if !self.queue_config_allowed() {
                    return;
                }
                let Some(q) = self.selected_queue() else {
                    return;
                };
                // Addresses may change only while the queue is not ready.
                if q.ready() {
                    return;
                }
                let (low, high) = if offset % 8 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                match offset {
                    VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                        q.set_desc_table_address(low, high)
                    }
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                        q.set_avail_ring_address(low, high)
                    }
                    _ => q.set_used_ring_address(low, high),
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify_queue(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.irq.ack(v),
            VIRTIO_MMIO_STATUS => self.write_status(v),
            _ => {}
        }
    }

    /// The driver notified queue `index`, through the QueueNotify register
    /// or its ioeventfd. Ignored unless the device is running.
    pub fn notify_queue(&mut self, index: u32) {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
        {
            self.device.queue_notify(index);
        }
    }

    /// How many queues the device has (each gets an ioeventfd).
    pub fn queue_count(&self) -> usize {
        self.device.queue_max_sizes().len()
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only adds bits (or writes 0 to reset); anything else
        // is a driver bug, ignored.
        if v & self.status != self.status {
            return;
        }
        let new = v & !self.status;
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // Leave FEATURES_OK clear: the driver reads it back and fails.
                self.status = v & !VIRTIO_CONFIG_S_FEATURES_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if v & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                return;
            }
            self.status = v;
            // The device gets its own copies; the transport's stay for
            // register reads.
            let queues: Result<Vec<Queue>, _> = self
                .queues
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect();
            let Ok(queues) = queues else {
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                let _ = self.irq.trigger(VIRTIO_MMIO_INT_CONFIG);
                return;
            };
            if self
                .device
                .activate(self.mem.clone(), queues, self.irq.clone())
                .is_err()
            {
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                let _ = self.irq.trigger(VIRTIO_MMIO_INT_CONFIG);
            }
            return;
        }
        self.status = v;
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.irq.ack(u32::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::Block;
    use crate::devices::virtio::test_utils::{add_chain, blk_header, memory, DATA, HDR, STATUS};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn rd(t: &mut MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }

    fn transport(mem: &GuestMemoryMmap) -> (MmioTransport, tempfile::NamedTempFile) {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        file.as_file().set_len(4096).expect("size");
        let disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(file.path())
            .expect("open");
        let block = Block::new(disk, false, "kiln0").expect("block");
        let irq = Arc::new(IrqLine::new().expect("irq"));
        (MmioTransport::new(Box::new(block), mem.clone(), irq), file)
    }

    /// The driver side of initialization up to FEATURES_OK.
    fn negotiate(t: &mut MmioTransport) {
        wr(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        wr(
            t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        wr(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = rd(t, VIRTIO_MMIO_DEVICE_FEATURES);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, hi);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        wr(
            t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, vq: &MockSplitQueue<GuestMemoryMmap>, size: u32) {
        wr(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(t, VIRTIO_MMIO_QUEUE_NUM, size);
        for (lo, hi, addr) in [
            (
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                vq.desc_table_addr(),
            ),
            (
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                vq.avail_addr(),
            ),
            (
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
                vq.used_addr(),
            ),
        ] {
            wr(t, lo, addr.0 as u32);
            wr(t, hi, (addr.0 >> 32) as u32);
        }
        wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    const RUNNING: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK;

    #[test]
    fn identifies_itself() {
        let mem = memory();
        let (mut t, _f) = transport(&mem);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VENDOR_ID), VENDOR);
        wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES) & 1,
            1,
            "VERSION_1 offered"
        );
        wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        // Capacity through the config window, byte by byte too.
        let mut cap = [0u8; 8];
        t.read(CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut one = [0u8; 1];
        t.read(CONFIG, &mut one);
        assert_eq!(one[0], 8);
    }

    #[test]
    fn a_driver_sets_up_a_queue_and_reads_a_sector() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut t, file) = transport(&mem);
        std::fs::write(file.path(), vec![0x5A; 4096]).expect("fill disk");
        negotiate(&mut t);
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_FEATURES_OK
        );
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        setup_queue(&mut t, &vq, 16);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, RUNNING);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), RUNNING);

        blk_header(&mem, VIRTIO_BLK_T_IN, 3);
        add_chain(
            &vq,
            0,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let used = vq.used().ring().ref_at(0).expect("used").load();
        assert_eq!(used.len(), 513);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"),
            VIRTIO_BLK_S_OK as u8
        );
        let mut sector = [0u8; 512];
        mem.read_slice(&mut sector, GuestAddress(DATA))
            .expect("data");
        assert!(sector.iter().all(|&b| b == 0x5A));
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn features_must_include_version_1_and_only_offered_bits() {
        let mem = memory();
        let (mut t, _f) = transport(&mem);
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        // Legacy driver: no VERSION_1.
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );

        let (mut t, _f) = transport(&mem);
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 | 1 << 20); // VERSION_1 + a bit never offered
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
    }

    #[test]
    fn queue_registers_are_ignored_outside_their_window() {
        let mem = memory();
        let (mut t, _f) = transport(&mem);
        // Before FEATURES_OK.
        wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        // A queue that does not exist.
        negotiate(&mut t);
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 5);
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        // Unaligned and short accesses.
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        t.write(u64::from(VIRTIO_MMIO_QUEUE_READY) + 1, &[1, 0, 0, 0]);
        t.write(u64::from(VIRTIO_MMIO_QUEUE_READY), &[1]);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        let mut two = [0xFFu8; 2];
        t.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut two);
        assert_eq!(two, [0, 0]);
    }

    #[test]
    fn an_invalid_queue_needs_reset_instead_of_running() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut t, _f) = transport(&mem);
        negotiate(&mut t);
        setup_queue(&mut t, &vq, 16);
        // Move the descriptor table outside guest memory.
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0xF000_0000);
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, RUNNING);
        assert_ne!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        // Notifications are ignored in that state.
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        // Reset brings it back.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
        negotiate(&mut t);
        setup_queue(&mut t, &vq, 16);
        wr(&mut t, VIRTIO_MMIO_STATUS, RUNNING);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), RUNNING);
    }

    #[test]
    fn status_bits_only_grow_until_reset() {
        let mem = memory();
        let (mut t, _f) = transport(&mem);
        negotiate(&mut t);
        let before = rd(&mut t, VIRTIO_MMIO_STATUS);
        wr(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), before);
        // DRIVER_OK without FEATURES_OK is refused.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK,
            0
        );
        // Reset clears negotiated features: FEATURES_OK needs them again.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
    }

    #[test]
    fn a_looping_descriptor_chain_does_not_hang_the_device() {
        use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let (mut t, _f) = transport(&mem);
        negotiate(&mut t);
        setup_queue(&mut t, &vq, 16);
        wr(&mut t, VIRTIO_MMIO_STATUS, RUNNING);
        blk_header(&mem, VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 0 -> ...
        let next = VRING_DESC_F_NEXT as u16;
        vq.desc_table()
            .store(
                0,
                RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
            )
            .expect("desc 0");
        vq.desc_table()
            .store(
                1,
                RawDescriptor::from(SplitDescriptor::new(DATA, 512, next, 0)),
            )
            .expect("desc 1");
        vq.avail()
            .ring()
            .ref_at(0)
            .expect("avail")
            .store(0u16.to_le());
        vq.avail().idx().store(1u16.to_le());
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(vq.used().idx().load(), 1, "the bad chain was not returned");
        assert_eq!(vq.used().ring().ref_at(0).expect("used").load().len(), 0);
    }
}
