//! The device thread: one epoll over every queue's ioeventfd (the guest's
//! QueueNotify writes, which KVM turns into eventfd signals without a VM
//! exit) and every host-side descriptor of the devices (the console's
//! socket). Devices are reached through the same locked transports the
//! vCPU threads use for register accesses.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::mmio::MmioTransport;

const STOP: u64 = 0;
const WAKE: u64 = 1;
const NOTIFIER_BASE: u64 = 2;
/// Host descriptors: HOST | device << 32 | fd.
const HOST: u64 = 1 << 63;

/// One queue's notification: the ioeventfd KVM signals when the guest
/// writes `queue` to the QueueNotify register of device `device`.
pub struct QueueNotifier {
    pub device: usize,
    pub queue: u32,
    pub eventfd: EventFd,
}

pub struct EventLoop {
    epoll: Epoll,
    stop: EventFd,
    wake: EventFd,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    notifiers: Vec<QueueNotifier>,
    /// Host descriptors in the epoll set: (device, fd) -> events.
    registered: HashMap<(usize, RawFd), EventSet>,
}

/// A transport's lock; a vCPU thread that panicked holding it leaves the
/// registers in a consistent state (each access is short and complete).
pub fn lock(t: &Mutex<MmioTransport>) -> MutexGuard<'_, MmioTransport> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

impl EventLoop {
    /// `stop` ends [`Self::run`]; `wake` makes it look again at what the
    /// devices wait for (after a vCPU thread changed a device).
    pub fn new(
        stop: EventFd,
        wake: EventFd,
        transports: Vec<Arc<Mutex<MmioTransport>>>,
        notifiers: Vec<QueueNotifier>,
    ) -> io::Result<EventLoop> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        for (i, n) in notifiers.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                n.eventfd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, NOTIFIER_BASE + i as u64),
            )?;
        }
        let mut el = EventLoop {
            epoll,
            stop,
            wake,
            transports,
            notifiers,
            registered: HashMap::new(),
        };
        for d in 0..el.transports.len() {
            el.refresh(d)?;
        }
        Ok(el)
    }

    /// Serves events until the stop eventfd is signalled.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in events.iter().take(n) {
                match ev.data() {
                    STOP => {
                        let _ = self.stop.read();
                        return Ok(());
                    }
                    WAKE => {
                        let _ = self.wake.read();
                        for d in 0..self.transports.len() {
                            self.refresh(d)?;
                        }
                    }
                    token if token & HOST != 0 => {
                        let device = ((token & !HOST) >> 32) as usize;
                        if let Some(t) = self.transports.get(device) {
                            lock(t).device_mut().host_ready();
                        }
                        self.refresh(device)?;
                    }
                    token => {
                        let Some(n) = usize::try_from(token - NOTIFIER_BASE)
                            .ok()
                            .and_then(|i| self.notifiers.get(i))
                        else {
                            continue;
                        };
                        // The count does not matter: one pass serves all.
                        let _ = n.eventfd.read();
                        let device = n.device;
                        if let Some(t) = self.transports.get(device) {
                            lock(t).notify_queue(n.queue);
                        }
                        self.refresh(device)?;
                    }
                }
            }
        }
    }

    /// Brings the epoll set in line with what device `device` waits for.
    fn refresh(&mut self, device: usize) -> io::Result<()> {
        let Some(t) = self.transports.get(device) else {
            return Ok(());
        };
        let wanted = lock(t).device().host_interest();
        let mut seen = Vec::with_capacity(wanted.len());
        for w in wanted {
            let mut set = EventSet::empty();
            if w.read {
                set |= EventSet::IN;
            }
            if w.write {
                set |= EventSet::OUT;
            }
            seen.push(w.fd);
            let key = (device, w.fd);
            let token = HOST | (device as u64) << 32 | u64::from(w.fd as u32);
            match self.registered.get(&key) {
                Some(&old) if old == set => {}
                Some(_) if set.is_empty() => {
                    self.registered.remove(&key);
                    self.epoll
                        .ctl(ControlOperation::Delete, w.fd, EpollEvent::default())?;
                }
                Some(_) => {
                    self.registered.insert(key, set);
                    self.epoll
                        .ctl(ControlOperation::Modify, w.fd, EpollEvent::new(set, token))?;
                }
                None if set.is_empty() => {}
                None => {
                    self.registered.insert(key, set);
                    self.epoll
                        .ctl(ControlOperation::Add, w.fd, EpollEvent::new(set, token))?;
                }
            }
        }
        // Descriptors the device dropped (a host side that went away).
        let gone: Vec<_> = self
            .registered
            .keys()
            .filter(|(d, fd)| *d == device && !seen.contains(fd))
            .copied()
            .collect();
        for key in gone {
            self.registered.remove(&key);
            // Already closed descriptors left the set by themselves.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, key.1, EpollEvent::default());
        }
        Ok(())
    }
}
