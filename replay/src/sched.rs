//! The continuous-batching scheduler and its step-time model.

use super::alloc::{Cost, KvAllocator, Preempted};
use super::trace::Request;
use crate::error::{Error, Result};

/// How long one simulated engine step takes. A step runs the prefill of every request admitted
/// in it, one decode token for every running request, and the preemption copies it caused:
///
/// `step_s = base_s + per_seq_s · batch + per_kv_token_s · Σ tokens in batch
///         + prefill_tokens / prefill_tokens_per_s
///         + copy_bytes / copy_bytes_per_s + copy_calls · copy_call_s`
///
/// Copies are charged in full to the step (no overlap with compute), the same way for every
/// allocator, so that a copy pattern made of many small calls shows up as lost time.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct StepModel {
    /// Fixed cost of a decode step (weights read once per step).
    pub base_s: f64,
    /// Cost per sequence in the batch.
    pub per_seq_s: f64,
    /// Attention cost per KV token read.
    pub per_kv_token_s: f64,
    /// Prefill throughput (prompt tokens, and tokens recomputed after a dropped preemption).
    pub prefill_tokens_per_s: f64,
    /// Device↔host copy bandwidth.
    pub copy_bytes_per_s: f64,
    /// Overhead of one copy call.
    pub copy_call_s: f64,
}

impl Default for StepModel {
    /// Roughly an 8B model on one H100-class GPU: 10 ms per decode step plus 0.1 ms per
    /// sequence and 20 ns per KV token read, 10,000 prefill tokens/s, 25 GB/s over PCIe with
    /// 3 µs per copy call.
    fn default() -> Self {
        StepModel {
            base_s: 0.010,
            per_seq_s: 0.000_1,
            per_kv_token_s: 2e-8,
            prefill_tokens_per_s: 10_000.0,
            copy_bytes_per_s: 25e9,
            copy_call_s: 3e-6,
        }
    }
}

impl StepModel {
    fn step_s(&self, batch: usize, kv_tokens: usize, prefill: usize, cost: Cost) -> f64 {
        self.base_s
            + self.per_seq_s * batch as f64
            + self.per_kv_token_s * kv_tokens as f64
            + prefill as f64 / self.prefill_tokens_per_s
            + cost.copy_bytes as f64 / self.copy_bytes_per_s
            + cost.copy_calls as f64 * self.copy_call_s
    }
}

/// Scheduler settings.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct SchedConfig {
    /// Most requests running at once.
    pub max_slots: usize,
    /// Most tokens (prompt + output) of one request; longer requests are cut (see
    /// [`prepare`]).
    pub max_tokens: usize,
    /// Arrival times are divided by this.
    pub speed: f64,
    /// Steps between two fairness checks (0: no fairness preemption).
    pub fair_interval: usize,
    /// A waiting request takes the place of the running request with the lowest priority when
    /// its priority (seconds waited minus seconds run) exceeds that request's by more than this.
    pub fair_quantum_s: f64,
    /// Admission keeps this fraction of the budget free for the running requests' growth.
    pub watermark: f64,
    /// The step-time model.
    pub step: StepModel,
    /// Simulated seconds between two memory samples kept for the plot.
    pub sample_s: f64,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            max_slots: 64,
            max_tokens: 8192,
            speed: 1.0,
            fair_interval: 50,
            fair_quantum_s: 10.0,
            watermark: 0.02,
            step: StepModel::default(),
            sample_s: 0.25,
        }
    }
}

/// A request as the scheduler runs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Job {
    /// Trace id.
    pub id: u64,
    /// Arrival in simulated seconds (trace time / speed).
    pub arrival_s: f64,
    /// Prompt tokens (after truncation).
    pub context: usize,
    /// Tokens to generate (after truncation, at least 1).
    pub output: usize,
    /// Whether the trace asked for more than `max_tokens`.
    pub truncated: bool,
}

/// Turns trace requests into jobs: arrivals divided by `speed`; at least one output token; a
/// request longer than `max_tokens` keeps its output (up to `max_tokens / 2`) and has its prompt
/// cut from the left to fit, as engines that truncate prompts do.
///
/// # Errors
/// [`Error::InvalidConfig`] for a non-positive speed or `max_tokens < 2`.
pub fn prepare(requests: &[Request], max_tokens: usize, speed: f64) -> Result<Vec<Job>> {
    if !(speed.is_finite() && speed > 0.0) {
        return Err(Error::InvalidConfig(format!(
            "speed must be positive, got {speed}"
        )));
    }
    if max_tokens < 2 {
        return Err(Error::InvalidConfig("max_tokens must be at least 2".into()));
    }
    Ok(requests
        .iter()
        .map(|r| {
            let mut output = r.output_tokens.max(1);
            if output > max_tokens / 2 && r.context_tokens.saturating_add(output) > max_tokens {
                output = max_tokens / 2;
            }
            let context = r.context_tokens.max(1).min(max_tokens - output);
            Job {
                id: r.id,
                arrival_s: r.arrival_s / speed,
                context,
                output,
                truncated: context != r.context_tokens.max(1) || output != r.output_tokens.max(1),
            }
        })
        .collect())
}

/// One memory sample.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Simulated seconds.
    pub t: f64,
    /// Bytes of live tokens.
    pub live_bytes: u64,
    /// Bytes held (mapped or reserved) for running requests.
    pub held_bytes: u64,
    /// Running requests.
    pub batch: usize,
}

/// What one allocator did over a replay.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RunResult {
    /// Allocator name.
    pub allocator: String,
    /// How it preempts.
    pub preemption: String,
    /// Time-averaged live bytes over time-averaged held bytes.
    pub utilization: f64,
    /// Most requests running in one step.
    pub peak_batch: usize,
    /// Running requests per step, averaged over steps.
    pub mean_batch: f64,
    /// Preemptions (memory pressure and fairness).
    pub preemptions: u64,
    /// Of which for fairness.
    pub fairness_preemptions: u64,
    /// Preemptions whose KV was dropped and recomputed.
    pub recomputes: u64,
    /// Bytes copied by preemption, both directions.
    pub swapped_bytes: u64,
    /// Bytes swap-outs did not copy thanks to KV reuse.
    pub reuse_saved_bytes: u64,
    /// Backend calls.
    pub backend_calls: u64,
    /// Copy calls made by preemption.
    pub copy_calls: u64,
    /// Wall-clock seconds of this allocator's replay.
    pub wall_s: f64,
    /// Tokens whose KV did not read back as written.
    pub integrity_errors: u64,
    /// Requests finished.
    pub finished: usize,
    /// Engine steps.
    pub steps: u64,
    /// Simulated seconds until the last request finished.
    pub sim_s: f64,
    /// Mean seconds from arrival to finish.
    pub mean_latency_s: f64,
    /// Peak bytes held.
    pub peak_held_bytes: u64,
    /// Memory over time (not in the JSON output).
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Future,
    Queued,
    Running,
    Preempted(Preempted),
    Done,
}

#[derive(Clone, Copy, Debug)]
struct Live {
    tokens: usize,
    generated: usize,
    /// Seconds spent waiting (queued or preempted) in finished waiting spells.
    waited: f64,
    /// Seconds spent running in finished running spells.
    ran: f64,
    /// Start of the current waiting spell.
    queued_since: f64,
    /// Start of the current running spell.
    running_since: f64,
    state: State,
}

/// Replays `jobs` (in arrival order) through `alloc`; `progress` is called with the number of
/// finished requests after every step that finished some.
///
/// Continuous batching: each step admits waiting requests in priority order while the batch has
/// a free slot and the allocator keeps a `watermark` of its budget free (prefill of new requests,
/// swap-in of preempted ones), then grows every running request by one token. When that growth
/// does not fit, the running request with the lowest priority is preempted and the growth is
/// retried. A request's priority is the time it has spent waiting (queued or preempted) minus
/// the time it has run, so waiting raises it and running lowers it, and a preempted request
/// comes back before newer ones; every `fair_interval` steps, a waiting request whose priority
/// exceeds the lowest running one's by `fair_quantum_s` takes its place (FastSwitch-style
/// fairness: a long request is swapped out and in again, and its host copy is reused). No new request is admitted in the step after a memory preemption.
///
/// # Errors
/// The allocator's errors; [`Error::InvalidConfig`] if a request cannot run even alone.
pub fn simulate(
    alloc: &mut dyn KvAllocator,
    jobs: &[Job],
    config: &SchedConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<RunResult> {
    let started = std::time::Instant::now();
    let n = jobs.len();
    let mut live: Vec<Live> = jobs
        .iter()
        .map(|j| Live {
            tokens: 0,
            generated: 0,
            waited: 0.0,
            ran: 0.0,
            queued_since: j.arrival_s,
            running_since: 0.0,
            state: State::Future,
        })
        .collect();
    let budget = alloc.free_bytes();
    let watermark = if alloc.grows() {
        (budget as f64 * config.watermark) as u64
    } else {
        0
    };
    let mut now = 0.0f64;
    let mut next = 0usize;
    let mut queue: Vec<usize> = Vec::new();
    let mut running: Vec<usize> = Vec::new();
    let mut done = 0usize;
    let mut steps = 0u64;
    let (mut area_live, mut area_held) = (0.0f64, 0.0f64);
    let mut batch_sum = 0u64;
    let mut peak_batch = 0;
    let mut peak_held = 0;
    let (mut preemptions, mut fair_preemptions, mut recomputes) = (0u64, 0u64, 0u64);
    let mut latency_sum = 0.0;
    let mut samples: Vec<Sample> = Vec::new();
    let mut last_sample = f64::NEG_INFINITY;
    let mut pressure = false;
    // Priority: seconds waited minus seconds run (virtual-time fairness): waiting raises it,
    // running lowers it.
    let prio = |l: &Live, now: f64| match l.state {
        State::Queued | State::Preempted(_) => l.waited + (now - l.queued_since) - l.ran,
        State::Running => l.waited - l.ran - (now - l.running_since),
        _ => l.waited - l.ran,
    };

    while done < n {
        while next < n && jobs[next].arrival_s <= now {
            live[next].state = State::Queued;
            queue.push(next);
            next += 1;
        }
        if running.is_empty() && queue.is_empty() {
            now = jobs[next].arrival_s;
            continue;
        }
        let mut cost = Cost::default();
        let mut prefill = 0usize;

        // Lowest priority first, then latest arrival.
        let victim = |running: &[usize], live: &[Live], now: f64| -> Option<usize> {
            running
                .iter()
                .enumerate()
                .min_by(|(_, &a), (_, &b)| {
                    prio(&live[a], now)
                        .total_cmp(&prio(&live[b], now))
                        .then(b.cmp(&a))
                })
                .map(|(k, _)| k)
        };
        // Fairness: the longest-waiting request may take the place of the lowest-priority one.
        if config.fair_interval > 0
            && steps % config.fair_interval as u64 == 0
            && !running.is_empty()
        {
            let best = queue
                .iter()
                .map(|&i| prio(&live[i], now))
                .fold(f64::NEG_INFINITY, f64::max);
            if let Some(k) = victim(&running, &live, now) {
                if best > prio(&live[running[k]], now) + config.fair_quantum_s {
                    let how = preempt(
                        alloc,
                        jobs,
                        k,
                        &mut running,
                        &mut queue,
                        &mut live,
                        &mut cost,
                        now,
                    )?;
                    preemptions += 1;
                    recomputes += u64::from(how == Preempted::Dropped);
                    fair_preemptions += 1;
                }
            }
        }

        // Admission in priority order (highest first, then earliest arrival).
        queue.sort_by(|&a, &b| {
            prio(&live[b], now)
                .total_cmp(&prio(&live[a], now))
                .then(a.cmp(&b))
        });
        let mut admitted = 0;
        while admitted < queue.len() && running.len() < config.max_slots {
            let i = queue[admitted];
            let fresh = live[i].state == State::Queued;
            if fresh && pressure {
                break;
            }
            let tokens = if fresh {
                jobs[i].context
            } else {
                live[i].tokens
            };
            if alloc.free_bytes() < alloc.bytes_for(tokens + 1).saturating_add(watermark) {
                break;
            }
            let ok = match live[i].state {
                State::Queued => {
                    let ok = alloc.admit(jobs[i].id, tokens)?;
                    if ok {
                        prefill += tokens;
                    }
                    ok
                }
                State::Preempted(how) => match alloc.resume(jobs[i].id, tokens)? {
                    Some(c) => {
                        cost.copy_bytes += c.copy_bytes;
                        cost.copy_calls += c.copy_calls;
                        if how == Preempted::Dropped {
                            prefill += tokens;
                        }
                        true
                    }
                    None => false,
                },
                _ => false,
            };
            if !ok {
                break;
            }
            let l = &mut live[i];
            l.waited += now - l.queued_since;
            l.running_since = now;
            l.tokens = tokens;
            l.state = State::Running;
            running.push(i);
            admitted += 1;
        }
        queue.drain(..admitted);
        if running.is_empty() {
            // Nothing could be admitted although nothing runs: the head request cannot fit.
            let Some(&i) = queue.first() else {
                return Err(Error::InvalidConfig(format!(
                    "{}: nothing runs and nothing waits",
                    alloc.name()
                )));
            };
            return Err(Error::InvalidConfig(format!(
                "request {} ({} tokens) does not fit the budget of {} even alone",
                jobs[i].id,
                jobs[i].context + jobs[i].output,
                alloc.name()
            )));
        }

        // Decode: every running request grows by one token; preempt until it fits.
        pressure = false;
        loop {
            let batch: Vec<(u64, usize)> = running
                .iter()
                .map(|&i| (jobs[i].id, live[i].tokens + 1))
                .collect();
            if alloc.grow(&batch)? {
                break;
            }
            if running.len() == 1 {
                let i = running[0];
                return Err(Error::InvalidConfig(format!(
                    "request {} cannot grow to {} tokens even alone in {}",
                    jobs[i].id,
                    live[i].tokens + 1,
                    alloc.name()
                )));
            }
            pressure = true;
            if let Some(k) = victim(&running, &live, now) {
                let how = preempt(
                    alloc,
                    jobs,
                    k,
                    &mut running,
                    &mut queue,
                    &mut live,
                    &mut cost,
                    now,
                )?;
                preemptions += 1;
                recomputes += u64::from(how == Preempted::Dropped);
            }
        }
        let batch = running.len();
        let kv_tokens: usize = running.iter().map(|&i| live[i].tokens + 1).sum();
        let dt = config.step.step_s(batch, kv_tokens, prefill, cost);
        let usage = alloc.usage();
        area_live += usage.live_bytes as f64 * dt;
        area_held += usage.held_bytes as f64 * dt;
        peak_held = peak_held.max(usage.held_bytes);
        batch_sum += batch as u64;
        peak_batch = peak_batch.max(batch);
        if now - last_sample >= config.sample_s {
            samples.push(Sample {
                t: now,
                live_bytes: usage.live_bytes,
                held_bytes: usage.held_bytes,
                batch,
            });
            last_sample = now;
        }
        now += dt;
        steps += 1;

        let before = done;
        let mut k = 0;
        while k < running.len() {
            let i = running[k];
            live[i].tokens += 1;
            live[i].generated += 1;
            if live[i].generated >= jobs[i].output {
                alloc.finish(jobs[i].id)?;
                live[i].state = State::Done;
                latency_sum += now - jobs[i].arrival_s;
                running.swap_remove(k);
                done += 1;
            } else {
                k += 1;
            }
        }
        if done != before {
            progress(done);
        }
    }
    let usage = alloc.usage();
    samples.push(Sample {
        t: now,
        live_bytes: usage.live_bytes,
        held_bytes: usage.held_bytes,
        batch: 0,
    });
    let c = alloc.counters();
    Ok(RunResult {
        allocator: alloc.name(),
        preemption: alloc.preemption().to_string(),
        utilization: if area_held > 0.0 {
            area_live / area_held
        } else {
            0.0
        },
        peak_batch,
        mean_batch: if steps > 0 {
            batch_sum as f64 / steps as f64
        } else {
            0.0
        },
        preemptions,
        fairness_preemptions: fair_preemptions,
        recomputes,
        swapped_bytes: c.swapped_bytes,
        reuse_saved_bytes: c.reuse_saved_bytes,
        backend_calls: c.backend_calls,
        copy_calls: c.copy_calls,
        wall_s: started.elapsed().as_secs_f64(),
        integrity_errors: c.integrity_errors,
        finished: done,
        steps,
        sim_s: now,
        mean_latency_s: if n > 0 { latency_sum / n as f64 } else { 0.0 },
        peak_held_bytes: peak_held,
        samples,
    })
}

/// Preempts `running[k]` and queues it.
#[allow(clippy::too_many_arguments)]
fn preempt(
    alloc: &mut dyn KvAllocator,
    jobs: &[Job],
    k: usize,
    running: &mut Vec<usize>,
    queue: &mut Vec<usize>,
    live: &mut [Live],
    cost: &mut Cost,
    now: f64,
) -> Result<Preempted> {
    let i = running.swap_remove(k);
    let (how, c) = alloc.preempt(jobs[i].id)?;
    cost.copy_bytes += c.copy_bytes;
    cost.copy_calls += c.copy_calls;
    live[i].state = State::Preempted(how);
    live[i].queued_since = now;
    live[i].ran += now - live[i].running_since;
    queue.push(i);
    Ok(how)
}
