//! `rabbitmq`: the physical baseline of the webhook pipeline. Every event devgate delivers
//! crosses RabbitMQ at least once (persistent publish with confirms, consume with ack), so
//! the broker's own rate for that round trip on this machine is the ceiling the
//! `webhooks` figure is compared with.
//!
//! One connection, two channels (like one devgate process): a publisher on a confirm-mode
//! channel sends `--messages` persistent messages of `--size` bytes to ONE durable queue of
//! its own (through the default exchange), `--batch` at a time, waiting for the broker's
//! confirms of each batch before the next (what the outbox relay does); meanwhile a
//! consumer with a prefetch of `--batch` acks every message singly. The queue is deleted
//! at the end, also after a failure.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{FieldTable, LongString},
};

use crate::{env_optional, round};

/// RabbitMQ URL when neither the environment nor the env file names one (devgate's default).
const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The whole run may not take longer than this (a stuck consumer fails instead of hanging).
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// What the baseline is asked to do.
pub struct Params {
    pub messages: u64,
    pub size: usize,
    pub batch: u16,
}

/// The one line on stdout.
#[derive(serde::Serialize)]
struct Report {
    scenario: &'static str,
    /// Messages published, confirmed, consumed and acked per second (first publish to
    /// last ack).
    msgs_per_s: f64,
    /// Published and confirmed per second (first publish to last confirm).
    publish_per_s: f64,
    messages: u64,
    size: usize,
    batch: u16,
    seconds: f64,
    queue_type: String,
}

pub async fn run(params: Params, env_file: &Path) -> anyhow::Result<()> {
    if params.messages == 0 || params.batch == 0 {
        bail!("--messages and --batch must be at least 1");
    }
    let url = env_optional(env_file, "DEVGATE_RABBITMQ_URL")?
        .unwrap_or_else(|| DEFAULT_AMQP_URL.to_string());
    let queue_type = env_optional(env_file, "DEVGATE_RABBITMQ_QUEUE_TYPE")?
        .unwrap_or_else(|| "classic".to_string());
    let queue_type: devgate::mq::QueueType = queue_type
        .parse()
        .map_err(|e| anyhow!("DEVGATE_RABBITMQ_QUEUE_TYPE: {e}"))?;
    let conn = connect(&url).await?;
    let queue = format!("loadgen.baseline.{}", uuid::Uuid::new_v4());
    let setup = conn.create_channel().await?;
    setup
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            queue_type.arguments(),
        )
        .await
        .with_context(|| format!("declaring queue {queue}"))?;
    eprintln!(
        "loadgen: rabbitmq queue={queue} messages={} size={} batch={}",
        params.messages, params.size, params.batch
    );
    let outcome = tokio::time::timeout(RUN_TIMEOUT, measure(&conn, &queue, &params)).await;
    // Deleted whatever happened (a failed run leaves no queue full of messages behind),
    // on a new connection if the run's was lost.
    let mut deleted = setup
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .map(drop);
    let _ = conn.close(200, "done".into()).await;
    if deleted.is_err() {
        deleted = delete_queue(&url, &queue).await;
    }
    let (total, published) =
        outcome.map_err(|_| anyhow!("the run did not finish within {RUN_TIMEOUT:?}"))??;
    deleted.with_context(|| format!("deleting queue {queue}"))?;

    let secs = total.as_secs_f64();
    let report = Report {
        scenario: "rabbitmq",
        msgs_per_s: round(params.messages as f64 / secs, 1),
        publish_per_s: round(params.messages as f64 / published.as_secs_f64(), 1),
        messages: params.messages,
        size: params.size,
        batch: params.batch,
        seconds: round(secs, 3),
        queue_type: format!("{queue_type:?}").to_lowercase(),
    };
    eprintln!(
        "loadgen: {} messages through {queue} in {secs:.2}s (all confirmed after {:.2}s)",
        params.messages,
        published.as_secs_f64()
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<Connection> {
    Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name(LongString::from("loadgen")),
    )
    .await
    .context("cannot connect to RabbitMQ (is it running? deploy/local/common.sh starts it)")
}

async fn delete_queue(url: &str, queue: &str) -> Result<(), lapin::Error> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let deleted = conn
        .create_channel()
        .await?
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    deleted.map(drop)
}

/// Runs publisher and consumer together; returns (first publish → last ack, first publish
/// → last confirm).
async fn measure(
    conn: &Connection,
    queue: &str,
    params: &Params,
) -> anyhow::Result<(Duration, Duration)> {
    let consumer_channel = conn.create_channel().await?;
    consumer_channel
        .basic_qos(params.batch, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.into(),
            "loadgen".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    let start = Instant::now();
    let messages = params.messages;
    let consume = tokio::spawn(async move {
        let mut acked = 0u64;
        while acked < messages {
            let delivery = consumer
                .next()
                .await
                .ok_or_else(|| anyhow!("the consumer stopped after {acked} messages"))??;
            delivery.ack(BasicAckOptions::default()).await?;
            acked += 1;
        }
        anyhow::Ok(start.elapsed())
    });
    let published = publish(&publisher, queue, params).await;
    let published = match published {
        Ok(()) => start.elapsed(),
        Err(e) => {
            consume.abort();
            return Err(e);
        }
    };
    let total = consume.await.context("the consumer task panicked")??;
    Ok((total, published))
}

/// Publishes `--messages` persistent messages, `--batch` at a time, each batch confirmed
/// (every confirm an ack) before the next is sent.
async fn publish(channel: &Channel, queue: &str, params: &Params) -> anyhow::Result<()> {
    let body = vec![b'x'; params.size];
    let mut sent = 0u64;
    while sent < params.messages {
        let n = u64::from(params.batch).min(params.messages - sent);
        let mut confirms = Vec::with_capacity(n as usize);
        for _ in 0..n {
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            if !confirm.await?.is_ack() {
                bail!("RabbitMQ nacked a message");
            }
        }
        sent += n;
    }
    Ok(())
}
