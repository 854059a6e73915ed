//! Identifiers an image needs that would otherwise be random (disk and
//! partition GUIDs, filesystem UUIDs, hash seeds, the vfat volume id),
//! derived from the recipe so that the same recipe gives the same image.

use sha2::{Digest, Sha256};

/// Derives identifiers from a seed (the recipe's text).
pub struct Ids {
    seed: Vec<u8>,
}

impl Ids {
    pub fn new(seed: &[u8]) -> Ids {
        Ids {
            seed: seed.to_vec(),
        }
    }

    fn bytes(&self, what: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"kiln-ids-v1\0");
        h.update(&self.seed);
        h.update(b"\0");
        h.update(what.as_bytes());
        h.finalize().into()
    }

    /// A random-looking (version 4, RFC 4122 variant) UUID named `what`.
    pub fn uuid(&self, what: &str) -> String {
        let mut b = self.bytes(what);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h = hex::encode(&b[..16]);
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    /// A vfat volume id: "ABCD-1234".
    pub fn vfat_id(&self, what: &str) -> String {
        let h = hex::encode_upper(&self.bytes(what)[..4]);
        format!("{}-{}", &h[..4], &h[4..])
    }

    /// A 32-bit MBR disk identifier.
    pub fn mbr_id(&self) -> String {
        format!("0x{}", hex::encode(&self.bytes("mbr-disk-id")[..4]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_distinct_and_well_formed() {
        let a = Ids::new(b"recipe");
        assert_eq!(a.uuid("root"), Ids::new(b"recipe").uuid("root"));
        assert_ne!(a.uuid("root"), a.uuid("esp"));
        assert_ne!(a.uuid("root"), Ids::new(b"other").uuid("root"));
        let u = a.uuid("root");
        assert!(crate::image::recipe::is_uuid(&u), "{u}");
        assert_eq!(&u[14..15], "4");
        assert!("89ab".contains(&u[19..20]));
        let v = a.vfat_id("esp");
        assert_eq!(v.len(), 9);
        assert_eq!(&v[4..5], "-");
        assert_eq!(a.mbr_id().len(), 10);
    }
}
