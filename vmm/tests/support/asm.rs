//! Tiny freestanding guests, assembled at test time with GNU binutils.
//! Shared by kiln-vmm's tests and benchmarks and the root crate's
//! `kiln __vmm` tests (each includes this file with `#[path]`).

use std::path::Path;
use std::process::Command;

/// Assembles `source`; returns the flat binary and the ELF (which
/// kiln-vmm's Linux loader takes as a "vmlinux").
pub fn assemble_both(source: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n);
    std::fs::write(
        p("g.s"),
        format!(".code64\n.globl _start\n_start:\n{source}\n"),
    )
    .expect("write");
    let run = |cmd: &str, args: &[&Path], extra: &[&str]| {
        let out = Command::new(cmd)
            .args(extra)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{cmd}: {e} (install binutils)"));
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run("as", &[&p("g.s"), Path::new("-o"), &p("g.o")], &["--64"]);
    run(
        "ld",
        &[&p("g.o"), Path::new("-o"), &p("g.elf")],
        &["-Ttext=0x100000", "-e", "_start", "--no-warn-rwx-segments"],
    );
    run("objcopy", &[&p("g.elf"), &p("g.bin")], &["-O", "binary"]);
    (
        std::fs::read(p("g.bin")).expect("read"),
        std::fs::read(p("g.elf")).expect("read"),
    )
}
