//! kiln-vmm's devices under the real KVM ioctls of this host, driven by tiny
//! freestanding 64-bit guests assembled here with GNU as (no Linux). On
//! hosts whose KVM is a PVM hypervisor these guests still run, through its
//! instruction emulator.

use kiln_vmm::arch::boot::Entry;
use kiln_vmm::vstate::bus::EXIT_PORT;
use kiln_vmm::vstate::machine::{Exit, Machine};

const LOAD: u64 = 0x10_0000;

#[path = "support/asm.rs"]
mod asm;
use asm::assemble_both;

/// Assembles `source` (AT&T syntax, 64-bit) linked at [`LOAD`]; returns
/// the flat binary.
fn assemble(source: &str) -> Vec<u8> {
    let (bin, _elf) = assemble_both(source);
    bin
}

/// A machine as the tests run it: seccomp on, so every tiny guest also
/// checks that the filters allow what the threads need.
fn machine<W: std::io::Write + Send>(vcpus: u8, console: W) -> Machine<W> {
    let mut m = Machine::with_vcpus(64 << 20, vcpus, console).expect("machine");
    m.set_seccomp(true);
    m
}

/// Whether this host can run KVM guests at all (a device we may open).
fn kvm_available() -> bool {
    match kvm_ioctls::Kvm::new() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("KVM not available here ({e}); skipping");
            false
        }
    }
}

#[test]
fn guest_prints_on_the_serial_port_and_exits_with_a_status() {
    if !kvm_available() {
        return;
    }
    let code = assemble(&format!(
        r#"
        mov $0x3f8, %dx
        lea msg(%rip), %rsi
    1:  movb (%rsi), %al
        test %al, %al
        jz 2f
        outb %al, %dx
        inc %rsi
        jmp 1b
    2:  mov ${EXIT_PORT}, %dx
        mov $42, %al
        outb %al, %dx
        hlt
    msg: .asciz "hello from a tiny guest\n"
    "#
    ));
    let mut m = machine(1, Vec::new());
    m.load(LOAD, &code).expect("load");
    m.start_at(Entry { rip: LOAD, rsi: 0 }).expect("start");
    let exit = m.run().expect("run");
    assert_eq!(exit, Exit::Status(42));
    assert_eq!(
        m.with_console(|c| String::from_utf8_lossy(c).into_owned()),
        "hello from a tiny guest\n"
    );
}

#[test]
fn start_up_is_recorded_step_by_step_up_to_the_first_exit() {
    if !kvm_available() {
        return;
    }
    let code = assemble(&format!(
        "mov ${EXIT_PORT}, %dx\nmov $0, %al\noutb %al, %dx\nhlt"
    ));
    let mut m = machine(2, Vec::new());
    m.load(LOAD, &code).expect("load");
    m.start_at(Entry { rip: LOAD, rsi: 0 }).expect("start");
    assert_eq!(m.run().expect("run"), Exit::Status(0));
    let names: Vec<&str> = m.startup_times().steps().iter().map(|s| s.0).collect();
    // Memory goes in before the irqchip (see Machine::with_vcpus); each
    // vCPU's steps are summed under one name.
    let at = |step| names.iter().position(|n| *n == step);
    assert!(at("memory: KVM memory slot") < at("irqchip"), "{names:?}");
    assert_eq!(names.iter().filter(|n| **n == "vCPU: create").count(), 1);
    for step in ["KVM_CREATE_VM", "PIT", "run: seccomp install"] {
        assert!(at(step).is_some(), "no {step} in {names:?}");
    }
    assert_eq!(names.last(), Some(&"run: KVM_RUN to first exit"));
}

/// A virtio-blk driver in a few dozen instructions: it initializes the
/// device through the mmio registers, writes a sector, flushes, reads it
/// back, asks for the serial, and tries a sector past the end. It prints
/// each request's status and the serial, then whether the data read back
/// matched, and exits.
const BLK_DRIVER: &str = r#"
    .set BASE,    0xd0000000
    .set DESC,    0x200000
    .set AVAIL,   0x201000
    .set USED,    0x202000
    .set HDR,     0x203000
    .set STATUSB, 0x203100
    .set WBUF,    0x204000
    .set RBUF,    0x205000
    .set IDBUF,   0x206000

    mov $BASE, %r15
    movl $1, 0x70(%r15)          # ACKNOWLEDGE
    movl $3, 0x70(%r15)          # DRIVER
    movl $1, 0x24(%r15)          # DriverFeaturesSel = 1
    movl $1, 0x20(%r15)          # VERSION_1 (bit 32)
    movl $0, 0x24(%r15)
    movl $0, 0x20(%r15)
    movl $11, 0x70(%r15)         # FEATURES_OK
    movl 0x70(%r15), %eax
    test $8, %eax
    jz fail
    movl $0, 0x30(%r15)          # QueueSel
    movl $8, 0x38(%r15)          # QueueNum
    movl $DESC, 0x80(%r15)
    movl $0, 0x84(%r15)
    movl $AVAIL, 0x90(%r15)
    movl $0, 0x94(%r15)
    movl $USED, 0xa0(%r15)
    movl $0, 0xa4(%r15)
    movl $1, 0x44(%r15)          # QueueReady
    movl $15, 0x70(%r15)         # DRIVER_OK

    # A recognizable sector: byte i = i * 7.
    xor %ecx, %ecx
fill:
    mov %ecx, %eax
    imul $7, %eax
    movb %al, WBUF(%rcx)
    inc %ecx
    cmp $512, %ecx
    jne fill

    mov $1, %edi                 # OUT
    mov $1, %esi                 # sector 1
    mov $WBUF, %edx
    mov $512, %ecx
    xor %r8d, %r8d
    call submit
    call putdigit
    mov $4, %edi                 # FLUSH
    xor %esi, %esi
    mov $WBUF, %edx
    xor %ecx, %ecx
    xor %r8d, %r8d
    call submit
    call putdigit
    mov $0, %edi                 # IN
    mov $1, %esi
    mov $RBUF, %edx
    mov $512, %ecx
    mov $2, %r8d                 # device-writable
    call submit
    call putdigit
    mov $8, %edi                 # GET_ID
    xor %esi, %esi
    mov $IDBUF, %edx
    mov $20, %ecx
    mov $2, %r8d
    call submit
    call putdigit
    mov $0, %edi                 # IN, far past the end
    mov $0x10000000000, %rsi
    mov $RBUF + 1024, %edx
    mov $512, %ecx
    mov $2, %r8d
    call submit
    call putdigit
    mov $' ', %al
    call putc

    mov $IDBUF, %rsi
id: movb (%rsi), %al
    test %al, %al
    jz cmp
    call putc
    inc %rsi
    jmp id

cmp:
    mov $' ', %al
    call putc
    xor %ecx, %ecx
1:  movb WBUF(%rcx), %al
    cmpb RBUF(%rcx), %al
    jne differ
    inc %ecx
    cmp $512, %ecx
    jne 1b
    mov $'=', %al
    call putc
    jmp done
differ:
    mov $'!', %al
    call putc
done:
    mov $'\n', %al
    call putc
    mov $0xf4, %dx
    mov $0, %al
    outb %al, %dx
    hlt
fail:
    mov $0xf4, %dx
    mov $1, %al
    outb %al, %dx
    hlt

# submit(type=edi, sector=rsi, data=rdx, len=ecx, flags=r8) -> status in eax
submit:
    movl %edi, HDR
    movl $0, HDR+4
    movq %rsi, HDR+8
    movq $HDR, DESC
    movl $16, DESC+8
    movw $1, DESC+12             # NEXT
    movw $1, DESC+14
    movq %rdx, DESC+16
    movl %ecx, DESC+24
    mov %r8d, %eax
    or $1, %eax
    movw %ax, DESC+28
    movw $2, DESC+30
    movq $STATUSB, DESC+32
    movl $1, DESC+40
    movw $2, DESC+44             # WRITE
    movw $0, DESC+46
    movb $0xff, STATUSB
    movzwl AVAIL+2, %eax
    mov %eax, %ebx
    and $7, %ebx
    movw $0, AVAIL+4(,%rbx,2)
    inc %eax
    movw %ax, AVAIL+2
    mfence
    movl $0, 0x50(%r15)          # QueueNotify
2:  movzwl USED+2, %ebx
    cmp %ax, %bx
    jne 2b
    movzbl STATUSB, %eax
    ret

putdigit:
    add $'0', %al
putc:
    push %rdx
    mov $0x3f8, %dx
    outb %al, %dx
    pop %rdx
    ret
"#;

/// Runs [`BLK_DRIVER`] against a 1 MiB disk with `serial`; returns what the
/// guest printed and the disk's contents afterwards. The guest must exit 0.
fn run_blk_driver(readonly: bool, serial: &str) -> (String, Vec<u8>) {
    use kiln_vmm::devices::virtio::block::Block;
    let disk = tempfile::NamedTempFile::new().expect("disk");
    disk.as_file().set_len(1 << 20).expect("size");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(disk.path())
        .expect("open");
    let mut m = machine(1, Vec::new());
    let base = m
        .add_virtio(Box::new(Block::new(file, readonly, serial).expect("block")))
        .expect("add");
    assert_eq!(base, 0xd000_0000, "the driver expects the first window");
    m.load(LOAD, &assemble(BLK_DRIVER)).expect("load");
    m.start_at(Entry { rip: LOAD, rsi: 0 }).expect("start");
    let exit = m.run().expect("run");
    let console = m.with_console(|c| String::from_utf8_lossy(c).into_owned());
    assert_eq!(exit, Exit::Status(0), "console: {console}");
    (console, std::fs::read(disk.path()).expect("read disk"))
}

#[test]
fn guest_driver_reads_and_writes_a_disk_through_virtio_blk() {
    if !kvm_available() {
        return;
    }
    let (console, data) = run_blk_driver(false, "kiln-test");
    // OUT, FLUSH, IN, GET_ID succeed; the read past the end is IOERR.
    assert_eq!(console, "00001 kiln-test =\n");
    let expected: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(&data[512..1024], &expected[..], "sector 1 on the host");
    assert!(data[..512].iter().all(|&b| b == 0), "sector 0 untouched");
}

#[test]
fn guest_writes_to_a_read_only_disk_are_refused() {
    if !kvm_available() {
        return;
    }
    let (console, data) = run_blk_driver(true, "kiln-ro");
    // The write is IOERR; the read returns the disk's zeros, not the pattern.
    assert_eq!(console, "10001 kiln-ro !\n");
    assert!(data.iter().all(|&b| b == 0));
}

/// A virtio-console driver (one port, no MULTIPORT): it sets up the rx and
/// tx queues, waits for one rx buffer's worth of host input, and sends it
/// back prefixed with "got " as a two-descriptor tx chain.
const CONSOLE_DRIVER: &str = r#"
    .set BASE,  0xd0000000
    .set RXD,   0x200000
    .set RXA,   0x201000
    .set RXU,   0x202000
    .set TXD,   0x210000
    .set TXA,   0x211000
    .set TXU,   0x212000
    .set RXBUF, 0x220000

    mov $BASE, %r15
    movl $1, 0x70(%r15)          # ACKNOWLEDGE
    movl $3, 0x70(%r15)          # DRIVER
    movl $1, 0x24(%r15)
    movl $1, 0x20(%r15)          # VERSION_1
    movl $0, 0x24(%r15)
    movl $0, 0x20(%r15)          # no MULTIPORT
    movl $11, 0x70(%r15)         # FEATURES_OK
    movl 0x70(%r15), %eax
    test $8, %eax
    jz fail
    movl $0, 0x30(%r15)          # queue 0: port 0 rx
    movl $8, 0x38(%r15)
    movl $RXD, 0x80(%r15)
    movl $0, 0x84(%r15)
    movl $RXA, 0x90(%r15)
    movl $0, 0x94(%r15)
    movl $RXU, 0xa0(%r15)
    movl $0, 0xa4(%r15)
    movl $1, 0x44(%r15)
    movl $1, 0x30(%r15)          # queue 1: port 0 tx
    movl $8, 0x38(%r15)
    movl $TXD, 0x80(%r15)
    movl $0, 0x84(%r15)
    movl $TXA, 0x90(%r15)
    movl $0, 0x94(%r15)
    movl $TXU, 0xa0(%r15)
    movl $0, 0xa4(%r15)
    movl $1, 0x44(%r15)
    movl $15, 0x70(%r15)         # DRIVER_OK

    movq $RXBUF, RXD             # one 64-byte device-writable buffer
    movl $64, RXD+8
    movw $2, RXD+12
    movw $0, RXA+4
    movw $1, RXA+2
    mfence
    movl $0, 0x50(%r15)          # notify queue 0
1:  movzwl RXU+2, %eax
    cmp $1, %eax
    jne 1b
    movl RXU+8, %ecx             # used[0].len

    lea prefix(%rip), %rax
    movq %rax, TXD
    movl $4, TXD+8
    movw $1, TXD+12              # NEXT
    movw $1, TXD+14
    movq $RXBUF, TXD+16
    movl %ecx, TXD+24
    movw $0, TXD+28
    movw $0, TXA+4
    movw $1, TXA+2
    mfence
    movl $1, 0x50(%r15)          # notify queue 1
2:  movzwl TXU+2, %eax
    cmp $1, %eax
    jne 2b
    mov $0xf4, %dx
    mov $0, %al
    outb %al, %dx
    hlt
fail:
    mov $0xf4, %dx
    mov $1, %al
    outb %al, %dx
    hlt
prefix: .ascii "got "
"#;

#[test]
fn guest_driver_echoes_host_bytes_through_virtio_console() {
    use kiln_vmm::devices::virtio::console::{Console, PortConfig};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    if !kvm_available() {
        return;
    }
    let (vmm_side, mut host) = UnixStream::pair().expect("socket pair");
    host.write_all(b"ping").expect("host write");
    let console = Console::new(vec![PortConfig {
        name: String::new(),
        console: false,
        host: Some(vmm_side.into()),
    }])
    .expect("console");
    let mut m = machine(1, Vec::new());
    assert_eq!(m.add_virtio(Box::new(console)).expect("add"), 0xd000_0000);
    m.load(LOAD, &assemble(CONSOLE_DRIVER)).expect("load");
    m.start_at(Entry { rip: LOAD, rsi: 0 }).expect("start");
    let exit = m.run().expect("run");
    assert_eq!(exit, Exit::Status(0));
    drop(m);
    let mut got = Vec::new();
    host.read_to_end(&mut got).expect("host read");
    assert_eq!(got, b"got ping");
}

#[test]
fn the_boot_vcpu_starts_a_second_one_with_init_and_sipi() {
    if !kvm_available() {
        return;
    }
    // vCPU 1 waits in KVM's initial state; vCPU 0 sends it INIT and a
    // startup IPI for 0x8000 through the local APIC, then waits for it to
    // set a flag.
    let bsp = assemble(
        r#"
        mov $0xfee00000, %rbx
        movl $0x01000000, 0x310(%rbx)    # ICR high: APIC ID 1
        movl $0x00004500, 0x300(%rbx)    # INIT
        movl $0x01000000, 0x310(%rbx)
        movl $0x00004608, 0x300(%rbx)    # STARTUP, vector 0x08
    1:  cmpb $1, 0x6000
        jne 1b
        mov $0xf4, %dx
        mov $7, %al
        outb %al, %dx
        hlt
    "#,
    );
    // Real mode: movb $1, 0x6000; 1: hlt; jmp 1b
    let ap = [0xc6, 0x06, 0x00, 0x60, 0x01, 0xf4, 0xeb, 0xfd];
    let mut m = machine(2, Vec::new());
    m.load(LOAD, &bsp).expect("load");
    m.load(0x8000, &ap).expect("load AP code");
    m.start_at(Entry { rip: LOAD, rsi: 0 }).expect("start");
    assert_eq!(m.run().expect("run"), Exit::Status(7));
}

#[test]
fn an_i8042_reset_ends_the_run_as_a_shutdown() {
    if !kvm_available() {
        return;
    }
    let code = assemble(
        r#"
        mov $0xfe, %al
        outb %al, $0x64
    1:  jmp 1b
    "#,
    );
    let mut m = machine(2, Vec::new());
    m.load(LOAD, &code).expect("load");
    m.start_at(Entry { rip: LOAD, rsi: 0 }).expect("start");
    assert_eq!(m.run().expect("run"), Exit::Shutdown);
}

/// A console sink the test can read while the machine runs.
#[derive(Clone, Default)]
struct SharedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stopper_ends_a_machine_whose_vcpus_sleep_in_the_kernel() {
    if !kvm_available() {
        return;
    }
    // Both vCPUs end up blocked inside KVM_RUN: vCPU 0 halted with
    // interrupts off, vCPU 1 never started.
    let code = assemble(
        r#"
        mov $0x3f8, %dx
        mov $'z', %al
        outb %al, %dx
        cli
    1:  hlt
        jmp 1b
    "#,
    );
    let log = SharedLog::default();
    let mut m = machine(2, log.clone());
    m.load(LOAD, &code).expect("load");
    m.start_at(Entry { rip: LOAD, rsi: 0 }).expect("start");
    let stopper = m.stopper();
    let watcher = std::thread::spawn(move || {
        // Wait until the guest has run, then stop it.
        while log.0.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            std::thread::yield_now();
        }
        stopper.stop();
    });
    assert_eq!(m.run().expect("run"), Exit::Stopped);
    watcher.join().expect("watcher");
    m.with_console(|c| assert_eq!(c.0.lock().expect("log").as_slice(), b"z"));
}

#[test]
fn the_vm_api_boots_an_elf_and_announces_its_devices_on_the_command_line() {
    use kiln_vmm::{AgentPortConfig, DiskConfig, DiskFormat, NetConfig, NetPeer, VmConfig};
    if !kvm_available() {
        return;
    }
    // A "kernel" that prints the command line the loader wrote (at 0x20000)
    // and exits with status 3.
    let (_, elf) = assemble_both(
        r#"
        mov $0x20000, %rsi
        mov $0x3f8, %dx
    1:  movb (%rsi), %al
        test %al, %al
        jz 2f
        outb %al, %dx
        inc %rsi
        jmp 1b
    2:  mov $0xf4, %dx
        mov $3, %al
        outb %al, %dx
        hlt
    "#,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, elf).expect("kernel");
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    // kiln-vmm connects the agent port to this socket as it builds the VM.
    let agent = dir.path().join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&agent).expect("bind");
    // And the network to passt's.
    let passt = dir.path().join("passt.sock");
    let passt_listener = std::os::unix::net::UnixListener::bind(&passt).expect("bind");
    let log = SharedLog::default();
    let config = VmConfig {
        kernel,
        initrd: None,
        cmdline: "console=ttyS0 reboot=t".into(),
        mem_mib: 64,
        vcpus: 2,
        disks: vec![DiskConfig {
            path: disk,
            format: DiskFormat::Raw,
            read_only: true,
            serial: "root".into(),
        }],
        fs: vec![],
        agent_port: Some(AgentPortConfig {
            name: "kiln.agent".into(),
            socket: agent.clone(),
        }),
        net: Some(NetConfig {
            peer: NetPeer::Socket(passt.clone()),
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        }),
        seccomp: true,
    };
    let exit = kiln_vmm::run(config.clone(), Box::new(log.clone())).expect("run");
    // The connection was made (and is still queued: nobody accepted it).
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(listener.accept().is_ok(), "the agent port did not connect");
    passt_listener.set_nonblocking(true).expect("nonblocking");
    assert!(
        passt_listener.accept().is_ok(),
        "the network did not connect"
    );
    assert_eq!(exit, Exit::Status(3));
    let printed = String::from_utf8_lossy(&log.0.lock().expect("log")).into_owned();
    assert_eq!(
        printed,
        "console=ttyS0 reboot=t virtio_mmio.device=4K@0xd0000000:5 \
         virtio_mmio.device=4K@0xd0001000:6 virtio_mmio.device=4K@0xd0002000:7 \
         virtio_mmio.device=4K@0xd0003000:8"
    );

    // With nothing listening on passt's socket, neither.
    drop(passt_listener);
    std::fs::remove_file(&passt).expect("remove the socket");
    let err = kiln_vmm::Vm::new(config.clone(), Box::new(std::io::sink()))
        .err()
        .expect("built without its network");
    let msg = err.to_string();
    assert!(msg.contains("connecting the network to"), "{msg}");
    assert!(msg.contains("passt.sock"), "{msg}");

    // With nothing listening on the agent's socket, the VM is not built,
    // and the error names the socket.
    drop(listener);
    std::fs::remove_file(&agent).expect("remove the socket");
    let err = kiln_vmm::Vm::new(config, Box::new(std::io::sink()))
        .err()
        .expect("built without its agent port");
    let msg = err.to_string();
    assert!(msg.contains("connecting the agent port to"), "{msg}");
    assert!(msg.contains("agent.sock"), "{msg}");
}
