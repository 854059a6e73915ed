//! put/get of files, streamed in chunks (directories: trees.rs).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use kiln_agent::frame::DATA_CHUNK;
use kiln_agent::Reply;

use crate::serve::Outbox;
use crate::trees;

/// Files being received, by request id.
#[derive(Default)]
pub struct Uploads {
    open: HashMap<u32, Upload>,
}

struct Upload {
    path: String,
    mode: u32,
    file: Option<File>,
    error: Option<String>,
}

impl Uploads {
    pub fn begin(&mut self, id: u32, path: String, mode: u32) {
        let mode = mode & 0o7777;
        let result = create(&path, mode);
        let (file, error) = match result {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(format!("{path}: {e}"))),
        };
        self.open.insert(
            id,
            Upload {
                path,
                mode,
                file,
                error,
            },
        );
    }

    /// Handles one chunk; an empty chunk ends the file and yields the reply.
    pub fn data(&mut self, id: u32, data: &[u8]) -> Option<Reply> {
        let Some(up) = self.open.get_mut(&id) else {
            return Some(Reply::Failed {
                id: Some(id),
                message: format!("file data for unknown upload {id}"),
            });
        };
        if !data.is_empty() {
            if let (Some(f), None) = (&mut up.file, &up.error) {
                if let Err(e) = f.write_all(data) {
                    up.error = Some(format!("{}: {e}", up.path));
                }
            }
            return None;
        }
        let up = self.open.remove(&id)?;
        let finish = || -> std::io::Result<()> {
            // Apply the mode exactly, whatever the umask did to it.
            fs::set_permissions(&up.path, fs::Permissions::from_mode(up.mode))
        };
        Some(match up.error {
            Some(message) => Reply::Failed {
                id: Some(id),
                message,
            },
            None => match finish() {
                Ok(()) => Reply::Done { id },
                Err(e) => Reply::Failed {
                    id: Some(id),
                    message: format!("{}: {e}", up.path),
                },
            },
        })
    }
}

fn create(path: &str, mode: u32) -> std::io::Result<File> {
    if let Some(parent) = Path::new(path).parent() {
        fs::create_dir_all(parent)?;
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
}

/// Sends a file, or a directory as a tar stream, back on its own thread so
/// commands and other requests go on.
pub fn send(id: u32, path: String, out: Outbox) {
    let _ = std::thread::Builder::new()
        .name(format!("get-{id}"))
        .spawn(move || {
            if let Err(message) = send_file(id, &path, &out) {
                out.send(&Reply::Failed {
                    id: Some(id),
                    message,
                });
            }
        });
}

fn send_file(id: u32, path: &str, out: &Outbox) -> Result<(), String> {
    // O_NONBLOCK: opening a FIFO must not block before the type check.
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("{path}: {e}"))?;
    if meta.is_dir() {
        drop(f);
        return trees::send(id, path, out);
    }
    if !meta.is_file() {
        return Err(format!("{path}: not a regular file or directory"));
    }
    out.send(&Reply::FileHeader {
        id,
        mode: meta.permissions().mode() & 0o7777,
        size: meta.len(),
    });
    let mut buf = vec![0u8; DATA_CHUNK];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if !out.send(&Reply::FileData {
                    id,
                    data: buf[..n].to_vec(),
                }) {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{path}: {e}")),
        }
    }
    out.send(&Reply::FileData { id, data: vec![] });
    Ok(())
}
