//! Finds and opens the agent's virtio-console port.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::time::{Duration, Instant};

use kiln_agent::poll::poll_until;
use kiln_agent::AGENT_PORT_NAME;

/// Opens `/dev/vportNpM` whose name is [`AGENT_PORT_NAME`], waiting for the
/// virtio-console driver to register it.
pub fn open() -> io::Result<File> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let Some(dev) = poll_until(deadline, Duration::from_millis(5), find) else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no virtio-console port named '{AGENT_PORT_NAME}'"),
        ));
    };
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/{dev}"))
}

fn find() -> Option<String> {
    for entry in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == AGENT_PORT_NAME {
            let dev = entry.file_name().to_string_lossy().into_owned();
            if fs::metadata(format!("/dev/{dev}")).is_ok() {
                return Some(dev);
            }
        }
    }
    None
}
