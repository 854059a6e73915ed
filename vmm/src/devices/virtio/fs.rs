//! virtio-fs (device ID 26) whose queues are served by a vhost-user
//! backend (virtiofsd) through the `vhost` crate's frontend.
//!
//! The VMM keeps the transport and the config space (tag, number of
//! request queues); the backend maps the guest memory (the memfd) and
//! processes the rings itself. The guest's queue notifications go straight
//! from KVM to the backend (the queue's ioeventfd is the vring's kick).
//! The backend's completions come back on a call eventfd per queue that
//! the event loop turns into the transport's interrupt: virtio-mmio needs
//! the InterruptStatus bit set, which a bare irqfd would not do.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    check_ready_queues, read_config_bytes, ActivateError, DeviceState, HostInterest, IrqLine,
    VirtioDevice, VIRTIO_F_VERSION_1,
};

/// One high-priority queue and one request queue.
pub const NUM_QUEUES: usize = 2;
pub const QUEUE_SIZE: u16 = 1024;
/// The tag field of the config space.
pub const TAG_LEN: usize = 36;
/// Ring features the backend implements and the driver may use.
const RING_FEATURES: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC
    | 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("tag '{0}' is empty or longer than {TAG_LEN} bytes")]
    Tag(String),
    #[error("connecting to the vhost-user backend at {0}: {1}")]
    Connect(PathBuf, vhost::Error),
    #[error("vhost-user {0}: {1}")]
    Protocol(&'static str, vhost::Error),
    #[error("the backend does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
}

fn vmm_eventfd(fd: &EventFd) -> Result<vmm_sys_util_015::eventfd::EventFd, FsError> {
    // SAFETY: dup of a descriptor we hold; the result is checked.
    let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(FsError::EventFd(std::io::Error::last_os_error()));
    }
    // SAFETY: `dup` is a fresh eventfd descriptor that nothing else owns.
    Ok(unsafe { vmm_sys_util_015::eventfd::EventFd::from_raw_fd(dup) })
}

pub struct Fs {
    frontend: Frontend,
    tag: String,
    backend_features: u64,
    protocol_features: bool,
    acked_features: u64,
    mem: GuestMemoryMmap,
    memfd: File,
    /// The queues' ioeventfds, handed to the backend as kicks.
    kicks: Vec<EventFd>,
    /// Completions from the backend, relayed as interrupts.
    calls: Vec<EventFd>,
    /// The backend serves the queues; the device keeps them with the
    /// interrupt it relays completions to.
    state: DeviceState,
    /// The rings the backend was told to start.
    started: Vec<usize>,
}

impl Fs {
    /// Connects to the backend at `socket` and negotiates the vhost-user
    /// protocol; `mem` and `memfd` are the guest memory the backend maps.
    pub fn connect(
        socket: &Path,
        tag: &str,
        mem: GuestMemoryMmap,
        memfd: &File,
    ) -> Result<Fs, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.to_string()));
        }
        let mut frontend = Frontend::connect(socket, NUM_QUEUES as u64)
            .map_err(|e| FsError::Connect(socket.to_path_buf(), e))?;
        frontend
            .set_owner()
            .map_err(|e| FsError::Protocol("SET_OWNER", e))?;
        let backend_features = frontend
            .get_features()
            .map_err(|e| FsError::Protocol("GET_FEATURES", e))?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::NotModern);
        }
        let protocol_features =
            backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if protocol_features {
            let offered = frontend
                .get_protocol_features()
                .map_err(|e| FsError::Protocol("GET_PROTOCOL_FEATURES", e))?;
            let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
            frontend
                .set_protocol_features(offered & wanted)
                .map_err(|e| FsError::Protocol("SET_PROTOCOL_FEATURES", e))?;
        }
        let calls = (0..NUM_QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Fs {
            frontend,
            tag: tag.to_string(),
            backend_features,
            protocol_features,
            acked_features: 0,
            mem,
            memfd: memfd.try_clone().map_err(FsError::EventFd)?,
            kicks: Vec::new(),
            calls,
            state: DeviceState::Inactive,
            started: Vec::new(),
        })
    }

    fn config(&self) -> [u8; TAG_LEN + 4] {
        let mut c = [0u8; TAG_LEN + 4];
        c[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        c[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        c
    }

    /// The backend's call eventfd of queue `index` (tests wait on it).
    pub fn call_eventfd(&self, index: usize) -> Option<&EventFd> {
        self.calls.get(index)
    }

    /// Sends the memory table and the rings to the backend and starts them.
    fn start(&mut self, queues: &[Queue]) -> Result<(), FsError> {
        let mut features = self.acked_features;
        if self.protocol_features {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(features)
            .map_err(|e| FsError::Protocol("SET_FEATURES", e))?;
        let regions = self
            .mem
            .iter()
            .map(|r| {
                let mut info = VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|e| FsError::Protocol("memory region", e))?;
                info.mmap_handle = self.memfd.as_raw_fd();
                Ok(info)
            })
            .collect::<Result<Vec<_>, FsError>>()?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(|e| FsError::Protocol("SET_MEM_TABLE", e))?;
        for (index, q) in queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let host = |a: u64| -> Result<u64, FsError> {
                self.mem
                    .get_host_address(GuestAddress(a))
                    .map(|p| p as u64)
                    .map_err(|_| {
                        FsError::Protocol("SET_VRING_ADDR", vhost::Error::InvalidGuestMemory)
                    })
            };
            let config = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            let f = &mut self.frontend;
            f.set_vring_num(index, q.size())
                .map_err(|e| FsError::Protocol("SET_VRING_NUM", e))?;
            f.set_vring_base(index, 0)
                .map_err(|e| FsError::Protocol("SET_VRING_BASE", e))?;
            f.set_vring_addr(index, &config)
                .map_err(|e| FsError::Protocol("SET_VRING_ADDR", e))?;
            if let Some(call) = self.calls.get(index) {
                f.set_vring_call(index, &vmm_eventfd(call)?)
                    .map_err(|e| FsError::Protocol("SET_VRING_CALL", e))?;
            }
            if let Some(kick) = self.kicks.get(index) {
                f.set_vring_kick(index, &vmm_eventfd(kick)?)
                    .map_err(|e| FsError::Protocol("SET_VRING_KICK", e))?;
            }
            if self.protocol_features {
                f.set_vring_enable(index, true)
                    .map_err(|e| FsError::Protocol("SET_VRING_ENABLE", e))?;
            }
            self.started.push(index);
        }
        Ok(())
    }

    /// Kicks queue `index` as the guest's QueueNotify would (tests).
    pub fn kick(&self, index: usize) -> std::io::Result<()> {
        match self.kicks.get(index) {
            Some(k) => k.write(1),
            None => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        self.backend_features & (VIRTIO_F_VERSION_1 | RING_FEATURES)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        read_config_bytes(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<IrqLine>,
    ) -> Result<(), ActivateError> {
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queues.len(),
            });
        }
        check_ready_queues(&mem, &queues)?;
        let started = self.start(&queues);
        // Activated even if the backend refused part of the set-up: what
        // it did start still completes through the interrupt.
        self.state = DeviceState::activated(mem, queues, irq);
        // A backend that refuses the set-up leaves the device needing reset.
        started.map_err(|_| ActivateError::Backend)
    }

    fn queue_notify(&mut self, _index: u32) {
        // Notifications go to the backend by the kick eventfds; one that
        // arrives here (no ioeventfd) is passed on.
        for k in &self.kicks {
            let _ = k.write(1);
        }
    }

    fn reset(&mut self) {
        // GET_VRING_BASE stops a ring in the backend.
        for index in std::mem::take(&mut self.started) {
            let _ = self.frontend.get_vring_base(index);
        }
        self.acked_features = 0;
        self.state = DeviceState::Inactive;
    }

    fn take_queue_notifiers(&mut self, notifiers: &[EventFd]) -> bool {
        match notifiers
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
        {
            Ok(k) => {
                self.kicks = k;
                true
            }
            Err(_) => false,
        }
    }

    fn host_interest(&self) -> Vec<HostInterest> {
        self.calls
            .iter()
            .map(|c| HostInterest {
                fd: c.as_raw_fd(),
                read: true,
                write: false,
            })
            .collect()
    }

    fn host_ready(&mut self) {
        let mut called = false;
        for c in &self.calls {
            called |= c.read().is_ok();
        }
        if called {
            if let Some(active) = self.state.active() {
                let _ = active.irq.trigger(VIRTIO_MMIO_INT_VRING);
            }
        }
    }
}
