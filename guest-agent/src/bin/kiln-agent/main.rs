//! kiln-agent: PID 1 of kiln's build VM.
//!
//! Sets up the guest's root (the tools image under a tmpfs overlay), opens the
//! agent's virtio-console port and serves the host's requests until it is told
//! to power off. Nothing here may panic on input from the host: a bad request
//! gets a `Failed` reply and the agent keeps serving.

mod disks;
mod etc_file;
mod exec;
mod files;
mod init;
mod limits;
mod machine_id;
mod mount;
mod network;
mod port;
mod pty;
mod reaper;
mod serve;
mod trees;

use std::process::ExitCode;

fn main() -> ExitCode {
    // `--stdio` serves the protocol on stdin/stdout instead of the console
    // port, outside a VM: how the agent's own tests drive it.
    if std::env::args().nth(1).as_deref() == Some("--stdio") {
        return match serve::serve(std::io::stdin().lock(), Box::new(std::io::stdout()), None) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kiln-agent: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let pid1 = std::process::id() == 1;
    let boot_error = if pid1 {
        init::early_mounts()
            .and_then(|()| init::enter_tools_root())
            .err()
            .map(|e| e.to_string())
    } else {
        None
    };
    if let Some(e) = &boot_error {
        eprintln!("kiln-agent: {e}");
    }
    if pid1 {
        reaper::start();
        if boot_error.is_none() {
            if let Err(e) = limits::setup() {
                eprintln!("kiln-agent: commands run without memory and process limits: {e}");
            }
            if let Err(e) = network::configure_resolver() {
                eprintln!("kiln-agent: names will not resolve: writing /etc/resolv.conf: {e}");
            }
            if let Err(e) = machine_id::ensure() {
                eprintln!("kiln-agent: the guest has no machine ID (systemd-nspawn will refuse to run): {e}");
            }
        }
    }
    disks::link_by_id();
    if boot_error.is_none() {
        disks::watch_uevents();
    }

    let result = port::open().map_err(|e| e.to_string()).and_then(|port| {
        let input = port.try_clone().map_err(|e| e.to_string())?;
        serve::serve(input, Box::new(port), boot_error).map_err(|e| e.to_string())
    });
    if let Err(e) = &result {
        eprintln!("kiln-agent: {e}");
    }
    if pid1 {
        // PID 1 must never exit; power off instead (the host sees no
        // PoweringOff reply and reports the failure).
        init::power_off();
    }
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
