//! The simulated AI orchestrator: consumes GenerationJobs and GenerationCancels from its own
//! queues bound to the jobs exchange, and publishes GenerationUpdates to devgate's updates
//! queue (see proto/upstream/orchestrator/v1/orchestrator.proto for the routing).
//!
//! A job runs `--job-duration` in `--progress-steps` steps: RUNNING at 0 % and after every
//! step but the last, then SUCCEEDED with `count` assets registered in the Asset service. A
//! prompt containing `fail` (any case) FAILS halfway; a cancel stops the job with CANCELLED.
//! Cancels have a queue of their own so they never wait behind jobs.
//!
//! Every update is published persistent and mandatory on a confirm channel, and retried with
//! backoff until RabbitMQ confirms it (e.g. before devgate declared its queue). A job message
//! (and any cancel for it) is acked only once its terminal update is confirmed; a job
//! delivered again meanwhile is not run twice but acked with it. Jobs are remembered for the
//! process's lifetime: this simulator is one process, not a cluster.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use devgate::{
    mq::{Mq, MqError},
    proto::{
        convert::timestamp,
        upstream::orchestrator::v1::{
            GenerationCancel, GenerationError, GenerationJob, GenerationState, GenerationUpdate,
            GenerationUsage, routing,
        },
    },
};
use futures_util::StreamExt;
use lapin::{
    Acker, BasicProperties, Channel, ExchangeKind,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};
use prost::{Message, Name};
use tokio_util::sync::CancellationToken;

use crate::directory::Directory;

/// How long RabbitMQ may take to confirm one update.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two attempts to publish an update or to reconnect.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Cancels taken at once (they are handled immediately).
const CANCEL_PREFETCH: u16 = 100;

/// The exchange and queue names, and how jobs behave.
#[derive(Debug, Clone)]
pub struct Options {
    pub jobs_exchange: String,
    pub updates_queue: String,
    /// The simulator's queue of jobs (bound with `generation.requested`).
    pub jobs_queue: String,
    /// The simulator's queue of cancels (bound with `generation.cancel`).
    pub cancels_queue: String,
    pub job_duration: Duration,
    pub progress_steps: u32,
    /// Publish every update twice.
    pub duplicate_updates: bool,
    /// After every update, publish the one before it again (late, out of order).
    pub out_of_order_updates: bool,
    /// Jobs run at once (the jobs consumer's prefetch).
    pub max_jobs: u16,
}

/// What the simulator knows of one generation.
enum Job {
    /// A cancel arrived before the job: the job is cancelled as soon as it comes.
    CancelledFirst {
        reason: String,
    },
    Running {
        cancel: CancellationToken,
        reason: Option<String>,
        /// Job deliveries and cancels to ack once the terminal update is confirmed.
        ackers: Vec<Acker>,
    },
    /// The outcome is decided and its update is being published; a cancel is too late.
    Ending {
        ackers: Vec<Acker>,
    },
    Done,
}

enum Outcome {
    Succeeded,
    /// Failed after `worked` of compute.
    Failed {
        worked: Duration,
    },
}

pub struct Orchestrator {
    mq: Mq,
    options: Options,
    directory: Arc<Directory>,
    jobs: Mutex<HashMap<String, Job>>,
    /// The confirm channel updates are published on, opened on first use.
    publisher: tokio::sync::Mutex<Option<Channel>>,
    stop: CancellationToken,
}

impl Orchestrator {
    pub fn new(
        mq: Mq,
        options: Options,
        directory: Arc<Directory>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            mq,
            options,
            directory,
            jobs: Mutex::new(HashMap::new()),
            publisher: tokio::sync::Mutex::new(None),
            stop,
        })
    }

    /// Declares the exchange and the simulator's queues, waiting for RabbitMQ as long as it
    /// takes; false if stopped first.
    pub async fn declare_topology(&self) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            let Some(channel) = self.mq.wait_channel(MAX_BACKOFF, &self.stop).await else {
                return false;
            };
            let declared = self.declare(&channel).await;
            // Best effort: the channel was only for declaring.
            let _ = channel.close(200, "declared".into()).await;
            match declared {
                Ok(()) => return true,
                Err(e) => tracing::warn!(error = %e, "declaring the orchestrator's queues failed"),
            }
            self.mq.reset().await;
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }

    /// Idempotent: the durable topic exchange (as devgate declares it too) and the
    /// simulator's two durable queues bound to it.
    async fn declare(&self, channel: &Channel) -> Result<(), MqError> {
        let o = &self.options;
        channel
            .exchange_declare(
                o.jobs_exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|source| MqError::Declare {
                what: format!("exchange {}", o.jobs_exchange),
                source,
            })?;
        for (queue, key) in [
            (&o.jobs_queue, routing::JOB_ROUTING_KEY),
            (&o.cancels_queue, routing::CANCEL_ROUTING_KEY),
        ] {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    self.mq.config().queue_type.arguments(),
                )
                .await
                .map_err(|source| MqError::Declare {
                    what: format!("queue {queue}"),
                    source,
                })?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    o.jobs_exchange.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|source| MqError::Declare {
                    what: format!("binding {queue} to {} with {key}", o.jobs_exchange),
                    source,
                })?;
        }
        Ok(())
    }

    /// Consumes jobs until stopped, reconnecting with backoff.
    pub async fn run_jobs(self: Arc<Self>) {
        let queue = self.options.jobs_queue.clone();
        self.consume_loop(&queue, self.options.max_jobs, true).await
    }

    /// Consumes cancels until stopped, reconnecting with backoff.
    pub async fn run_cancels(self: Arc<Self>) {
        let queue = self.options.cancels_queue.clone();
        self.consume_loop(&queue, CANCEL_PREFETCH, false).await
    }

    async fn consume_loop(self: &Arc<Self>, queue: &str, prefetch: u16, jobs: bool) {
        while !self.stop.is_cancelled() {
            let Some(channel) = self.mq.wait_channel(MAX_BACKOFF, &self.stop).await else {
                return;
            };
            if let Err(e) = self.consume(&channel, queue, prefetch, jobs).await {
                tracing::warn!(error = %e, queue, "consumer stopped; reconnecting");
                self.mq.reset().await;
                tokio::select! {
                    _ = self.stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            // Best effort: the channel may be gone with its connection.
            let _ = channel.close(200, "consumer stopped".into()).await;
        }
    }

    async fn consume(
        self: &Arc<Self>,
        channel: &Channel,
        queue: &str,
        prefetch: u16,
        jobs: bool,
    ) -> Result<(), MqError> {
        self.declare(channel).await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(MqError::Channel)?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "devgate-upstream-sim".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(MqError::Channel)?;
        loop {
            let next = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) if jobs => self.on_job(delivery).await,
                Some(Ok(delivery)) => self.on_cancel(delivery).await,
                Some(Err(e)) => return Err(MqError::Channel(e)),
                None => return Err(MqError::ConsumerEnded),
            }
        }
    }

    async fn on_job(self: &Arc<Self>, delivery: Delivery) {
        let Some(job) = decode::<GenerationJob>(&delivery) else {
            ack(&delivery.acker).await;
            return;
        };
        let id = job.generation_id.clone();
        let to_ack = {
            let mut jobs = self.jobs.lock().expect("jobs lock");
            match jobs.get_mut(&id) {
                Some(Job::Running { ackers, .. }) | Some(Job::Ending { ackers }) => {
                    // Delivered again (a lost ack, a re-published job): not run twice.
                    ackers.push(delivery.acker);
                    None
                }
                Some(Job::Done) => Some(delivery.acker),
                Some(Job::CancelledFirst { .. }) | None => {
                    let cancel = CancellationToken::new();
                    let reason = match jobs.remove(&id) {
                        Some(Job::CancelledFirst { reason }) => {
                            cancel.cancel();
                            Some(reason)
                        }
                        _ => None,
                    };
                    jobs.insert(
                        id.clone(),
                        Job::Running {
                            cancel: cancel.clone(),
                            reason,
                            ackers: vec![delivery.acker],
                        },
                    );
                    tracing::info!(generation_id = %id, tenant_id = %job.tenant_id, kind = %job.kind, count = job.count, "job started");
                    tokio::spawn(self.clone().run(job, cancel));
                    None
                }
            }
        };
        if let Some(acker) = to_ack {
            ack(&acker).await;
        }
    }

    async fn on_cancel(&self, delivery: Delivery) {
        let Some(cancel) = decode::<GenerationCancel>(&delivery) else {
            ack(&delivery.acker).await;
            return;
        };
        let to_ack = {
            let mut jobs = self.jobs.lock().expect("jobs lock");
            match jobs.get_mut(&cancel.generation_id) {
                Some(Job::Running {
                    cancel: token,
                    reason,
                    ackers,
                }) => {
                    if !token.is_cancelled() {
                        *reason = Some(cancel.reason.clone());
                        token.cancel();
                    }
                    ackers.push(delivery.acker);
                    None
                }
                // Too late, or a cancel again: nothing to stop.
                Some(Job::Ending { .. } | Job::Done | Job::CancelledFirst { .. }) => {
                    Some(delivery.acker)
                }
                None => {
                    jobs.insert(
                        cancel.generation_id.clone(),
                        Job::CancelledFirst {
                            reason: cancel.reason.clone(),
                        },
                    );
                    Some(delivery.acker)
                }
            }
        };
        tracing::info!(generation_id = %cancel.generation_id, reason = %cancel.reason, "cancel received");
        if let Some(acker) = to_ack {
            ack(&acker).await;
        }
    }

    /// Runs one job to its terminal update, then acks every delivery waiting for it.
    async fn run(self: Arc<Self>, job: GenerationJob, cancel: CancellationToken) {
        let started = Instant::now();
        let mut updates = Updates::new(&self, &job);
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            outcome = self.work(&job, &mut updates) => Some(outcome),
        };
        let reason = self.ending(&job.generation_id);
        let mut terminal = GenerationUpdate::default();
        match outcome {
            None => {
                terminal.set_state(GenerationState::Cancelled);
                terminal.progress = updates.progress;
                terminal.error = Some(GenerationError {
                    code: "CANCELLED".into(),
                    message: reason
                        .filter(|r| !r.is_empty())
                        .unwrap_or_else(|| "cancelled".into()),
                });
                terminal.usage = Some(usage(started.elapsed(), 0));
            }
            Some(Outcome::Failed { worked }) => {
                terminal.set_state(GenerationState::Failed);
                terminal.progress = updates.progress;
                terminal.error = Some(GenerationError {
                    code: "MODEL_ERROR".into(),
                    message: "the simulator fails every prompt that contains \"fail\"".into(),
                });
                terminal.usage = Some(usage(worked, 0));
            }
            Some(Outcome::Succeeded) => {
                let assets = self.directory.register_outputs(&job);
                terminal.set_state(GenerationState::Succeeded);
                terminal.progress = 100;
                terminal.usage = Some(usage(self.options.job_duration, assets.len() as u32));
                (terminal.asset_ids, terminal.result_urls) =
                    assets.into_iter().map(|a| (a.id, a.url)).unzip();
            }
        }
        let state = terminal.state().as_str_name();
        if !updates.send(terminal).await {
            return; // Stopping: the job stays unacked and RabbitMQ hands it out again.
        }
        tracing::info!(generation_id = %job.generation_id, state, "job ended");
        for acker in self.done(&job.generation_id) {
            ack(&acker).await;
        }
    }

    /// RUNNING updates over `--job-duration`; the outcome when the time is up (or halfway
    /// for a prompt that fails).
    async fn work(&self, job: &GenerationJob, updates: &mut Updates<'_>) -> Outcome {
        let steps = self.options.progress_steps.max(1);
        let step = self.options.job_duration / steps;
        let fails = job.prompt.to_lowercase().contains("fail");
        updates.running(0).await;
        for i in 1..steps {
            tokio::time::sleep(step).await;
            if fails && i * 2 >= steps {
                return Outcome::Failed { worked: step * i };
            }
            updates.running(i * 100 / steps).await;
        }
        tokio::time::sleep(step).await;
        if fails {
            Outcome::Failed {
                worked: step * steps,
            }
        } else {
            Outcome::Succeeded
        }
    }

    /// Moves a job to Ending and says why it was cancelled, if it was.
    fn ending(&self, id: &str) -> Option<String> {
        let mut jobs = self.jobs.lock().expect("jobs lock");
        match jobs.remove(id) {
            Some(Job::Running { reason, ackers, .. }) => {
                jobs.insert(id.to_string(), Job::Ending { ackers });
                reason
            }
            Some(other) => {
                jobs.insert(id.to_string(), other);
                None
            }
            None => None,
        }
    }

    /// Moves a job to Done and hands over the deliveries to ack.
    fn done(&self, id: &str) -> Vec<Acker> {
        let mut jobs = self.jobs.lock().expect("jobs lock");
        match jobs.insert(id.to_string(), Job::Done) {
            Some(Job::Ending { ackers } | Job::Running { ackers, .. }) => ackers,
            _ => Vec::new(),
        }
    }

    /// Publishes `update` until RabbitMQ confirms it; false if stopped first.
    async fn publish(&self, update: &GenerationUpdate) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.try_publish(update).await {
                Ok(()) => return true,
                Err(e) => tracing::warn!(
                    error = %e,
                    generation_id = %update.generation_id,
                    sequence = update.sequence,
                    "publishing an update failed; retrying"
                ),
            }
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }

    async fn try_publish(&self, update: &GenerationUpdate) -> Result<(), MqError> {
        let channel = {
            let mut slot = self.publisher.lock().await;
            match slot.as_ref() {
                Some(channel) if channel.status().connected() => channel.clone(),
                _ => {
                    let channel = self.mq.confirm_channel().await?;
                    *slot = Some(channel.clone());
                    channel
                }
            }
        };
        let message_id = format!("{}/{}", update.generation_id, update.sequence);
        let properties = BasicProperties::default()
            .with_content_type(routing::CONTENT_TYPE.into())
            .with_type(GenerationUpdate::full_name().into())
            .with_message_id(message_id.as_str().into())
            .with_delivery_mode(2)
            .with_timestamp(update.time.map_or(0, |t| t.seconds.max(0) as u64))
            .with_app_id("devgate-upstream-sim".into());
        let confirm = channel
            .basic_publish(
                "".into(),
                self.options.updates_queue.as_str().into(),
                // Mandatory: before devgate declared its queue the update comes back, and is
                // published again later.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &update.encode_to_vec(),
                properties,
            )
            .await
            .map_err(MqError::Publish)?;
        tokio::time::timeout(CONFIRM_TIMEOUT, Mq::confirmed(confirm, message_id))
            .await
            .map_err(|_| MqError::ConfirmTimeout(CONFIRM_TIMEOUT))?
    }
}

/// The updates of one job: numbers them and applies the duplicate / out-of-order options.
struct Updates<'a> {
    orchestrator: &'a Orchestrator,
    generation_id: String,
    tenant_id: String,
    sequence: u64,
    progress: u32,
    previous: Option<GenerationUpdate>,
}

impl<'a> Updates<'a> {
    fn new(orchestrator: &'a Orchestrator, job: &GenerationJob) -> Self {
        Self {
            orchestrator,
            generation_id: job.generation_id.clone(),
            tenant_id: job.tenant_id.clone(),
            sequence: 0,
            progress: 0,
            previous: None,
        }
    }

    async fn running(&mut self, progress: u32) -> bool {
        let mut update = GenerationUpdate {
            progress,
            ..GenerationUpdate::default()
        };
        update.set_state(GenerationState::Running);
        self.send(update).await
    }

    /// Numbers `update` and publishes it (then again, or the previous one, when asked);
    /// false if stopped first.
    async fn send(&mut self, mut update: GenerationUpdate) -> bool {
        self.sequence += 1;
        self.progress = update.progress;
        update.sequence = self.sequence;
        update.generation_id = self.generation_id.clone();
        update.tenant_id = self.tenant_id.clone();
        update.time = Some(timestamp(chrono::Utc::now()));
        let options = &self.orchestrator.options;
        let mut published = self.orchestrator.publish(&update).await;
        if published && options.duplicate_updates {
            published = self.orchestrator.publish(&update).await;
        }
        if published
            && options.out_of_order_updates
            && let Some(previous) = &self.previous
        {
            published = self.orchestrator.publish(previous).await;
        }
        self.previous = Some(update);
        published
    }
}

/// Whole seconds, rounded up.
fn usage(worked: Duration, outputs: u32) -> GenerationUsage {
    GenerationUsage {
        seconds: worked.as_nanos().div_ceil(1_000_000_000) as u64,
        outputs,
    }
}

/// The message in a delivery, or `None` (logged) for one that is not of type `M` or does
/// not name its generation and tenant: such a message is dropped.
fn decode<M: Message + Name + Default + Ids>(delivery: &Delivery) -> Option<M> {
    let kind = delivery.properties.kind().as_ref().map(|k| k.as_str());
    if kind.is_some_and(|k| k != M::full_name()) {
        tracing::error!(
            kind = ?kind,
            expected = %M::full_name(),
            "message of an unexpected type dropped"
        );
        return None;
    }
    match M::decode(delivery.data.as_slice()) {
        Ok(message) if message.ids_present() => Some(message),
        Ok(_) => {
            tracing::error!(message = %M::full_name(), "message without generation_id or tenant_id dropped");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, message = %M::full_name(), "undecodable message dropped");
            None
        }
    }
}

/// Messages that name a generation and its tenant.
trait Ids {
    fn ids_present(&self) -> bool;
}

impl Ids for GenerationJob {
    fn ids_present(&self) -> bool {
        !self.generation_id.is_empty() && !self.tenant_id.is_empty()
    }
}

impl Ids for GenerationCancel {
    fn ids_present(&self) -> bool {
        !self.generation_id.is_empty() && !self.tenant_id.is_empty()
    }
}

async fn ack(acker: &Acker) {
    // A failed ack (the channel is gone) redelivers the message, which then finds its job.
    if let Err(e) = acker.ack(BasicAckOptions::default()).await {
        tracing::debug!(error = %e, "ack failed");
    }
}
