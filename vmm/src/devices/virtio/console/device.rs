//! The console device: its queues (a pair per port plus, with MULTIPORT,
//! the control pair) and what moves through them.

use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, Reader, Writer};

use super::control::{event, Control, Outbox, CONTROL_LEN};
use super::port::{Port, PortConfig};
use super::{F_MULTIPORT, QUEUE_SIZE};
use crate::devices::virtio::{
    check_ready_queues, read_config_bytes, ActivateError, ActiveState, DeviceState, HostInterest,
    IrqLine, Served, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// At most this much is taken from one tx chain; the rest is dropped, so a
/// chain that names guest memory many times over cannot cost host memory.
const MAX_CHAIN: usize = 1 << 20;
const CONTROL_RX: usize = 2;
const CONTROL_TX: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("a console needs at least one port")]
    NoPorts,
    #[error("making the host side of port {0} non-blocking: {1}")]
    NonBlocking(usize, io::Error),
}

pub struct Console {
    ports: Vec<Port>,
    queue_sizes: Vec<u16>,
    acked_features: u64,
    outbox: Outbox,
    state: DeviceState,
}

impl Console {
    pub fn new(ports: Vec<PortConfig>) -> Result<Console, ConsoleError> {
        if ports.is_empty() {
            return Err(ConsoleError::NoPorts);
        }
        let n = ports.len();
        let ports = ports
            .into_iter()
            .enumerate()
            .map(|(i, p)| Port::new(p).map_err(|e| ConsoleError::NonBlocking(i, e)))
            .collect::<Result<Vec<_>, ConsoleError>>()?;
        // Port 0's pair, the control pair, then a pair per further port.
        let queues = 2 + if n > 1 { 2 * n } else { 0 };
        Ok(Console {
            ports,
            queue_sizes: vec![QUEUE_SIZE; queues],
            acked_features: 0,
            outbox: Outbox::default(),
            state: DeviceState::Inactive,
        })
    }

    fn multiport(&self) -> bool {
        self.acked_features & F_MULTIPORT != 0
    }

    /// (rx, tx) queue indexes of `port`.
    fn port_queues(port: usize) -> (usize, usize) {
        if port == 0 {
            (0, 1)
        } else {
            (2 + 2 * port, 3 + 2 * port)
        }
    }

    /// Moves everything that can move, in both directions and on the
    /// control queues, then interrupts the driver once if needed. Called on
    /// every queue notification and host-side readiness.
    pub fn pump(&mut self) {
        if self.state.active().is_none() {
            // Not running: still take host input, up to the bound.
            for port in &mut self.ports {
                port.read_host();
            }
            return;
        }
        let multiport = self.multiport();
        if multiport {
            self.control_tx();
        }
        let Some(active) = self.state.active_mut() else {
            return;
        };
        let mut eofs = Vec::new();
        for (i, port) in self.ports.iter_mut().enumerate() {
            if i > 0 && !multiport {
                break;
            }
            let (rx, tx) = Self::port_queues(i);
            guest_to_host(active, tx, port);
            // Alternate until neither the host nor the guest side moves.
            loop {
                let got = port.read_host();
                let gave = host_to_guest(active, rx, port);
                if got == 0 && gave == 0 {
                    break;
                }
            }
            if multiport && port.host_eof && port.from_host.is_empty() && !port.told_eof {
                port.told_eof = true;
                eofs.push(i as u32);
            }
        }
        for id in eofs {
            self.outbox.push(
                Control {
                    id,
                    event: event::PORT_OPEN,
                    value: 0,
                },
                &[],
            );
        }
        if multiport {
            self.control_rx();
        }
        if let Some(active) = self.state.active_mut() {
            active.signal_used();
        }
    }

    /// Handles the driver's control messages.
    fn control_tx(&mut self) {
        let mut msgs = Vec::new();
        if let Some(active) = self.state.active_mut() {
            active.serve(CONTROL_TX, |mem, chain| {
                if let Ok(mut r) = Reader::new(mem, chain) {
                    let mut b = [0u8; CONTROL_LEN];
                    if r.read_exact(&mut b).is_ok() {
                        msgs.push(Control::from_bytes(b));
                    }
                }
                Served::more(0)
            });
        }
        for m in msgs {
            self.handle_control(m);
        }
    }

    fn handle_control(&mut self, m: Control) {
        match m.event {
            event::DEVICE_READY if m.value == 1 => {
                for id in 0..self.ports.len() as u32 {
                    self.outbox.push(
                        Control {
                            id,
                            event: event::DEVICE_ADD,
                            value: 0,
                        },
                        &[],
                    );
                }
            }
            event::PORT_READY if m.value == 1 => {
                let Some(port) = self.ports.get(m.id as usize) else {
                    return;
                };
                if port.console {
                    self.outbox.push(
                        Control {
                            id: m.id,
                            event: event::CONSOLE_PORT,
                            value: 1,
                        },
                        &[],
                    );
                }
                if !port.name.is_empty() {
                    self.outbox.push(
                        Control {
                            id: m.id,
                            event: event::PORT_NAME,
                            value: 1,
                        },
                        port.name.as_bytes(),
                    );
                }
                if port.connected() {
                    self.outbox.push(
                        Control {
                            id: m.id,
                            event: event::PORT_OPEN,
                            value: 1,
                        },
                        &[],
                    );
                }
            }
            event::PORT_OPEN => {
                if let Some(port) = self.ports.get_mut(m.id as usize) {
                    port.guest_open = m.value == 1;
                }
            }
            // Anything else (failed readiness, unknown events, bad ids)
            // concerns only the driver.
            _ => {}
        }
    }

    /// Delivers pending control messages into the driver's control rx
    /// buffers.
    fn control_rx(&mut self) {
        let Some(active) = self.state.active_mut() else {
            return;
        };
        let outbox = &mut self.outbox;
        if outbox.is_empty() {
            return;
        }
        active.serve(CONTROL_RX, |mem, chain| {
            let Some(msg) = outbox.front() else {
                return Served {
                    len: 0,
                    more: false,
                };
            };
            let written = match Writer::new(mem, chain) {
                Ok(mut w) if w.available_bytes() >= msg.len() => {
                    w.write_all(msg).map_or(0, |()| msg.len() as u32)
                }
                // A buffer too small or outside memory: returned empty, and
                // the message waits for the next buffer.
                _ => 0,
            };
            if written > 0 {
                outbox.pop();
            }
            Served {
                len: written,
                more: !outbox.is_empty(),
            }
        });
    }

    /// The host-side descriptors and what the device waits for on each.
    pub fn interest(&self) -> Vec<HostInterest> {
        self.ports.iter().filter_map(Port::interest).collect()
    }
}

/// Takes the guest's output from queue `tx` while the host side keeps up.
fn guest_to_host(active: &mut ActiveState, tx: usize, port: &mut Port) {
    port.flush_to_host();
    if !port.takes_guest_output() {
        return;
    }
    active.serve(tx, |mem, chain| {
        if let Ok(mut r) = Reader::new(mem, chain) {
            let n = r.available_bytes().min(MAX_CHAIN);
            let mut buf = vec![0u8; n];
            // A descriptor the device may not read makes the chain fail
            // alone: its bytes are dropped.
            if r.read_exact(&mut buf).is_ok() {
                port.to_host.extend(buf);
            }
        }
        // Hand the bytes on before the guest sees the buffer used, so a
        // guest that writes and then stops the VM loses nothing.
        port.flush_to_host();
        Served {
            len: 0,
            more: port.takes_guest_output(),
        }
    });
}

/// Fills the guest's rx buffers on queue `rx` from the port's host input;
/// returns how many bytes moved.
fn host_to_guest(active: &mut ActiveState, rx: usize, port: &mut Port) -> usize {
    if !port.guest_open || port.from_host.is_empty() {
        return 0;
    }
    let mut total = 0;
    active.serve(rx, |mem, chain| {
        let mut written = 0;
        if let Ok(mut w) = Writer::new(mem, chain) {
            let n = w.available_bytes().min(port.from_host.len());
            let data: Vec<u8> = port.from_host.iter().take(n).copied().collect();
            if w.write_all(&data).is_ok() {
                port.from_host.drain(..n);
                written = n;
            }
        }
        total += written;
        Served {
            len: written as u32,
            more: !port.from_host.is_empty(),
        }
    });
    total
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        if self.ports.len() > 1 {
            VIRTIO_F_VERSION_1 | F_MULTIPORT
        } else {
            VIRTIO_F_VERSION_1
        }
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows (u16 each), max_nr_ports (u32), emerg_wr (u32).
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&(self.ports.len() as u32).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<IrqLine>,
    ) -> Result<(), ActivateError> {
        let expected = if self.multiport() {
            self.queue_sizes.len()
        } else {
            2
        };
        let Some(in_use) = queues.get(..expected) else {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len(),
            });
        };
        // Unused queues stay not ready; those in use must be sound.
        check_ready_queues(&mem, in_use)?;
        let multiport = self.multiport();
        for (i, p) in self.ports.iter_mut().enumerate() {
            // Without MULTIPORT port 0 is the only one and always open.
            p.guest_open = !multiport && i == 0;
        }
        self.state = DeviceState::activated(mem, queues, irq);
        self.pump();
        Ok(())
    }

    fn queue_notify(&mut self, _index: u32) {
        self.pump();
    }

    fn reset(&mut self) {
        self.state = DeviceState::Inactive;
        self.acked_features = 0;
        self.outbox.clear();
        for p in &mut self.ports {
            p.guest_open = false;
            p.told_eof = false;
        }
    }

    fn host_interest(&self) -> Vec<HostInterest> {
        self.interest()
    }

    fn host_ready(&mut self) {
        self.pump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::console::BUFFER_LIMIT;
    use crate::devices::virtio::test_utils::{add_chain, memory};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const BUF: u64 = 0x10_0000;

    /// A device with `ports` ports, each connected to a socket whose other
    /// end is returned, activated with the given features.
    struct Rig {
        mem: &'static GuestMemoryMmap,
        vqs: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
        console: Console,
        irq: Arc<IrqLine>,
        hosts: Vec<UnixStream>,
        next_desc: Vec<u16>,
        next_used: Vec<u16>,
    }

    impl Rig {
        fn new(ports: usize, multiport: bool) -> Rig {
            let mem: &'static GuestMemoryMmap = Box::leak(Box::new(memory()));
            let mut hosts = Vec::new();
            let configs = (0..ports)
                .map(|i| {
                    let (a, b) = UnixStream::pair().expect("pair");
                    hosts.push(b);
                    PortConfig {
                        name: if i == 1 {
                            "kiln.agent".into()
                        } else {
                            String::new()
                        },
                        console: i == 0,
                        host: Some(OwnedFd::from(a)),
                    }
                })
                .collect();
            let mut console = Console::new(configs).expect("console");
            let n = console.queue_max_sizes().len();
            // Rings one after another, 64 KiB apart, above the data buffers.
            let vqs: Vec<_> = (0..n)
                .map(|i| {
                    MockSplitQueue::create(mem, GuestAddress(0x80_0000 + i as u64 * 0x1_0000), 16)
                })
                .collect();
            let features = if multiport {
                VIRTIO_F_VERSION_1 | F_MULTIPORT
            } else {
                VIRTIO_F_VERSION_1
            };
            console.ack_features(features);
            let irq = Arc::new(IrqLine::new().expect("irq"));
            let queues = vqs
                .iter()
                .map(|vq| vq.create_queue().expect("queue"))
                .collect();
            console
                .activate(mem.clone(), queues, irq.clone())
                .expect("activate");
            Rig {
                mem,
                vqs,
                console,
                irq,
                hosts,
                next_desc: vec![0; n],
                next_used: vec![0; n],
            }
        }

        fn add(&mut self, q: usize, descs: &[(u64, u32, bool)]) {
            add_chain(&self.vqs[q], self.next_desc[q], descs);
            self.next_desc[q] += descs.len() as u16;
            self.console.queue_notify(q as u32);
        }

        /// The used entries of queue `q` not seen yet, as (id, len).
        fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
            let vq = &self.vqs[q];
            let idx = vq.used().idx().load();
            let mut out = Vec::new();
            while self.next_used[q] != idx {
                let e = vq
                    .used()
                    .ring()
                    .ref_at(usize::from(self.next_used[q] % 16))
                    .expect("used")
                    .load();
                out.push((e.id(), e.len()));
                self.next_used[q] += 1;
            }
            out
        }

        fn put(&self, addr: u64, data: &[u8]) {
            self.mem
                .write_slice(data, GuestAddress(addr))
                .expect("write");
        }

        fn get(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.mem
                .read_slice(&mut v, GuestAddress(addr))
                .expect("read");
            v
        }

        fn host_read(&mut self, port: usize) -> Vec<u8> {
            let h = &mut self.hosts[port];
            h.set_nonblocking(true).expect("nonblocking");
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = h.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            out
        }

        /// Sends a control message from the driver.
        fn control(&mut self, id: u32, ev: u16, value: u16) {
            let at = 0x70_0000 + u64::from(self.next_desc[3]) * 16;
            self.put(
                at,
                &Control {
                    id,
                    event: ev,
                    value,
                }
                .to_bytes(),
            );
            self.add(3, &[(at, 8, false)]);
        }

        /// Gives the device control rx buffers and returns the messages
        /// it wrote into them.
        fn control_messages(&mut self, buffers: usize) -> Vec<(Control, Vec<u8>)> {
            let base = 0x60_0000 + u64::from(self.next_desc[2]) * 0x100;
            for i in 0..buffers {
                self.add(2, &[(base + i as u64 * 0x100, 0x100, true)]);
            }
            let used = self.used(2);
            used.iter()
                .filter(|(_, len)| *len > 0)
                .map(|&(id, len)| {
                    let addr = 0x60_0000 + u64::from(id as u16) * 0x100;
                    let b = self.get(addr, len as usize);
                    let c = Control::from_bytes(b[..8].try_into().expect("8 bytes"));
                    (c, b[8..].to_vec())
                })
                .collect()
        }
    }

    #[test]
    fn guest_output_reaches_the_host_in_order_across_chains() {
        let mut r = Rig::new(1, false);
        r.put(BUF, b"hello, ");
        r.put(BUF + 0x1000, b"host");
        r.put(BUF + 0x2000, b"!\n");
        // One single-descriptor chain and one chained over two descriptors.
        r.add(1, &[(BUF, 7, false)]);
        r.add(1, &[(BUF + 0x1000, 4, false), (BUF + 0x2000, 2, false)]);
        assert_eq!(r.host_read(0), b"hello, host!\n");
        assert_eq!(r.used(1), vec![(0, 0), (1, 0)]);
        assert_ne!(r.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
    }

    #[test]
    fn host_input_waits_for_rx_buffers_and_splits_across_them() {
        let mut r = Rig::new(1, false);
        r.hosts[0].write_all(b"0123456789").expect("host write");
        r.console.host_ready();
        // No rx buffers yet: nothing used, nothing lost.
        assert!(r.used(0).is_empty());
        r.add(0, &[(BUF, 4, true)]);
        r.add(0, &[(BUF + 0x1000, 3, true), (BUF + 0x2000, 16, true)]);
        assert_eq!(r.used(0), vec![(0, 4), (1, 6)]);
        assert_eq!(r.get(BUF, 4), b"0123");
        assert_eq!(r.get(BUF + 0x1000, 3), b"456");
        assert_eq!(r.get(BUF + 0x2000, 3), b"789");
    }

    #[test]
    fn host_input_is_bounded_while_the_guest_reads_nothing() {
        let mut r = Rig::new(1, false);
        r.hosts[0].set_nonblocking(true).expect("nonblocking");
        let chunk = vec![0x41u8; 16 * 1024];
        let mut sent = 0;
        // Fill the socket and the device until the host side blocks.
        for _ in 0..64 {
            r.console.host_ready();
            match r.hosts[0].write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        r.console.host_ready();
        assert!(sent > BUFFER_LIMIT, "the socket took only {sent} bytes");
        assert_eq!(r.console.ports[0].from_host.len(), BUFFER_LIMIT);
        let i = &r.console.interest()[0];
        assert!(!i.read, "a full buffer must stop reading the host side");
        // A guest buffer frees room, and reading resumes.
        r.add(0, &[(BUF, 0x1000, true)]);
        assert_eq!(r.used(0), vec![(0, 0x1000)]);
        assert_eq!(r.console.ports[0].from_host.len(), BUFFER_LIMIT);
    }

    #[test]
    fn malformed_chains_fail_alone() {
        let mut r = Rig::new(1, false);
        r.put(BUF, b"ok");
        // tx: a descriptor outside guest memory, then a device-writable one
        // (which a tx chain must not have), then a good one.
        r.add(1, &[(0xFFFF_FFFF_0000, 8, false)]);
        r.add(1, &[(BUF + 0x1000, 8, true)]);
        r.add(1, &[(BUF, 2, false)]);
        assert_eq!(r.host_read(0), b"ok");
        assert_eq!(r.used(1).len(), 3);
        // rx: a read-only buffer gets nothing; the data goes to the next.
        r.hosts[0].write_all(b"xy").expect("write");
        r.add(0, &[(BUF, 8, false)]);
        r.add(0, &[(BUF + 0x1000, 8, true)]);
        assert_eq!(r.used(0), vec![(0, 0), (1, 2)]);
        assert_eq!(r.get(BUF + 0x1000, 2), b"xy");
    }

    #[test]
    fn multiport_announces_and_names_the_ports() {
        let mut r = Rig::new(2, true);
        let mut cfg = [0u8; 4];
        r.console.read_config(4, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg), 2, "max_nr_ports");
        assert_eq!(r.console.queue_max_sizes().len(), 6);

        r.control(0, event::DEVICE_READY, 1);
        let msgs = r.control_messages(4);
        let adds: Vec<_> = msgs.iter().map(|(c, _)| (c.id, c.event)).collect();
        assert_eq!(adds, vec![(0, event::DEVICE_ADD), (1, event::DEVICE_ADD)]);

        r.control(0, event::PORT_READY, 1);
        r.control(1, event::PORT_READY, 1);
        let msgs = r.control_messages(8);
        let got: Vec<_> = msgs
            .iter()
            .map(|(c, p)| (c.id, c.event, c.value, p.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, event::CONSOLE_PORT, 1, vec![]),
                (0, event::PORT_OPEN, 1, vec![]),
                (1, event::PORT_NAME, 1, b"kiln.agent".to_vec()),
                (1, event::PORT_OPEN, 1, vec![]),
            ]
        );
    }

    #[test]
    fn multiport_holds_host_data_until_the_guest_opens_the_port() {
        let mut r = Rig::new(2, true);
        r.hosts[1].write_all(b"frame").expect("write");
        r.add(4, &[(BUF, 64, true)]);
        assert!(r.used(4).is_empty(), "delivered to a closed port");
        r.control(1, event::PORT_OPEN, 1);
        assert_eq!(r.used(4), vec![(0, 5)]);
        assert_eq!(r.get(BUF, 5), b"frame");
        // Port 1's tx queue is queue 5; port 0's output does not mix in.
        r.put(BUF + 0x1000, b"reply");
        r.add(5, &[(BUF + 0x1000, 5, false)]);
        assert_eq!(r.host_read(1), b"reply");
        assert!(r.host_read(0).is_empty());
    }

    #[test]
    fn host_hangup_closes_the_port_for_the_guest() {
        let mut r = Rig::new(2, true);
        r.control(1, event::PORT_OPEN, 1);
        r.hosts.remove(1);
        r.console.host_ready();
        let msgs = r.control_messages(2);
        assert_eq!(
            msgs.iter()
                .map(|(c, _)| (c.id, c.event, c.value))
                .collect::<Vec<_>>(),
            vec![(1, event::PORT_OPEN, 0)]
        );
    }

    #[test]
    fn bad_control_messages_are_ignored() {
        let mut r = Rig::new(2, true);
        // A control rx buffer too small for the message is returned empty
        // and the message waits for the next one.
        r.control(1, event::PORT_READY, 1);
        r.add(2, &[(0x60_0000, 4, true)]);
        assert_eq!(r.used(2), vec![(0, 0)]);
        let msgs = r.control_messages(2);
        assert_eq!(msgs[0].0.event, event::PORT_NAME);
        assert_eq!(msgs[0].1, b"kiln.agent");
        assert_eq!(msgs[1].0.event, event::PORT_OPEN);
        // Unknown port, unknown event, short message: used, no answer.
        let before = r.next_desc[3];
        r.control(7, event::PORT_READY, 1);
        r.control(0, 99, 1);
        r.put(0x70_f000, &[1, 2]);
        r.add(3, &[(0x70_f000, 2, false)]);
        assert_eq!(r.next_desc[3] - before, 3);
        assert!(r.control_messages(2).is_empty());
    }

    #[test]
    fn guest_output_stops_being_taken_when_the_host_does_not_read() {
        let mut r = Rig::new(1, false);
        let data = vec![0x42u8; 0x8000];
        r.put(BUF, &data);
        let mut taken = 0;
        for _ in 0..16 {
            r.add(1, &[(BUF, 0x8000, false)]);
            taken += r.used(1).len();
        }
        assert!(taken < 16, "the device took everything ({taken} chains)");
        assert!(r.console.interest()[0].write);
        // Once the host reads, the rest flows.
        let mut got = r.host_read(0).len();
        for _ in 0..64 {
            r.console.host_ready();
            got += r.host_read(0).len();
        }
        assert_eq!(r.used(1).len(), 16 - taken);
        assert_eq!(got, 16 * 0x8000);
    }
}
