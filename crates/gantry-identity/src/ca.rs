//! The internal certificate authority (rcgen, on ring): short-lived certificates for the
//! instances of services that opt in (`mtls = true`), naming the service in a SPIFFE ID
//! (`spiffe://gantry/service/NAME`, a URI SAN) and `NAME.service.gantry`; the gateway's TLS
//! listener trusts this CA for client certificates, so a verified certificate tells it which
//! service calls (for the service-to-service policy), as a workload token does.
//!
//! The CA itself (ECDSA P-256, ten years) is made once and kept in the store (`identity-ca`),
//! so every gantry on the store and every restart issues under the same root.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use serde::{Deserialize, Serialize};

use gantry_secrets::Keyring as Sealer;

pub(crate) const CA_AAD: &str = "identity-ca/root";

pub const CA_BUCKET: &str = "identity-ca";
pub const CA_KEY: &str = "root";
/// The SPIFFE trust domain of workload certificates.
pub const TRUST_DOMAIN: &str = "gantry";

/// The CA as stored.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredCa {
    pub cn: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub expires: u64,
}

/// A certificate issued to an instance.
pub struct IssuedCert {
    /// The instance's certificate, then the CA's (a chain servers can send as is).
    pub chain_pem: String,
    pub key_pem: String,
    /// Seconds since the epoch.
    pub expires: u64,
}

/// The CA, loaded.
pub struct Ca {
    pub cn: String,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    key: KeyPair,
    pub expires: u64,
}

fn at(secs: u64) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::from_unix_timestamp(secs as i64).map_err(|e| e.to_string())
}

fn ca_params(cn: &str, from: u64, until: u64) -> Result<CertificateParams, String> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Gantry");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = at(from)?;
    p.not_after = at(until)?;
    Ok(p)
}

/// The SPIFFE ID of a service.
pub fn spiffe_id(service: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/service/{service}")
}

impl Ca {
    /// A new CA (valid ten years).
    pub fn generate(now: u64, sealer: &Sealer) -> Result<StoredCa, String> {
        let cn = format!("Gantry internal CA {}", crate::random_token(6));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let expires = now + 10 * 365 * 86_400;
        let cert = ca_params(&cn, now.saturating_sub(3600), expires)?
            .self_signed(&key)
            .map_err(|e| e.to_string())?;
        Ok(StoredCa {
            cn,
            cert_pem: cert.pem(),
            key_pem: sealer
                .seal(CA_AAD, key.serialize_pem().as_bytes())
                .map_err(|e| e.to_string())?,
            created: now,
            expires,
        })
    }

    pub fn load(s: &StoredCa, sealer: &Sealer) -> Result<Self, String> {
        let pem = if Sealer::is_sealed(&s.key_pem) {
            String::from_utf8(sealer.open(CA_AAD, &s.key_pem).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?
        } else {
            s.key_pem.clone()
        };
        let key = KeyPair::from_pem(&pem).map_err(|e| format!("CA key: {e}"))?;
        let der = pem_der(&s.cert_pem).ok_or("CA certificate: not PEM")?;
        Ok(Ca {
            cn: s.cn.clone(),
            cert_pem: s.cert_pem.clone(),
            cert_der: der,
            key,
            expires: s.expires,
        })
    }

    /// A certificate for one instance of `service`, valid `ttl` seconds (from a minute ago, for
    /// clock skew), for both TLS server and client use.
    pub fn issue(
        &self,
        service: &str,
        instance: &str,
        now: u64,
        ttl: u64,
    ) -> Result<IssuedCert, String> {
        self.issue_named(
            instance,
            &spiffe_id(service),
            &[&format!("{service}.service.gantry"), "localhost"],
            now,
            ttl,
        )
    }

    /// The gateway's own certificate (what it presents to instances over mutual TLS).
    pub fn issue_gateway(&self, now: u64, ttl: u64) -> Result<IssuedCert, String> {
        self.issue_named(
            "gantry-gateway",
            &format!("spiffe://{TRUST_DOMAIN}/gateway"),
            &["gateway.gantry"],
            now,
            ttl,
        )
    }

    fn issue_named(
        &self,
        cn: &str,
        spiffe: &str,
        dns: &[&str],
        now: u64,
        ttl: u64,
    ) -> Result<IssuedCert, String> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Gantry");
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        let ia5 = |s: String| s.try_into().map_err(|e: rcgen::Error| e.to_string());
        p.subject_alt_names = vec![SanType::URI(ia5(spiffe.to_string())?)];
        for d in dns {
            p.subject_alt_names
                .push(SanType::DnsName(ia5(d.to_string())?));
        }
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let expires = (now + ttl).min(self.expires);
        p.not_before = at(now.saturating_sub(60))?;
        p.not_after = at(expires)?;
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let issuer = Issuer::new(ca_params(&self.cn, 0, self.expires)?, &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
        Ok(IssuedCert {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            expires,
        })
    }
}

/// The DER of the first PEM block.
pub fn pem_der(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let start = pem.find("-----BEGIN ")?;
    let body_start = pem[start..].find('\n')? + start + 1;
    let end = pem[body_start..].find("-----END ")? + body_start;
    let b64: String = pem[body_start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_chain_to_the_ca_and_name_their_service() {
        let sealer = Sealer::new(&[5u8; 32], &[]);
        let stored = Ca::generate(1_800_000_000, &sealer).expect("ca");
        assert!(Sealer::is_sealed(&stored.key_pem));
        let ca = Ca::load(&stored, &sealer).expect("load");
        let c = ca
            .issue("orders", "orders-1", 1_800_000_000, 3600)
            .expect("issue");
        assert_eq!(c.expires, 1_800_003_600);
        assert_eq!(c.chain_pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(c.key_pem.contains("PRIVATE KEY"));
        let leaf = pem_der(&c.chain_pem).expect("der");
        // The verifier the gateway uses accepts it under the CA, as a client certificate.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(ca.cert_der.clone()))
            .expect("root");
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .expect("verifier");
        let when = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            1_800_000_100,
        ));
        v.verify_client_cert(
            &rustls::pki_types::CertificateDer::from(leaf.clone()),
            &[],
            when,
        )
        .expect("verifies");
        let later = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            1_800_004_000,
        ));
        assert!(v
            .verify_client_cert(&rustls::pki_types::CertificateDer::from(leaf), &[], later)
            .is_err());
        // And a CA loaded back from the store issues under the same root.
        let again = Ca::load(&stored, &sealer).expect("load");
        assert_eq!(again.cert_der, ca.cert_der);
    }
}
