//! Files of the guest's /etc the agent writes at boot (resolv.conf,
//! machine-id) over what the tools image has there.

use std::fs;
use std::io;
use std::path::Path;

/// Writes `text` to `path` as a new file. What was there is removed first:
/// the tools image may have a link (into a read-only place, or to a file
/// nothing serves here), which must not be written through.
pub fn replace(path: &Path, text: &str) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fs::write(path, text)
}
