//! Signing keys: generated with ring (Ed25519, P-256) or the `rsa` crate (RSA-2048: ring
//! cannot generate RSA keys; ring signs with them), stored in the `identity-keys` bucket, and
//! rotated with overlap.
//!
//! A key's life: created and **published** at once (in the JWKS and the gateway's material), it
//! **signs** from `signs_from` (creation + the propagation delay, so every verifier holds it
//! before the first token signed with it exists), stops signing when the next key starts
//! (`retired_at`), and stays published until every token it signed has expired
//! (`retired_at` + the longest token lifetime + leeway); then it is deleted. At every moment
//! exactly one key signs, and every unexpired token's key is published: no window of rejected
//! tokens (Istio's #10547).

use jsonwebtoken::{Algorithm, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::random_token;
use gantry_secrets::Keyring as Sealer;

/// The algorithms new keys may be made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Alg {
    EdDSA,
    ES256,
    RS256,
}

impl Alg {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "EdDSA" => Alg::EdDSA,
            "ES256" => Alg::ES256,
            "RS256" => Alg::RS256,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Alg::EdDSA => "EdDSA",
            Alg::ES256 => "ES256",
            Alg::RS256 => "RS256",
        }
    }

    pub fn jose(self) -> Algorithm {
        match self {
            Alg::EdDSA => Algorithm::EdDSA,
            Alg::ES256 => Algorithm::ES256,
            Alg::RS256 => Algorithm::RS256,
        }
    }
}

/// A signing key as stored.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredKey {
    pub kid: String,
    pub alg: Alg,
    /// The DER private key (PKCS#8 for EdDSA and ES256, PKCS#1 for RS256), sealed (`seal.rs`);
    /// keys stored before sealing existed hold it as plain base64url.
    pub private_der: String,
    /// The public JWK (with `kid`, `alg`, `use`).
    pub public: Value,
    /// Seconds since the epoch.
    pub created: u64,
    pub signs_from: u64,
    pub retired_at: Option<u64>,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("signs_from", &self.signs_from)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}

impl StoredKey {
    /// A new key of `alg`, signing from `signs_from`.
    pub fn generate(alg: Alg, now: u64, signs_from: u64, sealer: &Sealer) -> Result<Self, String> {
        let rng = SystemRandom::new();
        let kid = format!("{}-{}", now, &random_token(6));
        let (der, mut jwk) = match alg {
            Alg::EdDSA => {
                let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
                let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| e.to_string())?;
                let x = gantry_authn::b64url(pair.public_key().as_ref());
                (
                    pkcs8.as_ref().to_vec(),
                    json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
                )
            }
            Alg::ES256 => {
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|e| e.to_string())?;
                let pair = EcdsaKeyPair::from_pkcs8(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    pkcs8.as_ref(),
                    &rng,
                )
                .map_err(|e| e.to_string())?;
                // An uncompressed point: 0x04 || x || y.
                let p = pair.public_key().as_ref();
                if p.len() != 65 {
                    return Err("unexpected P-256 public key length".into());
                }
                (
                    pkcs8.as_ref().to_vec(),
                    json!({"kty": "EC", "crv": "P-256",
                           "x": gantry_authn::b64url(&p[1..33]), "y": gantry_authn::b64url(&p[33..])}),
                )
            }
            Alg::RS256 => {
                use rsa::pkcs1::EncodeRsaPrivateKey as _;
                use rsa::traits::PublicKeyParts as _;
                let mut os = rsa::rand_core::OsRng;
                let key = rsa::RsaPrivateKey::new(&mut os, 2048).map_err(|e| e.to_string())?;
                let der = key.to_pkcs1_der().map_err(|e| e.to_string())?;
                let n = gantry_authn::b64url(&key.n().to_bytes_be());
                let e = gantry_authn::b64url(&key.e().to_bytes_be());
                (
                    der.as_bytes().to_vec(),
                    json!({"kty": "RSA", "n": n, "e": e}),
                )
            }
        };
        if let Some(o) = jwk.as_object_mut() {
            o.insert("kid".into(), Value::String(kid.clone()));
            o.insert("alg".into(), Value::String(alg.as_str().into()));
            o.insert("use".into(), Value::String("sig".into()));
        }
        let private_der = sealer
            .seal(&format!("{}/{kid}", crate::KEYS), &der)
            .map_err(|e| e.to_string())?;
        Ok(StoredKey {
            kid,
            alg,
            private_der,
            public: jwk,
            created: now,
            signs_from,
            retired_at: None,
        })
    }

    pub fn encoding_key(&self, sealer: &Sealer) -> Result<EncodingKey, String> {
        let der = if Sealer::is_sealed(&self.private_der) {
            sealer
                .open(&format!("{}/{}", crate::KEYS, self.kid), &self.private_der)
                .map_err(|e| format!("key {}: {e}", self.kid))?
        } else {
            gantry_authn::b64url_decode(&self.private_der)
                .ok_or_else(|| format!("key {}: stored private key is not base64url", self.kid))?
        };
        Ok(match self.alg {
            Alg::EdDSA => EncodingKey::from_ed_der(&der),
            Alg::ES256 => EncodingKey::from_ec_der(&der),
            Alg::RS256 => EncodingKey::from_rsa_der(&der),
        })
    }

    /// Signs at `now`.
    pub fn signs_at(&self, now: u64) -> bool {
        self.signs_from <= now && self.retired_at.is_none_or(|r| now < r)
    }

    /// Still needed by verifiers at `now`, given the longest token lifetime.
    pub fn published_at(&self, now: u64, longest_ttl: u64) -> bool {
        self.retired_at
            .is_none_or(|r| now < r + longest_ttl + gantry_authn::LEEWAY_SECS)
    }
}

/// Which key signs at `now`: the one that started last among those signing.
pub fn signing<'a>(keys: impl Iterator<Item = &'a StoredKey>, now: u64) -> Option<&'a StoredKey> {
    keys.filter(|k| k.signs_at(now))
        .max_by_key(|k| k.signs_from)
}

/// What a rotation writes: the new key, and the keys to retire when it starts signing.
pub fn rotation<'a>(
    keys: impl Iterator<Item = &'a StoredKey>,
    alg: Alg,
    now: u64,
    propagation: u64,
    sealer: &Sealer,
) -> Result<(StoredKey, Vec<StoredKey>), String> {
    let new = StoredKey::generate(alg, now, now + propagation, sealer)?;
    let retire = keys
        .filter(|k| k.retired_at.is_none_or(|r| r > new.signs_from))
        .map(|k| {
            let mut k = k.clone();
            // A key that has not started signing yet (an earlier pending rotation) never will.
            k.retired_at = Some(new.signs_from.max(k.signs_from.min(new.signs_from)));
            k
        })
        .collect();
    Ok((new, retire))
}

/// The JWKS document of the published keys.
pub fn jwks<'a>(keys: impl Iterator<Item = &'a StoredKey>) -> Value {
    json!({"keys": keys.map(|k| k.public.clone()).collect::<Vec<_>>()})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::new(&[3u8; 32], &[])
    }

    #[test]
    fn every_algorithm_signs_what_its_published_key_verifies() {
        for alg in [Alg::EdDSA, Alg::ES256, Alg::RS256] {
            let k = StoredKey::generate(alg, 100, 100, &sealer()).expect("generate");
            assert!(Sealer::is_sealed(&k.private_der));
            let (set, skipped) =
                gantry_authn::KeySet::from_jwks(jwks([&k].into_iter()).to_string().as_bytes())
                    .expect("jwks");
            assert!(skipped.is_empty(), "{skipped:?}");
            let m = gantry_authn::Material {
                revision: 1,
                issuers: vec![gantry_authn::Issuer {
                    name: "gantry".into(),
                    iss: "http://x".into(),
                    keys: set,
                    workloads: true,
                }],
                ..Default::default()
            };
            let mut h = jsonwebtoken::Header::new(alg.jose());
            h.kid = Some(k.kid.clone());
            h.typ = Some("at+jwt".into());
            let now = gantry_authn::now_secs();
            let t = jsonwebtoken::encode(
                &h,
                &json!({"iss": "http://x", "sub": "s", "exp": now + 60}),
                &k.encoding_key(&sealer()).expect("enc"),
            )
            .expect("sign");
            let id = gantry_authn::verify_jwt(&t, &m, now).expect("verifies");
            assert_eq!(id.subject, "s", "{alg:?}");
        }
    }

    #[test]
    fn rotation_overlaps_with_no_gap() {
        let k1 = StoredKey::generate(Alg::EdDSA, 0, 0, &sealer()).expect("k1");
        let (k2, retired) =
            rotation([&k1].into_iter(), Alg::EdDSA, 1000, 60, &sealer()).expect("rotate");
        assert_eq!(k2.signs_from, 1060);
        assert_eq!(retired[0].retired_at, Some(1060));
        let keys = [retired[0].clone(), k2.clone()];
        // Until the new key starts, the old one signs; from then on, the new one.
        for now in [1000, 1059] {
            assert_eq!(signing(keys.iter(), now).map(|k| &k.kid), Some(&k1.kid));
        }
        for now in [1060, 5000] {
            assert_eq!(signing(keys.iter(), now).map(|k| &k.kid), Some(&k2.kid));
        }
        // The old key stays published until its last token expires.
        assert!(keys[0].published_at(1060 + 900, 900));
        assert!(!keys[0].published_at(1060 + 900 + 31, 900));
    }
}
