//! The control queues' messages (virtio 1.2, 5.3.6.2): an 8-byte header
//! (port id, event, value) and, for PORT_NAME, the name after it.

use std::collections::VecDeque;

/// Control message events.
pub mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const DEVICE_ADD: u16 = 1;
    pub const PORT_READY: u16 = 3;
    pub const CONSOLE_PORT: u16 = 4;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

pub const CONTROL_LEN: usize = 8;
/// Control messages waiting for the driver's control rx buffers. The
/// driver causes at most a few per port; more means it is misbehaving.
const MAX_PENDING_CONTROL: usize = 64;

/// A control message: port id, event, value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    pub id: u32,
    pub event: u16,
    pub value: u16,
}

impl Control {
    pub fn to_bytes(self) -> [u8; CONTROL_LEN] {
        let mut b = [0u8; CONTROL_LEN];
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..6].copy_from_slice(&self.event.to_le_bytes());
        b[6..8].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    pub fn from_bytes(b: [u8; CONTROL_LEN]) -> Control {
        Control {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        }
    }
}

/// The messages for the driver that wait for its control rx buffers, in
/// order, each with its payload.
#[derive(Debug, Default)]
pub struct Outbox(VecDeque<Vec<u8>>);

impl Outbox {
    /// Queues a message with an optional payload; beyond
    /// `MAX_PENDING_CONTROL` it is dropped.
    pub fn push(&mut self, msg: Control, payload: &[u8]) {
        if self.0.len() >= MAX_PENDING_CONTROL {
            return;
        }
        let mut v = msg.to_bytes().to_vec();
        v.extend_from_slice(payload);
        self.0.push_back(v);
    }

    /// The next message's bytes.
    pub fn front(&self) -> Option<&[u8]> {
        self.0.front().map(Vec::as_slice)
    }

    /// Drops the next message (it was delivered).
    pub fn pop(&mut self) {
        self.0.pop_front();
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }
}
