//! Secrets at rest: values sealed with AES-256-GCM (ring) before they reach the store, under a
//! key that never does — the data directory's `secrets.key` (0600) or `GANTRY_SECRETS_KEY`.
//!
//! A [`Keyring`] holds the current key and, during a rotation, the previous ones: values are
//! always sealed with the current key and opened with whichever key sealed them (each sealed
//! value names its key by a short id, a hash of the key, never the key). Components reseal what
//! an old key sealed when they load it ([`Keyring::reseal`]), so after one start with both keys
//! the old one can be removed. Each sealed value is bound to where it is stored (the additional
//! data names its place), so one cannot be swapped for another.
#![forbid(unsafe_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom as _, SystemRandom};

/// Sealed before keys had ids (identity's private keys): opened by trying every key.
const PREFIX_V1: &str = "sealed-v1.";
/// `sealed-v2.<key id>.<base64url(nonce ‖ ciphertext ‖ tag)>`.
const PREFIX_V2: &str = "sealed-v2.";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("not a sealed value")]
    NotSealed,
    #[error("the system random source failed")]
    Random,
    #[error("sealing failed")]
    Seal,
    #[error("cannot open a sealed value: the secrets key is not the one it was sealed with (keep the data directory's secrets.key or set GANTRY_SECRETS_KEY; during a rotation give the old key as GANTRY_SECRETS_KEY_PREVIOUS or secrets.key.previous)")]
    WrongKey,
}

struct Key {
    id: String,
    aead: LessSafeKey,
}

impl Key {
    fn new(raw: &[u8; 32]) -> Self {
        // A 32-byte key is always a valid AES-256 key.
        #[allow(clippy::expect_used)]
        let k = UnboundKey::new(&AES_256_GCM, raw).expect("a 32-byte AES-256 key");
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &[b"gantry-secrets-key-id:".as_slice(), raw].concat(),
        );
        let id = digest.as_ref()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self {
            id,
            aead: LessSafeKey::new(k),
        }
    }

    fn open(&self, aad: &str, raw: &[u8]) -> Result<Vec<u8>, SealError> {
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError::WrongKey);
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(nonce);
        let mut buf = rest.to_vec();
        let plain = self
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(n),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError::WrongKey)?;
        Ok(plain.to_vec())
    }
}

/// The current key and the previous ones still accepted for opening.
pub struct Keyring {
    current: Key,
    previous: Vec<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current.id)
            .field(
                "previous",
                &self.previous.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keyring {
    pub fn new(current: &[u8; 32], previous: &[[u8; 32]]) -> Self {
        let current = Key::new(current);
        let previous = previous
            .iter()
            .map(Key::new)
            .filter(|k| k.id != current.id)
            .collect();
        Self { current, previous }
    }

    /// The current key's id (what `sealed-v2` values name).
    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    /// Seal `plain` for the place `aad` with the current key.
    pub fn seal(&self, aad: &str, plain: &[u8]) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut buf = plain.to_vec();
        self.current
            .aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError::Seal)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!(
            "{PREFIX_V2}{}.{}",
            self.current.id,
            URL_SAFE_NO_PAD.encode(out)
        ))
    }

    /// Whether `value` is sealed (values written before sealing existed are not).
    pub fn is_sealed(value: &str) -> bool {
        value.starts_with(PREFIX_V1) || value.starts_with(PREFIX_V2)
    }

    /// Open a value sealed for the place `aad` by the current key or a previous one.
    pub fn open(&self, aad: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        if let Some(rest) = sealed.strip_prefix(PREFIX_V2) {
            let (id, data) = rest.split_once('.').ok_or(SealError::NotSealed)?;
            let raw = URL_SAFE_NO_PAD
                .decode(data)
                .map_err(|_| SealError::NotSealed)?;
            let key = self
                .keys()
                .find(|k| k.id == id)
                .ok_or(SealError::WrongKey)?;
            return key.open(aad, &raw);
        }
        let raw = sealed
            .strip_prefix(PREFIX_V1)
            .and_then(|d| URL_SAFE_NO_PAD.decode(d).ok())
            .ok_or(SealError::NotSealed)?;
        self.keys()
            .find_map(|k| k.open(aad, &raw).ok())
            .ok_or(SealError::WrongKey)
    }

    /// `Some(value sealed with the current key)` when `sealed` was sealed by another key (or
    /// before keys had ids); `None` when it is already current.
    pub fn reseal(&self, aad: &str, sealed: &str) -> Result<Option<String>, SealError> {
        let current = sealed
            .strip_prefix(PREFIX_V2)
            .and_then(|r| r.split_once('.'))
            .is_some_and(|(id, _)| id == self.current.id);
        if current {
            return Ok(None);
        }
        let plain = self.open(aad, sealed)?;
        self.seal(aad, &plain).map(Some)
    }

    fn keys(&self) -> impl Iterator<Item = &Key> {
        std::iter::once(&self.current).chain(&self.previous)
    }
}

/// A key from its text form: base64url (padding and surrounding space allowed) of 32 bytes.
pub fn decode_key(text: &str) -> Option<[u8; 32]> {
    let raw = URL_SAFE_NO_PAD
        .decode(text.trim().trim_end_matches('='))
        .ok()?;
    raw.try_into().ok()
}

/// The text form of a key.
pub fn encode_key(key: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_place() {
        let s = Keyring::new(&[7u8; 32], &[]);
        let v = s.seal("identity-keys/k1", b"private").unwrap();
        assert!(Keyring::is_sealed(&v) && !v.contains("private"));
        assert!(v.starts_with(&format!("sealed-v2.{}.", s.current_id())));
        assert_eq!(s.open("identity-keys/k1", &v).unwrap(), b"private");
        assert_eq!(s.open("identity-keys/k2", &v), Err(SealError::WrongKey));
        assert_eq!(
            Keyring::new(&[8u8; 32], &[]).open("identity-keys/k1", &v),
            Err(SealError::WrongKey)
        );
        assert_ne!(v, s.seal("identity-keys/k1", b"private").unwrap());
        assert_eq!(s.open("x", "plain"), Err(SealError::NotSealed));
        assert_eq!(s.open("x", "sealed-v2.nodot"), Err(SealError::NotSealed));
        assert_eq!(s.open("x", "sealed-v2.ab.AAAA"), Err(SealError::WrongKey));
    }

    #[test]
    fn rotation_opens_old_values_and_reseals_them_under_the_new_key() {
        let old = Keyring::new(&[1u8; 32], &[]);
        let sealed = old.seal("config/a", b"hunter2").unwrap();
        let rotated = Keyring::new(&[2u8; 32], &[[1u8; 32]]);
        assert_eq!(rotated.open("config/a", &sealed).unwrap(), b"hunter2");
        let resealed = rotated.reseal("config/a", &sealed).unwrap().unwrap();
        assert!(resealed.contains(rotated.current_id()));
        assert_eq!(rotated.reseal("config/a", &resealed).unwrap(), None);
        // Once the old key is gone, only the resealed value opens.
        let new_only = Keyring::new(&[2u8; 32], &[]);
        assert_eq!(new_only.open("config/a", &resealed).unwrap(), b"hunter2");
        assert_eq!(new_only.open("config/a", &sealed), Err(SealError::WrongKey));
    }

    #[test]
    fn version_1_values_open_with_any_key_of_the_ring() {
        // What identity wrote before keys had ids: nonce ‖ ciphertext ‖ tag, no key id.
        let k = Key::new(&[3u8; 32]);
        let mut buf = b"der".to_vec();
        let nonce = [9u8; NONCE_LEN];
        k.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(b"p".as_slice()),
                &mut buf,
            )
            .unwrap();
        let v1 = format!(
            "sealed-v1.{}",
            URL_SAFE_NO_PAD.encode([&nonce[..], &buf].concat())
        );
        let ring = Keyring::new(&[4u8; 32], &[[3u8; 32]]);
        assert_eq!(ring.open("p", &v1).unwrap(), b"der");
        assert!(ring.reseal("p", &v1).unwrap().is_some());
    }

    #[test]
    fn keys_round_trip_through_text() {
        let k = [5u8; 32];
        assert_eq!(decode_key(&encode_key(&k)), Some(k));
        assert_eq!(decode_key(&format!(" {}=\n", encode_key(&k))), Some(k));
        assert_eq!(decode_key("short"), None);
    }
}
