//! Private keys at rest: the signing keys' and the CA's private halves are sealed
//! (AES-256-GCM, ring) before they reach the store, under a key that never does — the data
//! directory's `secrets.key` (0600), or `GANTRY_SECRETS_KEY` (base64url, 32 bytes) for gantrys
//! that share a store. Each sealed value is bound to where it is stored (the additional data
//! names the bucket and key), so one cannot be swapped for another.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom as _, SystemRandom};

const PREFIX: &str = "sealed-v1.";

pub struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

impl Sealer {
    pub fn new(raw: &[u8; 32]) -> Self {
        // A 32-byte key is always a valid AES-256 key.
        #[allow(clippy::expect_used)]
        let k = UnboundKey::new(&AES_256_GCM, raw).expect("a 32-byte AES-256 key");
        Self {
            key: LessSafeKey::new(k),
        }
    }

    /// `sealed-v1.` + base64url(nonce ‖ ciphertext ‖ tag).
    pub fn seal(&self, aad: &str, plain: &[u8]) -> Result<String, String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "the system random source failed".to_string())?;
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .map_err(|_| "sealing failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!("{PREFIX}{}", gantry_authn::b64url(&out)))
    }

    /// Whether `value` is sealed (values written before sealing existed are not).
    pub fn is_sealed(value: &str) -> bool {
        value.starts_with(PREFIX)
    }

    pub fn open(&self, aad: &str, sealed: &str) -> Result<Vec<u8>, String> {
        let raw = sealed
            .strip_prefix(PREFIX)
            .and_then(gantry_authn::b64url_decode)
            .ok_or("not a sealed value")?;
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err("sealed value too short".into());
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(nonce);
        let mut buf = rest.to_vec();
        let plain = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(n), Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| {
                "cannot open a sealed private key: the secrets key is not the one it was sealed with (set GANTRY_SECRETS_KEY, or keep the data directory's secrets.key)".to_string()
            })?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_place() {
        let s = Sealer::new(&[7u8; 32]);
        let v = s.seal("identity-keys/k1", b"private").expect("seal");
        assert!(Sealer::is_sealed(&v) && !v.contains("private"));
        assert_eq!(s.open("identity-keys/k1", &v).expect("open"), b"private");
        assert!(
            s.open("identity-keys/k2", &v).is_err(),
            "bound to its place"
        );
        assert!(Sealer::new(&[8u8; 32])
            .open("identity-keys/k1", &v)
            .is_err());
        assert_ne!(
            v,
            s.seal("identity-keys/k1", b"private").expect("seal"),
            "fresh nonce"
        );
    }
}
