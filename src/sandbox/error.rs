//! The ways a sandbox's work ends that have exit codes of their own
//! (`kiln` maps them in one place, `cli::exit_code`); every other failure
//! is kiln's own.

/// Raised wherever kiln stops its VM or helpers for these reasons: the
/// guest watch, long host builds, the image build, `kiln boot`.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("interrupted; everything kiln started was stopped")]
    Interrupted,
    #[error("timed out after {0} s; the VM was stopped")]
    Timeout(u64),
}
