//! Turning the built raw disk (and live iso) into the formats people
//! deploy, with qemu-img; the OVA for VirtualBox; compression; a sha256
//! beside each. Everything is written in the build's work directory, inside
//! the output directory (so on its filesystem), and renamed into place only
//! when every output is complete.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::image::recipe::{Compression, Format};
use crate::sandbox::disk::is_qcow2;
use crate::util::process::run_tool;
use crate::util::sparse::read_with_holes;
use crate::util::which::which;

/// One finished output, still under its temporary name.
pub struct Output {
    pub format: Format,
    pub temp: PathBuf,
    pub final_path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

pub fn qemu_img() -> Result<PathBuf> {
    which("qemu-img").ok_or_else(|| {
        anyhow::anyhow!(
            "qemu-img not found, needed for the image formats: sudo apt-get install qemu-utils"
        )
    })
}

pub fn sha256_file(p: &Path) -> Result<String> {
    let f = File::open(p).with_context(|| format!("reading {}", p.display()))?;
    let mut h = Sha256::new();
    read_with_holes(&f, |b| h.update(b)).with_context(|| format!("reading {}", p.display()))?;
    Ok(hex::encode(h.finalize()))
}

pub struct Converter<'a> {
    pub out_dir: &'a Path,
    pub name: &'a str,
    /// Where outputs are made, on the output directory's filesystem; it
    /// goes with the build's work directory, however the build ends.
    pub temp_dir: &'a Path,
    pub epoch: u64,
    pub compress: Compression,
    pub qcow2_backing: Option<&'a Path>,
    pub disk_size: u64,
}

impl Converter<'_> {
    fn temp(&self, ext: &str) -> PathBuf {
        self.temp_dir.join(format!("{}.{ext}", self.name))
    }

    /// Whether the raw output is the built disk as it is (not compressed),
    /// so that its SHA-256 is the disk's.
    pub fn keeps_raw_as_is(&self) -> bool {
        compressor(Format::Raw, self.compress).is_none()
    }

    /// Makes `format` from the raw disk (or, for iso, takes the iso).
    /// `sha256`: the output's, when the caller knows it (a raw output kept
    /// as it is, hashed meanwhile).
    pub fn make(
        &self,
        format: Format,
        raw: &Path,
        iso: Option<&Path>,
        sha256: Option<String>,
    ) -> Result<Output> {
        let ext = format.ext();
        let tmp = self.temp(ext);
        match format {
            // The caller makes raw last: the built disk itself becomes it.
            Format::Raw => std::fs::rename(raw, &tmp)?,
            Format::Iso => {
                let iso = iso.context("no iso was built")?;
                std::fs::rename(iso, &tmp).or_else(|_| std::fs::copy(iso, &tmp).map(|_| ()))?;
            }
            Format::Qcow2 => match self.qcow2_backing {
                Some(base) => qcow2_delta(raw, &tmp, base)?,
                None => convert(raw, &tmp, "qcow2", "compat=1.1")?,
            },
            Format::Vmdk => convert(raw, &tmp, "vmdk", "subformat=monolithicSparse")?,
            Format::Vhdx => convert(raw, &tmp, "vhdx", "subformat=dynamic")?,
            // Fixed with the exact size: what clouds (Azure) take.
            Format::Vpc => convert(raw, &tmp, "vpc", "subformat=fixed,force_size=on")?,
            Format::Ova => self.ova(raw, &tmp)?,
        }
        let (temp, final_name) = self.compress(tmp, format)?;
        let size = std::fs::metadata(&temp)?.len();
        let sha256 = match sha256 {
            Some(h) => h,
            None => sha256_file(&temp)?,
        };
        Ok(Output {
            format,
            final_path: self.out_dir.join(final_name),
            temp,
            size,
            sha256,
        })
    }

    fn compress(&self, tmp: PathBuf, format: Format) -> Result<(PathBuf, String)> {
        let base = final_name(self.name, format, self.compress);
        let Some((tool, ext, args)) = compressor(format, self.compress) else {
            return Ok((tmp, base));
        };
        if which(tool).is_none() {
            bail!(
                "{tool} not found, needed for compress = \"{tool}\": sudo apt-get install {}",
                if tool == "xz" { "xz-utils" } else { "zstd" }
            );
        }
        run_tool(
            Command::new(tool).args(args).arg(&tmp),
            &format!("{tool} compression"),
        )?;
        let mut done = tmp.into_os_string();
        done.push(format!(".{ext}"));
        Ok((PathBuf::from(done), base))
    }

    /// An OVA: the OVF descriptor, a manifest of SHA256 digests and a
    /// streamOptimized vmdk, in a ustar archive in that order (OVF 1.x).
    fn ova(&self, raw: &Path, tmp: &Path) -> Result<()> {
        let dir = tempfile::Builder::new()
            .prefix("ova-")
            .tempdir_in(self.temp_dir)?;
        let disk_name = format!("{}-disk1.vmdk", self.name);
        let disk = dir.path().join(&disk_name);
        convert(raw, &disk, "vmdk", "subformat=streamOptimized")?;
        let disk_bytes = std::fs::metadata(&disk)?.len();
        let ovf_name = format!("{}.ovf", self.name);
        let ovf = ovf_descriptor(self.name, &disk_name, disk_bytes, self.disk_size);
        std::fs::write(dir.path().join(&ovf_name), &ovf)?;
        let mf_name = format!("{}.mf", self.name);
        let mut mf = String::new();
        for f in [&ovf_name, &disk_name] {
            let _ = writeln!(mf, "SHA256({f})= {}", sha256_file(&dir.path().join(f))?);
        }
        std::fs::write(dir.path().join(&mf_name), mf)?;
        run_tool(
            Command::new("tar")
                .args([
                    "--format=ustar",
                    "--numeric-owner",
                    "--owner=0",
                    "--group=0",
                ])
                .arg(format!("--mtime=@{}", self.epoch))
                .arg("--mode=0644")
                .arg("-C")
                .arg(dir.path())
                .arg("-cf")
                .arg(tmp)
                .args([&ovf_name, &mf_name, &disk_name]),
            "packing the ova",
        )?;
        Ok(())
    }
}

/// The tool, file extension and arguments that compress `format`'s
/// output, if it is compressed: the ova never is, being itself an archive
/// that VirtualBox opens as is.
fn compressor(
    format: Format,
    compress: Compression,
) -> Option<(&'static str, &'static str, &'static [&'static str])> {
    match compress {
        _ if format == Format::Ova => None,
        Compression::None => None,
        Compression::Xz => Some(("xz", "xz", &["-T0", "-6", "--force", "--quiet"])),
        Compression::Zstd => Some(("zstd", "zst", &["-T0", "-19", "--rm", "--force", "--quiet"])),
    }
}

/// The file name `format`'s output gets in the output directory.
pub fn final_name(name: &str, format: Format, compress: Compression) -> String {
    let base = format!("{name}.{}", format.ext());
    match compressor(format, compress) {
        Some((_, ext, _)) => format!("{base}.{ext}"),
        None => base,
    }
}

/// Refuses a `qcow2_backing` that is one of the files this build replaces
/// (an output or its `.sha256`): the overlay would name itself, or the
/// base would be gone once the outputs take their names.
pub fn check_backing_is_kept(
    backing: &Path,
    out_dir: &Path,
    name: &str,
    formats: &[Format],
    compress: Compression,
) -> Result<()> {
    for f in formats {
        let out = final_name(name, *f, compress);
        for file in [out.clone(), format!("{out}.sha256")] {
            let path = out_dir.join(&file);
            if path.canonicalize().is_ok_and(|p| p == backing) {
                bail!(
                    "output.qcow2_backing is {}, which this build replaces with its \
                     {file}: copy the base image elsewhere and name that, or build \
                     into another directory (-o DIR)",
                    backing.display()
                );
            }
        }
    }
    Ok(())
}

/// `qemu-img convert` of the raw disk to `format` with creation `options`.
fn convert(raw: &Path, dest: &Path, format: &str, options: &str) -> Result<()> {
    run_tool(
        Command::new(qemu_img()?)
            .args(["convert", "-q", "-f", "raw", "-O", format, "-o", options])
            .arg(raw)
            .arg(dest),
        &format!("qemu-img convert to {format} ({options})"),
    )?;
    Ok(())
}

/// A qcow2 overlay on `base` (an existing image, its format detected)
/// that holds only the clusters where the raw disk differs from it.
/// `qemu-img convert -B` would copy every allocated cluster of the disk;
/// instead the overlay starts empty on the raw disk itself (so it reads as
/// the disk and has its size), and a safe-mode rebase onto `base` writes
/// into it exactly what reads differently from the two backings. The
/// result names `base`, as given, and no longer the raw disk.
fn qcow2_delta(raw: &Path, dest: &Path, base: &Path) -> Result<()> {
    let base_format = detect_format(base)?;
    let tool = qemu_img()?;
    // Absolute: a relative backing name is read relative to the overlay.
    let raw = std::path::absolute(raw)?;
    run_tool(
        Command::new(&tool)
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=1.1",
                "-F",
                "raw",
                "-b",
            ])
            .arg(&raw)
            .arg(dest),
        "qemu-img create of the qcow2 overlay",
    )?;
    run_tool(
        Command::new(&tool)
            .args(["rebase", "-q", "-f", "qcow2", "-F", base_format, "-b"])
            .arg(base)
            .arg(dest),
        &format!(
            "qemu-img rebase of the qcow2 overlay onto qcow2_backing {}",
            base.display()
        ),
    )?;
    Ok(())
}

/// The format of an existing image, by its magic (for a qcow2 backing file).
pub fn detect_format(p: &Path) -> Result<&'static str> {
    let mut magic = [0u8; 8];
    let mut f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let n = f.read(&mut magic)?;
    // A fixed VHD has its "conectix" footer only in the last sector.
    let len = f.metadata()?.len();
    if len >= 512 && n == 8 && !is_qcow2(&magic) {
        use std::io::{Seek, SeekFrom};
        let mut footer = [0u8; 8];
        f.seek(SeekFrom::Start(len - 512))?;
        if f.read_exact(&mut footer).is_ok() && &footer == b"conectix" {
            return Ok("vpc");
        }
    }
    Ok(match &magic[..n] {
        header if is_qcow2(header) => "qcow2",
        [b'K', b'D', b'M', b'V', ..] => "vmdk",
        b"vhdxfile" => "vhdx",
        b"conectix" => "vpc",
        _ => "raw",
    })
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An OVF 1.0 descriptor for one 64-bit Debian machine with a SATA disk,
/// 2 CPUs, 1 GiB of memory and a NAT network card.
pub fn ovf_descriptor(name: &str, disk_file: &str, file_size: u64, capacity: u64) -> String {
    let name = xml_escape(name);
    let disk_file = xml_escape(disk_file);
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:id="file1" ovf:href="{disk_file}" ovf:size="{file_size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks</Info>
    <Network ovf:name="NAT">
      <Description>NAT network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine built by kiln</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="96">
      <Info>The guest operating system</Info>
      <Description>Debian_64</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>2 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>1024 MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>1024 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>sataController0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:Caption>disk1</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:ElementName>disk1</rasd:ElementName>
        <rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>Ethernet adapter on 'NAT'</rasd:Caption>
        <rasd:Connection>NAT</rasd:Connection>
        <rasd:ElementName>Ethernet adapter on 'NAT'</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

/// Writes `NAME.sha256` for an output, in sha256sum's format, in
/// `temp_dir`; returns it and the name it is to take beside the output.
pub fn write_sha256(out: &Output, temp_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let file_name = out
        .final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = out.final_path.parent().unwrap_or(Path::new("."));
    let tmp = temp_dir.join(format!("{file_name}.sha256"));
    let mut f = File::create(&tmp)?;
    writeln!(f, "{}  {file_name}", out.sha256)?;
    f.sync_all()?;
    Ok((tmp, dir.join(format!("{file_name}.sha256"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backing_image_the_build_would_replace_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().canonicalize().expect("canonical");
        for f in ["img.qcow2", "img.raw.zst.sha256", "other.qcow2"] {
            File::create(out.join(f)).expect("create");
        }
        let check = |base: &str, formats: &[Format], compress| {
            check_backing_is_kept(&out.join(base), &out, "img", formats, compress)
        };
        let err = check(
            "img.qcow2",
            &[Format::Raw, Format::Qcow2],
            Compression::None,
        )
        .expect_err("the overlay would replace its own base");
        assert!(err.to_string().contains("-o DIR"), "{err}");
        check("img.raw.zst.sha256", &[Format::Raw], Compression::Zstd)
            .expect_err("a checksum the build rewrites");
        check("other.qcow2", &[Format::Qcow2], Compression::None).expect("another image");
        // Compressed, the qcow2 output is img.qcow2.zst: img.qcow2 is kept.
        check("img.qcow2", &[Format::Qcow2], Compression::Zstd).expect("not an output");
    }

    /// qemu-img's answer as JSON; qemu-utils is installed by .ci/setup, so
    /// its absence fails the test rather than skipping it.
    fn qemu_img_json(args: &[&str], image: &Path) -> serde_json::Value {
        let tool = qemu_img().expect("qemu-img (qemu-utils, installed by .ci/setup)");
        let out = run_tool(Command::new(tool).args(args).arg(image), "qemu-img").expect("qemu-img");
        serde_json::from_slice(&out).expect("qemu-img's JSON")
    }

    /// Bytes of data the qcow2 file itself holds (not its backing chain).
    fn own_data(qcow2: &Path) -> u64 {
        let map = qemu_img_json(&["map", "--output=json", "-f", "qcow2"], qcow2);
        map.as_array()
            .expect("a list of extents")
            .iter()
            .filter(|e| e["depth"] == 0 && e["data"] == true)
            .map(|e| e["length"].as_u64().expect("length"))
            .sum()
    }

    /// A sparse disk of `size` bytes with `data` written at each offset.
    fn disk(p: &Path, size: u64, data: &[(u64, &[u8])]) {
        use std::io::{Seek, SeekFrom};
        let mut f = File::create(p).expect("create");
        f.set_len(size).expect("set_len");
        for (at, bytes) in data {
            f.seek(SeekFrom::Start(*at)).expect("seek");
            f.write_all(bytes).expect("write");
        }
    }

    fn reads_back_as(qcow2: &Path, raw: &Path) {
        let tool = qemu_img().expect("qemu-img");
        run_tool(
            Command::new(tool)
                .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
                .arg(qcow2)
                .arg(raw),
            "qemu-img compare",
        )
        .expect("the overlay reads back as the disk");
    }

    #[test]
    fn a_qcow2_delta_holds_only_the_clusters_that_differ() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| dir.path().join(n);
        let filled = vec![0x5au8; 8 * MIB as usize];
        let built = [(4 * MIB, &filled[..]), (20 * MIB, b"new".as_slice())];
        disk(&p("new.raw"), 32 * MIB, &built);

        // The same disk: nothing of it in the overlay, and only the base
        // in its backing chain (not the raw disk it was made from).
        disk(&p("same.raw"), 32 * MIB, &built);
        qcow2_delta(&p("new.raw"), &p("same.qcow2"), &p("same.raw")).expect("delta");
        assert_eq!(own_data(&p("same.qcow2")), 0);
        reads_back_as(&p("same.qcow2"), &p("new.raw"));
        let chain = qemu_img_json(
            &["info", "--output=json", "--backing-chain", "-f", "qcow2"],
            &p("same.qcow2"),
        );
        let names: Vec<_> = chain
            .as_array()
            .expect("a chain")
            .iter()
            .map(|i| i["filename"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(names.len(), 2, "{chain}");
        assert!(names[1].ends_with("same.raw"), "{chain}");
        assert_eq!(chain[0]["virtual-size"], 32 * MIB);

        // One changed cluster: that cluster (64 KiB) and nothing else.
        disk(
            &p("old.raw"),
            32 * MIB,
            &[(4 * MIB, &filled[..]), (20 * MIB, b"old")],
        );
        qcow2_delta(&p("new.raw"), &p("one.qcow2"), &p("old.raw")).expect("delta");
        assert_eq!(own_data(&p("one.qcow2")), 64 << 10);
        reads_back_as(&p("one.qcow2"), &p("new.raw"));

        // A qcow2 base, of another size: shorter (read past its end as
        // zeroes) or longer; the overlay keeps the built disk's size.
        for (name, size) in [("short", 8 * MIB), ("long", 64 * MIB)] {
            let raw = p(&format!("{name}.raw"));
            disk(&raw, size, &[(4 * MIB, &filled[..(4 * MIB) as usize])]);
            let base = p(&format!("{name}.base.qcow2"));
            convert(&raw, &base, "qcow2", "compat=1.1").expect("qcow2 base");
            let out = p(&format!("{name}.qcow2"));
            qcow2_delta(&p("new.raw"), &out, &base).expect("delta");
            let info = qemu_img_json(&["info", "--output=json", "-f", "qcow2"], &out);
            assert_eq!(info["virtual-size"], 32 * MIB, "{info}");
            assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
            reads_back_as(&out, &p("new.raw"));
            // The 4 MiB past the short base's end and the changed cluster.
            let data = own_data(&out);
            assert!(data <= 4 * MIB + (64 << 10), "{name}: {data} bytes");
        }
    }

    #[test]
    fn formats_are_told_by_their_magic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let detect = |name: &str, data: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, data).expect("write");
            detect_format(&p).expect("detect")
        };
        let with = |head: &[u8], len: usize| {
            let mut d = head.to_vec();
            d.resize(len, 0);
            d
        };
        assert_eq!(detect("q", &with(b"QFI\xfb\0\0\0\x03", 4096)), "qcow2");
        assert_eq!(detect("k", &with(b"KDMV", 4096)), "vmdk");
        assert_eq!(detect("h", &with(b"vhdxfile", 4096)), "vhdx");
        assert_eq!(detect("r", &with(b"", 4096)), "raw");
        assert_eq!(detect("e", b""), "raw");
        // A fixed VHD: the footer in the last sector only.
        let mut vpc = vec![0u8; 4096];
        vpc[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
        assert_eq!(detect("v", &vpc), "vpc");
        // A qcow2 image's last sector is its data, never read as a footer.
        let mut q = with(b"QFI\xfb\0\0\0\x03", 4096);
        q[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
        assert_eq!(detect("qv", &q), "qcow2");
    }
}
