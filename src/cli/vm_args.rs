//! The VM flags `kiln run` and `kiln build` share, and the parsers of
//! memory sizes and seconds (which `kiln boot` takes too).

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
    pub mem: u64,
    #[arg(
        long,
        default_value = F::CPUS_DEFAULT,
        value_parser = clap::value_parser!(u32).range(1..=64),
        help = F::CPUS_HELP,
        display_order = F::ORDER.cpus
    )]
    pub cpus: u32,
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

/// A memory size in MiB: a bare number counts MiB, and only M and G are
/// taken.
pub(super) fn parse_mem(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let mib = match size::parse(s) {
        Some((n, size::Unit::None | size::Unit::M)) => n,
        Some((n, size::Unit::G)) => n.saturating_mul(1024),
        _ => return Err(format!("expected a size such as 512M or 2G, got '{s}'")),
    };
    if !(64..=1024 * 1024).contains(&mib) {
        return Err(format!("memory must be between 64M and 1024G, got {mib}M"));
    }
    Ok(mib)
}

#[cfg(test)]
mod tests {
    use super::parse_mem;

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
        assert_eq!(parse_mem("1025G"), range(1025 * 1024));
        assert_eq!(parse_mem("18446744073709551615G"), range(u64::MAX));
    }
}
