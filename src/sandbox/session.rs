//! The host's side of the agent protocol over the VM's console-port socket.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kiln_agent::frame::DATA_CHUNK;
use kiln_agent::{
    ExecRequest, ExitStatus, FrameError, FrameReader, FrameWriter, LimitsReport, MountRequest,
    Reply, Request, SpawnErrorKind, WindowSize, MAX_FRAME, PROTOCOL_VERSION,
};

use crate::sandbox::tree_copy;
use crate::util::sparse::SparseWriter;

/// Polled while waiting for the guest: returns an error to abandon the wait
/// (Ctrl-C, `--timeout`).
pub trait Watch {
    fn check(&mut self) -> Result<()>;
    /// The connection closed: explain why (the VM stopped, most likely).
    fn connection_lost(&mut self, why: &str) -> anyhow::Error;
}

enum Event {
    Reply(Reply),
    /// The guest broke the protocol (what it sent); nothing more is read.
    Bad(String),
    /// The connection ended (why).
    Closed(String),
}

/// Replies read ahead of the consumer. Bounded: when kiln's own output is
/// slow (a full pipe), the guest is held back instead of its output piling
/// up in kiln's memory. A reply carries at most [`MAX_FRAME`] bytes (1 MiB;
/// the agent's data chunks are 256 KiB), so this holds at most 8 MiB.
const QUEUED_REPLIES: usize = 8;

type Writer = Arc<Mutex<FrameWriter<UnixStream>>>;

pub struct Session {
    writer: Writer,
    events: Receiver<Event>,
    next_id: u32,
}

/// How a command ended.
#[derive(Debug, Clone)]
pub enum ExecOutcome {
    /// It ran; `limits` is what it ran into, where the guest limits commands.
    Exited {
        status: ExitStatus,
        limits: Option<LimitsReport>,
    },
    NotFound,
    /// It exists but cannot be run; the guest's reason.
    NotExecutable(String),
}

impl ExecOutcome {
    /// What to tell the user about the guest's limits the command ran into,
    /// in a VM of `mem_mib` MiB; `None` if it ran into none.
    pub fn limits_note(&self, mem_mib: u32) -> Option<String> {
        let ExecOutcome::Exited {
            limits: Some(l), ..
        } = self
        else {
            return None;
        };
        let mib = |b: u64| b.div_ceil(1 << 20);
        let ended_by = if l.oom_kills > 0 {
            Some("the guest's OOM killer ended it")
        } else if l.memory_stall_kill {
            Some(
                "it stalled on memory (thrashing) for most of 10 s, so kiln's guest agent \
                 ended it",
            )
        } else {
            None
        };
        if let Some(ended_by) = ended_by {
            Some(format!(
                "the command ran out of memory: {ended_by} at a peak of {} MiB, the most \
                 commands may use in a VM with --mem {mem_mib}M ({} MiB; the rest is kept for \
                 the guest's kernel and agent); give it more with --mem",
                mib(l.memory_peak),
                mib(l.memory_max)
            ))
        } else if l.pids_refused > 0 {
            Some(format!(
                "the command reached the guest's limit of {} processes and threads, and {} \
                 forks failed; the guest allows more with more --mem",
                l.pids_max, l.pids_refused
            ))
        } else {
            None
        }
    }
}

impl Session {
    pub fn new(stream: UnixStream) -> Result<Session> {
        stream.set_nonblocking(false)?;
        // Without resync: a bad frame ends the session anyway, so an
        // absurd length is reported at once rather than read through.
        let mut reader = FrameReader::without_resync(stream.try_clone()?);
        let (tx, rx) = mpsc::sync_channel(QUEUED_REPLIES);
        std::thread::spawn(move || loop {
            let event = match reader.read::<Reply>() {
                Ok(r) => Event::Reply(r),
                Err(FrameError::Oversized(n)) => Event::Bad(format!(
                    "a frame of {n} bytes, over the {MAX_FRAME}-byte limit"
                )),
                Err(FrameError::Malformed(why)) => Event::Bad(format!("a malformed frame ({why})")),
                Err(e) => Event::Closed(e.to_string()),
            };
            let last = !matches!(event, Event::Reply(_));
            if tx.send(event).is_err() || last {
                return;
            }
        });
        Ok(Session {
            writer: Arc::new(Mutex::new(FrameWriter::new(stream))),
            events: rx,
            next_id: 1,
        })
    }

    fn id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn send(&self, req: &Request) -> Result<()> {
        send(&self.writer, req)
    }

    /// The next reply; `None` if `deadline` passes first.
    fn recv_until(
        &mut self,
        watch: &mut dyn Watch,
        deadline: Option<Instant>,
    ) -> Result<Option<Reply>> {
        loop {
            match self.events.recv_timeout(Duration::from_millis(50)) {
                Ok(event) => return reply_of(event, watch).map(Some),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(watch.connection_lost("connection closed"))
                }
                Err(RecvTimeoutError::Timeout) => {
                    watch.check()?;
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// A reply already waiting, if there is one.
    fn try_recv(&mut self, watch: &mut dyn Watch) -> Result<Option<Reply>> {
        match self.events.try_recv() {
            Ok(event) => reply_of(event, watch).map(Some),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(watch.connection_lost("connection closed")),
        }
    }

    fn recv(&mut self, watch: &mut dyn Watch) -> Result<Reply> {
        self.recv_until(watch, None)?
            .ok_or_else(|| anyhow!("no reply from the guest agent"))
    }

    /// Waits for the agent's hello (until `deadline`) and answers it.
    pub fn handshake(
        &mut self,
        watch: &mut dyn Watch,
        deadline: Instant,
        boot_secs: f64,
    ) -> Result<String> {
        let hello = self.recv_until(watch, Some(deadline))?;
        let Some(hello) = hello else {
            bail!(
                "the guest agent did not connect within {boot_secs} s: the guest may be stuck \
                 in early boot (see it with --console), or this machine is slow: raise \
                 --boot-timeout"
            );
        };
        let Reply::Hello {
            protocol,
            agent_version,
            boot_error,
        } = hello
        else {
            // Its name only: the reply may hold a megabyte of the guest's data.
            bail!(
                "the guest agent did not start with a hello (it sent {})",
                reply_name(&hello)
            );
        };
        if protocol != PROTOCOL_VERSION {
            bail!(
                "the guest agent speaks protocol {protocol} but this kiln speaks \
                 {PROTOCOL_VERSION}: rebuild kiln so both sides come from one version"
            );
        }
        self.send(&Request::Hello {
            protocol: PROTOCOL_VERSION,
            host_version: env!("CARGO_PKG_VERSION").to_string(),
            unix_time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        })?;
        if let Some(e) = boot_error {
            bail!(
                "the guest could not set up its root from the tools image: {}; \
                 rebuild it with 'kiln tools build --force' or check --tools",
                guest_text(&e)
            );
        }
        Ok(guest_text(&agent_version))
    }

    /// Runs a command, streaming its output to `stdout` and `stderr`, and
    /// forwarding the host's stdin if `req.stdin`
    /// (`req.id` is assigned here.)
    pub fn exec(
        &mut self,
        req: ExecRequest,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
        watch: &mut dyn Watch,
    ) -> Result<ExecOutcome> {
        self.exec_with(req, stdout, stderr, None, watch)
    }

    /// [`Session::exec`] for a command on a guest terminal (`req.tty`):
    /// `resizes` is polled for new sizes of the user's terminal, which the
    /// guest's terminal then takes.
    pub fn exec_tty(
        &mut self,
        req: ExecRequest,
        stdout: &mut dyn Write,
        resizes: &mut dyn FnMut() -> Option<WindowSize>,
        watch: &mut dyn Watch,
    ) -> Result<ExecOutcome> {
        // A terminal has no separate error stream; anything the agent
        // sends as one still reaches kiln's.
        self.exec_with(req, stdout, &mut std::io::stderr(), Some(resizes), watch)
    }

    fn exec_with(
        &mut self,
        mut req: ExecRequest,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
        mut resizes: Option<&mut dyn FnMut() -> Option<WindowSize>>,
        watch: &mut dyn Watch,
    ) -> Result<ExecOutcome> {
        let id = self.id();
        req.id = id;
        let forward_stdin = req.stdin;
        self.send(&Request::Exec(req))?;
        loop {
            match self.recv(watch)? {
                Reply::Started { id: i, .. } if i == id => break,
                Reply::SpawnFailed {
                    id: i,
                    kind,
                    message,
                } if i == id => {
                    return match kind {
                        SpawnErrorKind::NotFound => Ok(ExecOutcome::NotFound),
                        SpawnErrorKind::NotExecutable => {
                            Ok(ExecOutcome::NotExecutable(guest_text(&message)))
                        }
                        SpawnErrorKind::Other => {
                            bail!(
                                "cannot start the command in the guest: {}",
                                guest_text(&message)
                            )
                        }
                    };
                }
                _ => {}
            }
        }
        // Stops the stdin pump once the command is done.
        let stdin_done = Arc::new(AtomicBool::new(false));
        if forward_stdin {
            let writer = self.writer.clone();
            let done = stdin_done.clone();
            std::thread::spawn(move || pump_stdin(id, &writer, &done));
        }
        let _stop_stdin = SetOnDrop(stdin_done);
        let mut out = Sink::new(stdout, "standard output");
        let mut err = Sink::new(stderr, "standard error");
        let mut piped = false;
        loop {
            let reply = match resizes.as_mut() {
                Some(resized) => {
                    if let Some(size) = resized() {
                        self.send(&Request::Resize {
                            id,
                            rows: size.rows,
                            cols: size.cols,
                        })?;
                    }
                    // Back soon, to look for the next resize.
                    let soon = Instant::now() + Duration::from_millis(50);
                    match self.recv_until(watch, Some(soon))? {
                        Some(reply) => reply,
                        None => continue,
                    }
                }
                None => self.recv(watch)?,
            };
            match reply {
                Reply::Stdout { id: i, data } if i == id => {
                    out.write(&data);
                    if out.closed && !piped {
                        // Whoever read kiln's output stopped (`| head`): the
                        // command gets SIGPIPE, as it would in a local pipeline.
                        piped = true;
                        self.send(&Request::Signal {
                            id,
                            signal: libc::SIGPIPE,
                        })?;
                    }
                }
                Reply::Stderr { id: i, data } if i == id => err.write(&data),
                Reply::Exited {
                    id: i,
                    status,
                    limits,
                } if i == id => {
                    // Output that could not be written is a failure of the
                    // run, whatever the command's status.
                    out.result()?;
                    err.result()?;
                    return Ok(ExecOutcome::Exited { status, limits });
                }
                _ => {}
            }
        }
    }

    pub fn mount(&mut self, mut m: MountRequest, watch: &mut dyn Watch) -> Result<()> {
        let id = self.id();
        m.id = id;
        let target = m.target.clone();
        self.send(&Request::Mount(m))?;
        self.wait_done(id, watch)
            .with_context(|| format!("mounting {target} in the guest"))
    }

    fn wait_done(&mut self, id: u32, watch: &mut dyn Watch) -> Result<()> {
        loop {
            match self.recv(watch)? {
                Reply::Done { id: i } if i == id => return Ok(()),
                Reply::Failed {
                    id: Some(i),
                    message,
                } if i == id => return Err(anyhow!(guest_text(&message))),
                _ => {}
            }
        }
    }

    /// Copies a host file into the guest, keeping its mode.
    pub fn put_file(&mut self, host: &Path, guest: &str, watch: &mut dyn Watch) -> Result<()> {
        let mut f =
            fs::File::open(host).with_context(|| format!("--copy-in {}", host.display()))?;
        let meta = f.metadata()?;
        if !meta.is_file() {
            bail!("--copy-in {}: not a regular file", host.display());
        }
        let id = self.id();
        self.send(&Request::PutFile {
            id,
            path: guest.to_string(),
            mode: meta.permissions().mode() & 0o7777,
        })?;
        let mut buf = vec![0u8; DATA_CHUNK];
        loop {
            watch.check()?;
            let n = match f.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", host.display())),
            };
            self.send(&Request::FileData {
                id,
                data: buf[..n].to_vec(),
            })?;
            if n == 0 {
                break;
            }
        }
        self.wait_done(id, watch)
            .with_context(|| format!("copying {} into the guest as {guest}", host.display()))
    }

    /// Copies a host directory's contents into the guest directory `guest`
    /// (created if missing) as a tar stream: owners (by number), modes,
    /// symlinks, hard links, xattrs and holes kept.
    pub fn put_tree(&mut self, host: &Path, guest: &str, watch: &mut dyn Watch) -> Result<()> {
        let what = || format!("copying {} into the guest as {guest}", host.display());
        let mut tar = tree_copy::Outgoing::start(host).with_context(what)?;
        let id = self.id();
        self.send(&Request::PutTree {
            id,
            path: guest.to_string(),
        })?;
        let mut buf = vec![0u8; DATA_CHUNK];
        loop {
            watch.check()?;
            // The guest's tar gave up early (a broken stream): sending the
            // rest would be for nothing.
            while let Some(reply) = self.try_recv(watch)? {
                if let Reply::Failed {
                    id: Some(i),
                    message,
                } = reply
                {
                    if i == id {
                        self.send(&Request::FileData { id, data: vec![] })?;
                        return Err(anyhow!(guest_text(&message))).with_context(what);
                    }
                }
            }
            let n = tar.read(&mut buf).with_context(what)?;
            self.send(&Request::FileData {
                id,
                data: buf[..n].to_vec(),
            })?;
            if n == 0 {
                break;
            }
        }
        // The guest has a stream either way; it holds the whole directory
        // only if the host's tar succeeded.
        tar.finish().with_context(what)?;
        self.wait_done(id, watch).with_context(what)
    }

    /// Copies a guest file or directory to `host`. A file keeps its
    /// permission bits (see [`host_mode`] for the rest); a directory comes
    /// as a tar stream, with what it holds (see [`Session::receive_tree`]).
    /// Either appears under its final name only once complete.
    pub fn get_file(
        &mut self,
        guest: &str,
        host: &Path,
        keep_setuid: bool,
        watch: &mut dyn Watch,
    ) -> Result<()> {
        let id = self.id();
        self.send(&Request::GetFile {
            id,
            path: guest.to_string(),
        })?;
        let copy = CopyOut {
            id,
            guest,
            host,
            keep_setuid,
        };
        loop {
            match self.recv(watch)? {
                Reply::FileHeader { id: i, mode, size } if i == id => {
                    return self.receive_file(&copy, mode, size, watch)
                }
                Reply::TreeHeader { id: i } if i == id => return self.receive_tree(&copy, watch),
                Reply::FileData { id: i, .. } if i == id => {
                    bail!("the guest agent sent data of {guest} before its header")
                }
                Reply::Failed {
                    id: Some(i),
                    message,
                } if i == id => {
                    bail!("copying {guest} out of the guest: {}", guest_text(&message))
                }
                _ => {}
            }
        }
    }

    /// A file announced as `mode` and `size`: exactly that many bytes must
    /// follow, so the file is what the guest said it was, and never more.
    /// Written to a temporary file beside `host`, renamed once complete,
    /// owned by whoever runs kiln.
    fn receive_file(
        &mut self,
        c: &CopyOut,
        mode: u32,
        size: u64,
        watch: &mut dyn Watch,
    ) -> Result<()> {
        let (id, guest, host) = (c.id, c.guest, c.host);
        let dir = match host.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(tree_copy::COPY_OUT_PREFIX)
            .tempfile_in(dir)
            .with_context(|| format!("creating a file in {}", dir.display()))?;
        let mut written = 0u64;
        // Sparse: a disk image the guest made sparse stays so.
        let mut out = SparseWriter::new(tmp.as_file());
        loop {
            match self.recv(watch)? {
                Reply::FileHeader { id: i, .. } | Reply::TreeHeader { id: i } if i == id => {
                    bail!("the guest agent sent a second header for {guest}");
                }
                Reply::FileData { id: i, data } if i == id => {
                    if data.is_empty() {
                        if written != size {
                            bail!(
                                "the guest agent ended {guest} after {written} of the {size} \
                                 bytes it announced (did the file change while it was copied?)"
                            );
                        }
                        break;
                    }
                    if data.len() as u64 > size - written {
                        bail!(
                            "the guest agent sent more than the {size} bytes it announced for \
                             {guest} (did the file change while it was copied?)"
                        );
                    }
                    out.write_all(&data)
                        .with_context(|| format!("writing {}", host.display()))?;
                    written += data.len() as u64;
                }
                Reply::Failed {
                    id: Some(i),
                    message,
                } if i == id => {
                    bail!("copying {guest} out of the guest: {}", guest_text(&message))
                }
                _ => {}
            }
        }
        out.finish()
            .with_context(|| format!("writing {}", host.display()))?;
        // fchmod, not chmod by name: the name is in a directory others
        // may write to. No chown: the file stays the invoking user's.
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(host_mode(mode, c.keep_setuid)))
            .with_context(|| format!("setting the mode of {}", host.display()))?;
        tmp.as_file().sync_all()?;
        tmp.persist(host)
            .with_context(|| format!("writing {}", host.display()))?;
        Ok(())
    }

    /// A directory, as a tar stream the host's tar extracts into a private
    /// staging directory beside `host` (see `tree_copy`). `host` must not
    /// exist. Without `keep_setuid` the tree loses its setuid, setgid and
    /// sticky bits, file capabilities and device nodes before it takes its
    /// name; its owners are kept where kiln runs as root, else it is the
    /// invoking user's.
    fn receive_tree(&mut self, c: &CopyOut, watch: &mut dyn Watch) -> Result<()> {
        let (id, guest, host) = (c.id, c.guest, c.host);
        let what = || format!("copying {guest} out of the guest to {}", host.display());
        let mut tree = tree_copy::Incoming::start(host, c.keep_setuid).with_context(what)?;
        loop {
            match self.recv(watch)? {
                Reply::FileHeader { id: i, .. } | Reply::TreeHeader { id: i } if i == id => {
                    bail!("the guest agent sent a second header for {guest}");
                }
                Reply::FileData { id: i, data } if i == id => {
                    if data.is_empty() {
                        break;
                    }
                    watch.check()?;
                    tree.write(&data).with_context(what)?;
                }
                Reply::Done { id: i } if i == id => {
                    bail!("the guest agent said {guest} was done before the end of its stream")
                }
                Reply::Failed {
                    id: Some(i),
                    message,
                } if i == id => {
                    bail!("copying {guest} out of the guest: {}", guest_text(&message))
                }
                _ => {}
            }
        }
        // The guest's word first: where its tar failed, that says why
        // better than the host's tar finding the stream cut short.
        tree.close();
        self.wait_done(id, watch).with_context(what)?;
        let said = tree.end().with_context(what)?;
        let dropped = tree.publish().with_context(what)?;
        if !said.is_empty() {
            eprintln!("kiln: warning: copying {guest} out of the guest, tar said:\n{said}");
        }
        if let Some(first) = dropped.devices.first() {
            eprintln!(
                "kiln: warning: {} device node(s) in {guest} were left out ({} the first); \
                 --keep-setuid keeps them",
                dropped.devices.len(),
                guest_text(&first.to_string_lossy())
            );
        }
        Ok(())
    }

    /// Asks the agent to sync and power off; returns once it has synced.
    pub fn poweroff(&mut self, watch: &mut dyn Watch) -> Result<()> {
        self.send(&Request::Poweroff)?;
        loop {
            if let Reply::PoweringOff = self.recv(watch)? {
                return Ok(());
            }
        }
    }
}

/// What `get_file` was asked for.
struct CopyOut<'a> {
    id: u32,
    guest: &'a str,
    host: &'a Path,
    keep_setuid: bool,
}

/// The reply an event carries, or the error that ends the session.
fn reply_of(event: Event, watch: &mut dyn Watch) -> Result<Reply> {
    match event {
        Event::Reply(Reply::Failed { id: None, message }) => bail!(
            "the guest agent rejected a request: {}",
            guest_text(&message)
        ),
        Event::Reply(r) => Ok(r),
        Event::Bad(what) => bail!(
            "the guest agent sent {what}: it is broken, or not kiln's agent; \
             kiln stopped talking to it"
        ),
        Event::Closed(why) => Err(watch.connection_lost(&why)),
    }
}

/// The mode a copied-out file gets on the host. The guest runs as root and
/// is not trusted: its setuid, setgid and sticky bits are dropped unless the
/// user asked for them (`--keep-setuid`), so a guest cannot plant a
/// setuid-root program. Its rwx bits are kept, and nothing else it sent.
fn host_mode(guest_mode: u32, keep_setuid: bool) -> u32 {
    let allowed = if keep_setuid { 0o7777 } else { 0o777 };
    guest_mode & allowed
}

/// Text from the guest, made safe to print: its control characters, which
/// could drive the user's terminal (move the cursor, set the title, write
/// the clipboard), are shown escaped. Newlines and tabs are kept.
pub(crate) fn guest_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A reply's kind, for messages.
fn reply_name(r: &Reply) -> &'static str {
    match r {
        Reply::Hello { .. } => "Hello",
        Reply::Started { .. } => "Started",
        Reply::SpawnFailed { .. } => "SpawnFailed",
        Reply::Stdout { .. } => "Stdout",
        Reply::Stderr { .. } => "Stderr",
        Reply::Exited { .. } => "Exited",
        Reply::FileHeader { .. } => "FileHeader",
        Reply::FileData { .. } => "FileData",
        Reply::Done { .. } => "Done",
        Reply::Failed { .. } => "Failed",
        Reply::PoweringOff => "PoweringOff",
        Reply::TreeHeader { .. } => "TreeHeader",
    }
}

fn send(writer: &Writer, req: &Request) -> Result<()> {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    w.write(req).context("sending a request to the guest agent")
}

/// Where a command's output goes on the host. A closed pipe (EPIPE) means
/// the reader wants no more, and the rest is dropped quietly while the
/// command runs on; any other write error (a full disk, say) is kept and
/// fails the run.
struct Sink<'a> {
    w: &'a mut dyn Write,
    what: &'static str,
    closed: bool,
    error: Option<std::io::Error>,
}

impl<'a> Sink<'a> {
    fn new(w: &'a mut dyn Write, what: &'static str) -> Self {
        Sink {
            w,
            what,
            closed: false,
            error: None,
        }
    }

    fn write(&mut self, data: &[u8]) {
        if self.closed {
            return;
        }
        if let Err(e) = self.w.write_all(data).and_then(|()| self.w.flush()) {
            self.closed = true;
            if e.kind() != ErrorKind::BrokenPipe {
                self.error = Some(e);
            }
        }
    }

    fn result(&mut self) -> Result<()> {
        match self.error.take() {
            Some(e) => Err(anyhow!("writing the command's {} failed: {e}", self.what)),
            None => Ok(()),
        }
    }
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn pump_stdin(id: u32, writer: &Writer, done: &AtomicBool) {
    let stdin = std::io::stdin();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Waits for input a while at a time, so that once the command is
        // done this thread ends rather than stay blocked on a terminal,
        // where it would take the next line typed.
        if !stdin_readable(Duration::from_millis(100)) {
            if done.load(Ordering::Relaxed) {
                return;
            }
            continue;
        }
        let n = match stdin.lock().read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if done.load(Ordering::Relaxed) {
            return;
        }
        let req = Request::Stdin {
            id,
            data: buf[..n].to_vec(),
        };
        if send(writer, &req).is_err() || n == 0 {
            return;
        }
    }
}

/// Whether a read of stdin would not block (input, its end, or an error
/// to report), waiting at most `wait`.
fn stdin_readable(wait: Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let stdin = std::io::stdin();
    let mut fds = [PollFd::new(&stdin, PollFlags::IN)];
    let timeout = Timespec {
        tv_sec: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(wait.subsec_nanos()),
    };
    match poll(&mut fds, Some(&timeout)) {
        Ok(0) | Err(rustix::io::Errno::INTR) => false,
        // Readable, hung up or in error: the read says which.
        Ok(_) | Err(_) => true,
    }
}

#[cfg(test)]
mod hostile_tests;

#[cfg(test)]
mod tests {
    use super::{host_mode, ExecOutcome, ExitStatus, LimitsReport};

    #[test]
    fn the_limits_a_command_ran_into_are_explained() {
        let outcome = |limits| ExecOutcome::Exited {
            status: ExitStatus::Signal(9),
            limits,
        };
        let oom = LimitsReport {
            oom_kills: 3,
            memory_peak: (76 << 20) + 1,
            memory_max: 76 << 20,
            pids_refused: 0,
            pids_max: 700,
            memory_stall_kill: false,
        };
        let note = outcome(Some(oom)).limits_note(128).expect("a note");
        assert!(note.contains("ran out of memory"), "{note}");
        assert!(note.contains("OOM killer ended it"), "{note}");
        assert!(note.contains("peak of 77 MiB"), "{note}");
        assert!(note.contains("--mem 128M (76 MiB"), "{note}");
        let stalled = LimitsReport {
            oom_kills: 0,
            memory_stall_kill: true,
            ..oom
        };
        let note = outcome(Some(stalled)).limits_note(128).expect("a note");
        assert!(note.contains("ran out of memory"), "{note}");
        assert!(note.contains("stalled on memory"), "{note}");
        assert!(note.contains("--mem 128M (76 MiB"), "{note}");
        let pids = LimitsReport {
            oom_kills: 0,
            pids_refused: 12,
            ..oom
        };
        let note = outcome(Some(pids)).limits_note(128).expect("a note");
        assert!(
            note.contains("limit of 700 processes and threads"),
            "{note}"
        );
        assert!(note.contains("12 forks failed"), "{note}");
        let none = LimitsReport {
            oom_kills: 0,
            pids_refused: 0,
            ..oom
        };
        assert_eq!(outcome(Some(none)).limits_note(128), None);
        assert_eq!(outcome(None).limits_note(128), None);
        assert_eq!(ExecOutcome::NotFound.limits_note(128), None);
    }

    #[test]
    fn special_bits_from_the_guest_are_dropped() {
        assert_eq!(host_mode(0o4755, false), 0o755);
        assert_eq!(host_mode(0o2755, false), 0o755);
        assert_eq!(host_mode(0o1777, false), 0o777);
        assert_eq!(host_mode(0o7640, false), 0o640);
        assert_eq!(host_mode(0o600, false), 0o600);
        // File-type bits or junk a guest might send never get through.
        assert_eq!(host_mode(0o100755, false), 0o755);
        assert_eq!(host_mode(u32::MAX, false), 0o777);
    }

    #[test]
    fn keep_setuid_keeps_only_mode_bits() {
        assert_eq!(host_mode(0o4755, true), 0o4755);
        assert_eq!(host_mode(0o2755, true), 0o2755);
        assert_eq!(host_mode(0o1777, true), 0o1777);
        assert_eq!(host_mode(u32::MAX, true), 0o7777);
    }
}
