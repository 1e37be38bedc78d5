//! `/v1/topics/...` and `/v1/subscriptions`: the message bus. Publishing takes CloudEvents in
//! binary, structured and batched modes, or a plain body; pull subscribers fetch, ack and nack;
//! operators make topics and subscriptions, replay, inspect dead letters and redrive them.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use gantry_bus::{BusError, Mode, Start, Subscription};
use gantry_store::{ReadFrom, StreamOptions};
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};

use crate::parse::{parse_json, ApiResult};
use crate::{ApiError, ApiState};

/// A publish may carry a message of the largest size a topic allows, and its attributes.
const MAX_PUBLISH_BYTES: usize = (8 << 20) + (64 << 10);

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/topics", get(list_topics))
        .route(
            "/v1/topics/{topic}",
            get(get_topic).put(put_topic).delete(delete_topic),
        )
        .route(
            "/v1/topics/{topic}/messages",
            post(publish)
                .get(peek)
                .layer(DefaultBodyLimit::max(MAX_PUBLISH_BYTES)),
        )
        .route("/v1/subscriptions", get(list_subscriptions))
        .route(
            "/v1/topics/{topic}/subscriptions/{name}",
            get(get_subscription)
                .put(put_subscription)
                .delete(delete_subscription),
        )
        .route("/v1/topics/{topic}/subscriptions/{name}/fetch", post(fetch))
        .route("/v1/topics/{topic}/subscriptions/{name}/ack", post(ack))
        .route("/v1/topics/{topic}/subscriptions/{name}/nack", post(nack))
        .route(
            "/v1/topics/{topic}/subscriptions/{name}/extend",
            post(extend),
        )
        .route(
            "/v1/topics/{topic}/subscriptions/{name}/replay",
            post(replay),
        )
        .route(
            "/v1/topics/{topic}/subscriptions/{name}/dead-letters",
            get(dead_letters),
        )
        .route(
            "/v1/topics/{topic}/subscriptions/{name}/redrive",
            post(redrive),
        )
}

pub(crate) fn bus_error(e: BusError) -> ApiError {
    match e {
        BusError::Invalid(m) => ApiError::bad_request(m),
        BusError::NotFound(m) => ApiError::not_found(format!("no such {m}")),
        BusError::Exists(m) => ApiError::conflict(format!("{m} already exists")),
        BusError::TooLarge(m) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", m),
        BusError::Store(e) => e.into(),
    }
}

fn topic_name(t: &str) -> ApiResult<()> {
    gantry_bus::check_name("topic", t).map_err(bus_error)
}

pub async fn list_topics(State(s): State<ApiState>) -> ApiResult<Json<Vec<gantry_bus::TopicView>>> {
    s.bus.topics().await.map(Json).map_err(bus_error)
}

pub async fn get_topic(
    State(s): State<ApiState>,
    Path(topic): Path<String>,
) -> ApiResult<Json<gantry_bus::TopicView>> {
    match s.bus.topic(&topic).await.map_err(bus_error)? {
        Some(t) => Ok(Json(t)),
        None => Err(ApiError::not_found(format!("no such topic {topic}"))),
    }
}

/// The body of `PUT /v1/topics/{topic}`: retention and limits (all optional).
#[derive(Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopicBody {
    /// Messages older than this are dropped.
    #[serde(default)]
    pub max_age_ms: Option<u64>,
    #[serde(default)]
    pub max_bytes: Option<u64>,
    #[serde(default)]
    pub max_messages: Option<u64>,
    /// The largest message (bytes of data). Default 1 MiB.
    #[serde(default)]
    pub max_message_bytes: Option<u32>,
    /// How long publisher-given ids are remembered. Default 120000.
    #[serde(default)]
    pub dedup_window_ms: Option<u64>,
}

pub async fn put_topic(
    State(s): State<ApiState>,
    Path(topic): Path<String>,
    body: Bytes,
) -> ApiResult<Json<gantry_bus::TopicView>> {
    topic_name(&topic)?;
    let b: TopicBody = if body.is_empty() {
        TopicBody::default()
    } else {
        parse_json(&body)?
    };
    let d = StreamOptions::default();
    let o = StreamOptions {
        max_age: b.max_age_ms.map(Duration::from_millis),
        max_bytes: b.max_bytes,
        max_messages: b.max_messages,
        max_record_bytes: b.max_message_bytes.unwrap_or(d.max_record_bytes),
        dedup_window: b
            .dedup_window_ms
            .map(Duration::from_millis)
            .unwrap_or(d.dedup_window),
    };
    s.bus.create_topic(&topic, o).await.map_err(bus_error)?;
    get_topic(State(s), Path(topic)).await
}

pub async fn delete_topic(
    State(s): State<ApiState>,
    Path(topic): Path<String>,
) -> ApiResult<StatusCode> {
    topic_name(&topic)?;
    if s.bus.delete_topic(&topic).await.map_err(bus_error)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no such topic {topic}")))
    }
}

/// What a publish stored.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PublishAnswer {
    pub messages: Vec<gantry_bus::Published>,
}

/// `POST /v1/topics/{topic}/messages`: a CloudEvent (binary or structured mode), a batch
/// (`application/cloudevents-batch+json`) or a plain body; 201 once durable.
pub async fn publish(
    State(s): State<ApiState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<PublishAnswer>)> {
    topic_name(&topic)?;
    let messages = gantry_bus::message::from_http(&topic, &headers, body)
        .map_err(|e| ApiError::bad_request(e.0))?;
    let out = s.bus.publish(&topic, messages).await.map_err(bus_error)?;
    Ok((StatusCode::CREATED, Json(PublishAnswer { messages: out })))
}

#[derive(Debug, Deserialize)]
pub struct PeekQuery {
    from_seq: Option<u64>,
    from_time: Option<String>,
    limit: Option<usize>,
}

/// One stored message, as views show it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredMessage {
    pub seq: u64,
    /// When it was stored (unix ms).
    pub time_ms: u64,
    /// The message as a structured CloudEvent.
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
}

fn from_of(seq: Option<u64>, time: Option<&str>) -> ApiResult<ReadFrom> {
    match (seq, time) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "give from_seq or from_time, not both",
        )),
        (Some(s), None) => Ok(ReadFrom::Seq(s.max(1))),
        (None, Some(t)) => crate::parse::time_ms(t)
            .map(ReadFrom::Time)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "from_time {t:?}: expected an RFC 3339 time, unix milliseconds or a duration ago such as 10m"
                ))
            }),
        (None, None) => Ok(ReadFrom::Seq(1)),
    }
}

pub async fn peek(
    State(s): State<ApiState>,
    Path(topic): Path<String>,
    Query(q): Query<PeekQuery>,
) -> ApiResult<Json<Vec<StoredMessage>>> {
    topic_name(&topic)?;
    let from = from_of(q.from_seq, q.from_time.as_deref())?;
    stored(&s, &topic, from, q.limit.unwrap_or(100)).await
}

async fn stored(
    s: &ApiState,
    topic: &str,
    from: ReadFrom,
    limit: usize,
) -> ApiResult<Json<Vec<StoredMessage>>> {
    let msgs = s
        .bus
        .peek(topic, from, limit.clamp(1, 1000))
        .await
        .map_err(bus_error)?;
    Ok(Json(
        msgs.into_iter()
            .map(|(seq, time_ms, m)| StoredMessage {
                seq,
                time_ms,
                event: m.to_json(),
            })
            .collect(),
    ))
}

pub async fn list_subscriptions(
    State(s): State<ApiState>,
) -> ApiResult<Json<Vec<gantry_bus::SubscriptionStatus>>> {
    s.bus.subscriptions().await.map(Json).map_err(bus_error)
}

pub async fn get_subscription(
    State(s): State<ApiState>,
    Path((topic, name)): Path<(String, String)>,
) -> ApiResult<Json<gantry_bus::SubscriptionStatus>> {
    match s.bus.subscription(&topic, &name).await.map_err(bus_error)? {
        Some(st) => Ok(Json(st)),
        None => Err(ApiError::not_found(format!(
            "no such subscription {topic}/{name}"
        ))),
    }
}

/// The body of `PUT /v1/topics/{topic}/subscriptions/{name}`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionBody {
    /// `pull` (fetched over this API) or `push` (POSTed to a service's instances).
    pub mode: String,
    /// push: the service and the path messages are POSTed to.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    /// push: one attempt's limit. Default 10000.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// pull: how long a fetched message is the fetcher's before it goes out again. Default
    /// 30000.
    #[serde(default)]
    pub ack_deadline_ms: Option<u64>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub backoff_initial_ms: Option<u64>,
    #[serde(default)]
    pub backoff_max_ms: Option<u64>,
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    #[serde(default)]
    pub ordered: Option<bool>,
    /// `new` (default) or `earliest`.
    #[serde(default)]
    pub start: Option<String>,
}

pub async fn put_subscription(
    State(s): State<ApiState>,
    Path((topic, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<gantry_bus::SubscriptionStatus>> {
    let b: SubscriptionBody = parse_json(&body)?;
    let mode = match b.mode.as_str() {
        "pull" => Mode::Pull {
            ack_deadline_ms: b.ack_deadline_ms.unwrap_or(30_000),
        },
        "push" => Mode::Push {
            service: b
                .service
                .clone()
                .ok_or_else(|| ApiError::bad_request("a push subscription needs service"))?,
            path: b
                .path
                .clone()
                .ok_or_else(|| ApiError::bad_request("a push subscription needs path"))?,
            timeout_ms: b.timeout_ms.unwrap_or(10_000),
        },
        other => {
            return Err(ApiError::bad_request(format!(
                "mode {other:?}: expected \"pull\" or \"push\""
            )))
        }
    };
    let start = match b.start.as_deref() {
        None | Some("new") => Start::New,
        Some("earliest") => Start::Earliest,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "start {other:?}: expected \"new\" or \"earliest\""
            )))
        }
    };
    let sub = Subscription {
        topic: topic.clone(),
        name: name.clone(),
        mode,
        max_attempts: b.max_attempts.unwrap_or(5),
        backoff_initial_ms: b.backoff_initial_ms.unwrap_or(500),
        backoff_max_ms: b.backoff_max_ms.unwrap_or(60_000),
        max_in_flight: b.max_in_flight.unwrap_or(64),
        ordered: b.ordered.unwrap_or(true),
        start,
        from_spec: false,
    };
    not_the_specs(&s, &topic, &name, "change").await?;
    s.bus.put_subscription(&sub).await.map_err(bus_error)?;
    get_subscription(State(s), Path((topic, name))).await
}

/// A subscription the spec file declares is changed there, not over the API.
async fn not_the_specs(s: &ApiState, topic: &str, name: &str, verb: &str) -> ApiResult<()> {
    match s.bus.subscription(topic, name).await.map_err(bus_error)? {
        Some(old) if old.subscription.from_spec => Err(ApiError::conflict(format!(
            "subscription {topic}/{name} is declared by the spec file; {verb} it there"
        ))),
        _ => Ok(()),
    }
}

pub async fn delete_subscription(
    State(s): State<ApiState>,
    Path((topic, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    not_the_specs(&s, &topic, &name, "remove").await?;
    if s.bus
        .delete_subscription(&topic, &name)
        .await
        .map_err(bus_error)?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "no such subscription {topic}/{name}"
        )))
    }
}

/// The body of a fetch.
#[derive(Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FetchBody {
    /// At most this many messages (1-1000). Default 10.
    #[serde(default)]
    pub max: Option<usize>,
    /// Wait up to this long for the first one (at most 60000). Default 0.
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FetchAnswer {
    pub messages: Vec<gantry_bus::Fetched>,
}

pub async fn fetch(
    State(s): State<ApiState>,
    Path((topic, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<FetchAnswer>> {
    let b: FetchBody = if body.is_empty() {
        FetchBody::default()
    } else {
        parse_json(&body)?
    };
    if b.max.is_some_and(|m| m == 0 || m > 1000) {
        return Err(ApiError::bad_request("max: expected 1..=1000"));
    }
    if b.wait_ms.is_some_and(|w| w > 60_000) {
        return Err(ApiError::bad_request("wait_ms: expected at most 60000"));
    }
    let messages = s
        .bus
        .fetch(
            &topic,
            &name,
            b.max.unwrap_or(10),
            Duration::from_millis(b.wait_ms.unwrap_or(0)),
        )
        .await
        .map_err(bus_error)?;
    Ok(Json(FetchAnswer { messages }))
}

/// The body of an ack or nack: the `seq`s of fetched messages.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SeqsBody {
    pub seqs: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AckAnswer {
    /// How many of them were outstanding (the rest were acknowledged already, or not fetched).
    pub count: usize,
}

fn seqs(body: &Bytes) -> ApiResult<Vec<u64>> {
    let b: SeqsBody = parse_json(body)?;
    check_seqs(&b.seqs)?;
    Ok(b.seqs)
}

fn check_seqs(seqs: &[u64]) -> ApiResult<()> {
    if seqs.is_empty() || seqs.len() > 10_000 {
        return Err(ApiError::bad_request("seqs: expected 1-10000 of them"));
    }
    Ok(())
}

pub async fn ack(
    State(s): State<ApiState>,
    Path((topic, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<AckAnswer>> {
    let seqs = seqs(&body)?;
    let count = s.bus.ack(&topic, &name, &seqs).map_err(bus_error)?;
    Ok(Json(AckAnswer { count }))
}

pub async fn nack(
    State(s): State<ApiState>,
    Path((topic, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<AckAnswer>> {
    let seqs = seqs(&body)?;
    let count = s.bus.nack(&topic, &name, &seqs).map_err(bus_error)?;
    Ok(Json(AckAnswer { count }))
}

/// The body of an extend: fetched messages still being worked on.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendBody {
    pub seqs: Vec<u64>,
    /// Each lease runs this long from now (100-3600000). Default: the subscription's
    /// `ack_deadline_ms`.
    #[serde(default)]
    pub ack_deadline_ms: Option<u64>,
}

pub async fn extend(
    State(s): State<ApiState>,
    Path((topic, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<AckAnswer>> {
    let b: ExtendBody = parse_json(&body)?;
    check_seqs(&b.seqs)?;
    if b.ack_deadline_ms
        .is_some_and(|d| !(100..=3_600_000).contains(&d))
    {
        return Err(ApiError::bad_request(
            "ack_deadline_ms: expected 100..=3600000",
        ));
    }
    let count = s
        .bus
        .extend(
            &topic,
            &name,
            &b.seqs,
            b.ack_deadline_ms.map(Duration::from_millis),
        )
        .map_err(bus_error)?;
    Ok(Json(AckAnswer { count }))
}

/// Where a replay starts: a seq or a time (RFC 3339, unix ms, or a duration ago).
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    #[serde(default)]
    pub from_seq: Option<u64>,
    #[serde(default)]
    pub from_time: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplayAnswer {
    /// The first message that goes out again.
    pub from_seq: u64,
}

pub async fn replay(
    State(s): State<ApiState>,
    Path((topic, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<ReplayAnswer>> {
    let b: ReplayBody = parse_json(&body)?;
    if b.from_seq.is_none() && b.from_time.is_none() {
        return Err(ApiError::bad_request("give from_seq or from_time"));
    }
    let from = from_of(b.from_seq, b.from_time.as_deref())?;
    let from_seq = s.bus.replay(&topic, &name, from).await.map_err(bus_error)?;
    Ok(Json(ReplayAnswer { from_seq }))
}

#[derive(Debug, Deserialize)]
pub struct LimitQuery {
    limit: Option<usize>,
}

pub async fn dead_letters(
    State(s): State<ApiState>,
    Path((topic, name)): Path<(String, String)>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<Vec<StoredMessage>>> {
    topic_name(&topic)?;
    gantry_bus::check_name("subscription", &name).map_err(bus_error)?;
    let dlq = gantry_bus::dead_letter_topic(&topic, &name);
    if s.bus.topic(&dlq).await.map_err(bus_error)?.is_none() {
        return Ok(Json(Vec::new()));
    }
    stored(&s, &dlq, ReadFrom::Seq(1), q.limit.unwrap_or(100)).await
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RedriveAnswer {
    /// Dead letters published back into the topic for this subscription.
    pub redriven: usize,
}

pub async fn redrive(
    State(s): State<ApiState>,
    Path((topic, name)): Path<(String, String)>,
) -> ApiResult<Json<RedriveAnswer>> {
    let redriven = s.bus.redrive(&topic, &name).await.map_err(bus_error)?;
    Ok(Json(RedriveAnswer { redriven }))
}
