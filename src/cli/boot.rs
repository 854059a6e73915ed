//! `kiln boot IMAGE`: its flags, handed to the firmware boot of a built
//! image.

use std::path::PathBuf;

use anyhow::Result;

use super::vm_args::{parse_mem, parse_secs};
use crate::image::firmware_boot::{self, BootOptions, Firmware};
use crate::image::recipe::{self, Size};

#[derive(clap::Args)]
pub struct BootArgs {
    /// The image: raw, qcow2, vmdk, vhdx, vpc, ova or iso (optionally .xz/.zst).
    image: PathBuf,
    #[arg(long, value_enum, default_value_t = Firmware::Uefi)]
    firmware: Firmware,
    /// Succeed once the serial console matches this regular expression.
    /// It is tried as text arrives: end it with \n to wait for a whole line.
    #[arg(long, value_name = "REGEX", default_value = "login:")]
    expect: String,
    /// Give up (exit 124) after SECS seconds.
    #[arg(long, value_name = "SECS", default_value = "600", value_parser = parse_secs)]
    timeout: f64,
    /// Guest memory.
    #[arg(long, default_value = "1G", value_parser = parse_mem)]
    mem: u32,
    /// Boot with the disk enlarged to SIZE (e.g. 8G), in a throwaway
    /// overlay, as a cloud gives a bigger disk: tests growing the root.
    #[arg(long, value_name = "SIZE", value_parser = parse_disk_size)]
    disk_size: Option<u64>,
    /// Attach a cloud-init NoCloud seed (a CIDATA disk, like cloud-localds
    /// makes) from DIR/user-data, DIR/meta-data and DIR/network-config.
    #[arg(long, value_name = "DIR")]
    cloud_init: Option<PathBuf>,
    /// Show the console on stderr as it comes.
    #[arg(long)]
    console: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_disk_size(s: &str) -> Result<u64, String> {
    match recipe::parse_size(s)? {
        Size::Bytes(n) if n > 0 => Ok(n),
        _ => Err(format!("invalid disk size '{s}': give a size such as 8G")),
    }
}

pub fn boot(a: BootArgs) -> Result<u8> {
    firmware_boot::boot(BootOptions {
        image: a.image,
        firmware: a.firmware,
        expect: a.expect,
        timeout: a.timeout,
        mem_mib: a.mem,
        disk_size: a.disk_size,
        cloud_init: a.cloud_init,
        console: a.console,
        json: a.json,
    })
}
