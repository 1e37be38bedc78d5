//! DNS for the registry (hickory's server crates), so any client that can resolve a name can
//! discover a service: A and AAAA records of its healthy instances, SRV records with their
//! ports. Names, in the `gantry` domain and in Consul's (`consul`), case-insensitive:
//!
//! - `NAME.service.gantry` — every routable instance of NAME (passing or warning);
//! - `VERSION.NAME.service.gantry` — those of a version: `2` or `v2` (any 2.x.y), `2-1`
//!   (2.1.x), `2-1-3` (exactly 2.1.3); a label that is not a version is a tag;
//! - `TAG.NAME.service.consul`, `NAME.service.consul`, and RFC 2782's `_NAME._tcp.service.…`
//!   for SRV;
//! - `ID.instance.gantry` — one instance (the SRV records' targets, also sent as additional
//!   records).
//!
//! Answers are ordered for locality (this node first), with a short TTL (`[registry] dns_ttl`,
//! default 1 s): a crashed instance leaves the answers as soon as it leaves the registry.
//! A name in these domains that matches nothing is NXDOMAIN; anything else is REFUSED (this is
//! not a recursive resolver).
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use gantry_model::Instance;
use gantry_registry::{HealthFilter, Query, Registry};
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Domains answered: Gantry's own and Consul's, so Consul DNS users need not change names.
const DOMAINS: [&str; 2] = ["gantry", "consul"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    rcode: &'static str,
}

/// The request handler: answers from the registry's current snapshot (no lock beyond the
/// snapshot's, no I/O).
pub struct DnsHandler {
    registry: Arc<Registry>,
    ttl: u32,
    queries: Family<OutcomeLabel, Counter>,
}

impl DnsHandler {
    pub fn new(
        registry: Arc<Registry>,
        ttl: Duration,
        metrics: &gantry_telemetry::Metrics,
    ) -> Self {
        let queries = Family::<OutcomeLabel, Counter>::default();
        metrics.register("dns", |r| {
            r.register(
                "queries",
                "DNS queries answered, by response code",
                queries.clone(),
            );
        });
        Self {
            registry,
            ttl: ttl.as_secs().min(u64::from(u32::MAX)) as u32,
            queries,
        }
    }

    /// The records for one question, or the response code to give instead.
    pub fn answer(
        &self,
        name: &str,
        qtype: RecordType,
    ) -> Result<(Vec<Record>, Vec<Record>), ResponseCode> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let labels: Vec<&str> = name.split('.').collect();
        let Some((domain, rest)) = labels.split_last() else {
            return Err(ResponseCode::Refused);
        };
        if !DOMAINS.contains(domain) {
            return Err(ResponseCode::Refused);
        }
        let consul = *domain == "consul";
        match rest {
            // ID.instance.gantry
            [id, "instance"] => {
                let inst = self
                    .registry
                    .get(id)
                    .filter(|i| HealthFilter::Routable.admits(i.health))
                    .ok_or(ResponseCode::NXDomain)?;
                let owner = fqdn(&name)?;
                Ok((
                    self.addresses(&owner, std::slice::from_ref(&inst), qtype),
                    Vec::new(),
                ))
            }
            // _NAME._tcp.service.DOMAIN (RFC 2782)
            [svc, proto, "service"] if svc.starts_with('_') && proto.starts_with('_') => {
                self.service(&name, &svc[1..], None, qtype, consul)
            }
            [svc, "service"] => self.service(&name, svc, None, qtype, consul),
            [label, svc, "service"] => self.service(&name, svc, Some(label), qtype, consul),
            _ => Err(ResponseCode::NXDomain),
        }
    }

    fn service(
        &self,
        name: &str,
        service: &str,
        label: Option<&str>,
        qtype: RecordType,
        consul: bool,
    ) -> Result<(Vec<Record>, Vec<Record>), ResponseCode> {
        let mut q = Query {
            service: service.to_string(),
            health: HealthFilter::Routable,
            ..Query::default()
        };
        if let Some(l) = label {
            match version_req(l).filter(|_| !consul) {
                Some(req) => q.version = Some(req),
                None => q.tags = vec![l.to_string()],
            }
        }
        let (_, instances) = self.registry.query(&q);
        if instances.is_empty() {
            return Err(ResponseCode::NXDomain);
        }
        let owner = fqdn(name)?;
        match qtype {
            RecordType::SRV => {
                let mut answers = Vec::with_capacity(instances.len());
                let mut extra = Vec::with_capacity(instances.len());
                for i in &instances {
                    // Ids that cannot be one DNS label (a '.', over 63 bytes) get no SRV
                    // record: their target could not be looked up.
                    if i.id.contains('.') || i.id.len() > 63 {
                        continue;
                    }
                    let Ok(target) = fqdn(&format!("{}.instance.gantry", i.id)) else {
                        continue;
                    };
                    answers.push(Record::from_rdata(
                        owner.clone(),
                        self.ttl,
                        RData::SRV(SRV::new(1, 1, i.port, target.clone())),
                    ));
                    extra.extend(self.addresses(&target, std::slice::from_ref(i), RecordType::ANY));
                }
                Ok((answers, extra))
            }
            _ => Ok((self.addresses(&owner, &instances, qtype), Vec::new())),
        }
    }

    /// A and AAAA records for `instances` as `qtype` asks (ANY: both).
    fn addresses(&self, owner: &Name, instances: &[Instance], qtype: RecordType) -> Vec<Record> {
        let mut seen = std::collections::BTreeSet::new();
        instances
            .iter()
            .filter(|i| seen.insert(i.address))
            .filter_map(|i| match (i.address, qtype) {
                (IpAddr::V4(a), RecordType::A | RecordType::ANY) => Some(RData::A(A(a))),
                (IpAddr::V6(a), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(a))),
                _ => None,
            })
            .map(|rd| Record::from_rdata(owner.clone(), self.ttl, rd))
            .collect()
    }
}

fn fqdn(name: &str) -> Result<Name, ResponseCode> {
    Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).map_err(|_| ResponseCode::FormErr)
}

/// `2`, `v2` → 2.x.y; `2-1` → 2.1.x; `2-1-3` → 2.1.3.
fn version_req(label: &str) -> Option<semver::VersionReq> {
    let l = label.strip_prefix('v').unwrap_or(label);
    let parts: Vec<&str> = l.split('-').collect();
    if parts.is_empty()
        || parts.len() > 3
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    semver::VersionReq::parse(&format!("={}", parts.join("."))).ok()
}

fn rcode_name(c: ResponseCode) -> &'static str {
    match c {
        ResponseCode::NoError => "noerror",
        ResponseCode::NXDomain => "nxdomain",
        ResponseCode::Refused => "refused",
        ResponseCode::FormErr => "formerr",
        ResponseCode::NotImp => "notimp",
        _ => "servfail",
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.authoritative = true;
        let result = match request.request_info() {
            Ok(info) => self.answer(&info.query.name().to_string(), info.query.query_type()),
            Err(_) => Err(ResponseCode::FormErr),
        };
        let sent = match result {
            Ok((answers, extra)) => {
                self.queries
                    .get_or_create(&OutcomeLabel { rcode: "noerror" })
                    .inc();
                response_handle
                    .send_response(builder.build(meta, answers.iter(), [], [], extra.iter()))
                    .await
            }
            Err(code) => {
                self.queries
                    .get_or_create(&OutcomeLabel {
                        rcode: rcode_name(code),
                    })
                    .inc();
                response_handle
                    .send_response(builder.error_msg(&request.metadata, code))
                    .await
            }
        };
        match sent {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "dns: could not send a response");
                let mut meta = Metadata::response_from_request(&request.metadata);
                meta.response_code = ResponseCode::ServFail;
                ResponseInfo::from(hickory_server::proto::op::Header {
                    metadata: meta,
                    counts: Default::default(),
                })
            }
        }
    }
}

/// Bind UDP and TCP on the same address (with port 0: the same free port for both).
pub fn bind(addr: SocketAddr) -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    for _ in 0..16 {
        let udp = std::net::UdpSocket::bind(addr)?;
        let bound = udp.local_addr()?;
        match std::net::TcpListener::bind(bound) {
            Ok(tcp) => {
                udp.set_nonblocking(true)?;
                tcp.set_nonblocking(true)?;
                return Ok((udp, tcp));
            }
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no port free for both UDP and TCP",
    ))
}

/// Serve DNS on the bound sockets until `shutdown`.
pub async fn serve(
    handler: DnsHandler,
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut server = hickory_server::Server::new(handler);
    server.register_socket(tokio::net::UdpSocket::from_std(udp)?);
    server.register_listener(
        tokio::net::TcpListener::from_std(tcp)?,
        Duration::from_secs(5),
        64 * 1024,
    );
    let _ = shutdown.wait_for(|s| *s).await;
    if let Err(e) = server.shutdown_gracefully().await {
        tracing::debug!(error = %e, "dns: shutdown");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use gantry_registry::Registration;

    async fn registry(dir: &std::path::Path) -> Arc<Registry> {
        let store = Arc::new(gantry_store::RedbStore::open(dir).unwrap());
        Registry::open(store, "n1".into(), &gantry_telemetry::Metrics::new())
            .await
            .unwrap()
    }

    async fn reg(r: &Registry, id: &str, version: &str, addr: &str, tags: &[&str]) {
        r.register_external(Registration {
            service: "web".into(),
            id: Some(id.into()),
            version: Some(version.into()),
            address: Some(addr.parse().unwrap()),
            port: 8000,
            metadata: Default::default(),
            zone: None,
            ttl_ms: Some(60_000),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            checks: Vec::new(),
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn names_answer_with_healthy_instances() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path()).await;
        reg(&r, "web-1", "1.4.0", "127.0.0.2", &["blue"]).await;
        reg(&r, "web-2", "2.1.3", "127.0.0.3", &[]).await;
        reg(&r, "web-3", "2.2.0", "::1", &[]).await;
        let h = DnsHandler::new(
            r.clone(),
            Duration::from_secs(1),
            &gantry_telemetry::Metrics::new(),
        );
        let a = |name: &str, t: RecordType| {
            h.answer(name, t)
                .map(|(ans, _)| ans.iter().map(|r| r.data.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(
            a("web.service.gantry.", RecordType::A).unwrap(),
            ["127.0.0.2", "127.0.0.3"]
        );
        assert_eq!(a("WEB.Service.Gantry", RecordType::AAAA).unwrap(), ["::1"]);
        assert_eq!(
            a("v2.web.service.gantry", RecordType::A).unwrap(),
            ["127.0.0.3"]
        );
        assert_eq!(
            a("2-1-3.web.service.gantry", RecordType::A).unwrap(),
            ["127.0.0.3"]
        );
        assert_eq!(
            a("1.web.service.gantry", RecordType::A).unwrap(),
            ["127.0.0.2"]
        );
        assert_eq!(
            a("blue.web.service.consul", RecordType::A).unwrap(),
            ["127.0.0.2"]
        );
        assert_eq!(a("web.service.consul", RecordType::A).unwrap().len(), 2);
        let (srv, extra) = h
            .answer("_web._tcp.service.consul", RecordType::SRV)
            .unwrap();
        assert_eq!(srv.len(), 3);
        assert!(srv[0]
            .data
            .to_string()
            .contains("8000 web-1.instance.gantry."));
        assert_eq!(extra.len(), 3);
        assert_eq!(
            a("web-2.instance.gantry", RecordType::A).unwrap(),
            ["127.0.0.3"]
        );
        assert_eq!(
            a("nope.service.gantry", RecordType::A),
            Err(ResponseCode::NXDomain)
        );
        assert_eq!(
            a("3.web.service.gantry", RecordType::A),
            Err(ResponseCode::NXDomain)
        );
        assert_eq!(a("example.com", RecordType::A), Err(ResponseCode::Refused));
        assert_eq!(
            a("a.b.c.d.gantry", RecordType::A),
            Err(ResponseCode::NXDomain)
        );
        // An instance that leaves the registry leaves the answers.
        r.deregister_external("web-1").await.unwrap();
        assert_eq!(
            a("1.web.service.gantry", RecordType::A),
            Err(ResponseCode::NXDomain)
        );
    }
}
