//! Supervision of background tasks (writers, flushers, listeners, the worker's jobs): a task
//! that fails or panics is logged with its name and either restarted with exponential
//! backoff or, when it owns state that cannot be rebuilt, reported as fatal so the process
//! stops with a non-zero exit. No task dies silently.

use std::{future::Future, time::Duration};

use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

/// First and longest pause between restarts of a failing task.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

/// A task that cannot go on: the process should stop.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("background task {task} failed: {reason}")]
    Fatal { task: &'static str, reason: String },
}

pub struct Supervisor {
    tasks: JoinSet<Result<(), SupervisorError>>,
    stop: CancellationToken,
    fatal: CancellationToken,
}

impl Supervisor {
    /// Tasks are expected to return once `stop` is cancelled.
    pub fn new(stop: CancellationToken) -> Self {
        Self {
            tasks: JoinSet::new(),
            stop,
            fatal: CancellationToken::new(),
        }
    }

    /// Cancelled as soon as a task fails for good (the caller then shuts the process down).
    pub fn fatal(&self) -> CancellationToken {
        self.fatal.clone()
    }

    /// A task that can start over: `make` builds a fresh run each time. An error or a panic
    /// is logged and the task restarted after a backoff that doubles up to `backoff.max`
    /// (and starts over once a run lasted longer than that). `Ok` ends it for good.
    pub fn restartable<F, Fut, E>(&mut self, name: &'static str, backoff: Backoff, mut make: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            let mut delay = backoff.initial;
            loop {
                let started = tokio::time::Instant::now();
                let outcome = tokio::spawn(make()).await;
                let reason = match outcome {
                    Ok(Ok(())) => {
                        if !stop.is_cancelled() {
                            tracing::warn!(task = name, "background task ended before shutdown");
                        }
                        return Ok(());
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => describe(e),
                };
                if stop.is_cancelled() {
                    tracing::error!(task = name, reason = %reason, "background task failed during shutdown");
                    return Ok(());
                }
                if started.elapsed() > backoff.max {
                    delay = backoff.initial;
                }
                tracing::error!(task = name, reason = %reason, restart_in_ms = delay.as_millis() as u64, "background task failed; restarting");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(backoff.max);
            }
        });
    }

    /// A task that owns what it works on (e.g. a channel's receiving end) and so cannot be
    /// restarted: if it fails or panics, the process must stop.
    pub fn once<Fut>(&mut self, name: &'static str, task: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, fatal) = (self.stop.clone(), self.fatal.clone());
        self.tasks.spawn(async move {
            match tokio::spawn(task).await {
                Ok(()) => {
                    if !stop.is_cancelled() {
                        tracing::warn!(task = name, "background task ended before shutdown");
                    }
                    Ok(())
                }
                Err(e) => {
                    let reason = describe(e);
                    tracing::error!(task = name, reason = %reason, "background task failed; stopping the process");
                    fatal.cancel();
                    Err(SupervisorError::Fatal { task: name, reason })
                }
            }
        });
    }

    /// Waits for every task; the first fatal failure, if any.
    pub async fn join(mut self) -> Result<(), SupervisorError> {
        let mut first = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            let result = joined.unwrap_or_else(|e| {
                // The supervising loop itself never panics; a cancelled runtime aborts it.
                Err(SupervisorError::Fatal {
                    task: "supervisor",
                    reason: describe(e),
                })
            });
            if first.is_ok() {
                first = result;
            }
        }
        first
    }
}

/// A panic's message, or why the task was cancelled.
fn describe(e: JoinError) -> String {
    if e.is_panic() {
        let payload = e.into_panic();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string payload".into());
        format!("panicked: {message}")
    } else {
        "cancelled".into()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    const FAST: Backoff = Backoff {
        initial: Duration::from_millis(1),
        max: Duration::from_millis(10),
    };

    #[tokio::test]
    async fn a_task_that_panics_twice_is_restarted_until_it_runs() {
        let stop = CancellationToken::new();
        let mut supervisor = Supervisor::new(stop.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let (running_tx, mut running) = tokio::sync::mpsc::channel(1);
        let (r, s) = (runs.clone(), stop.clone());
        supervisor.restartable("flaky", FAST, move || {
            let (runs, stop, running) = (r.clone(), s.clone(), running_tx.clone());
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
                running.send(()).await.unwrap();
                stop.cancelled().await;
                Ok::<(), std::convert::Infallible>(())
            }
        });
        tokio::time::timeout(Duration::from_secs(5), running.recv())
            .await
            .expect("the third run starts")
            .unwrap();
        assert!(!supervisor.fatal().is_cancelled());
        stop.cancel();
        supervisor.join().await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3, "not restarted after Ok");
    }

    #[tokio::test]
    async fn errors_are_restarted_too() {
        let stop = CancellationToken::new();
        let mut supervisor = Supervisor::new(stop.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        supervisor.restartable("erring", FAST, move || {
            let runs = r.clone();
            async move {
                match runs.fetch_add(1, Ordering::SeqCst) {
                    0..3 => Err("database gone"),
                    _ => Ok(()),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), supervisor.join())
            .await
            .expect("the task ends after its fourth run")
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_panicking_task_that_cannot_restart_is_fatal() {
        let stop = CancellationToken::new();
        let mut supervisor = Supervisor::new(stop.clone());
        let fatal = supervisor.fatal();
        supervisor.once("writer", async { panic!("lost the channel") });
        let s = stop.clone();
        supervisor.once("flusher", async move { s.cancelled().await });
        tokio::time::timeout(Duration::from_secs(5), fatal.cancelled())
            .await
            .expect("the failure is reported");
        stop.cancel();
        let err = supervisor.join().await.unwrap_err();
        let SupervisorError::Fatal { task, reason } = err;
        assert_eq!(task, "writer");
        assert!(reason.contains("lost the channel"), "{reason}");
    }
}
