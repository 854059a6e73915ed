//! QEMU command lines, one builder for the microvm backend and for
//! `kiln boot`: where the binary is, the options every kiln QEMU starts
//! with (no default devices, no user config, no window), KVM or TCG, the
//! serial console on stdio, and drives whose paths are escaped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::util::which::which;

/// qemu-system-x86_64: `$KILN_QEMU`, else from PATH.
pub fn binary() -> Result<PathBuf> {
    match std::env::var_os("KILN_QEMU").filter(|v| !v.is_empty()) {
        Some(p) => Ok(PathBuf::from(p)),
        None => which("qemu-system-x86_64").context(
            "qemu-system-x86_64 not found: install it with 'sudo apt-get install qemu-system-x86'",
        ),
    }
}

/// A path as a value in a QEMU option list (`-drive file=PATH,if=none`),
/// where a comma inside a value is written twice.
pub fn escape_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// How the machine shows itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// No graphics at all (`-nographic`): a microVM has none.
    None,
    /// A PC's graphics card with its window turned off (`-display none`).
    Off,
}

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM, with the host's CPU.
    Kvm,
    /// TCG software emulation of every CPU feature it has; with
    /// `thread_per_vcpu`, asked for explicitly (`thread=multi`).
    Tcg { thread_per_vcpu: bool },
}

/// Where the guest's first serial port goes: QEMU's stdout either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serial {
    /// `-serial stdio`.
    Stdio,
    /// Through a stdio chardev with `signal=off`, so a Ctrl-C in the
    /// console's bytes never stops QEMU: kiln decides when it ends.
    StdioNoSignals,
}

/// A qemu-system-x86_64 command line, in the order it is built.
#[derive(Debug, Clone)]
pub struct QemuCommand {
    binary: PathBuf,
    args: Vec<String>,
}

impl QemuCommand {
    /// Starts with the options every kiln QEMU takes: no default devices
    /// and no user config, so the machine is exactly what follows.
    pub fn new(binary: PathBuf, display: Display) -> QemuCommand {
        let mut q = QemuCommand {
            binary,
            args: Vec::new(),
        };
        q.flag("-nodefaults").flag("-no-user-config");
        match display {
            Display::None => q.flag("-nographic"),
            Display::Off => q.opt("-display", "none"),
        };
        q
    }

    /// A lone option, such as `-no-reboot`.
    pub fn flag(&mut self, name: &str) -> &mut QemuCommand {
        self.args.push(name.to_string());
        self
    }

    /// An option and its value, such as `-m 512M`.
    pub fn opt(&mut self, name: &str, value: impl Into<String>) -> &mut QemuCommand {
        self.args.push(name.to_string());
        self.args.push(value.into());
        self
    }

    pub fn accel(&mut self, accel: Accel) -> &mut QemuCommand {
        match accel {
            Accel::Kvm => self.opt("-accel", "kvm").opt("-cpu", "host"),
            Accel::Tcg { thread_per_vcpu } => {
                let tcg = if thread_per_vcpu {
                    "tcg,thread=multi"
                } else {
                    "tcg"
                };
                self.opt("-accel", tcg).opt("-cpu", "max")
            }
        }
    }

    pub fn serial(&mut self, serial: Serial) -> &mut QemuCommand {
        match serial {
            Serial::Stdio => self.opt("-serial", "stdio"),
            Serial::StdioNoSignals => self
                .opt("-chardev", "stdio,id=con,signal=off")
                .opt("-serial", "chardev:con"),
        }
    }

    /// `-drive file=FILE,OPTIONS`.
    pub fn drive(&mut self, file: &Path, options: &str) -> &mut QemuCommand {
        self.opt("-drive", format!("file={},{options}", escape_path(file)))
    }

    /// A firmware flash drive: unit 0 is the code (read-only), unit 1
    /// the variables.
    pub fn pflash(&mut self, unit: u8, file: &Path, readonly: bool) -> &mut QemuCommand {
        let ro = if readonly { "readonly=on," } else { "" };
        self.opt(
            "-drive",
            format!(
                "if=pflash,format=raw,unit={unit},{ro}file={}",
                escape_path(file)
            ),
        )
    }

    /// The arguments, without the binary (for tests of command lines).
    #[cfg(test)]
    pub fn args(&self) -> &[String] {
        &self.args
    }

    pub fn into_command(self) -> Command {
        let mut cmd = Command::new(self.binary);
        cmd.args(self.args);
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_common_options_then_the_callers_in_order() {
        let mut q = QemuCommand::new(PathBuf::from("/q"), Display::Off);
        q.opt("-m", "1024M")
            .serial(Serial::StdioNoSignals)
            .accel(Accel::Tcg {
                thread_per_vcpu: true,
            })
            .pflash(0, Path::new("/f,w/CODE.fd"), true)
            .pflash(1, Path::new("/w/VARS.fd"), false)
            .drive(Path::new("/a,b.qcow2"), "format=qcow2,if=virtio");
        assert_eq!(
            q.args().join(" "),
            "-nodefaults -no-user-config -display none -m 1024M \
             -chardev stdio,id=con,signal=off -serial chardev:con \
             -accel tcg,thread=multi -cpu max \
             -drive if=pflash,format=raw,unit=0,readonly=on,file=/f,,w/CODE.fd \
             -drive if=pflash,format=raw,unit=1,file=/w/VARS.fd \
             -drive file=/a,,b.qcow2,format=qcow2,if=virtio"
        );

        let mut q = QemuCommand::new(PathBuf::from("/q"), Display::None);
        q.flag("-no-reboot").accel(Accel::Kvm).serial(Serial::Stdio);
        assert_eq!(
            q.args(),
            [
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-no-reboot",
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-serial",
                "stdio"
            ]
        );
        let q = QemuCommand::new(PathBuf::from("/q"), Display::None)
            .accel(Accel::Tcg {
                thread_per_vcpu: false,
            })
            .clone();
        assert_eq!(q.args()[3..], ["-accel", "tcg", "-cpu", "max"]);
        assert_eq!(q.into_command().get_program(), "/q");
    }
}
