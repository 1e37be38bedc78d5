//! The OpenAPI 3.1 document of the admin API, served at `/v1/openapi.json`: generated from the
//! request and response types themselves (their `utoipa::ToSchema` derives, which follow their
//! serde attributes) and from one table of endpoints, whose permissions come from `auth.rs`.

use std::sync::OnceLock;

use utoipa::openapi::path::{OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, HttpMethod, InfoBuilder, OpenApi, OpenApiBuilder, PathItem,
    PathsBuilder, Ref, RefOr, Required, ResponseBuilder, ResponsesBuilder,
};
use utoipa::ToSchema;

use crate::auth::{permission_for, Permission};

type Schemas = Vec<(String, RefOr<Schema>)>;

/// How to describe a body: a named type (and the types it refers to), a list of one, or any
/// JSON object.
#[derive(Clone, Copy)]
enum Shape {
    Of(fn(&mut Schemas) -> RefOr<Schema>),
    ListOf(fn(&mut Schemas) -> RefOr<Schema>),
    AnyObject,
    Strings,
}

fn of<T: ToSchema>(schemas: &mut Schemas) -> RefOr<Schema> {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
    RefOr::Ref(Ref::from_schema_name(T::name()))
}

impl Shape {
    fn schema(self, schemas: &mut Schemas) -> RefOr<Schema> {
        match self {
            Shape::Of(f) => f(schemas),
            Shape::ListOf(f) => ArrayBuilder::new().items(f(schemas)).build().into(),
            Shape::Strings => ArrayBuilder::new()
                .items(ObjectBuilder::new().schema_type(Type::String))
                .build()
                .into(),
            Shape::AnyObject => ObjectBuilder::new()
                .schema_type(Type::Object)
                .additional_properties(Some(
                    utoipa::openapi::schema::AdditionalProperties::<Schema>::FreeForm(true),
                ))
                .build()
                .into(),
        }
    }
}

#[derive(Clone, Copy)]
enum Answer {
    Json(u16, Shape),
    /// 204, no body.
    Empty,
    /// Newline-delimited JSON, each line of this shape.
    Ndjson(Shape),
    EventStream,
    Text,
}

struct Endpoint {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    query: &'static [(&'static str, &'static str)],
    body: Option<Shape>,
    answer: Answer,
}

macro_rules! ep {
    ($m:literal $p:literal, $s:literal, query $q:expr, body $b:expr, $a:expr) => {
        Endpoint {
            method: $m,
            path: $p,
            summary: $s,
            query: $q,
            body: $b,
            answer: $a,
        }
    };
}

use gantry_config::{ChangeRequest, ChangeView, Committed, ConfigView, ResolvedView, VersionView};
use gantry_gateway::{RouteView, Traffic, UpstreamView};
use gantry_model::{Deployment, Instance};
use gantry_registry::Registration;
use gantry_supervisor::{InstanceStatus, RestartReport, ServiceStatus, VersionChange};
use gantry_telemetry::LogLine;

use crate::audit::AuditRecord;
use crate::config::RollbackBody;
use crate::error::ErrorBody;
use crate::routing::RoutePutBody;
use crate::services::ScaleBody;

use Answer::*;
use Shape::*;

const NONE: &[(&str, &str)] = &[];

fn endpoints() -> Vec<Endpoint> {
    vec![
        ep!("GET" "/v1/health", "Liveness of the admin API", query NONE, body None, Json(200, AnyObject)),
        ep!("GET" "/metrics", "Prometheus metrics (OpenMetrics when asked for first, else the 0.0.4 text format)", query NONE, body None, Text),
        ep!("GET" "/v1/metrics/query", "The metrics history at one time (a PromQL subset; Prometheus's answer shape)", query &[("query", "the PromQL expression"), ("time", "unix seconds, unix ms, RFC 3339 or a duration ago (default now)")], body None, Json(200, AnyObject)),
        ep!("GET" "/v1/metrics/query_range", "The metrics history over a range (a PromQL subset; Prometheus's answer shape)", query &[("query", "the PromQL expression"), ("start", "unix seconds, unix ms, RFC 3339 or a duration ago"), ("end", "the same forms (default now)"), ("step", "seconds or a duration such as 30s (default the sampling step)")], body None, Json(200, AnyObject)),
        ep!("GET" "/v1/metrics/names", "Metric names the history has", query NONE, body None, Json(200, AnyObject)),
        ep!("GET" "/v1/openapi.json", "This document", query NONE, body None, Json(200, AnyObject)),
        ep!("GET" "/v1/services", "Services with desired and healthy counts", query NONE, body None, Json(200, ListOf(of::<ServiceStatus>))),
        ep!("GET" "/v1/instances", "Instances and their state", query &[("service", "only this service")], body None, Json(200, ListOf(of::<InstanceStatus>))),
        ep!("GET" "/v1/upstreams", "Per-service policy, circuits, in-flight and ejected", query NONE, body None, Json(200, ListOf(of::<UpstreamView>))),
        ep!("POST" "/v1/services/{name}/scale", "Set the instance count (durable)", query NONE, body Some(Of(of::<ScaleBody>)), Json(200, AnyObject)),
        ep!("POST" "/v1/services/{name}/restart", "Rolling restart", query NONE, body None, Json(200, Of(of::<RestartReport>))),
        ep!("GET" "/v1/deployments", "The desired state", query NONE, body None, Json(200, ListOf(of::<Deployment>))),
        ep!("GET" "/v1/deployments/{service}", "One service's desired state", query NONE, body None, Json(200, Of(of::<Deployment>))),
        ep!("PUT" "/v1/deployments/{service}/versions/{version}", "Run a version beside the others", query NONE, body Some(Of(of::<VersionChange>)), Json(200, Of(of::<Deployment>))),
        ep!("DELETE" "/v1/deployments/{service}/versions/{version}", "Remove a version deployed through the API", query NONE, body None, Json(200, Of(of::<Deployment>))),
        ep!("GET" "/v1/routes", "The live route table", query NONE, body None, Json(200, ListOf(of::<RouteView>))),
        ep!("PUT" "/v1/routes/{name}", "Add or replace a route (fields as in the spec file)", query NONE, body Some(Of(of::<RoutePutBody>)), Json(200, Of(of::<crate::RouteWritten>))),
        ep!("DELETE" "/v1/routes/{name}", "Remove a route added over the API", query NONE, body None, Empty),
        ep!("GET" "/v1/traffic", "The last minute per route, service and version", query NONE, body None, Json(200, Of(of::<Traffic>))),
        ep!("POST" "/v1/reload", "Re-read the spec file", query NONE, body None, Json(200, Of(of::<crate::ReloadReport>))),
        ep!("GET" "/v1/registry/services", "Registered instances by service", query &[("index", "answer once anything changed past this X-Gantry-Index"), ("wait", "longest wait, e.g. 30s")], body None, Json(200, AnyObject)),
        ep!("GET" "/v1/registry/services/{name}", "Instances of a service, filtered, ordered for locality; a blocking query with index", query &[("version", "semver requirement, e.g. ^1.2"), ("tags", "comma-separated tags, all required"), ("meta", "comma-separated key:value, all required"), ("zone", "only this zone"), ("near", "preferred zone first"), ("health", "passing, routable (default) or any"), ("index", "answer once the service changed past this X-Gantry-Index"), ("wait", "longest wait for that, e.g. 30s (default 5m, at most 10m)")], body None, Json(200, ListOf(of::<Instance>))),
        ep!("PUT" "/v1/registry/instances/{id}/checks/{check}", "Set a TTL check's status (renews the lease)", query NONE, body Some(Of(of::<crate::registry::CheckUpdate>)), Json(200, Of(of::<Instance>))),
        ep!("POST" "/v1/registry/discover", "Client-side discovery: a JSON question, full endpoints back", query NONE, body Some(Of(of::<crate::registry::DiscoverRequest>)), Json(200, Of(of::<crate::registry::DiscoverAnswer>))),
        ep!("GET" "/v1/registry/instances", "Every registered instance", query NONE, body None, Json(200, ListOf(of::<Instance>))),
        ep!("POST" "/v1/registry/instances", "Register an instance (with a lease)", query NONE, body Some(Of(of::<Registration>)), Json(201, Of(of::<Instance>))),
        ep!("GET" "/v1/registry/instances/{id}", "One instance", query NONE, body None, Json(200, Of(of::<Instance>))),
        ep!("DELETE" "/v1/registry/instances/{id}", "Deregister a self-registered instance", query NONE, body None, Empty),
        ep!("PUT" "/v1/registry/instances/{id}/heartbeat", "Renew a lease", query NONE, body None, Json(200, Of(of::<Instance>))),
        ep!("GET" "/v1/registry/watch", "Server-Sent Events: snapshot, then changes", query NONE, body None, EventStream),
        ep!("GET" "/v1/config", "Config sets (services, and _global)", query NONE, body None, Json(200, Strings)),
        ep!("GET" "/v1/config/{set}", "Current config of a set, every layer", query &[("reveal", "true: show secret values (config:reveal, audited)")], body None, Json(200, Of(of::<ConfigView>))),
        ep!("PATCH" "/v1/config/{set}", "Commit a change of one layer (new version)", query NONE, body Some(Of(of::<ChangeRequest>)), Json(201, Of(of::<Committed>))),
        ep!("GET" "/v1/config/{set}/history", "Every retained version, oldest first", query &[("reveal", "true: show secret values"), ("limit", "only the newest N")], body None, Json(200, ListOf(of::<VersionView>))),
        ep!("GET" "/v1/config/{set}/versions/{version}", "One version's changes", query &[("reveal", "true: show secret values")], body None, Json(200, Of(of::<VersionView>))),
        ep!("GET" "/v1/config/{set}/diff", "What changed between two versions", query &[("from", "version"), ("to", "version (default: current)"), ("reveal", "true: show secret values")], body None, Json(200, ListOf(of::<ChangeView>))),
        ep!("POST" "/v1/config/{set}/rollback", "Make an earlier version's values current", query NONE, body Some(Of(of::<RollbackBody>)), Json(201, Of(of::<Committed>))),
        ep!("GET" "/v1/config/{set}/export", "The set as JSON, TOML or one layer as .env", query &[("format", "json, toml or env"), ("version", "default: current"), ("env", "layer of a .env export"), ("instance", "layer of a .env export"), ("reveal", "true: include secret values")], body None, Text),
        ep!("POST" "/v1/config/{set}/import", "Import a document as one commit", query &[("format", "json, toml or env"), ("replace", "true: remove keys the document does not mention"), ("env", "layer of a .env import"), ("instance", "layer of a .env import"), ("secrets", "keys of a .env import to store as secrets"), ("message", "commit message")], body Some(AnyObject), Json(201, Of(of::<Committed>))),
        ep!("GET" "/v1/config/{set}/resolved", "A service's config as an instance sees it", query &[("env", "environment layer"), ("instance", "instance layer"), ("reveal", "true: show secret values")], body None, Json(200, Of(of::<ResolvedView>))),
        ep!("GET" "/v1/config/{set}/watch", "Server-Sent Events: the resolved config, then each change", query &[("env", "environment layer"), ("instance", "instance layer"), ("reveal", "true: show secret values"), ("format", "sse or ndjson")], body None, EventStream),
        ep!("GET" "/v1/logs", "Instance output and the access log (NDJSON)", query &[("service", "only this service (gateway: the access log)"), ("instance", "only this instance"), ("since", "RFC 3339 time, unix ms or a duration such as 10m"), ("until", "only lines before this time (same forms as since)"), ("grep", "a regular expression the line matches"), ("level", "the least severity: trace, debug, info, warn, error, fatal"), ("field", "KEY=VALUE: a JSON line's top-level field (repeatable)"), ("request_id", "lines of one request (the access log's and services' lines naming it)"), ("trace_id", "lines of one trace"), ("tail", "only the last N lines"), ("limit", "at most N lines (default 10000)"), ("follow", "true: keep streaming")], body None, Ndjson(Of(of::<LogLine>))),
        ep!("GET" "/v1/events", "Server-Sent Events of instance lifecycle", query NONE, body None, EventStream),
        ep!("GET" "/v1/topics", "Topics (dead-letter topics included) and their extent", query NONE, body None, Json(200, ListOf(of::<gantry_bus::TopicView>))),
        ep!("GET" "/v1/topics/{topic}", "One topic", query NONE, body None, Json(200, Of(of::<gantry_bus::TopicView>))),
        ep!("PUT" "/v1/topics/{topic}", "Make a topic, or change its retention and limits", query NONE, body Some(Of(of::<crate::bus::TopicBody>)), Json(200, Of(of::<gantry_bus::TopicView>))),
        ep!("DELETE" "/v1/topics/{topic}", "Remove a topic, its messages and its subscriptions", query NONE, body None, Empty),
        ep!("POST" "/v1/topics/{topic}/messages", "Publish: a CloudEvent (binary or structured mode), a batch (application/cloudevents-batch+json) or a plain body (ids in Gantry-Message-Id, ordering keys in Gantry-Key); answered once durable", query NONE, body Some(AnyObject), Json(201, Of(of::<crate::bus::PublishAnswer>))),
        ep!("GET" "/v1/topics/{topic}/messages", "Stored messages from a position, without consuming them", query &[("from_seq", "first seq (default 1)"), ("from_time", "RFC 3339 time, unix ms or a duration ago such as 10m"), ("limit", "at most this many (default 100, at most 1000)")], body None, Json(200, ListOf(of::<crate::bus::StoredMessage>))),
        ep!("GET" "/v1/subscriptions", "Every subscription with its lag, in-flight count and dead letters", query NONE, body None, Json(200, ListOf(of::<gantry_bus::SubscriptionStatus>))),
        ep!("GET" "/v1/topics/{topic}/subscriptions/{name}", "One subscription", query NONE, body None, Json(200, Of(of::<gantry_bus::SubscriptionStatus>))),
        ep!("PUT" "/v1/topics/{topic}/subscriptions/{name}", "Make or replace a subscription (pull, or push to a service)", query NONE, body Some(Of(of::<crate::bus::SubscriptionBody>)), Json(200, Of(of::<gantry_bus::SubscriptionStatus>))),
        ep!("DELETE" "/v1/topics/{topic}/subscriptions/{name}", "Remove a subscription made over the API", query NONE, body None, Empty),
        ep!("POST" "/v1/topics/{topic}/subscriptions/{name}/fetch", "Pull: messages, each the fetcher's until its ack deadline", query NONE, body Some(Of(of::<crate::bus::FetchBody>)), Json(200, Of(of::<crate::bus::FetchAnswer>))),
        ep!("POST" "/v1/topics/{topic}/subscriptions/{name}/ack", "Pull: acknowledge fetched messages", query NONE, body Some(Of(of::<crate::bus::SeqsBody>)), Json(200, Of(of::<crate::bus::AckAnswer>))),
        ep!("POST" "/v1/topics/{topic}/subscriptions/{name}/extend", "Pull: extend the ack deadline of fetched messages still being worked on", query NONE, body Some(Of(of::<crate::bus::ExtendBody>)), Json(200, Of(of::<crate::bus::AckAnswer>))),
        ep!("POST" "/v1/topics/{topic}/subscriptions/{name}/nack", "Pull: give fetched messages back (retried after backoff, dead letters after the last attempt)", query NONE, body Some(Of(of::<crate::bus::SeqsBody>)), Json(200, Of(of::<crate::bus::AckAnswer>))),
        ep!("POST" "/v1/topics/{topic}/subscriptions/{name}/replay", "Deliver again from a seq or a time", query NONE, body Some(Of(of::<crate::bus::ReplayBody>)), Json(200, Of(of::<crate::bus::ReplayAnswer>))),
        ep!("GET" "/v1/topics/{topic}/subscriptions/{name}/dead-letters", "A subscription's dead letters, with why (gantryreason) and after how many attempts", query &[("limit", "at most this many (default 100)")], body None, Json(200, ListOf(of::<crate::bus::StoredMessage>))),
        ep!("POST" "/v1/topics/{topic}/subscriptions/{name}/redrive", "Publish the dead letters back, for this subscription only", query NONE, body None, Json(200, Of(of::<crate::bus::RedriveAnswer>))),
        ep!("GET" "/v1/identity/clients", "OAuth clients (never their secrets)", query NONE, body None, Json(200, ListOf(of::<gantry_identity::Client>))),
        ep!("POST" "/v1/identity/clients", "Register a client; a confidential client's secret is in this answer only", query NONE, body Some(Of(of::<gantry_identity::NewClient>)), Json(201, Of(of::<crate::identity::CreatedClient>))),
        ep!("DELETE" "/v1/identity/clients/{id}", "Remove a client and its API keys", query NONE, body None, Empty),
        ep!("POST" "/v1/identity/clients/{id}/secret", "A new secret for a confidential client (the old one stops working)", query NONE, body None, Json(200, Of(of::<crate::identity::NewSecret>))),
        ep!("GET" "/v1/identity/users", "Users (never their password hashes)", query NONE, body None, Json(200, ListOf(of::<crate::identity::UserView>))),
        ep!("POST" "/v1/identity/users", "Create a user", query NONE, body Some(Of(of::<crate::identity::NewUser>)), Json(201, Of(of::<crate::identity::UserView>))),
        ep!("PATCH" "/v1/identity/users/{name}", "Change a user's password, roles or disabled flag", query NONE, body Some(Of(of::<crate::identity::UserChange>)), Json(200, Of(of::<crate::identity::UserView>))),
        ep!("DELETE" "/v1/identity/users/{name}", "Remove a user", query NONE, body None, Empty),
        ep!("GET" "/v1/identity/roles", "Roles: built-in and custom permission sets", query NONE, body None, Json(200, ListOf(of::<gantry_identity::Role>))),
        ep!("PUT" "/v1/identity/roles/{name}", "Create or replace a custom role", query NONE, body Some(Of(of::<crate::identity::RoleBody>)), Json(200, Of(of::<gantry_identity::Role>))),
        ep!("DELETE" "/v1/identity/roles/{name}", "Remove a custom role", query NONE, body None, Empty),
        ep!("GET" "/v1/identity/api-keys", "API keys (never the keys)", query NONE, body None, Json(200, ListOf(of::<crate::identity::ApiKeyView>))),
        ep!("POST" "/v1/identity/api-keys", "A new API key for a client; the key is in this answer only", query NONE, body Some(Of(of::<crate::identity::NewApiKey>)), Json(201, Of(of::<crate::identity::CreatedApiKey>))),
        ep!("DELETE" "/v1/identity/api-keys/{id}", "Remove an API key", query NONE, body None, Empty),
        ep!("GET" "/v1/identity/keys", "Signing keys published now, and which one signs", query NONE, body None, Json(200, ListOf(of::<crate::identity::KeyView>))),
        ep!("POST" "/v1/identity/keys/rotate", "Rotate now: the new key is published at once and signs after the propagation delay", query NONE, body None, Json(201, Of(of::<crate::identity::KeyView>))),
        ep!("GET" "/v1/audit", "The audit trail, newest first", query &[("limit", "at most this many (1-10000, default 100)"), ("since", "ms since the epoch"), ("principal", "only this principal")], body None, Json(200, ListOf(of::<AuditRecord>))),
    ]
}

fn method(m: &str) -> (HttpMethod, http::Method) {
    match m {
        "GET" => (HttpMethod::Get, http::Method::GET),
        "POST" => (HttpMethod::Post, http::Method::POST),
        "PUT" => (HttpMethod::Put, http::Method::PUT),
        "PATCH" => (HttpMethod::Patch, http::Method::PATCH),
        _ => (HttpMethod::Delete, http::Method::DELETE),
    }
}

fn json(schema: RefOr<Schema>) -> utoipa::openapi::Content {
    ContentBuilder::new().schema(Some(schema)).build()
}

fn build() -> OpenApi {
    let mut schemas: Schemas = Vec::new();
    let error = of::<ErrorBody>(&mut schemas);
    let mut paths = PathsBuilder::new();
    for e in endpoints() {
        let (hm, m) = method(e.method);
        let permission: Option<Permission> = permission_for(&m, e.path);
        let mut op = OperationBuilder::new()
            .summary(Some(e.summary))
            .operation_id(Some(format!(
                "{}_{}",
                e.method.to_ascii_lowercase(),
                e.path
                    .trim_start_matches('/')
                    .replace(['/', '.'], "_")
                    .replace(['{', '}'], "")
            )))
            .description(Some(match permission {
                Some(p) => format!("Requires the `{}` permission.", p.as_str()),
                None => "Open to every caller.".to_string(),
            }));
        if permission.is_some() {
            op = op.security(SecurityRequirement::new("bearer", Vec::<String>::new()));
        }
        for seg in e.path.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                op = op.parameter(
                    ParameterBuilder::new()
                        .name(name)
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
                );
            }
        }
        for (name, desc) in e.query {
            let ty = match *name {
                "tail" | "limit" | "since" if e.path == "/v1/audit" || *name == "tail" => {
                    Type::Integer
                }
                "follow" => Type::Boolean,
                _ => Type::String,
            };
            op = op.parameter(
                ParameterBuilder::new()
                    .name(*name)
                    .parameter_in(ParameterIn::Query)
                    .required(Required::False)
                    .description(Some(*desc))
                    .schema(Some(ObjectBuilder::new().schema_type(ty))),
            );
        }
        if let Some(body) = e.body {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .content("application/json", json(body.schema(&mut schemas)))
                    .build(),
            ));
        }
        let ok = match e.answer {
            Json(code, shape) => (
                code,
                ResponseBuilder::new()
                    .description("OK")
                    .content("application/json", json(shape.schema(&mut schemas)))
                    .build(),
            ),
            Empty => (204, ResponseBuilder::new().description("Done").build()),
            Ndjson(shape) => (
                200,
                ResponseBuilder::new()
                    .description("One JSON object per line")
                    .content("application/x-ndjson", json(shape.schema(&mut schemas)))
                    .build(),
            ),
            EventStream => (
                200,
                ResponseBuilder::new()
                    .description("Server-Sent Events; each event's data is one JSON value")
                    .content(
                        "text/event-stream",
                        // One event, as the OpenAPI specification's generic event-stream
                        // schema describes it (tools validate each event against it).
                        json(
                            ObjectBuilder::new()
                                .property("event", ObjectBuilder::new().schema_type(Type::String))
                                .property("data", ObjectBuilder::new().schema_type(Type::String))
                                .property("id", ObjectBuilder::new().schema_type(Type::String))
                                .property("retry", ObjectBuilder::new().schema_type(Type::Integer))
                                .required("data")
                                .into(),
                        ),
                    )
                    .build(),
            ),
            Text => (
                200,
                ResponseBuilder::new()
                    .description("Prometheus text format")
                    .content(
                        "text/plain",
                        json(ObjectBuilder::new().schema_type(Type::String).into()),
                    )
                    .build(),
            ),
        };
        let mut responses = ResponsesBuilder::new().response(ok.0.to_string(), ok.1);
        // A change that creates nothing answers 200 where the table says 201.
        if ok.0 == 201 {
            if let Json(_, shape) = e.answer {
                responses = responses.response(
                    "200",
                    ResponseBuilder::new()
                        .description("Nothing new: the current state")
                        .content("application/json", json(shape.schema(&mut schemas)))
                        .build(),
                );
            }
        }
        let responses = responses.response(
            "default",
            ResponseBuilder::new()
                .description("An error: a 4xx or 5xx status with a JSON body")
                .content("application/json", json(error.clone()))
                .build(),
        );
        paths = paths.path(e.path, PathItem::new(hm, op.responses(responses.build())));
    }
    schemas.sort_by(|a, b| a.0.cmp(&b.0));
    schemas.dedup_by(|a, b| a.0 == b.0);
    let components = ComponentsBuilder::new()
        .schemas_from_iter(schemas)
        .security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        )
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Gantry admin API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Every endpoint requires a permission (named in its description); errors are JSON `{\"error\", \"message\"}`.",
                ))
                .build(),
        )
        .paths(paths.build())
        .components(Some(components))
        .build()
}

/// The document, built once.
pub fn document() -> &'static serde_json::Value {
    static DOC: OnceLock<serde_json::Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::to_value(build()).unwrap_or(serde_json::Value::Null))
}

pub(crate) async fn serve() -> axum::Json<serde_json::Value> {
    axum::Json(document().clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_documented_endpoint_has_a_permission_and_schemas_resolve() {
        for e in endpoints() {
            assert!(
                permission_for(&method(e.method).1, e.path).is_some(),
                "{} {} has no permission",
                e.method,
                e.path
            );
        }
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &r[..r.find('"').unwrap()];
            assert!(schemas.contains_key(name), "unresolved $ref {name}");
        }
    }
}
