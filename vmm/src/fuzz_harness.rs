//! Entry points for the fuzz targets in `vmm/fuzz` (cargo fuzz), kept in
//! the crate so the unit tests below run the same code on stable Rust with
//! generated inputs. Each takes arbitrary bytes as a guest would present
//! them and must never panic or hang.

use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::{IrqLine, VirtioDevice};
use crate::vstate::memory;

const MEM_SIZE: usize = 0x10000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;

fn setup(data: &[u8]) -> Option<(GuestMemoryMmap, Block, Arc<IrqLine>)> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).ok()?;
    let disk = memory::memfd("kiln-fuzz-disk", 64 * 1024).ok()?;
    let readonly = data.first().is_some_and(|b| b & 1 == 1);
    let block = Block::new(disk, readonly, "fuzz").ok()?;
    let irq = Arc::new(IrqLine::new().ok()?);
    Some((mem, block, irq))
}

/// The input is guest memory holding a 16-entry queue (descriptor table,
/// available ring, used ring) and whatever buffers it points at.
pub fn block_queue(data: &[u8]) {
    let Some((mem, mut block, irq)) = setup(data) else {
        return;
    };
    let Ok(mut q) = Queue::new(16) else {
        return;
    };
    q.set_size(16);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    if block.activate(mem, vec![q], irq).is_ok() {
        block.process_queue();
    }
}

/// A 16-entry queue whose descriptor table, available and used rings
/// start at `base`.
fn queue_at(base: u64) -> Option<Queue> {
    let mut q = Queue::new(16).ok()?;
    q.set_size(16);
    q.set_desc_table_address(Some((base + DESC) as u32), Some(0));
    q.set_avail_ring_address(Some((base + AVAIL) as u32), Some(0));
    q.set_used_ring_address(Some((base + USED) as u32), Some(0));
    q.set_ready(true);
    Some(q)
}

/// The input is guest memory holding virtio-net's rx queue (as
/// [`block_queue`]'s) and its tx queue 0x400 further, and the buffers they
/// point at; the same bytes, cut into frames by their first byte, are what
/// the peer sends, with a raw tail that may break the framing.
pub fn net_queues(data: &[u8]) {
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let n = data.len().min(MEM_SIZE);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let Ok((ours, peer)) = std::os::unix::net::UnixStream::pair() else {
        return;
    };
    let (Ok(mut net), Ok(irq)) = (Net::new(ours, [0x52, 0x54, 0, 0, 0, 1]), IrqLine::new()) else {
        return;
    };
    let (Some(rx), Some(tx)) = (queue_at(0), queue_at(0x400)) else {
        return;
    };
    net.ack_features(
        data.first()
            .map_or(0, |&b| u64::from(b) << 32 | 0xffff_ffff),
    );
    if net.activate(mem, vec![rx, tx], Arc::new(irq)).is_err() {
        return;
    }
    if peer.set_nonblocking(true).is_err() {
        return;
    }
    let mut wire = Vec::new();
    for chunk in data.chunks(1 + usize::from(data.first().copied().unwrap_or(0))) {
        wire.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        wire.extend_from_slice(chunk);
    }
    wire.extend_from_slice(data.get(..data.len().min(8)).unwrap_or_default());
    let mut sent = 0;
    for round in 0..4 {
        sent += std::io::Write::write(&mut &peer, &wire[sent..]).unwrap_or(0);
        net.host_ready();
        net.queue_notify(round % 2);
        let mut sink = [0u8; 4096];
        while matches!(std::io::Read::read(&mut &peer, &mut sink), Ok(1..)) {}
    }
}

/// The input is a sequence of register accesses (7 bytes each: kind,
/// offset, width, value) against a virtio-blk device's mmio window; guest
/// memory starts as the same bytes.
pub fn mmio_registers(data: &[u8]) {
    let Some((mem, block, irq)) = setup(data) else {
        return;
    };
    let mut t = MmioTransport::new(Box::new(block), mem, irq);
    for op in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) % 0x200);
        let width = [1usize, 2, 4, 8][usize::from(op[3] & 3)];
        let value = u32::from_le_bytes([op[4], op[5], op[6], op[0]]);
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&value.to_le_bytes());
        if op[0] & 0x80 == 0 {
            t.write(offset, &buf[..width]);
        } else {
            t.read(offset, &mut buf[..width]);
        }
    }
}

#[cfg(test)]
mod tests {
    /// A few thousand generated inputs through each harness, so the
    /// harnesses themselves stay working between fuzzing runs.
    fn inputs(seed: u64) -> impl Iterator<Item = Vec<u8>> {
        let mut x = seed;
        (0..3000usize).map(move |i| {
            let len = (i * 37) % 9000;
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Mostly small values, so addresses and lengths land
                    // inside guest memory often enough to matter.
                    if x % 3 == 0 {
                        (x >> 8) as u8 & 0x1f
                    } else {
                        (x >> 16) as u8
                    }
                })
                .collect()
        })
    }

    #[test]
    fn block_queue_survives_generated_input() {
        for data in inputs(0x1234_5678_9abc_def1) {
            super::block_queue(&data);
        }
    }

    #[test]
    fn net_queues_survive_generated_input() {
        for data in inputs(0x5a5a_1234_a5a5_4321) {
            super::net_queues(&data);
        }
    }

    #[test]
    fn mmio_registers_survive_generated_input() {
        for data in inputs(0x0fed_cba9_8765_4321) {
            super::mmio_registers(&data);
        }
    }
}
