//! The request loop.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use kiln_agent::{
    FrameError, FrameReader, FrameWriter, MountRequest, Reply, Request, SpawnErrorKind,
    AGENT_VERSION, PROTOCOL_VERSION,
};
use nix::mount::MsFlags;

use crate::mount::{mount_on, MountError};
use crate::{disks, exec, files, trees};

/// The write half of the channel, shared by every thread that replies.
#[derive(Clone)]
pub struct Outbox(Arc<Mutex<FrameWriter<Box<dyn Write + Send>>>>);

impl Outbox {
    /// Sends one reply; false if the host is gone.
    pub fn send(&self, msg: &Reply) -> bool {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        w.write(msg).is_ok()
    }
}

/// Serves requests read from `input`, replying on `output`, until the host
/// asks for power-off or goes away.
pub fn serve(
    input: impl Read,
    output: Box<dyn Write + Send>,
    boot_error: Option<String>,
) -> Result<(), FrameError> {
    let mut reader = FrameReader::new(input);
    let out = Outbox(Arc::new(Mutex::new(FrameWriter::new(output))));
    out.send(&Reply::Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: AGENT_VERSION.to_string(),
        boot_error: boot_error.clone(),
    });

    let mut running: HashMap<u32, exec::Running> = HashMap::new();
    let mut uploads = files::Uploads::default();
    let mut trees = trees::TreeUploads::default();
    loop {
        let req = match reader.read::<Request>() {
            Ok(req) => req,
            Err(e) if e.is_recoverable() => {
                out.send(&Reply::Failed {
                    id: None,
                    message: e.to_string(),
                });
                continue;
            }
            // The host went away: nothing left to serve.
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        match req {
            Request::Hello {
                protocol,
                unix_time_ms,
                ..
            } => {
                if std::process::id() == 1 {
                    set_clock(unix_time_ms);
                }
                if protocol != PROTOCOL_VERSION {
                    out.send(&Reply::Failed {
                        id: None,
                        message: format!(
                            "protocol mismatch: host speaks {protocol}, agent {PROTOCOL_VERSION}"
                        ),
                    });
                }
            }
            Request::Exec(req) => {
                if let Some(e) = &boot_error {
                    out.send(&Reply::SpawnFailed {
                        id: req.id,
                        kind: SpawnErrorKind::Other,
                        message: format!("the guest has no usable root: {e}"),
                    });
                    continue;
                }
                disks::link_by_id();
                let id = req.id;
                running.retain(|_, r| !r.has_exited());
                if let Some(r) = exec::start(req, out.clone()) {
                    running.insert(id, r);
                }
            }
            Request::Stdin { id, data } => {
                let eof = data.is_empty();
                if let Some(r) = running.get_mut(&id) {
                    if let Some(tx) = &r.stdin {
                        if tx.send(data).is_err() || eof {
                            r.stdin = None;
                        }
                    }
                }
            }
            Request::Signal { id, signal } => {
                if let Some(Err(message)) = running.get(&id).map(|r| r.signal(signal)) {
                    out.send(&Reply::Failed {
                        id: Some(id),
                        message,
                    });
                }
            }
            Request::Resize { id, rows, cols } => {
                let size = kiln_agent::WindowSize { rows, cols };
                if let Some(Err(message)) = running.get(&id).map(|r| r.resize(size)) {
                    out.send(&Reply::Failed {
                        id: Some(id),
                        message,
                    });
                }
            }
            Request::Mount(m) => {
                let id = m.id;
                out.send(&match do_mount(&m) {
                    Ok(()) => Reply::Done { id },
                    Err(message) => Reply::Failed {
                        id: Some(id),
                        message,
                    },
                });
            }
            Request::PutFile { id, path, mode } => uploads.begin(id, path, mode),
            Request::PutTree { id, path } => trees.begin(id, path, &out),
            Request::FileData { id, data } => {
                if trees.has(id) {
                    trees.data(id, data);
                } else if let Some(reply) = uploads.data(id, &data) {
                    out.send(&reply);
                }
            }
            Request::GetFile { id, path } => files::send(id, path, out.clone()),
            Request::Poweroff => {
                if std::process::id() == 1 {
                    crate::init::quiesce();
                }
                nix::unistd::sync();
                out.send(&Reply::PoweringOff);
                return Ok(());
            }
        }
    }
}

fn do_mount(m: &MountRequest) -> Result<(), String> {
    let flags = if m.readonly {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    let data = (!m.options.is_empty()).then_some(m.options.as_str());
    mount_on(&m.source, &m.target, &m.fstype, flags, data).map_err(|e| match e {
        MountError::MountPoint(e) => format!("creating {}: {e}", m.target),
        MountError::Mount(e) => {
            format!("mounting {} ({}) on {}: {e}", m.source, m.fstype, m.target)
        }
    })
}

fn set_clock(unix_time_ms: u64) {
    let ts = nix::sys::time::TimeSpec::from(std::time::Duration::from_millis(unix_time_ms));
    if let Err(e) = nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
        eprintln!("kiln-agent: setting the clock: {e}");
    }
}
