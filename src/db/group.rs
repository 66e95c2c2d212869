//! Group commit for hot writes whose callers must know the write is durable before they
//! answer (PublishEvent before it returns the event id, a delivery worker before it acks
//! its task): concurrent callers' writes are gathered into one statement and one commit.
//!
//! Postgres pays one WAL flush per commit (≈ 3 ms here, `pg_test_fsync`), and a commit that
//! sends a `NOTIFY` (the outbox trigger) holds the notification lock through that flush, so
//! one write per transaction caps such a path at a few hundred commits per second whatever
//! the concurrency. A [`GroupCommit`] keeps up to `writers` batches in flight; while they
//! run, new writes wait in the channel and the next batch takes all of them (up to
//! [`GroupWrite::MAX_BATCH`]). Nothing waits on purpose: a lone write goes out at once.
//!
//! A batch that fails with anything but a lost database is retried write by write, so one
//! bad write (a constraint, a deadlock between two batches) fails only its own caller.

use std::{future::Future, sync::Arc};

use diesel_async::AsyncPgConnection;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{PgPool, StoreError};

/// Callers that may wait for a batch slot at once; more get [`StoreError::Unavailable`].
const CHANNEL_CAPACITY: usize = 16_384;

/// A write that a [`GroupCommit`] batches.
pub trait GroupWrite: Send + Sync + Sized + 'static {
    /// What the caller of this write gets back once it is committed.
    type Output: Send + 'static;
    /// Names the writer in logs.
    const NAME: &'static str;
    /// Most writes per batch (bounded by Postgres's 65,535 bind parameters, or by latency).
    const MAX_BATCH: usize;

    /// Commits `writes` (1 to [`GroupWrite::MAX_BATCH`]) together — one statement, or one
    /// transaction — and returns one output per write, in order.
    fn write<'a>(
        conn: &'a mut AsyncPgConnection,
        writes: &'a [Self],
    ) -> impl Future<Output = Result<Vec<Self::Output>, StoreError>> + Send + 'a;
}

type Reply<W> = oneshot::Sender<Result<<W as GroupWrite>::Output, StoreError>>;

/// The cheap-to-clone handle callers submit writes through.
pub struct GroupCommit<W: GroupWrite> {
    tx: mpsc::Sender<(W, Reply<W>)>,
}

impl<W: GroupWrite> Clone for GroupCommit<W> {
    fn clone(&self) -> Self {
        GroupCommit {
            tx: self.tx.clone(),
        }
    }
}

impl<W: GroupWrite> GroupCommit<W> {
    /// A handle and the task that writes its batches with at most `writers` connections of
    /// `pool` at once; the task ends when the last handle is dropped and the writes already
    /// submitted are answered.
    pub fn spawn(pool: PgPool, writers: usize) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        tokio::spawn(run::<W>(pool, writers.max(1), rx));
        GroupCommit { tx }
    }

    /// Commits `write` with whatever other writes are waiting, and returns its output once
    /// the batch is committed.
    pub async fn submit(&self, write: W) -> Result<W::Output, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send((write, reply))
            .map_err(|_| StoreError::Unavailable(format!("{} is saturated", W::NAME)))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable(format!("{} stopped", W::NAME)))?
    }
}

async fn run<W: GroupWrite>(pool: PgPool, writers: usize, mut rx: mpsc::Receiver<(W, Reply<W>)>) {
    let slots = Arc::new(Semaphore::new(writers));
    loop {
        // Take a slot first: while every writer is busy, writes pile up for the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { break };
        let mut batch = Vec::with_capacity(W::MAX_BATCH.min(64));
        batch.push(first);
        while batch.len() < W::MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            write_batch::<W>(&pool, batch).await;
            drop(slot);
        });
    }
    // Let the batches in flight answer their callers before the task ends.
    let _ = slots.acquire_many(writers as u32).await;
}

async fn write_batch<W: GroupWrite>(pool: &PgPool, batch: Vec<(W, Reply<W>)>) {
    let (writes, replies): (Vec<W>, Vec<Reply<W>>) = batch.into_iter().unzip();
    let result = match pool.get().await {
        Ok(mut conn) => W::write(&mut conn, &writes).await,
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(outputs) if outputs.len() == writes.len() => {
            for (reply, output) in replies.into_iter().zip(outputs) {
                let _ = reply.send(Ok(output));
            }
        }
        Ok(outputs) => {
            let message = format!(
                "{}: {} outputs for {} writes",
                W::NAME,
                outputs.len(),
                writes.len()
            );
            tracing::error!("{message}");
            for reply in replies {
                let _ = reply.send(Err(StoreError::Unavailable(message.clone())));
            }
        }
        Err(StoreError::Unavailable(message)) => {
            for reply in replies {
                let _ = reply.send(Err(StoreError::Unavailable(message.clone())));
            }
        }
        Err(e) if writes.len() == 1 => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(e));
            }
        }
        Err(e) => {
            tracing::debug!(writer = W::NAME, error = %e, "batch failed; writing one by one");
            for (write, reply) in writes.iter().zip(replies) {
                let result = match pool.get().await {
                    Ok(mut conn) => W::write(&mut conn, std::slice::from_ref(write))
                        .await
                        .and_then(|mut out| {
                            out.pop().ok_or_else(|| {
                                StoreError::Unavailable(format!("{}: no output", W::NAME))
                            })
                        }),
                    Err(e) => Err(e.into()),
                };
                let _ = reply.send(result);
            }
        }
    }
}
