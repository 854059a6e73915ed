//! The virtio-net device: its configuration space, the frame stream to
//! passt, and the two queues once the driver has started it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{DescriptorChain, Queue, Reader, Writer};
use vm_memory::ByteValued;

use super::stream::{FrameEncoder, FrameStream, StreamError, MAX_FRAME};
use super::{NET_HDR_LEN, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::{
    check_ready_queues, read_config_bytes, ActivateError, ActiveState, DeviceState, HostInterest,
    IrqLine, Served, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Socket reads per pass: a peer that never stops sending cannot keep the
/// device thread from the other devices (epoll brings it back).
const READS_PER_PASS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("MAC address {0} is not a unicast address")]
    Mac(String),
    #[error("making the socket non-blocking: {0}")]
    NonBlocking(io::Error),
}

/// The device configuration space (virtio 1.2, 5.1.4) up to the status,
/// the last field offered; little-endian.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, packed)]
pub struct ConfigSpace {
    pub mac: [u8; 6],
    pub status: u16,
}
// SAFETY: plain old data of integer fields; packed, so there is no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for ConfigSpace {}

// The spec's offsets.
const _: () = {
    assert!(std::mem::size_of::<ConfigSpace>() == 8);
    assert!(std::mem::offset_of!(ConfigSpace, status) == 6);
};

/// What went through, and what was dropped, since the device was made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    /// Malformed or oversized tx chains, and frames sent with no peer.
    pub tx_dropped: u64,
    pub rx_frames: u64,
    /// Frames larger than the guest's rx buffer.
    pub rx_dropped: u64,
}

pub struct Net {
    config: ConfigSpace,
    acked_features: u64,
    /// None once the peer has gone (or broken the framing).
    stream: Option<FrameStream>,
    /// Why the stream was dropped.
    gone: Option<StreamError>,
    stats: NetStats,
    state: DeviceState,
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Net {
    /// A device with address `mac` whose frames go through `socket`, a
    /// connection to passt.
    pub fn new(socket: UnixStream, mac: [u8; 6]) -> Result<Net, NetError> {
        // Multicast and all-zero addresses cannot be a station's: Linux
        // would replace them with a random one, which passt does not know.
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::Mac(mac_string(&mac)));
        }
        let stream = FrameStream::new(socket).map_err(NetError::NonBlocking)?;
        Ok(Net {
            config: ConfigSpace {
                mac,
                status: (VIRTIO_NET_S_LINK_UP as u16).to_le(),
            },
            acked_features: 0,
            stream: Some(stream),
            gone: None,
            stats: NetStats::default(),
            state: DeviceState::Inactive,
        })
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Why the connection to the peer was dropped, if it was.
    pub fn disconnected(&self) -> Option<&StreamError> {
        self.gone.as_ref()
    }

    /// Moves everything that can move, both ways, then interrupts the
    /// driver once if needed. Called on every queue notification and
    /// socket readiness.
    pub fn pump(&mut self) {
        let result = match (self.stream.as_mut(), self.state.active_mut()) {
            (Some(stream), Some(active)) => {
                let r = transmit(active, stream, &mut self.stats)
                    .and_then(|()| receive(active, stream, &mut self.stats));
                active.signal_used();
                r
            }
            // Not running: only earlier output still goes out.
            (Some(stream), None) => stream.flush().map(|_| ()),
            (None, Some(active)) => {
                // No peer: the guest's frames are dropped rather than left
                // to fill its tx queue; the link is down for it anyway.
                let stats = &mut self.stats;
                active.serve(TX_QUEUE, |_, _| {
                    stats.tx_dropped += 1;
                    Served::more(0)
                });
                active.signal_used();
                Ok(())
            }
            (None, None) => Ok(()),
        };
        if let Err(e) = result {
            self.disconnect(e);
        }
    }

    /// Drops the connection (a peer that broke the framing cannot be
    /// resynchronised) and tells the driver the link is down.
    fn disconnect(&mut self, why: StreamError) {
        self.stream = None;
        self.gone = Some(why);
        self.config.status = 0;
        if self.acked_features & 1 << VIRTIO_NET_F_STATUS != 0 {
            if let Some(active) = self.state.active_mut() {
                let _ = active.irq.trigger(VIRTIO_MMIO_INT_CONFIG);
            }
        }
        // Chains the guest had posted for tx are returned now.
        self.pump();
    }
}

/// Takes the guest's frames while the pending output has room, writing
/// them to the peer as it goes.
fn transmit(
    active: &mut ActiveState,
    stream: &mut FrameStream,
    stats: &mut NetStats,
) -> Result<(), StreamError> {
    stream.flush()?;
    while stream.tx.has_room() {
        let tx = &mut stream.tx;
        let taken = active.serve(TX_QUEUE, |mem, chain| {
            if gather_tx(mem, chain, tx) {
                stats.tx_frames += 1;
            } else {
                stats.tx_dropped += 1;
            }
            Served {
                len: 0,
                more: tx.has_room(),
            }
        });
        // Written before the next batch, so frames leave in order and the
        // buffer frees up.
        stream.flush()?;
        if taken == 0 {
            break;
        }
    }
    Ok(())
}

/// Queues the frame of one tx chain (the header skipped); false if the
/// chain is malformed (device-writable parts, addresses outside guest
/// memory, shorter than the header) or the frame empty or too long.
fn gather_tx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    tx: &mut FrameEncoder,
) -> bool {
    if chain.clone().any(|d| d.is_write_only()) {
        return false;
    }
    let Ok(mut r) = Reader::new(mem, chain) else {
        return false;
    };
    let Some(len) = r
        .available_bytes()
        .checked_sub(NET_HDR_LEN)
        .filter(|n| (1..=MAX_FRAME).contains(n))
    else {
        return false;
    };
    // No offloads were offered, so the header carries nothing to act on.
    let mut hdr = [0u8; NET_HDR_LEN];
    if r.read_exact(&mut hdr).is_err() {
        return false;
    }
    tx.push_with(len, |frame| r.read_exact(frame)).is_ok()
}

/// What one rx chain did with a frame.
enum RxOutcome {
    /// Written, with this used length.
    Written(u32),
    /// Too small for the frame: the frame is dropped, the chain returned.
    TooSmall,
    /// Not a usable rx buffer (device-readable parts, addresses outside
    /// guest memory): returned empty, the frame waits for the next one.
    Malformed,
}

/// Writes the header and `frame` into one rx chain.
fn fill_rx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> RxOutcome {
    if chain.clone().any(|d| !d.is_write_only()) {
        return RxOutcome::Malformed;
    }
    let Ok(mut w) = Writer::new(mem, chain) else {
        return RxOutcome::Malformed;
    };
    let len = NET_HDR_LEN + frame.len();
    if w.available_bytes() < len {
        return RxOutcome::TooSmall;
    }
    // No offloads, one buffer per frame: all zero but num_buffers, which
    // VERSION_1 has the device set to 1 without mergeable buffers.
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr[NET_HDR_LEN - 2..].copy_from_slice(&1u16.to_le_bytes());
    match w.write_all(&hdr).and_then(|()| w.write_all(frame)) {
        Ok(()) => u32::try_from(len).map_or(RxOutcome::Malformed, RxOutcome::Written),
        Err(_) => RxOutcome::Malformed,
    }
}

/// Delivers the peer's frames into the guest's rx buffers, reading the
/// socket only while no whole frame waits.
fn receive(
    active: &mut ActiveState,
    stream: &mut FrameStream,
    stats: &mut NetStats,
) -> Result<(), StreamError> {
    let mut reads = 0;
    loop {
        while let Some(frame) = stream.rx.frame()? {
            let mut done = None;
            active.serve(RX_QUEUE, |mem, chain| match fill_rx(mem, chain, frame) {
                RxOutcome::Written(len) => {
                    done = Some(true);
                    Served { len, more: false }
                }
                RxOutcome::TooSmall => {
                    done = Some(false);
                    Served {
                        len: 0,
                        more: false,
                    }
                }
                RxOutcome::Malformed => Served::more(0),
            });
            match done {
                Some(true) => stats.rx_frames += 1,
                Some(false) => stats.rx_dropped += 1,
                // No rx buffer: the frame waits, and the socket is left
                // unread until the guest posts some.
                None => return Ok(()),
            }
            stream.rx.consume();
        }
        if reads == READS_PER_PASS || stream.fill()? == 0 {
            return Ok(());
        }
        reads += 1;
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config.as_slice(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<IrqLine>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        check_ready_queues(&mem, &queues)?;
        self.state = DeviceState::activated(mem, queues, irq);
        self.pump();
        Ok(())
    }

    fn queue_notify(&mut self, _index: u32) {
        // Either queue may unblock either direction: rx buffers let a
        // waiting frame in, used tx chains free room.
        self.pump();
    }

    fn reset(&mut self) {
        self.state = DeviceState::Inactive;
        self.acked_features = 0;
    }

    fn host_interest(&self) -> Vec<HostInterest> {
        let Some(stream) = &self.stream else {
            return Vec::new();
        };
        vec![HostInterest {
            fd: stream.fd(),
            // A whole frame waiting means the guest has no buffer for it:
            // read no further (back-pressure on passt).
            read: self.state.active().is_some() && !stream.rx.has_frame(),
            write: !stream.tx.is_empty(),
        }]
    }

    fn host_ready(&mut self) {
        self.pump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{add_chain, memory, Desc};
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const BUF: u64 = 0x10_0000;
    const RING: u16 = 256;

    /// A started device whose peer (passt's side) is `peer`.
    struct Rig {
        mem: &'static GuestMemoryMmap,
        vqs: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
        net: Net,
        irq: Arc<IrqLine>,
        peer: UnixStream,
        next_desc: [u16; 2],
        next_used: [u16; 2],
    }

    impl Rig {
        fn new() -> Rig {
            let (a, peer) = UnixStream::pair().expect("pair");
            Rig::with_socket(a, peer)
        }

        /// A device on `socket`; `peer` is what the tests talk to.
        fn with_socket(socket: UnixStream, peer: UnixStream) -> Rig {
            let mem: &'static GuestMemoryMmap = Box::leak(Box::new(memory()));
            let mut net = Net::new(socket, MAC).expect("net");
            let vqs: Vec<_> = (0..2)
                .map(|i| MockSplitQueue::create(mem, GuestAddress(0x80_0000 + i * 0x1_0000), RING))
                .collect();
            net.ack_features(net.features());
            let irq = Arc::new(IrqLine::new().expect("irq"));
            let queues = vqs
                .iter()
                .map(|vq| vq.create_queue().expect("queue"))
                .collect();
            net.activate(mem.clone(), queues, irq.clone())
                .expect("activate");
            Rig {
                mem,
                vqs,
                net,
                irq,
                peer,
                next_desc: [0; 2],
                next_used: [0; 2],
            }
        }

        /// Makes a chain available on queue `q` without notifying.
        fn post(&mut self, q: usize, descs: &[Desc]) {
            add_chain(&self.vqs[q], self.next_desc[q], descs);
            self.next_desc[q] += descs.len() as u16;
        }

        fn add(&mut self, q: usize, descs: &[Desc]) {
            self.post(q, descs);
            self.net.queue_notify(q as u32);
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
                    .ref_at(usize::from(self.next_used[q] % RING))
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

        /// What the peer can read now.
        fn peer_read(&mut self) -> Vec<u8> {
            self.peer.set_nonblocking(true).expect("nonblocking");
            let mut out = Vec::new();
            let mut buf = [0u8; 65536];
            while let Ok(n) = self.peer.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            out
        }

        fn peer_write(&mut self, data: &[u8]) {
            self.peer.set_nonblocking(false).expect("blocking");
            self.peer.write_all(data).expect("peer write");
        }

        fn link_up(&self) -> bool {
            let mut s = [0u8; 2];
            self.net.read_config(6, &mut s);
            u16::from_le_bytes(s) & VIRTIO_NET_S_LINK_UP as u16 != 0
        }
    }

    fn framed(frame: &[u8]) -> Vec<u8> {
        let mut v = (frame.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(frame);
        v
    }

    /// An Ethernet frame of `len` bytes, every byte `fill`.
    fn frame(len: usize, fill: u8) -> Vec<u8> {
        vec![fill; len]
    }

    #[test]
    fn a_tx_chain_reaches_the_peer_length_prefixed_without_its_header() {
        let mut r = Rig::new();
        let payload = frame(60, 0xab);
        // The header split 5 + 7 across two descriptors, then the frame.
        r.put(BUF, &[0xee; 5]);
        r.put(BUF + 0x1000, &[0xee; 7]);
        r.put(BUF + 0x2000, &payload);
        r.add(
            TX_QUEUE,
            &[
                (BUF, 5, false),
                (BUF + 0x1000, 7, false),
                (BUF + 0x2000, 60, false),
            ],
        );
        assert_eq!(r.peer_read(), framed(&payload));
        assert_eq!(r.used(TX_QUEUE), vec![(0, 0)]);
        assert_ne!(r.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
        // Header and frame in one descriptor, as Linux sends them too.
        let mut both = vec![0u8; NET_HDR_LEN];
        both.extend_from_slice(b"one buffer");
        r.put(BUF + 0x3000, &both);
        r.add(TX_QUEUE, &[(BUF + 0x3000, both.len() as u32, false)]);
        assert_eq!(r.peer_read(), framed(b"one buffer"));
        assert_eq!(r.net.stats().tx_frames, 2);
    }

    #[test]
    fn a_peer_frame_written_in_pieces_lands_whole_in_one_rx_chain() {
        let mut r = Rig::new();
        r.add(RX_QUEUE, &[(BUF, 2048, true)]);
        let payload: Vec<u8> = (0..100u8).collect();
        let wire = framed(&payload);
        // The prefix split 1 + 3, the frame in two pieces.
        for piece in [&wire[..1], &wire[1..4], &wire[4..30], &wire[30..]] {
            assert!(r.used(RX_QUEUE).is_empty(), "delivered early");
            r.peer_write(piece);
            r.net.host_ready();
        }
        assert_eq!(r.used(RX_QUEUE), vec![(0, (NET_HDR_LEN + 100) as u32)]);
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[10] = 1; // num_buffers
        assert_eq!(r.get(BUF, NET_HDR_LEN), hdr);
        assert_eq!(r.get(BUF + NET_HDR_LEN as u64, 100), payload);
        assert_ne!(r.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
        assert_eq!(r.net.stats().rx_frames, 1);
    }

    #[test]
    fn without_rx_buffers_the_frame_waits_and_the_socket_is_not_read() {
        let mut r = Rig::new();
        r.peer_write(&framed(b"first"));
        r.peer_write(&framed(b"second"));
        r.net.host_ready();
        assert!(r.used(RX_QUEUE).is_empty());
        let interest = r.net.host_interest();
        assert!(!interest[0].read, "reads on with a frame waiting");
        // Buffers posted (the guest notifies): both frames arrive in order.
        r.post(RX_QUEUE, &[(BUF, 2048, true)]);
        r.add(RX_QUEUE, &[(BUF + 0x1000, 2048, true)]);
        assert_eq!(
            r.used(RX_QUEUE),
            vec![(0, (NET_HDR_LEN + 5) as u32), (1, (NET_HDR_LEN + 6) as u32)]
        );
        assert_eq!(r.get(BUF + NET_HDR_LEN as u64, 5), b"first");
        assert_eq!(r.get(BUF + 0x1000 + NET_HDR_LEN as u64, 6), b"second");
        assert!(r.net.host_interest()[0].read);
    }

    #[test]
    fn a_bad_length_prefix_disconnects_and_downs_the_link() {
        for bad in [0u32, MAX_FRAME as u32 + 1, u32::MAX] {
            let mut r = Rig::new();
            assert!(r.link_up());
            r.add(RX_QUEUE, &[(BUF, 2048, true)]);
            r.peer_write(&framed(b"good"));
            r.peer_write(&bad.to_be_bytes());
            r.peer_write(&[0; 64]);
            r.net.host_ready();
            // The frame before the bad prefix still arrives.
            assert_eq!(r.used(RX_QUEUE), vec![(0, (NET_HDR_LEN + 4) as u32)]);
            assert!(
                matches!(r.net.disconnected(), Some(StreamError::FrameLength(n)) if *n == bad),
                "{:?}",
                r.net.disconnected()
            );
            assert!(!r.link_up());
            assert_ne!(r.irq.status() & VIRTIO_MMIO_INT_CONFIG, 0);
            assert!(r.net.host_interest().is_empty());
            // The peer sees the connection closed.
            assert!(r.peer_read().is_empty());
            // The guest's frames are returned (and dropped) from now on.
            r.put(BUF + 0x1000, &[0; 20]);
            r.add(TX_QUEUE, &[(BUF + 0x1000, 20, false)]);
            assert_eq!(r.used(TX_QUEUE), vec![(0, 0)]);
            assert_eq!(r.net.stats().tx_dropped, 1);
        }
    }

    #[test]
    fn a_peer_hangup_downs_the_link() {
        let mut r = Rig::new();
        let (_, dead) = UnixStream::pair().expect("pair");
        drop(std::mem::replace(&mut r.peer, dead));
        r.net.host_ready();
        assert!(matches!(r.net.disconnected(), Some(StreamError::Closed)));
        assert!(!r.link_up());
    }

    #[test]
    fn malformed_chains_are_returned_without_harm() {
        let mut r = Rig::new();
        r.put(BUF, &[0; NET_HDR_LEN + 4]);
        // tx: a device-writable descriptor, a chain shorter than the
        // header, a header with no frame, a descriptor outside memory,
        // then a good one.
        r.add(
            TX_QUEUE,
            &[(BUF, NET_HDR_LEN as u32, false), (BUF + 0x1000, 64, true)],
        );
        r.add(TX_QUEUE, &[(BUF, 8, false)]);
        r.add(TX_QUEUE, &[(BUF, NET_HDR_LEN as u32, false)]);
        r.add(TX_QUEUE, &[(0xFFFF_FFFF_0000, 64, false)]);
        r.add(TX_QUEUE, &[(BUF, NET_HDR_LEN as u32 + 4, false)]);
        assert_eq!(r.used(TX_QUEUE).len(), 5);
        assert_eq!(r.peer_read(), framed(&[0; 4]));
        assert_eq!(
            r.net.stats(),
            NetStats {
                tx_frames: 1,
                tx_dropped: 4,
                ..NetStats::default()
            }
        );
        // rx: a device-readable descriptor and one outside memory get
        // nothing and the frame goes to the next buffer; a buffer shorter
        // than the header loses its frame.
        r.peer_write(&framed(b"kept"));
        r.peer_write(&framed(b"lost"));
        r.post(
            RX_QUEUE,
            &[(BUF + 0x2000, 8, false), (BUF + 0x3000, 2048, true)],
        );
        r.post(RX_QUEUE, &[(0xFFFF_FFFF_0000, 2048, true)]);
        r.post(RX_QUEUE, &[(BUF + 0x4000, 2048, true)]);
        r.add(RX_QUEUE, &[(BUF + 0x5000, 8, true)]);
        assert_eq!(
            r.used(RX_QUEUE),
            vec![(0, 0), (2, 0), (3, (NET_HDR_LEN + 4) as u32), (4, 0)]
        );
        assert_eq!(r.get(BUF + 0x4000 + NET_HDR_LEN as u64, 4), b"kept");
        assert_eq!(r.net.stats().rx_frames, 1);
        assert_eq!(r.net.stats().rx_dropped, 1);
        assert!(r.net.disconnected().is_none());
    }

    #[test]
    fn a_frame_larger_than_the_rx_buffer_is_dropped_and_counted() {
        let mut r = Rig::new();
        r.peer_write(&framed(&frame(4000, 1)));
        r.peer_write(&framed(&frame(1000, 2)));
        r.post(RX_QUEUE, &[(BUF, 1526, true)]);
        r.add(RX_QUEUE, &[(BUF + 0x1000, 1526, true)]);
        assert_eq!(
            r.used(RX_QUEUE),
            vec![(0, 0), (1, (NET_HDR_LEN + 1000) as u32)]
        );
        assert_eq!(r.net.stats().rx_dropped, 1);
        assert_eq!(r.net.stats().rx_frames, 1);
    }

    #[test]
    fn a_peer_that_stops_reading_gets_every_frame_whole_later() {
        let mut r = Rig::new();
        const FRAMES: u8 = 40;
        const LEN: usize = 60_000;
        for i in 0..FRAMES {
            let at = BUF + u64::from(i) * 0x1_0000;
            r.put(at, &[0; NET_HDR_LEN]);
            r.put(at + NET_HDR_LEN as u64, &frame(LEN, i));
            r.post(TX_QUEUE, &[(at, (NET_HDR_LEN + LEN) as u32, false)]);
        }
        r.net.queue_notify(TX_QUEUE as u32);
        // The socket and the device's bound fill up: the rest stays queued.
        let taken = r.used(TX_QUEUE).len();
        assert!(
            taken > 0 && taken < usize::from(FRAMES),
            "took {taken} chains"
        );
        assert!(r.net.host_interest()[0].write, "no wait for EPOLLOUT");
        // The peer drains; each EPOLLOUT moves more.
        let mut wire = Vec::new();
        for _ in 0..1000 {
            wire.extend(r.peer_read());
            r.net.host_ready();
            if r.net.stats().tx_frames == u64::from(FRAMES) && !r.net.host_interest()[0].write {
                break;
            }
        }
        wire.extend(r.peer_read());
        assert_eq!(r.used(TX_QUEUE).len() + taken, usize::from(FRAMES));
        let mut rest = &wire[..];
        for i in 0..FRAMES {
            let (prefix, tail) = rest.split_at(4);
            assert_eq!(prefix, (LEN as u32).to_be_bytes(), "frame {i}");
            assert!(tail[..LEN].iter().all(|&b| b == i), "frame {i} torn");
            rest = &tail[LEN..];
        }
        assert!(rest.is_empty());
    }

    #[test]
    fn config_space_holds_the_mac_and_features_are_negotiated() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let mut net = Net::new(a, MAC).expect("net");
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, MAC);
        let mut tail = [0xffu8; 4];
        net.read_config(8, &mut tail);
        assert_eq!(tail, [0; 4], "bytes past the status read as zero");
        assert_eq!(net.device_type(), 1);
        assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        let offered = net.features();
        assert_eq!(
            offered,
            VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
        );
        // No offloads, no mergeable buffers: a driver asking for them gets
        // only what was offered.
        net.ack_features(u64::MAX);
        assert_eq!(net.acked_features, offered);
        net.reset();
        assert_eq!(net.acked_features, 0);
        // Before DRIVER_OK the socket is not read.
        assert!(!net.host_interest()[0].read);
    }

    #[test]
    fn group_and_zero_macs_are_refused() {
        for mac in [[1, 0, 0, 0, 0, 1], [0; 6], [0xff; 6]] {
            let (a, _b) = UnixStream::pair().expect("pair");
            assert!(matches!(Net::new(a, mac), Err(NetError::Mac(_))));
        }
    }

    #[test]
    fn activation_needs_two_queues() {
        let mem = memory();
        let (a, _b) = UnixStream::pair().expect("pair");
        let mut net = Net::new(a, MAC).expect("net");
        let vq = MockSplitQueue::new(&mem, 16);
        let irq = Arc::new(IrqLine::new().expect("irq"));
        let err = net
            .activate(mem.clone(), vec![vq.create_queue().expect("queue")], irq)
            .expect_err("one queue accepted");
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 2,
                got: 1
            }
        ));
    }

    /// passt itself, where it is installed and finds a host interface to
    /// copy (skipped otherwise), on a socket pair as kiln runs it: the
    /// guest's ARP probe gets passt's answer, through the real framing
    /// both ways.
    #[test]
    fn the_real_passt_answers_an_arp_probe() {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        use std::time::Duration;
        let (conn, passt_end) = UnixStream::pair().expect("pair");
        let fd = passt_end.as_raw_fd();
        let mut cmd = Command::new("passt");
        cmd.args(["--foreground", "--quiet", "--fd", &fd.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: one fcntl, async-signal-safe, between fork and exec, on
        // a descriptor this test keeps open.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
        };
        let Ok(mut passt) = cmd.spawn() else {
            eprintln!("passt is not installed; skipping");
            return;
        };
        drop(passt_end);
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(Some(status)) = passt.try_wait() {
            eprintln!("passt did not start here ({status}: no host interface?); skipping");
            return;
        }
        // The rig's own peer stays unused.
        let (_, unused) = UnixStream::pair().expect("pair");
        let mut r = Rig::with_socket(conn, unused);
        r.add(RX_QUEUE, &[(BUF + 0x1_0000, 1530, true)]);
        // An ARP probe (sender 0.0.0.0) for a link-local address: passt
        // answers requests for any address but the guest's own (copied
        // from the host), whatever the host's network.
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&MAC);
        arp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        arp.extend_from_slice(&[169, 254, 1, 1]);
        arp.resize(60, 0);
        let mut chain = vec![0u8; NET_HDR_LEN];
        chain.extend_from_slice(&arp);
        r.put(BUF, &chain);
        r.add(TX_QUEUE, &[(BUF, chain.len() as u32, false)]);
        let mut used = Vec::new();
        for _ in 0..100 {
            r.net.host_ready();
            used = r.used(RX_QUEUE);
            if !used.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let frame = r.get(BUF + 0x1_0000 + NET_HDR_LEN as u64, 1530 - NET_HDR_LEN);
        drop(r);
        let _ = passt.kill();
        let _ = passt.wait();
        let &[(0, len)] = used.as_slice() else {
            panic!("passt's answer did not arrive: {used:?}");
        };
        assert!(len as usize >= NET_HDR_LEN + 42, "{len}");
        let reply = &frame[..len as usize - NET_HDR_LEN];
        // An ARP reply (opcode 2) to our MAC, for the address asked.
        assert_eq!(&reply[..6], &MAC);
        assert_eq!(&reply[12..14], &[0x08, 0x06]);
        assert_eq!(&reply[20..22], &[0, 2]);
        assert_eq!(&reply[28..32], &[169, 254, 1, 1]);
    }
}
