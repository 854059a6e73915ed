//! kiln's guest agent: the wire protocol shared by the host (`kiln`) and the
//! in-guest PID 1 (`kiln-agent`), defined once here.
//!
//! A connection is one byte stream (a virtio-console port on the guest side,
//! a unix socket on the host side) carrying length-prefixed frames
//! ([`frame`]) whose payloads are serde-encoded [`protocol`] messages.
//!
//! [`poll`], the deadline-bounded wait both sides use, lives here too, as
//! the one crate both depend on.

pub mod frame;
pub mod fuzz_harness;
pub mod poll;
pub mod protocol;

pub use frame::{FrameError, FrameReader, FrameWriter, MAX_FRAME};
pub use protocol::*;
