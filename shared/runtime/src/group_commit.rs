//! The collector behind group commit: mutations queue up, and each free worker takes every one
//! waiting (up to a maximum) and runs them as one batch, typically one database transaction
//! whose commit answers them all. Under load the batches grow with the queue; at low load a
//! lone mutation is a batch of one and waits for nobody.
//!
//! This only schedules work inside one process: what a batch may do, and that it stays correct
//! beside other replicas' batches, is the caller's (row locks and unique keys in the database).

use std::{collections::HashSet, fmt::Display, future::Future, sync::Arc};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::metrics::Metrics;

/// What became of a mutation handed to group commit.
pub enum Batched<T> {
    /// Answered in a committed batch (or refused there, or its first answer replayed).
    Done(T),
    /// Not taken by a batch: the caller runs it alone.
    Alone,
}

/// Splits off the later jobs whose idempotency key is already in the batch: they run alone
/// after it, and replay (or resume) what the first one did, as a concurrent retry would.
pub fn twins<J>(jobs: Vec<J>, key: impl Fn(&J) -> &str) -> (Vec<J>, Vec<J>) {
    let mut seen = HashSet::new();
    jobs.into_iter()
        .partition(|j| seen.insert(key(j).to_string()))
}

/// Answers a batch's jobs through `reply`, counting them in the `group_commit_*` metrics: each
/// job its answer when the batch committed (`done` holds one per job, in order), every job
/// `Alone` when it failed (nothing of it committed), and the twins `Alone` either way.
pub fn deliver<J, T, E: Display>(
    metrics: &Metrics,
    jobs: Vec<J>,
    twins: Vec<J>,
    done: Result<Vec<Batched<T>>, E>,
    reply: impl Fn(J, Batched<T>),
) {
    match done {
        Ok(answers) => {
            metrics.group_commit_batches.inc();
            for (job, answer) in jobs.into_iter().zip(answers) {
                match answer {
                    Batched::Done(_) => metrics.group_commit_mutations.inc(),
                    Batched::Alone => metrics.group_commit_alone.inc(),
                };
                reply(job, answer);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, mutations = jobs.len(), "group commit failed; each mutation runs alone");
            for job in jobs {
                metrics.group_commit_alone.inc();
                reply(job, Batched::Alone);
            }
        }
    }
    for job in twins {
        metrics.group_commit_alone.inc();
        reply(job, Batched::Alone);
    }
}

/// Starts a collector on the current runtime and returns its queue. `run` gets each batch, in
/// arrival order, on a task of its own; at most `workers` batches run at once. The collector
/// ends when every sender of the queue is dropped.
pub fn spawn<J, F, Fut>(max_batch: usize, workers: usize, run: F) -> mpsc::Sender<J>
where
    J: Send + 'static,
    F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let max_batch = max_batch.max(1);
    let (queue, mut rx) = mpsc::channel::<J>(max_batch * 4);
    let workers = Arc::new(Semaphore::new(workers.max(1)));
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            // Wait for a free worker before draining the queue, so the batch holds everything
            // that arrived while all workers were busy.
            let Ok(permit) = workers.clone().acquire_owned().await else {
                break;
            };
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let work = run(batch);
            tokio::spawn(async move {
                work.await;
                drop(permit);
            });
        }
    });
    queue
}

/// Several collectors of one worker each, a job going to the one its key picks: the mutations of
/// one hot row (a reseller's wallet) all meet in one queue and make big batches, instead of
/// small ones on several workers that queue on the row's lock one behind another, while
/// mutations of different rows still run side by side.
pub struct Shards<J> {
    queues: Vec<mpsc::Sender<J>>,
}

impl<J> Clone for Shards<J> {
    fn clone(&self) -> Self {
        Self {
            queues: self.queues.clone(),
        }
    }
}

impl<J: Send + 'static> Shards<J> {
    /// Starts `shards` collectors (at least one), each with one worker running `run`.
    pub fn spawn<F, Fut>(shards: usize, max_batch: usize, run: F) -> Self
    where
        F: Fn(Vec<J>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self {
            queues: (0..shards.max(1))
                .map(|_| spawn(max_batch, 1, run.clone()))
                .collect(),
        }
    }

    /// The queue of `key` (FNV-1a of its bytes: stable, and spread well enough).
    pub fn queue(&self, key: &str) -> &mpsc::Sender<J> {
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let n = self.queues.len() as u64;
        // `n` is at least 1 and the remainder is below it, so it fits and indexes.
        &self.queues[usize::try_from(hash % n).unwrap_or(0)]
    }
}

/// Queues `job` (built around a reply channel by `make`) and waits for its answer; `None` when
/// the collector is gone or dropped the job unanswered (shutdown): the caller then does the
/// work alone.
pub async fn submit<J, A>(
    queue: &mpsc::Sender<J>,
    make: impl FnOnce(oneshot::Sender<A>) -> J,
) -> Option<A> {
    let (reply, answer) = oneshot::channel();
    queue.send(make(reply)).await.ok()?;
    answer.await.ok()
}
