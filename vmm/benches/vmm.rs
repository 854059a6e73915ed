//! kiln-vmm figures, each against a baseline measured in the same run:
//!
//! 1. start-up: from creating the machine to the guest's first instruction
//!    (a guest whose first instruction writes the exit port), against bare
//!    KVM ioctls doing the least that runs one instruction, with the median
//!    of each step the machine records ([`Machine::startup_times`]);
//! 2. resident memory of the VMM beyond guest RAM (goal: at most 5 MiB);
//! 3. virtio-blk sequential read and write from a tiny guest, against the
//!    host reading and writing the same file in the same request size.
//!
//! `cargo bench -p kiln-vmm --bench vmm -- RUNS` (default 15 runs).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_vmm::arch::boot::Entry;
use kiln_vmm::devices::virtio::block::Block;
use kiln_vmm::vstate::machine::{Exit, Machine, StartupTimes};

const LOAD: u64 = 0x10_0000;
const DISK_MIB: u64 = 64;
const REQUEST: u32 = 512 * 1024;

#[path = "../tests/support/asm.rs"]
mod asm;

fn assemble(source: &str) -> Vec<u8> {
    asm::assemble_both(source).0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Bare KVM: VM, 1 MiB of anonymous memory, one vCPU in real mode at
/// 0x1000 running `out %al, $0xf4`.
fn bare_kvm_first_instruction() -> Duration {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuExit};
    let start = Instant::now();
    let kvm = Kvm::new().expect("kvm");
    let vm = kvm.create_vm().expect("vm");
    let size = 1 << 20;
    // SAFETY: a fresh private anonymous mapping, checked, unmapped below.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    // SAFETY: 0x1000 + 2 bytes lie inside the 1 MiB mapping.
    unsafe {
        std::ptr::copy_nonoverlapping([0xe6u8, 0xf4].as_ptr(), (host as *mut u8).add(0x1000), 2)
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping outlives the VM (unmapped after it is dropped).
    unsafe { vm.set_user_memory_region(region) }.expect("memory");
    let mut vcpu = vm.create_vcpu(0).expect("vcpu");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("sregs");
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).expect("regs");
    loop {
        if let VcpuExit::IoOut(0xf4, _) = vcpu.run().expect("run") {
            break;
        }
    }
    let t = start.elapsed();
    drop(vcpu);
    drop(vm);
    // SAFETY: the mapping made above, no longer used by any VM.
    unsafe { libc::munmap(host, size) };
    t
}

fn kiln_vmm_first_instruction(code: &[u8]) -> (Duration, StartupTimes) {
    let start = Instant::now();
    let mut m = Machine::new(128 << 20, std::io::sink()).expect("machine");
    m.load(LOAD, code).expect("load");
    m.start_at(Entry { rip: LOAD, rsi: 0 }).expect("start");
    assert_eq!(m.run().expect("run"), Exit::Status(0));
    (start.elapsed(), m.startup_times().clone())
}

/// The median of each step across runs, in the order of the first run.
fn median_steps(runs: &[StartupTimes]) -> Vec<(&'static str, Duration)> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .steps()
        .iter()
        .map(|&(name, _)| {
            let each = runs
                .iter()
                .map(|r| {
                    r.steps()
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map_or(Duration::ZERO, |s| s.1)
                })
                .collect();
            (name, median(each))
        })
        .collect()
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A guest that moves the disk sequentially in REQUEST-sized virtio-blk
/// requests of type `kind` (0 read, 1 write), then exits 0.
fn blk_guest(kind: u32) -> Vec<u8> {
    assemble(&format!(
        r#"
    .set BASE,    0xd0000000
    .set DESC,    0x200000
    .set AVAIL,   0x201000
    .set USED,    0x202000
    .set HDR,     0x203000
    .set STATUSB, 0x203100
    .set BUF,     0x400000
    mov $BASE, %r15
    movl $1, 0x70(%r15)
    movl $3, 0x70(%r15)
    movl $1, 0x24(%r15)
    movl $1, 0x20(%r15)
    movl $0, 0x24(%r15)
    movl $0, 0x20(%r15)
    movl $11, 0x70(%r15)
    movl $0, 0x30(%r15)
    movl $8, 0x38(%r15)
    movl $DESC, 0x80(%r15)
    movl $0, 0x84(%r15)
    movl $AVAIL, 0x90(%r15)
    movl $0, 0x94(%r15)
    movl $USED, 0xa0(%r15)
    movl $0, 0xa4(%r15)
    movl $1, 0x44(%r15)
    movl $15, 0x70(%r15)
    xor %r12, %r12                # sector
    xor %r13d, %r13d              # avail idx
next:
    movl ${kind}, HDR
    movl $0, HDR+4
    movq %r12, HDR+8
    movq $HDR, DESC
    movl $16, DESC+8
    movw $1, DESC+12
    movw $1, DESC+14
    movq $BUF, DESC+16
    movl ${req}, DESC+24
    movw ${dflags}, DESC+28
    movw $2, DESC+30
    movq $STATUSB, DESC+32
    movl $1, DESC+40
    movw $2, DESC+44
    mov %r13d, %ebx
    and $7, %ebx
    movw $0, AVAIL+4(,%rbx,2)
    inc %r13d
    movw %r13w, AVAIL+2
    mfence
    movl $0, 0x50(%r15)
1:  movzwl USED+2, %eax
    cmp %r13w, %ax
    jne 1b
    cmpb $0, STATUSB
    jne fail
    add ${sectors}, %r12
    cmp ${total}, %r12
    jb next
    mov $0xf4, %dx
    mov $0, %al
    outb %al, %dx
    hlt
fail:
    mov $0xf4, %dx
    mov $1, %al
    outb %al, %dx
    hlt
"#,
        req = REQUEST,
        dflags = if kind == 0 { 3 } else { 1 },
        sectors = REQUEST / 512,
        total = DISK_MIB * 2048,
    ))
}

fn guest_blk(path: &Path, code: &[u8]) -> Duration {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("disk");
    let mut m = Machine::new(128 << 20, std::io::sink()).expect("machine");
    m.add_virtio(Box::new(Block::new(file, false, "bench").expect("block")))
        .expect("add");
    m.load(LOAD, code).expect("load");
    m.start_at(Entry { rip: LOAD, rsi: 0 }).expect("start");
    let start = Instant::now();
    assert_eq!(m.run().expect("run"), Exit::Status(0));
    start.elapsed()
}

fn host_blk(path: &Path, write: bool) -> Duration {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("disk");
    let mut buf = vec![0x5au8; REQUEST as usize];
    let start = Instant::now();
    let mut off = 0;
    while off < DISK_MIB << 20 {
        if write {
            file.write_all_at(&buf, off).expect("write");
        } else {
            file.read_exact_at(&mut buf, off).expect("read");
        }
        off += u64::from(REQUEST);
    }
    start.elapsed()
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(15)
        .max(1);
    if kvm_ioctls::Kvm::new().is_err() {
        println!("no usable /dev/kvm here: kiln-vmm benchmarks cannot run");
        return;
    }
    let exit_now = assemble("mov $0xf4, %dx\nmov $0, %al\noutb %al, %dx\nhlt");

    // 1. Start-up, interleaved so both see the same machine state.
    let (mut vmm, mut bare, mut steps) = (Vec::new(), Vec::new(), Vec::new());
    let (mut to_exit, mut after_exit) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (total, times) = kiln_vmm_first_instruction(&exit_now);
        let counted: Duration = times.steps().iter().map(|s| s.1).sum();
        to_exit.push(counted);
        after_exit.push(total.saturating_sub(counted));
        vmm.push(total);
        steps.push(times);
        bare.push(bare_kvm_first_instruction());
    }
    let (v, b) = (median(vmm), median(bare));
    println!("start to first guest instruction ({runs} runs, medians)");
    println!("  bare KVM ioctls (real mode, 1 MiB)      {:8.3} ms", ms(b));
    println!("  kiln-vmm Machine (64-bit, 128 MiB)      {:8.3} ms", ms(v));
    println!(
        "  ratio                                   {:8.2}",
        ms(v) / ms(b)
    );
    println!("  kiln-vmm by step (median of each; the guest's first instruction exits):");
    for (name, d) in median_steps(&steps) {
        println!("    {name:<36}  {:8.3} ms", ms(d));
    }
    println!(
        "    {:<36}  {:8.3} ms",
        "= to the first exit (all steps)",
        ms(median(to_exit))
    );
    println!(
        "    {:<36}  {:8.3} ms",
        "then stop + join threads (rest)",
        ms(median(after_exit))
    );

    // 2. Resident memory beyond guest RAM, with a machine alive.
    let before = status_kib("VmRSS:");
    let mut m = Machine::new(256 << 20, std::io::sink()).expect("machine");
    m.load(LOAD, &exit_now).expect("load");
    m.start_at(Entry { rip: LOAD, rsi: 0 }).expect("start");
    let _ = m.run().expect("run");
    let (rss, shmem) = (status_kib("VmRSS:"), status_kib("RssShmem:"));
    drop(m);
    println!("resident memory (guest RAM is the memfd, counted in RssShmem)");
    println!("  whole process before the machine        {:8} KiB", before);
    println!("  whole process, machine alive            {:8} KiB", rss);
    println!("  guest memory touched (RssShmem)         {:8} KiB", shmem);
    println!(
        "  VMM beyond guest RAM (VmRSS - RssShmem) {:8} KiB (goal <= 5120)",
        rss.saturating_sub(shmem)
    );

    // 3. virtio-blk sequential throughput, against the host on the same file.
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.raw");
    let mut f = std::fs::File::create(&disk).expect("disk");
    f.write_all(&vec![0x11u8; (DISK_MIB << 20) as usize])
        .expect("fill");
    drop(f);
    let read = blk_guest(0);
    let write = blk_guest(1);
    let mib = DISK_MIB as f64;
    for (name, code, w) in [("read", &read, false), ("write", &write, true)] {
        let (mut g, mut h) = (Vec::new(), Vec::new());
        for _ in 0..runs.min(7) {
            g.push(guest_blk(&disk, code));
            h.push(host_blk(&disk, w));
        }
        let (g, h) = (median(g), median(h));
        println!(
            "virtio-blk sequential {name}, {DISK_MIB} MiB in {} KiB requests (page cache warm)",
            REQUEST / 1024
        );
        println!("  host pread/pwrite   {:8.1} MiB/s", mib / h.as_secs_f64());
        println!("  tiny guest          {:8.1} MiB/s", mib / g.as_secs_f64());
        println!(
            "  guest/host ratio    {:8.2}",
            h.as_secs_f64() / g.as_secs_f64()
        );
    }
    println!(
        "agent handshake under kiln-vmm: not measurable here (needs an unmodified \
         Linux guest under KVM; this host's KVM is PVM)"
    );
}
