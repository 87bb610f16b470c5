//! The load loop: N tokio tasks, each calling one operation in a loop until the time is up (or
//! a call budget is spent), recording every call's latency and outcome.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use tonic::{Code, Status};

/// One RPC: how long it took and how it ended.
pub struct Call {
    pub rpc: &'static str,
    pub micros: u32,
    pub code: Code,
}

/// Times one RPC.
pub async fn timed<T>(
    rpc: &'static str,
    fut: impl Future<Output = Result<T, Status>>,
) -> (Call, Option<T>) {
    let start = Instant::now();
    let result = fut.await;
    let micros = u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX);
    match result {
        Ok(v) => (
            Call {
                rpc,
                micros,
                code: Code::Ok,
            },
            Some(v),
        ),
        Err(s) => (
            Call {
                rpc,
                micros,
                code: s.code(),
            },
            None,
        ),
    }
}

/// What one step of a task returns: the RPCs it made (one, or reserve + capture).
pub type Step = Pin<Box<dyn Future<Output = Vec<Call>> + Send>>;
/// One step of task `task`, its `seq`-th.
pub type Operation = Arc<dyn Fn(usize, u64) -> Step + Send + Sync>;

/// Everything one timed run saw.
#[derive(Default)]
pub struct Tally {
    /// Latency of every call, in microseconds (sorted by [`Tally::finish`]).
    pub micros: Vec<u32>,
    pub ok: u64,
    /// Failed calls by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// Calls whose effect the client cannot know (deadline, unavailable, cancelled, unknown,
    /// internal): they may or may not have committed.
    pub uncertain: u64,
    /// Per RPC name: (successful, uncertain) calls, for the correctness check.
    pub by_rpc: BTreeMap<&'static str, (u64, u64)>,
    /// From the first call to the last answer.
    pub elapsed: Duration,
    pub tasks: usize,
}

impl Tally {
    /// Per RPC name: successful and uncertain calls of this run and `other` together.
    pub fn counts_with(&self, other: Option<&Tally>) -> BTreeMap<&'static str, (u64, u64)> {
        let mut out = self.by_rpc.clone();
        for (k, (ok, unsure)) in other.map(|o| o.by_rpc.clone()).unwrap_or_default() {
            let e = out.entry(k).or_default();
            e.0 += ok;
            e.1 += unsure;
        }
        out
    }

    fn absorb(&mut self, other: Tally) {
        self.micros.extend(other.micros);
        self.ok += other.ok;
        self.uncertain += other.uncertain;
        for (k, (ok, unsure)) in other.by_rpc {
            let e = self.by_rpc.entry(k).or_default();
            e.0 += ok;
            e.1 += unsure;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    fn take(&mut self, step: Result<Vec<Call>, tokio::task::JoinError>) {
        match step {
            Ok(calls) => calls.iter().for_each(|c| self.record(c)),
            Err(e) => *self.errors.entry(format!("task failed: {e}")).or_default() += 1,
        }
    }

    fn record(&mut self, call: &Call) {
        self.micros.push(call.micros);
        let per_rpc = self.by_rpc.entry(call.rpc).or_default();
        if call.code == Code::Ok {
            self.ok += 1;
            per_rpc.0 += 1;
        } else {
            *self.errors.entry(format!("{:?}", call.code)).or_default() += 1;
            if matches!(
                call.code,
                Code::DeadlineExceeded
                    | Code::Unavailable
                    | Code::Cancelled
                    | Code::Unknown
                    | Code::Internal
            ) {
                self.uncertain += 1;
                per_rpc.1 += 1;
            }
        }
    }

    pub fn calls(&self) -> u64 {
        self.micros.len() as u64
    }

    /// Successful calls per second of wall time.
    pub fn throughput(&self) -> u64 {
        let micros = self.elapsed.as_micros().max(1);
        u64::try_from(u128::from(self.ok) * 1_000_000 / micros).unwrap_or(u64::MAX)
    }

    /// The `p`-th per-mille latency in microseconds (500 = median, 990 = p99, 1000 = max).
    pub fn permille(&self, p: usize) -> u32 {
        if self.micros.is_empty() {
            return 0;
        }
        let idx = ((self.micros.len() - 1) * p.min(1000)).div_ceil(1000);
        self.micros[idx]
    }

    fn finish(&mut self) {
        self.micros.sort_unstable();
    }
}

/// Runs `op` from `tasks` concurrent tasks for `duration`, each task at most `max_steps`
/// times. A step that outlives the run by 30 s is abandoned (its calls carry 10 s deadlines,
/// so this only bounds a wedged server).
pub async fn drive(tasks: usize, duration: Duration, max_steps: u64, op: Operation) -> Tally {
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let op = op.clone();
        set.spawn(async move {
            let mut tally = Tally::default();
            let mut seq = 0;
            while seq < max_steps && Instant::now() < deadline {
                for call in op(task, seq).await {
                    tally.record(&call);
                }
                seq += 1;
            }
            tally
        });
    }
    let mut total = Tally {
        tasks,
        ..Tally::default()
    };
    let hard_stop = tokio::time::sleep_until((deadline + Duration::from_secs(30)).into());
    tokio::pin!(hard_stop);
    loop {
        tokio::select! {
            joined = set.join_next() => match joined {
                Some(Ok(t)) => total.absorb(t),
                Some(Err(e)) => {
                    *total.errors.entry(format!("task failed: {e}")).or_default() += 1;
                }
                None => break,
            },
            _ = &mut hard_stop => {
                let left = set.len();
                set.abort_all();
                *total.errors.entry("abandoned tasks".into()).or_default() += left as u64;
                break;
            }
        }
    }
    total.elapsed = start.elapsed();
    total.finish();
    total
}

/// Open-loop load at a chosen rate: starts `rate` steps per second for `duration`, whether or
/// not the earlier ones have answered, so the latencies are those a client sees at that offered
/// rate (a closed loop of N callers would slow down with the server and hide its queueing).
/// Steps are numbered from task `first_task` on, 64 tasks round robin, so their keys differ from
/// every other run's. At most `max_in_flight` steps run at once; a step due beyond that is not
/// started and counted as the error "not started: too many in flight".
pub async fn pace(
    rate: u64,
    duration: Duration,
    first_task: usize,
    max_in_flight: usize,
    op: Operation,
) -> Tally {
    const LANES: u64 = 64;
    let start = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let mut set = tokio::task::JoinSet::new();
    let mut total = Tally::default();
    let mut started: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while start.elapsed() < duration {
        tick.tick().await;
        // Integer arithmetic: steps due by now at `rate` per second.
        let due = u64::try_from(start.elapsed().as_micros().min(duration.as_micros()))
            .unwrap_or(u64::MAX)
            .saturating_mul(rate)
            / 1_000_000;
        while started < due {
            let (task, seq) = (first_task + (started % LANES) as usize, started / LANES);
            started += 1;
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                *total
                    .errors
                    .entry("not started: too many in flight".into())
                    .or_default() += 1;
                continue;
            };
            let step = op(task, seq);
            set.spawn(async move {
                let calls = step.await;
                drop(slot);
                calls
            });
        }
        while let Some(joined) = set.try_join_next() {
            total.take(joined);
        }
    }
    while let Some(joined) = set.join_next().await {
        total.take(joined);
    }
    total.tasks = max_in_flight;
    total.elapsed = start.elapsed();
    total.finish();
    total
}

/// A well-mixed number below `n` from a task and step number (splitmix64), so the tasks spread
/// over the wallets without a shared generator or an extra dependency.
pub fn pick(task: usize, seq: u64, n: u64) -> u64 {
    let mut z = (task as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(seq)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) % n.max(1)
}

/// Runs `f` over `items` with at most `concurrency` at once; the first error wins.
pub async fn parallel<I, F, Fut>(items: I, concurrency: usize, f: F) -> anyhow::Result<()>
where
    I: IntoIterator,
    F: Fn(I::Item) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    use futures::StreamExt;
    let mut results = futures::stream::iter(items.into_iter().map(f)).buffer_unordered(concurrency);
    while let Some(r) = results.next().await {
        r?;
    }
    Ok(())
}
