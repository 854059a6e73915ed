//! What this host's KVM can do for us.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use kvm_ioctls::Kvm;

const ENOENT: i32 = 2;
const EPERM: i32 = 1;
const EACCES: i32 = 13;

/// The KVM API version every usable kernel reports.
const KVM_API_VERSION: i32 = 12;

/// Whether, and why not, KVM can run an unmodified Linux guest here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmSupport {
    /// KVM is present, accessible, and runs unmodified guests.
    Usable,
    /// The KVM device does not exist (no hardware virtualization, or the
    /// module is not loaded, or we are inside a VM without nesting).
    Missing,
    /// The device exists but this user may not open it. `group` is the
    /// device's group if that group may read and write it (then joining
    /// it is the fix); `None` if only its owner may.
    NoPermission { group: Option<String> },
    /// KVM is provided by a hypervisor that runs only specially built guest
    /// kernels (for example PVM, the `kvm_pvm` module).
    Restricted(String),
    /// Opening or querying the device failed otherwise.
    Broken(String),
}

impl KvmSupport {
    pub fn is_usable(&self) -> bool {
        matches!(self, KvmSupport::Usable)
    }

    /// One sentence saying why KVM cannot be used, and what to do about it.
    pub fn explain(&self, device: &Path) -> String {
        let dev = device.display();
        match self {
            KvmSupport::Usable => format!("KVM at {dev} is usable"),
            KvmSupport::Missing => format!(
                "{dev} does not exist: enable hardware virtualization (VT-x/AMD-V) \
                 and load the kvm module, or enable nested virtualization"
            ),
            KvmSupport::NoPermission { group: Some(g) } => format!(
                "no permission to open {dev}: add yourself to its group {g} \
                 ('sudo adduser $USER {g}', then log in again)"
            ),
            KvmSupport::NoPermission { group: None } => format!(
                "no permission to open {dev}, and its group may not use it either: have an \
                 administrator give it to the kvm group with mode 0660, as Debian's udev \
                 rules do ('sudo chgrp kvm {dev} && sudo chmod 0660 {dev}' until the next \
                 boot), and add you to that group ('sudo adduser $USER kvm')"
            ),
            KvmSupport::Restricted(why) => format!("{dev} cannot run unmodified guests: {why}"),
            KvmSupport::Broken(why) => format!("{dev} is not usable: {why}"),
        }
    }
}

/// Probes `device` (normally `/dev/kvm`) and `sys_module` (normally
/// `/sys/module`).
pub fn probe(device: &Path, sys_module: &Path) -> KvmSupport {
    let Ok(path) = CString::new(device.as_os_str().as_bytes()) else {
        return KvmSupport::Broken("device path contains a NUL byte".into());
    };
    let kvm = match Kvm::new_with_path(&path) {
        Ok(kvm) => kvm,
        Err(e) if e.errno() == ENOENT => return KvmSupport::Missing,
        Err(e) if e.errno() == EACCES || e.errno() == EPERM => {
            return KvmSupport::NoPermission {
                group: access_group(device),
            }
        }
        Err(e) => return KvmSupport::Broken(e.to_string()),
    };
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return KvmSupport::Broken(format!(
            "KVM API version {version}, expected {KVM_API_VERSION} (is it a KVM device?)"
        ));
    }
    if sys_module.join("kvm_pvm").exists() {
        return KvmSupport::Restricted(
            "it is provided by kvm_pvm, which runs only guest kernels built for PVM".into(),
        );
    }
    KvmSupport::Usable
}

/// The group of `device` if its group may read and write it, by name
/// (from /etc/group) or else by number.
fn access_group(device: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(device).ok()?;
    if meta.mode() & 0o060 != 0o060 || meta.gid() == 0 {
        return None;
    }
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    Some(group_name(&groups, meta.gid()).unwrap_or_else(|| meta.gid().to_string()))
}

/// The name of group `gid` in group-format `text`.
fn group_name(text: &str, gid: u32) -> Option<String> {
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == gid && !name.is_empty()).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device() {
        let p = probe(Path::new("/nonexistent/kvm"), Path::new("/sys/module"));
        assert_eq!(p, KvmSupport::Missing);
        assert!(p
            .explain(Path::new("/nonexistent/kvm"))
            .contains("does not exist"));
    }

    #[test]
    fn no_permission_names_the_fix_for_how_the_device_is_shared() {
        let dev = Path::new("/dev/kvm");
        let group = KvmSupport::NoPermission {
            group: Some("kvm".into()),
        }
        .explain(dev);
        assert!(group.contains("add yourself to its group kvm"), "{group}");
        assert!(group.contains("sudo adduser $USER kvm"), "{group}");
        let owner_only = KvmSupport::NoPermission { group: None }.explain(dev);
        assert!(
            owner_only.contains("its group may not use it"),
            "{owner_only}"
        );
        assert!(owner_only.contains("chmod 0660 /dev/kvm"), "{owner_only}");
        let groups = "root:x:0:\nkvm:x:993:ci\nbroken\n";
        assert_eq!(group_name(groups, 993).as_deref(), Some("kvm"));
        assert_eq!(group_name(groups, 5), None);
    }

    #[test]
    fn not_a_kvm_device() {
        match probe(Path::new("/dev/null"), Path::new("/sys/module")) {
            KvmSupport::Broken(_) => {}
            other => panic!("expected Broken, got {other:?}"),
        }
    }

    #[test]
    fn pvm_is_restricted() {
        let dir = std::env::temp_dir().join(format!("kiln-vmm-probe-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm_pvm")).expect("mkdir");
        if Path::new("/dev/kvm").exists() {
            match probe(Path::new("/dev/kvm"), &dir) {
                KvmSupport::Restricted(why) => assert!(why.contains("kvm_pvm")),
                KvmSupport::NoPermission { .. } | KvmSupport::Broken(_) => {}
                other => panic!("expected Restricted, got {other:?}"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
