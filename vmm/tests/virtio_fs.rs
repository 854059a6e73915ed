//! virtio-fs against the real virtiofsd: the vhost-user handshake, the
//! memory table and the vrings are set up, and a FUSE_INIT request put on
//! the request queue (in our memfd guest memory) is answered by virtiofsd.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use kiln_vmm::devices::virtio::fs::Fs;
use kiln_vmm::devices::virtio::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};
use kiln_vmm::vstate::memory;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn virtiofsd() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("KILN_VIRTIOFSD").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/virtiofsd")),
        Some(PathBuf::from("/usr/libexec/virtiofsd")),
        Some(PathBuf::from("/usr/lib/qemu/virtiofsd")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// The daemon, killed when the test ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const FUSE_INIT: u32 = 26;
const IN_LEN: u32 = 40 + 64;
const OUT_LEN: u32 = 16 + 64;

#[test]
fn virtiofsd_answers_fuse_init_through_our_rings() {
    let Some(bin) = virtiofsd() else {
        eprintln!("virtiofsd not installed (cargo install virtiofsd); skipping");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    let socket = dir.path().join("fs.sock");
    let daemon = Daemon(
        Command::new(&bin)
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(&shared)
            .args(["--sandbox", "none", "--cache", "never"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start virtiofsd"),
    );
    // virtiofsd creates its socket once it listens.
    while !socket.exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    let (mem, memfd) = memory::create(64 << 20, memory::Backing::Shared).expect("memory");
    let memfd = memfd.expect("shared memory has a memfd");
    let mut fs = Fs::connect(&socket, "kiln-shared", mem.clone(), &memfd).expect("connect");
    assert_eq!(fs.device_type(), 26);
    assert_ne!(fs.features() & VIRTIO_F_VERSION_1, 0);
    let mut tag = [0u8; 40];
    fs.read_config(0, &mut tag);
    assert_eq!(&tag[..11], b"kiln-shared");
    assert_eq!(u32::from_le_bytes([tag[36], tag[37], tag[38], tag[39]]), 1);

    let kicks: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
        .collect();
    assert!(fs.take_queue_notifiers(&kicks));
    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
    let requests = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 16);
    let irq = Arc::new(IrqLine::new().expect("irq"));
    fs.ack_features(VIRTIO_F_VERSION_1);
    let queues = vec![
        hiprio.create_queue().expect("queue"),
        requests.create_queue().expect("queue"),
    ];
    // The driver starts the device from a vCPU thread: activate under the
    // vCPU seccomp filter, which kills the process on a system call it
    // does not allow.
    let filters = kiln_vmm::seccomp::Filters::new().expect("filters");
    let (activated, mut fs) = std::thread::scope(|s| {
        s.spawn(|| {
            kiln_vmm::seccomp::apply(&filters.vcpu).expect("seccomp");
            let r = fs.activate(mem.clone(), queues, irq.clone());
            (r, fs)
        })
        .join()
        .expect("activation thread")
    });
    activated.expect("activate: memory table and vrings");

    // FUSE_INIT: in header + init_in (device-readable), out header +
    // init_out (device-writable).
    let req = 0x30_0000u64;
    let reply = 0x31_0000u64;
    let mut msg = Vec::new();
    msg.extend_from_slice(&IN_LEN.to_le_bytes());
    msg.extend_from_slice(&FUSE_INIT.to_le_bytes());
    msg.extend_from_slice(&1u64.to_le_bytes()); // unique
    msg.extend_from_slice(&[0; 24]); // nodeid, uid, gid, pid, extlen, pad
    msg.extend_from_slice(&7u32.to_le_bytes()); // major
    msg.extend_from_slice(&31u32.to_le_bytes()); // minor
    msg.extend_from_slice(&[0; 56]);
    assert_eq!(msg.len(), IN_LEN as usize);
    mem.write_slice(&msg, GuestAddress(req)).expect("request");
    requests
        .add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(req, IN_LEN, VRING_DESC_F_NEXT as u16, 1)),
                RawDescriptor::from(Descriptor::new(
                    reply,
                    OUT_LEN,
                    VRING_DESC_F_WRITE as u16,
                    0,
                )),
            ],
            0,
        )
        .expect("chain");
    kicks[1].write(1).expect("kick");

    // Wait for virtiofsd's call, then relay it as the device would.
    let call = fs.call_eventfd(1).expect("call eventfd").as_raw_fd();
    let mut pfd = libc::pollfd {
        fd: call,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a 60 s bound only keeps a broken backend
    // from hanging the test.
    let n = unsafe { libc::poll(&mut pfd, 1, 60_000) };
    assert_eq!(n, 1, "virtiofsd never signalled the call eventfd");
    fs.host_ready();
    assert_ne!(
        irq.status() & VIRTIO_MMIO_INT_VRING,
        0,
        "no interrupt relayed"
    );

    assert_eq!(requests.used().idx().load(), 1);
    let used = requests.used().ring().ref_at(0).expect("used").load();
    assert_eq!(used.len(), OUT_LEN);
    let mut out = [0u8; OUT_LEN as usize];
    mem.read_slice(&mut out, GuestAddress(reply))
        .expect("reply");
    let error = i32::from_le_bytes([out[4], out[5], out[6], out[7]]);
    let unique = u64::from_le_bytes(out[8..16].try_into().expect("8"));
    let major = u32::from_le_bytes([out[16], out[17], out[18], out[19]]);
    assert_eq!((error, unique, major), (0, 1, 7));

    // A reset stops the rings in the backend without an error.
    fs.reset();
    drop(daemon);
}
