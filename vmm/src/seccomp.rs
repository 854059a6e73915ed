//! seccomp filters for the machine's threads (seccompiler): a vCPU thread
//! and the device thread may make only the system calls their work needs,
//! and `ioctl` only with the request numbers they use. Anything else kills
//! the process: a guest that has taken over a thread cannot open files,
//! start processes, reach the network or reconfigure the VM through it.

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building a seccomp filter: {0}")]
    Build(seccompiler::BackendError),
    #[error("installing a seccomp filter: {0}")]
    Apply(seccompiler::Error),
}

/// What every thread of the machine needs: memory, locks, signals (the
/// end-of-run kick), reading and writing descriptors it already holds,
/// thread exit.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    // Dropping a descriptor checks it is still open (std, debug builds).
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    // Disk I/O (virtio-blk), which may run on either thread.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    // vhost-user messages (virtio-fs set-up happens when the driver
    // starts the device, on a vCPU thread).
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
];

/// `_IO(KVMIO, 0x80)`: enter the guest. Everything else KVM offers (memory
/// slots, registers, irqfds, ioeventfds) is set up before the threads start.
pub const KVM_RUN: u64 = 0xae80;

/// A vCPU thread needs [`COMMON`] and one ioctl, to run the guest.
const VCPU_IOCTLS: &[u64] = &[KVM_RUN];

/// The device thread waits on its epoll set and changes it; it makes no
/// ioctl at all (interrupts go out through irqfds, which are writes).
const EVENT_LOOP: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];
const EVENT_LOOP_IOCTLS: &[u64] = &[];

/// The compiled filters, one per kind of thread.
#[derive(Clone)]
pub struct Filters {
    pub vcpu: Arc<BpfProgram>,
    pub event_loop: Arc<BpfProgram>,
}

impl Filters {
    /// Filters that kill the process on any other system call.
    pub fn new() -> Result<Filters, SeccompError> {
        Self::with_action(SeccompAction::KillProcess)
    }

    /// Filters whose answer to other system calls is `action` (tests use
    /// an errno to observe refusals without dying).
    pub fn with_action(action: SeccompAction) -> Result<Filters, SeccompError> {
        Ok(Filters {
            vcpu: Arc::new(compile(&[COMMON], VCPU_IOCTLS, action.clone())?),
            event_loop: Arc::new(compile(&[COMMON, EVENT_LOOP], EVENT_LOOP_IOCTLS, action)?),
        })
    }
}

/// A filter allowing the system calls in `lists` with any arguments, and
/// `ioctl` with the requests in `ioctls` only (none: no ioctl).
fn compile(
    lists: &[&[libc::c_long]],
    ioctls: &[u64],
    action: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = lists
        .iter()
        .flat_map(|l| l.iter())
        .map(|&nr| (nr, Vec::new()))
        .collect();
    if !ioctls.is_empty() {
        // The request is an unsigned int in the kernel's ioctl(2): compare
        // the low 32 bits of the second argument.
        let by_request = ioctls
            .iter()
            .map(|&request| {
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                    .and_then(|c| SeccompRule::new(vec![c]))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(SeccompError::Build)?;
        rules.insert(libc::SYS_ioctl, by_request);
    }
    let filter = SeccompFilter::new(rules, action, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Build)
}

/// Installs `filter` on the calling thread (only).
pub fn apply(filter: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(filter).map_err(SeccompError::Apply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_filtered_thread_is_refused_what_it_does_not_need() {
        let filters =
            Filters::with_action(SeccompAction::Errno(libc::EPERM as u32)).expect("filters");
        let (r, w) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (open_errno, write_ok) = std::thread::spawn(move || {
            apply(&filters.vcpu).expect("apply");
            let path = c"/etc/hostname";
            // SAFETY: a valid NUL-terminated path; the result is checked.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            let ok = std::io::Write::write(&mut &w, b"x").is_ok();
            (if fd < 0 { errno } else { Some(0) }, ok)
        })
        .join()
        .expect("thread");
        assert_eq!(open_errno, Some(libc::EPERM), "open was allowed");
        assert!(write_ok, "write on a held descriptor was refused");
        drop(r);
        // The filter is the thread's: this thread may still open files.
        let f = std::fs::File::open("/etc/hostname")
            .or_else(|_| std::fs::File::open("/proc/self/stat"));
        assert!(f.is_ok_and(|f| f.as_raw_fd() >= 0));
    }

    #[test]
    fn both_threads_may_move_network_frames() {
        use crate::devices::virtio::net::FrameStream;
        // The device thread serves the socket; a vCPU thread does too when
        // the driver starts the device (activation pumps once).
        let filters =
            Filters::with_action(SeccompAction::Errno(libc::EPERM as u32)).expect("filters");
        for filter in [filters.event_loop.clone(), filters.vcpu.clone()] {
            let (ours, mut peer) = std::os::unix::net::UnixStream::pair().expect("pair");
            let mut stream = FrameStream::new(ours).expect("stream");
            std::io::Write::write_all(&mut peer, &[0, 0, 0, 2, 0xaa, 0xbb]).expect("peer");
            let (stream, got) = std::thread::spawn(move || {
                apply(&filter).expect("apply");
                stream.tx.push(b"frame").expect("push");
                let flushed = stream.flush().map_err(|e| e.to_string());
                let read = stream.fill().map_err(|e| e.to_string());
                (stream, (flushed, read))
            })
            .join()
            .expect("thread");
            assert_eq!(got, (Ok(true), Ok(6)));
            assert_eq!(stream.rx.frame().expect("frame"), Some(&[0xaa, 0xbb][..]));
            let mut out = [0u8; 9];
            std::io::Read::read_exact(&mut peer, &mut out).expect("peer read");
            assert_eq!(&out, b"\0\0\0\x05frame");
        }
    }

    /// Run by the tests below in a child, which must die of SIGSYS at the
    /// forbidden call.
    #[test]
    fn production_filter_child() {
        let Some(what) = std::env::var_os("KILN_SECCOMP_CHILD") else {
            return;
        };
        let filters = Filters::new().expect("filters");
        match what.to_str() {
            Some("open") => {
                apply(&filters.event_loop).expect("apply");
                let _ = std::fs::File::open("/proc/self/stat");
            }
            Some("ioctl") => {
                apply(&filters.vcpu).expect("apply");
                // KVM_RUN is on the list: on a descriptor that is not a
                // vCPU it fails, and the thread goes on.
                // SAFETY: an ioctl with no argument; the result is checked.
                let r = unsafe { libc::ioctl(0, KVM_RUN as libc::c_ulong) };
                if r == -1 {
                    let _ = std::io::Write::write_all(&mut std::io::stdout(), b"KVM_RUN allowed\n");
                }
                // TCGETS is not.
                let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
                // SAFETY: TCGETS writes one termios into `t`.
                let _ = unsafe { libc::ioctl(0, libc::TCGETS, t.as_mut_ptr()) };
            }
            _ => {}
        }
        std::process::exit(0);
    }

    /// Runs [`production_filter_child`] doing `what`; its status and stdout.
    fn filtered_child(what: &str) -> std::process::Output {
        let exe = std::env::current_exe().expect("test binary");
        std::process::Command::new(exe)
            .args([
                "--exact",
                "seccomp::tests::production_filter_child",
                "--test-threads=1",
                "--nocapture",
                "--quiet",
            ])
            .env("KILN_SECCOMP_CHILD", what)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .expect("child")
    }

    #[test]
    fn the_production_filter_kills_the_process() {
        use std::os::unix::process::ExitStatusExt;
        let out = filtered_child("open");
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{:?}", out.status);
    }

    #[test]
    fn an_ioctl_outside_the_list_kills_the_process() {
        use std::os::unix::process::ExitStatusExt;
        let out = filtered_child("ioctl");
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{:?}", out.status);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("KVM_RUN allowed"),
            "KVM_RUN was refused: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    #[test]
    fn kvm_run_is_the_request_kvm_ioctls_uses() {
        // _IO(KVMIO, 0x80), as the kernel's uapi defines it.
        use vmm_sys_util::{ioctl_io_nr, ioctl_ioc_nr};
        ioctl_io_nr!(kvm_run, 0xae, 0x80);
        assert_eq!(kvm_run(), KVM_RUN);
    }
}
