//! The delivery queues: `<prefix>.webhooks.fanout` (bound to the events exchange with `#`),
//! `<prefix>.webhooks.deliveries` (one [`Task`] per attempt to make now), and delay queues
//! `<prefix>.webhooks.delay.<ms>` for retries and rate-limited tasks.
//!
//! A delay queue has a per-queue TTL and dead-letters expired messages back to the
//! deliveries queue: no polling over Postgres, and (unlike per-message TTLs, which RabbitMQ
//! only expires at the head of a queue) a short wait never sits behind a long one. Delays are
//! rounded to two significant digits so the jittered schedule uses a bounded set of queues
//! (about twenty per step), declared on first use.

use std::{collections::HashSet, time::Duration};

use lapin::{
    BasicProperties, Channel,
    options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::mq::{Mq, MqError, QueueType};

/// What a worker is asked to do: attempt number `attempt` of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub delivery_id: Uuid,
    /// The attempt this task is for; a delivery that already made this many attempts
    /// drops the task as a duplicate.
    pub attempt: i32,
    /// RetryWebhookDelivery / RecoverWebhookDeliveries: outside the schedule.
    #[serde(default)]
    pub manual: bool,
}

/// Queue names of one deployment (its RabbitMQ prefix).
#[derive(Debug, Clone)]
pub struct Queues {
    pub fanout: String,
    pub deliveries: String,
    prefix: String,
    events_exchange: String,
    queue_type: QueueType,
}

/// How long RabbitMQ may take to confirm a task publish.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

impl Queues {
    pub fn new(mq: &Mq) -> Self {
        Self {
            fanout: mq.queue_name("webhooks.fanout"),
            deliveries: mq.queue_name("webhooks.deliveries"),
            prefix: mq.queue_name("webhooks.delay."),
            events_exchange: mq.events_exchange(),
            queue_type: mq.config().queue_type,
        }
    }

    /// The delay queue holding tasks for `delay` (already rounded by [`round_delay`]).
    pub fn delay_queue(&self, delay: Duration) -> String {
        format!("{}{}", self.prefix, delay.as_millis())
    }

    /// Every delay queue name starts with this (tests delete them by it).
    pub fn delay_prefix(&self) -> &str {
        &self.prefix
    }

    fn arguments(&self) -> FieldTable {
        let mut args = self.queue_type.arguments();
        if self.queue_type == QueueType::Quorum {
            // Dead-lettering out of a quorum queue is at most once unless asked otherwise.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString(LongString::from("at-least-once")),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString(LongString::from("reject-publish")),
            );
        }
        args
    }

    /// Declares the fan-out queue (bound to every event) and the deliveries queue;
    /// idempotent, run on every (re)connect.
    pub async fn declare(&self, mq: &Mq, channel: &Channel) -> Result<(), MqError> {
        for queue in [&self.fanout, &self.deliveries] {
            mq.note_queue(queue);
            declare_queue(channel, queue, self.queue_type.arguments()).await?;
        }
        channel
            .queue_bind(
                self.fanout.as_str().into(),
                self.events_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| MqError::Declare {
                what: format!("binding {} to {}", self.fanout, self.events_exchange),
                source,
            })
    }
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), MqError> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(|_| ())
        .map_err(|source| MqError::Declare {
            what: format!("queue {name}"),
            source,
        })
}

/// Rounds a delay to two significant digits of milliseconds (at least 10 ms).
pub fn round_delay(delay: Duration) -> Duration {
    let ms = delay.as_millis().max(10) as u64;
    let mut scale = 1;
    while ms / scale >= 100 {
        scale *= 10;
    }
    Duration::from_millis(ms.div_ceil(scale) * scale)
}

/// `base` ± 10 %, uniformly.
pub fn jitter(base: Duration) -> Duration {
    let factor = 0.9 + fastrand::f64() * 0.2;
    base.mul_f64(factor)
}

/// Publishes tasks on one confirm-mode channel, declaring delay queues on first use.
pub struct Publisher {
    mq: Mq,
    channel: Channel,
    queues: Queues,
    declared: HashSet<u128>,
}

impl Publisher {
    /// A confirm-mode channel of `mq` (which connects if needed).
    pub async fn open(mq: &Mq, queues: Queues) -> Result<Self, MqError> {
        let channel = mq.confirm_channel().await?;
        queues.declare(mq, &channel).await?;
        Ok(Self {
            mq: mq.clone(),
            channel,
            queues,
            declared: HashSet::new(),
        })
    }

    pub fn is_usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Queues `tasks` to run after `delay` (now if `None`) and waits for RabbitMQ's
    /// confirms: once this returns Ok, the broker holds them.
    pub async fn publish(
        &mut self,
        tasks: &[Task],
        delay: Option<Duration>,
    ) -> Result<(), MqError> {
        let routing_key = match delay {
            None => self.queues.deliveries.clone(),
            Some(delay) => self.delay_queue(delay).await?,
        };
        let mut confirms = Vec::with_capacity(tasks.len());
        for task in tasks {
            let body = serde_json::to_vec(task).expect("tasks serialize");
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_app_id("devgate".into());
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    routing_key.as_str().into(),
                    // Mandatory: a queue deleted under us returns the task instead of
                    // dropping it.
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    properties,
                )
                .await
                .map_err(MqError::Publish)?;
            confirms.push((task.delivery_id, confirm));
        }
        let all = async {
            for (id, confirm) in confirms {
                Mq::confirmed(confirm, id).await?;
            }
            Ok::<(), MqError>(())
        };
        tokio::time::timeout(CONFIRM_TIMEOUT, all)
            .await
            .map_err(|_| MqError::ConfirmTimeout(CONFIRM_TIMEOUT))?
    }

    async fn delay_queue(&mut self, delay: Duration) -> Result<String, MqError> {
        let delay = round_delay(delay);
        let name = self.queues.delay_queue(delay);
        if self.declared.insert(delay.as_millis()) {
            let mut args = self.queues.arguments();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from("")),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(LongString::from(self.queues.deliveries.as_str())),
            );
            self.mq.note_queue(&name);
            if let Err(e) = declare_queue(&self.channel, &name, args).await {
                self.declared.remove(&delay.as_millis());
                return Err(e);
            }
        }
        Ok(name)
    }
}

/// A [`Publisher`] shared by a process's tasks and RPCs: opened on first use, reopened after
/// a failure (the next call reconnects).
#[derive(Clone)]
pub struct TaskQueue {
    mq: Mq,
    queues: Queues,
    publisher: std::sync::Arc<tokio::sync::Mutex<Option<Publisher>>>,
}

impl TaskQueue {
    pub fn new(mq: Mq) -> Self {
        Self {
            queues: Queues::new(&mq),
            mq,
            publisher: Default::default(),
        }
    }

    pub fn queues(&self) -> &Queues {
        &self.queues
    }

    pub fn mq(&self) -> &Mq {
        &self.mq
    }

    /// [`Publisher::publish`] on the shared channel. On an error the channel is dropped, so
    /// the next call opens a new one; the caller decides whether to retry.
    pub async fn publish(&self, tasks: &[Task], delay: Option<Duration>) -> Result<(), MqError> {
        if tasks.is_empty() {
            return Ok(());
        }
        let mut slot = self.publisher.lock().await;
        if !slot.as_ref().is_some_and(Publisher::is_usable) {
            *slot = Some(Publisher::open(&self.mq, self.queues.clone()).await?);
        }
        let publisher = slot.as_mut().expect("opened above");
        let result = publisher.publish(tasks, delay).await;
        if result.is_err() {
            *slot = None;
            if matches!(result, Err(MqError::ConfirmTimeout(_))) {
                self.mq.reset().await;
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_two_significant_digits() {
        let ms = |n| Duration::from_millis(n);
        assert_eq!(round_delay(ms(0)), ms(10));
        assert_eq!(round_delay(ms(57)), ms(57));
        assert_eq!(round_delay(ms(1234)), ms(1300));
        assert_eq!(round_delay(ms(54_001)), ms(55_000));
        assert_eq!(
            round_delay(Duration::from_secs(3600)),
            Duration::from_secs(3600)
        );
        // ±10 % of one step lands in about twenty queues.
        let step = Duration::from_secs(300);
        let names: HashSet<u128> = (0..10_000)
            .map(|_| round_delay(jitter(step)).as_millis())
            .collect();
        assert!(names.len() <= 22, "{}", names.len());
        assert!(names.iter().all(|&m| (270_000..=330_000).contains(&m)));
    }

    #[test]
    fn tasks_round_trip_as_json() {
        let t = Task {
            delivery_id: Uuid::now_v7(),
            attempt: 3,
            manual: true,
        };
        let back: Task = serde_json::from_slice(&serde_json::to_vec(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        let old: Task = serde_json::from_str(&format!(
            r#"{{"delivery_id":"{}","attempt":1}}"#,
            t.delivery_id
        ))
        .unwrap();
        assert!(!old.manual);
    }
}
