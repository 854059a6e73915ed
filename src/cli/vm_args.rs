//! The VM flags `kiln run` and `kiln build` share, and the parsers of
//! memory sizes and seconds (which `kiln boot` takes too). The sizes are
//! checked here, once, against limits every backend takes (kiln-vmm counts
//! memory in a u32 of MiB and vCPUs in a u8), so nothing after parsing has
//! to check them again.

use std::marker::PhantomData;

use crate::sandbox::backend::BackendChoice;
use crate::util::size;

/// What the shared VM flags say in one command: `kiln build`'s VM is
/// bigger by default and its help names the build VM, and each command
/// lists the flags among its own where they always were.
pub trait VmFlags {
    const MEM_DEFAULT: &'static str;
    const MEM_HELP: &'static str;
    const CPUS_DEFAULT: &'static str;
    const CPUS_HELP: &'static str;
    const BACKEND_HELP: &'static str;
    const TIMEOUT_HELP: &'static str;
    /// Where each flag appears in the command's --help.
    const ORDER: VmFlagOrder;
}

/// Places in --help (clap's `display_order`).
pub struct VmFlagOrder {
    pub mem: usize,
    pub cpus: usize,
    pub timeout: usize,
    pub backend: usize,
}

/// --mem, --cpus, --timeout and --backend, as `F` words them. The help is
/// given as `help = ...` (clap drops a doc comment's final period; these
/// strings have none).
#[derive(clap::Args)]
pub struct VmArgs<F: VmFlags> {
    #[arg(
        long,
        default_value = F::MEM_DEFAULT,
        value_parser = parse_mem,
        help = F::MEM_HELP,
        display_order = F::ORDER.mem
    )]
    pub mem: u32,
    #[arg(
        long,
        default_value = F::CPUS_DEFAULT,
        value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_CPUS)),
        help = F::CPUS_HELP,
        display_order = F::ORDER.cpus
    )]
    pub cpus: u8,
    #[arg(
        long,
        value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(1..),
        help = F::TIMEOUT_HELP,
        display_order = F::ORDER.timeout
    )]
    pub timeout: Option<u64>,
    #[arg(
        long,
        value_enum,
        default_value_t = BackendChoice::Auto,
        help = F::BACKEND_HELP,
        display_order = F::ORDER.backend
    )]
    pub backend: BackendChoice,
    #[arg(skip)]
    words: PhantomData<F>,
}

pub(super) fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "expected seconds between 0 and 86400 (e.g. 60 or 0.5), got '{s}'"
        )),
    }
}

/// The most vCPUs `--cpus` gives a VM.
const MAX_CPUS: u8 = 64;
/// The least and the most memory `--mem` gives a VM, in MiB (64M, 1024G).
const MEM_MIB: std::ops::RangeInclusive<u32> = 64..=1024 * 1024;

/// A memory size in MiB: a bare number counts MiB, and only M and G are
/// taken.
pub(super) fn parse_mem(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let mib = match size::parse(s) {
        Some((n, size::Unit::None | size::Unit::M)) => n,
        Some((n, size::Unit::G)) => n.saturating_mul(1024),
        _ => return Err(format!("expected a size such as 512M or 2G, got '{s}'")),
    };
    match u32::try_from(mib) {
        Ok(m) if MEM_MIB.contains(&m) => Ok(m),
        _ => Err(format!("memory must be between 64M and 1024G, got {mib}M")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    struct Words;

    impl VmFlags for Words {
        const MEM_DEFAULT: &'static str = "1G";
        const MEM_HELP: &'static str = "memory";
        const CPUS_DEFAULT: &'static str = "1";
        const CPUS_HELP: &'static str = "cpus";
        const BACKEND_HELP: &'static str = "backend";
        const TIMEOUT_HELP: &'static str = "timeout";
        const ORDER: VmFlagOrder = VmFlagOrder {
            mem: 0,
            cpus: 1,
            timeout: 2,
            backend: 3,
        };
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        vm: VmArgs<Words>,
    }

    #[test]
    fn cpus_are_between_1_and_64() {
        let cpus = |n: &str| Cli::try_parse_from(["kiln", "--cpus", n]).map(|c| c.vm.cpus);
        assert_eq!(cpus("1").expect("1"), 1);
        assert_eq!(cpus("64").expect("64"), 64);
        for bad in ["0", "65", "300", "x"] {
            let e = cpus(bad).expect_err(bad).to_string();
            assert!(e.contains(&format!("'{bad}' for '--cpus")), "{e}");
        }
        let e = cpus("300").expect_err("300").to_string();
        assert!(e.contains("300 is not in 1..=64"), "{e}");
    }

    #[test]
    fn memory_is_in_mib_with_m_or_g() {
        assert_eq!(parse_mem("2G"), Ok(2048));
        assert_eq!(parse_mem(" 1g "), Ok(1024));
        assert_eq!(parse_mem("512"), Ok(512));
        assert_eq!(parse_mem("512m"), Ok(512));
        for bad in ["512K", "1T", "", "G", "1.5G"] {
            assert_eq!(
                parse_mem(bad),
                Err(format!(
                    "expected a size such as 512M or 2G, got '{}'",
                    bad.trim()
                ))
            );
        }
        let range = |mib: u64| Err(format!("memory must be between 64M and 1024G, got {mib}M"));
        assert_eq!(parse_mem("63M"), range(63));
        assert_eq!(parse_mem("1024G"), Ok(1024 * 1024));
        assert_eq!(parse_mem("1025G"), range(1025 * 1024));
        // Beyond a u32 of MiB: the same message, not a wrapped value.
        assert_eq!(parse_mem("4194304G"), range(4194304 * 1024));
        assert_eq!(parse_mem("18446744073709551615G"), range(u64::MAX));
    }
}
