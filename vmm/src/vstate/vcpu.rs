//! A vCPU thread's side of a run: KVM_RUN in a loop, each exit handed to
//! the [`Bus`], until the run is over; and the signal that kicks a thread
//! out of KVM_RUN when it must look at the stop flag.

use std::io::Write;
use std::sync::Once;

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::bus::{Bus, Exit};
use super::machine::{MachineError, RunState};

/// The signal that kicks a vCPU thread out of KVM_RUN at the end of a run.
pub(super) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler, once per process. It does nothing:
/// the signal is only there to make KVM_RUN return EINTR.
pub(super) fn install_kick_handler() -> std::io::Result<()> {
    static HANDLER: Once = Once::new();
    let mut handler = Ok(());
    HANDLER.call_once(|| {
        handler = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick);
    });
    handler.map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// One vCPU's loop: run, dispatch the exit, until the run is over.
/// `first_exit` marks the time the guest first exits to the VMM.
pub(super) fn run_vcpu<W: Write>(
    index: usize,
    vcpu: &mut VcpuFd,
    bus: &Bus<W>,
    state: &RunState,
    mut first_exit: Option<&(dyn Fn(&'static str) + Sync)>,
) {
    while !state.stopping() {
        let result = vcpu.run();
        if let Some(mark) = first_exit.take() {
            mark("run: KVM_RUN to first exit");
        }
        let exit = match result {
            Ok(VcpuExit::IoOut(port, data)) => bus.pio_out(port, data),
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.pio_in(port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.mmio_read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.mmio_write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => Some(Exit::Halted),
            Ok(VcpuExit::Shutdown) | Ok(VcpuExit::SystemEvent(..)) => Some(Exit::Shutdown),
            Ok(other) => {
                state.finish(Err(MachineError::UnexpectedExit(
                    index,
                    format!("{other:?}"),
                )));
                return;
            }
            // A kick (or any signal): look at the stop flag again.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => {
                state.finish(Err(MachineError::Run(index, e)));
                return;
            }
        };
        if let Some(exit) = exit {
            state.finish(Ok(exit));
            return;
        }
    }
}
