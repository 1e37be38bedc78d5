//! `gantry bus ...`: topics, publishing, subscriptions, dead letters, redrive and replay.

use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};

use crate::client::{CliError, Client};
use crate::commands::print_json;
use crate::{table, Output};

#[derive(Subcommand)]
pub enum BusCmd {
    /// Topics (dead-letter topics included) with their extent.
    Topics {
        #[command(flatten)]
        out: Output,
    },
    /// Publish one message (its data from --data or standard input); printed once durable.
    Publish {
        topic: String,
        /// The data; without it, standard input is read.
        #[arg(long)]
        data: Option<String>,
        /// The message id (a second publish with it within the topic's dedup window is
        /// dropped). Default: a fresh one.
        #[arg(long)]
        id: Option<String>,
        /// The ordering key: messages with the same key are handled one at a time, in order.
        #[arg(long)]
        key: Option<String>,
        /// The CloudEvents type. Default gantry.message.
        #[arg(long = "type")]
        kind: Option<String>,
        /// The data's content type. Default application/json if it parses, else text/plain.
        #[arg(long)]
        content_type: Option<String>,
    },
    /// Subscriptions with their lag, in-flight count and dead letters.
    Subs {
        #[command(flatten)]
        out: Output,
    },
    /// A subscription's dead letters, with why and after how many attempts.
    DeadLetters {
        topic: String,
        subscription: String,
        #[arg(long, short = 'n', default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        out: Output,
    },
    /// Publish a subscription's dead letters back into its topic, for it alone.
    Redrive { topic: String, subscription: String },
    /// Deliver a subscription's messages again from a seq or a time.
    Replay {
        topic: String,
        subscription: String,
        #[arg(long, conflicts_with = "from_time")]
        from_seq: Option<u64>,
        /// An RFC 3339 time, unix milliseconds, or a duration ago such as 10m.
        #[arg(long)]
        from_time: Option<String>,
    },
}

fn seg(s: &str) -> Result<&str, CliError> {
    if s.is_empty() || s.contains(['/', '?', '#', '%']) || s.chars().any(char::is_whitespace) {
        return Err(CliError::usage(format!(
            "{s:?} is not a topic or subscription name"
        )));
    }
    Ok(s)
}

pub async fn run(c: &Client, cmd: BusCmd) -> Result<(), CliError> {
    match cmd {
        BusCmd::Topics { out } => {
            list(
                c,
                "/v1/topics",
                out,
                &["TOPIC", "MESSAGES", "SEQS", "BYTES"],
                |t| {
                    vec![
                        t["name"].as_str().unwrap_or("").to_string(),
                        t["messages"].to_string(),
                        format!("{}..{}", t["first_seq"], t["last_seq"]),
                        t["bytes"].to_string(),
                    ]
                },
            )
            .await
        }
        BusCmd::Publish {
            topic,
            data,
            id,
            key,
            kind,
            content_type,
        } => {
            let data = match data {
                Some(d) => d.into_bytes(),
                None => {
                    use std::io::Read;
                    let mut b = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut b)
                        .map_err(|e| CliError::new(format!("reading standard input: {e}")))?;
                    b
                }
            };
            let ct = content_type.unwrap_or_else(|| {
                if serde_json::from_slice::<Value>(&data).is_ok() {
                    "application/json".into()
                } else {
                    "text/plain".into()
                }
            });
            let mut headers = vec![
                ("ce-specversion".to_string(), "1.0".to_string()),
                ("ce-id".into(), id.unwrap_or_else(new_id)),
                ("ce-source".into(), "/gantry/cli".into()),
                (
                    "ce-type".into(),
                    kind.unwrap_or_else(|| "gantry.message".into()),
                ),
            ];
            if let Some(k) = key {
                headers.push(("ce-partitionkey".into(), k));
            }
            let path = format!("/v1/topics/{}/messages", seg(&topic)?);
            let v: Value = c
                .send_with_headers(Method::POST, &path, &ct, &headers, data)
                .await?;
            for m in v["messages"].as_array().into_iter().flatten() {
                println!(
                    "{} seq {}{}",
                    m["id"].as_str().unwrap_or(""),
                    m["seq"],
                    if m["duplicate"] == true {
                        " (a duplicate: stored before)"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        BusCmd::Subs { out } => {
            let headers = [
                "TOPIC",
                "SUBSCRIPTION",
                "DELIVERY",
                "LAG",
                "IN FLIGHT",
                "DEAD",
            ];
            list(c, "/v1/subscriptions", out, &headers, |s| {
                let target = match s["mode"].as_str() {
                    Some("push") => format!(
                        "push {}{}",
                        s["service"].as_str().unwrap_or(""),
                        s["path"].as_str().unwrap_or("")
                    ),
                    _ => "pull".into(),
                };
                vec![
                    s["topic"].as_str().unwrap_or("").to_string(),
                    s["name"].as_str().unwrap_or("").to_string(),
                    target,
                    s["lag"].to_string(),
                    s["in_flight"].to_string(),
                    s["dead_letters"].to_string(),
                ]
            })
            .await
        }
        BusCmd::DeadLetters {
            topic,
            subscription,
            limit,
            out,
        } => {
            let path = format!(
                "/v1/topics/{}/subscriptions/{}/dead-letters?limit={limit}",
                seg(&topic)?,
                seg(&subscription)?
            );
            let headers = ["AT", "ID", "TYPE", "ATTEMPTS", "REASON"];
            list(c, &path, out, &headers, |m| {
                let e = &m["event"];
                vec![
                    table::clock(m["time_ms"].as_u64().unwrap_or(0)),
                    e["id"].as_str().unwrap_or("").to_string(),
                    e["type"].as_str().unwrap_or("").to_string(),
                    e["gantryattempts"].as_str().unwrap_or("").to_string(),
                    e["gantryreason"].as_str().unwrap_or("").to_string(),
                ]
            })
            .await
        }
        BusCmd::Redrive {
            topic,
            subscription,
        } => {
            let v = c
                .call(
                    Method::POST,
                    &format!(
                        "/v1/topics/{}/subscriptions/{}/redrive",
                        seg(&topic)?,
                        seg(&subscription)?
                    ),
                    None,
                )
                .await?;
            println!(
                "{} dead letter(s) published back to {topic} for {subscription}",
                v["redriven"]
            );
            Ok(())
        }
        BusCmd::Replay {
            topic,
            subscription,
            from_seq,
            from_time,
        } => {
            if from_seq.is_none() && from_time.is_none() {
                return Err(CliError::usage("give --from-seq or --from-time"));
            }
            let v = c
                .call(
                    Method::POST,
                    &format!(
                        "/v1/topics/{}/subscriptions/{}/replay",
                        seg(&topic)?,
                        seg(&subscription)?
                    ),
                    Some(&json!({"from_seq": from_seq, "from_time": from_time})),
                )
                .await?;
            println!(
                "{subscription} receives {topic} again from seq {}",
                v["from_seq"]
            );
            Ok(())
        }
    }
}

/// A list from the API: as JSON with `--json`, else a table of `row` per item.
async fn list(
    c: &Client,
    path: &str,
    out: Output,
    headers: &[&str],
    row: impl Fn(&Value) -> Vec<String>,
) -> Result<(), CliError> {
    let v = c.get(path).await?;
    if out.json {
        print_json(&v);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v.as_array().into_iter().flatten().map(row).collect();
    table::print(headers, &rows);
    Ok(())
}

fn new_id() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}
