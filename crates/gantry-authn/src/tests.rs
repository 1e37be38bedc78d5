use super::*;
use jsonwebtoken::{EncodingKey, Header as JwtHeader};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::json;

const ISS: &str = "http://127.0.0.1:7072";

struct Signer {
    enc: EncodingKey,
    public: Vec<u8>,
}

fn signer() -> Signer {
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("keygen");
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pkcs8");
    Signer {
        enc: EncodingKey::from_ed_der(pkcs8.as_ref()),
        public: pair.public_key().as_ref().to_vec(),
    }
}

fn material(s: &Signer, kid: &str) -> Material {
    let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64url(&s.public), "kid": kid, "alg": "EdDSA", "use": "sig"}]});
    let (keys, skipped) = KeySet::from_jwks(jwks.to_string().as_bytes()).expect("jwks");
    assert!(skipped.is_empty(), "{skipped:?}");
    Material {
        revision: 1,
        issuers: vec![Issuer {
            name: "gantry".into(),
            iss: ISS.into(),
            keys,
            workloads: true,
        }],
        ..Material::default()
    }
}

fn sign(s: &Signer, kid: &str, claims: &Value) -> String {
    let mut h = JwtHeader::new(Algorithm::EdDSA);
    h.kid = Some(kid.into());
    h.typ = Some("at+jwt".into());
    jsonwebtoken::encode(&h, claims, &s.enc).expect("sign")
}

fn claims(now: u64) -> Value {
    json!({"iss": ISS, "sub": "alice", "aud": ["shop"], "exp": now + 300, "iat": now,
           "jti": "t1", "scope": "orders:read orders:write", "roles": ["admin"], "tenant": "acme",
           "client_id": "web"})
}

fn forge(header: Value, payload: &Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(payload.to_string().as_bytes()),
        b64url(sig)
    )
}

#[test]
fn a_valid_token_yields_its_identity() {
    let s = signer();
    let m = material(&s, "k1");
    let now = now_secs();
    let id = verify_jwt(&sign(&s, "k1", &claims(now)), &m, now).expect("valid");
    assert_eq!(id.subject, "alice");
    assert_eq!(id.kind, Kind::User);
    assert_eq!(id.scopes, ["orders:read", "orders:write"]);
    assert_eq!(id.roles, ["admin"]);
    assert_eq!(id.client_id.as_deref(), Some("web"));
}

#[test]
fn every_attack_is_refused_with_its_reason() {
    let s = signer();
    let m = material(&s, "k1");
    let now = now_secs();
    let good = sign(&s, "k1", &claims(now));
    let parts: Vec<&str> = good.split('.').collect();
    let sig = b64url_decode(parts[2]).expect("sig");
    let c = claims(now);
    let cases: Vec<(&str, String, Denial)> = vec![
        (
            "alg none",
            format!("{}.{}.", b64url(br#"{"alg":"none","kid":"k1"}"#), parts[1]),
            Denial::AlgorithmNotAllowed,
        ),
        (
            "alg none with sig",
            forge(json!({"alg": "none", "kid": "k1"}), &c, &sig),
            Denial::AlgorithmNotAllowed,
        ),
        (
            "hs256 confusion",
            forge(json!({"alg": "HS256", "kid": "k1"}), &c, &sig),
            Denial::AlgorithmNotAllowed,
        ),
        (
            "wrong alg for key",
            forge(json!({"alg": "ES256", "kid": "k1"}), &c, &sig),
            Denial::AlgorithmNotAllowed,
        ),
        ("unknown kid", sign(&s, "k9", &c), Denial::UnknownKey),
        (
            "no kid",
            forge(json!({"alg": "EdDSA", "typ": "at+jwt"}), &c, &sig),
            Denial::UnknownKey,
        ),
        (
            "expired",
            sign(
                &s,
                "k1",
                &json!({"iss": ISS, "sub": "a", "exp": now - 3600}),
            ),
            Denial::Expired,
        ),
        (
            "not yet valid",
            sign(
                &s,
                "k1",
                &json!({"iss": ISS, "sub": "a", "exp": now + 7200, "nbf": now + 3600}),
            ),
            Denial::NotYetValid,
        ),
        (
            "no exp",
            sign(&s, "k1", &json!({"iss": ISS, "sub": "a"})),
            Denial::Malformed,
        ),
        (
            "untrusted issuer",
            sign(
                &s,
                "k1",
                &json!({"iss": "https://evil", "sub": "a", "exp": now + 60}),
            ),
            Denial::UntrustedIssuer,
        ),
        (
            "tampered",
            format!(
                "{}.{}.{}",
                parts[0],
                b64url(
                    json!({"iss": ISS, "sub": "root", "exp": now + 300})
                        .to_string()
                        .as_bytes()
                ),
                parts[2]
            ),
            Denial::BadSignature,
        ),
        (
            "truncated",
            format!("{}.{}", parts[0], parts[1]),
            Denial::Malformed,
        ),
        (
            "truncated sig",
            format!("{}.{}.{}", parts[0], parts[1], &parts[2][..20]),
            Denial::BadSignature,
        ),
        (
            "oversized",
            "a".repeat(MAX_TOKEN_BYTES + 1),
            Denial::TooLarge,
        ),
        (
            "crit",
            forge(
                json!({"alg": "EdDSA", "typ": "at+jwt", "kid": "k1", "crit": ["exp"]}),
                &c,
                &sig,
            ),
            Denial::CriticalHeader,
        ),
        (
            "jwk",
            forge(
                json!({"alg": "EdDSA", "kid": "k1", "jwk": {"kty": "OKP"}}),
                &c,
                &sig,
            ),
            Denial::EmbeddedKey,
        ),
        (
            "jku",
            forge(
                json!({"alg": "EdDSA", "kid": "k1", "jku": "https://evil/jwks"}),
                &c,
                &sig,
            ),
            Denial::EmbeddedKey,
        ),
        (
            "x5u",
            forge(
                json!({"alg": "EdDSA", "kid": "k1", "x5u": "https://evil/cert"}),
                &c,
                &sig,
            ),
            Denial::EmbeddedKey,
        ),
        ("garbage", "not a token".into(), Denial::Malformed),
    ];
    for (name, token, want) in cases {
        assert_eq!(verify_jwt(&token, &m, now).err(), Some(want), "{name}");
    }
}

#[test]
fn revoked_tokens_are_refused_even_from_the_cache() {
    let s = signer();
    let mut m = material(&s, "k1");
    let now = now_secs();
    let t = sign(&s, "k1", &claims(now));
    assert!(Cache::verify(&t, &m, now).is_ok());
    m.revoked.insert("t1".into());
    assert_eq!(Cache::verify(&t, &m, now).err(), Some(Denial::Revoked));
    // Expiry is checked on a hit too.
    m.revoked.clear();
    assert_eq!(
        Cache::verify(&t, &m, now + 400).err(),
        Some(Denial::Expired)
    );
}

#[test]
fn a_cached_token_is_verified_again_under_new_material() {
    let s = signer();
    let m = material(&s, "k1");
    let now = now_secs();
    let t = sign(&s, "k1", &claims(now));
    assert!(Cache::verify(&t, &m, now).is_ok());
    // The key is withdrawn: the cached verification must not outlive it.
    let other = signer();
    let mut m2 = material(&other, "k2");
    m2.revision = 2;
    assert_eq!(Cache::verify(&t, &m2, now).err(), Some(Denial::UnknownKey));
}

#[test]
fn requirements_name_what_is_missing() {
    let s = signer();
    let m = material(&s, "k1");
    let now = now_secs();
    let id = verify_jwt(&sign(&s, "k1", &claims(now)), &m, now).expect("valid");
    let mut r = Requirement {
        mode: Mode::Required,
        scopes: vec!["orders:read".into()],
        roles: vec!["viewer".into(), "admin".into()],
        claims: vec![("tenant".into(), "acme".into())],
        issuers: vec!["gantry".into()],
        audiences: vec!["shop".into()],
    };
    assert!(r.accepts(&id, &m).is_ok());
    assert!(r.check(&id).is_ok());
    r.scopes.push("orders:delete".into());
    assert_eq!(
        r.check(&id),
        Err(Forbidden::InsufficientScope("orders:delete".into()))
    );
    r.scopes.pop();
    r.roles = vec!["viewer".into()];
    assert_eq!(r.check(&id), Err(Forbidden::MissingRole));
    r.roles.clear();
    r.claims = vec![("tenant".into(), "other".into())];
    assert_eq!(r.check(&id), Err(Forbidden::ClaimMismatch("tenant".into())));
    r.audiences = vec!["billing".into()];
    assert_eq!(r.accepts(&id, &m), Err(Denial::WrongAudience));
    r.audiences.clear();
    r.issuers = vec!["keycloak".into()];
    assert_eq!(r.accepts(&id, &m), Err(Denial::WrongIssuer));
}

#[test]
fn symmetric_and_mismatched_keys_are_not_trusted() {
    let jwks = json!({"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "h"},
        {"kty": "OKP", "crv": "Ed25519", "x": b64url(&[7u8; 32]), "kid": "e", "alg": "RS256"},
        {"kty": "OKP", "crv": "Ed25519", "x": b64url(&[7u8; 32])},
    ]});
    let (set, skipped) = KeySet::from_jwks(jwks.to_string().as_bytes()).expect("parse");
    assert!(set.is_empty());
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(KeySet::from_jwks(b"[]").is_err());
}

#[test]
fn call_policy_denies_by_default_with_exceptions() {
    assert!(CallPolicy::default().check(None, "catalog", false).is_ok());
    let mut p = CallPolicy {
        default_allow: false,
        ..CallPolicy::default()
    };
    p.calls
        .entry("orders".into())
        .or_default()
        .insert("catalog".into());
    assert!(p.check(Some("orders"), "catalog", false).is_ok());
    assert_eq!(
        p.check(Some("catalog"), "orders", false),
        Err(Forbidden::CallNotAllowed {
            caller: "catalog".into(),
            service: "orders".into()
        })
    );
    assert_eq!(p.check(None, "catalog", false), Err(Forbidden::NotPublic));
    assert!(p.check(None, "orders", true).is_ok());
    assert!(p.check(Some("catalog"), "orders", true).is_ok());
    p.default_allow = true;
    assert!(p.check(None, "catalog", false).is_ok());
}

#[test]
fn credentials_are_read_from_the_usual_headers() {
    assert_eq!(
        presented(Some(b"Bearer abc"), None),
        Ok(Some(Presented::Bearer("abc")))
    );
    assert_eq!(
        presented(Some(b"bearer  abc "), None),
        Ok(Some(Presented::Bearer("abc")))
    );
    assert_eq!(
        presented(Some(b"ApiKey k"), None),
        Ok(Some(Presented::ApiKey("k")))
    );
    assert_eq!(
        presented(None, Some(b"k")),
        Ok(Some(Presented::ApiKey("k")))
    );
    assert_eq!(presented(Some(b"Basic xyz"), None), Err(Denial::BadScheme));
    assert_eq!(presented(Some(b"Bearer"), None), Err(Denial::BadScheme));
    assert_eq!(presented(None, None), Ok(None));
}

#[test]
fn only_gantry_s_own_issuer_can_name_a_calling_service() {
    let s = signer();
    let mut m = material(&s, "k1");
    let now = now_secs();
    let t = sign(
        &s,
        "k1",
        &json!({"iss": ISS, "sub": "x", "exp": now + 60, CLAIM_SERVICE: "orders"}),
    );
    assert_eq!(
        verify_jwt(&t, &m, now).expect("valid").service.as_deref(),
        Some("orders")
    );
    m.issuers[0].workloads = false;
    let id = verify_jwt(&t, &m, now).expect("valid");
    assert_eq!(id.service, None);
    assert_eq!(id.kind, Kind::User);
}

#[test]
fn numeric_dates_may_be_fractional_or_huge() {
    let s = signer();
    let m = material(&s, "k1");
    let now = now_secs();
    let frac = sign(
        &s,
        "k1",
        &json!({"iss": ISS, "sub": "a", "exp": now as f64 + 60.5, "iat": now as f64 - 0.25}),
    );
    assert!(verify_jwt(&frac, &m, now).is_ok());
    let huge = sign(&s, "k1", &json!({"iss": ISS, "sub": "a", "exp": u64::MAX}));
    assert!(verify_jwt(&huge, &m, now).is_ok());
    assert!(Cache::verify(&huge, &m, now).is_ok());
    let negative = sign(&s, "k1", &json!({"iss": ISS, "sub": "a", "exp": -5}));
    assert_eq!(
        verify_jwt(&negative, &m, now).err(),
        Some(Denial::Malformed)
    );
}

#[test]
fn gantry_s_own_id_tokens_are_not_access_tokens() {
    let s = signer();
    let m = material(&s, "k1");
    let now = now_secs();
    let mut h = JwtHeader::new(Algorithm::EdDSA);
    h.kid = Some("k1".into());
    let id_token = jsonwebtoken::encode(&h, &claims(now), &s.enc).expect("sign");
    assert_eq!(
        verify_jwt(&id_token, &m, now).err(),
        Some(Denial::WrongTokenType)
    );
    // Another issuer's access tokens may say `JWT` (Keycloak does).
    let mut other = material(&s, "k1");
    other.issuers[0].workloads = false;
    assert!(verify_jwt(&id_token, &other, now).is_ok());
}
