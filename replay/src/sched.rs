//! The continuous-batching scheduler on a simulated clock, with the overlap model of
//! [`crate::timing`] and the step-time model of [`crate::profile`].

use std::sync::Arc;

use crate::error::{Error, Result};

use crate::alloc::{KvAllocator, Outcome, Preempted};
pub use crate::profile::StepModel;
use crate::timing::{CopyEngines, Dir, Transfer, VmmCounters};
use crate::trace::Request;

/// Scheduler settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
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

impl SchedConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero batch, a non-finite or negative fairness quantum, or
    /// a watermark outside `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        if self.max_slots == 0 {
            return Err(Error::InvalidConfig("max_slots must be positive".into()));
        }
        if !(self.fair_quantum_s.is_finite() && self.fair_quantum_s >= 0.0) {
            return Err(Error::InvalidConfig(format!(
                "the fairness quantum must be a finite number of seconds >= 0, got {}",
                self.fair_quantum_s
            )));
        }
        if !(self.watermark.is_finite() && (0.0..1.0).contains(&self.watermark)) {
            return Err(Error::InvalidConfig(format!(
                "the watermark must be in [0, 1), got {}",
                self.watermark
            )));
        }
        if !(self.sample_s.is_finite() && self.sample_s > 0.0) {
            return Err(Error::InvalidConfig("sample_s must be positive".into()));
        }
        Ok(())
    }
}

/// A request as the scheduler runs it.
#[derive(Clone, Debug, PartialEq)]
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
    /// Prefix-block hashes of the prompt (Mooncake, 512 tokens each; empty for Azure and for a
    /// prompt cut from the left, whose blocks no longer line up).
    pub hash_ids: Arc<[u64]>,
}

impl Job {
    /// A job of `context` prompt and `output` generated tokens arriving at `arrival_s`, with
    /// no shared prefix.
    pub fn new(id: u64, arrival_s: f64, context: usize, output: usize) -> Job {
        Job {
            id,
            arrival_s,
            context,
            output,
            truncated: false,
            hash_ids: Arc::from(Vec::new()),
        }
    }
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
            let cut = context != r.context_tokens.max(1);
            Job {
                id: r.id,
                arrival_s: r.arrival_s / speed,
                context,
                output,
                truncated: cut || output != r.output_tokens.max(1),
                hash_ids: if cut {
                    Arc::from(Vec::new())
                } else {
                    Arc::from(r.hash_ids.as_slice())
                },
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

/// Nearest-rank percentiles of a set of durations, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Values.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// The value at quantile `q` of `sorted` (ascending) by the nearest-rank method: the smallest
/// value with at least `q · n` values at or below it. 0 for an empty set.
pub fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Percentiles {
    /// The percentiles of `values` (sorted in place).
    pub fn of(values: &mut [f64]) -> Percentiles {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        Percentiles {
            count: n,
            p50: nearest_rank(values, 0.50),
            p90: nearest_rank(values, 0.90),
            p99: nearest_rank(values, 0.99),
            max: values.last().copied().unwrap_or(0.0),
            mean: if n > 0 {
                values.iter().sum::<f64>() / n as f64
            } else {
                0.0
            },
        }
    }
}

/// What one allocator did over a replay.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RunResult {
    /// Allocator name.
    pub allocator: String,
    /// `real` (the kvvm cache and swap engine, real memory) or `model` (bookkeeping).
    pub kind: &'static str,
    /// How it preempts.
    pub preemption: String,
    /// Time to first token: arrival to the end of the step that produced the first token.
    pub ttft: Percentiles,
    /// Time between tokens: every gap between two consecutive tokens of a request, stalls of
    /// preemption and resume included.
    pub tbt: Percentiles,
    /// Arrival to last token.
    pub e2e: Percentiles,
    /// Generated tokens per simulated second (all tokens over `sim_s`).
    pub throughput_tokens_per_s: f64,
    /// Seconds from the last token before a preemption to the first token after it, summed
    /// over preemptions.
    pub preempt_stall_s: f64,
    /// Seconds steps spent on copies before computing: submission on the step's thread, and
    /// waiting for synchronous copies, for swap-outs whose memory the step needed and for the
    /// swap-ins of the requests it resumed.
    pub copy_wait_s: f64,
    /// Seconds of VMM calls on the step (inline mapping, or background work that fell behind).
    pub vmm_step_s: f64,
    /// Seconds of VMM calls on background threads.
    pub vmm_background_s: f64,
    /// Seconds the device-to-host and host-to-device copy engines were busy.
    pub copy_engine_s: (f64, f64),
    /// Prompt tokens found cached at admission (prefix cache; not prefilled).
    pub cached_prompt_tokens: u64,
    /// Tokens prefilled again after a preemption (recompute).
    pub recomputed_tokens: u64,
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
    /// Bytes copied by preemption and offload, both directions.
    pub swapped_bytes: u64,
    /// Bytes swap-outs did not copy thanks to KV reuse.
    pub reuse_saved_bytes: u64,
    /// Backend calls.
    pub backend_calls: u64,
    /// Copy calls (descriptors) made by preemption and offload.
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
    /// Every TTFT, sorted (for the plot; not in the JSON output).
    #[serde(skip)]
    pub ttft_samples: Vec<f64>,
    /// Every TBT gap, sorted (for the plot; not in the JSON output).
    #[serde(skip)]
    pub tbt_samples: Vec<f64>,
    /// For every job (in job order), the times its tokens were produced (not in the JSON
    /// output).
    #[serde(skip)]
    pub token_times: Vec<Vec<f64>>,
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
    /// When its KV is in place (asynchronous copies, memory freed by swap-outs).
    ready_at: f64,
    /// The first scheduler iteration whose step it is in (a request waiting for an
    /// asynchronous copy joins the step after the one that admitted it).
    joins_at: u64,
    /// Tokens to prefill in the next step it is in.
    prefill: usize,
    last_token: Option<f64>,
    /// Time of the last token before the current preemption, until the next token.
    stalled_since: Option<f64>,
}

/// Where a step's time goes, accumulated while the step is set up.
#[derive(Clone, Copy, Debug)]
struct StepClock {
    /// CPU seconds on the critical path before the step can launch.
    cpu_s: f64,
    /// The step computes no earlier than this (synchronous copies, memory it needs).
    wait_until: f64,
    /// Memory freed by this step's swap-outs is usable from then on.
    mem_ready: f64,
}

struct Engine<'a> {
    m: &'a StepModel,
    copies: CopyEngines,
}

impl Engine<'_> {
    /// Issues `ts` at `now` (a host-to-device copy no earlier than the memory it fills is
    /// free); returns when the data of the asynchronous host-to-device ones is in place.
    fn issue(&mut self, ts: &[Transfer], now: f64, clock: &mut StepClock) -> f64 {
        let mut ready = now;
        for t in ts {
            // Synchronous copies run one after the other on the compute stream before the
            // step; an asynchronous swap-in starts once the memory it fills is free.
            let at = match (t.dir, t.sync) {
                (_, true) => clock.wait_until.max(now),
                (Dir::ToHost, false) => now,
                (Dir::ToDevice, false) => now.max(clock.mem_ready),
            };
            let end = self.copies.issue(t, at, self.m);
            if t.submit_on_step {
                clock.cpu_s += t.submit_s(self.m);
            }
            match (t.dir, t.sync) {
                (_, true) => clock.wait_until = clock.wait_until.max(end),
                (Dir::ToHost, false) => clock.mem_ready = clock.mem_ready.max(end),
                (Dir::ToDevice, false) => ready = ready.max(end),
            }
        }
        ready
    }
}

/// Replays `jobs` (in arrival order) through `alloc`; `progress` is called with the number of
/// finished requests after every step that finished some.
///
/// Continuous batching: each step admits waiting requests in priority order while the batch has
/// a free slot and the allocator keeps a `watermark` of its budget free (prefill of new requests,
/// swap-in or recompute of preempted ones), then grows every running request whose KV is in
/// place by one token. When that growth does not fit, the running request with the lowest
/// priority is preempted and the growth is retried. A request's priority is the time it has
/// spent waiting (queued or preempted) minus the time it has run; every `fair_interval` steps, a
/// waiting request whose priority exceeds the lowest running one's by `fair_quantum_s` takes its
/// place (FastSwitch-style fairness). No new request is admitted in the step after a memory
/// preemption.
///
/// Time: `docs/replay.md` describes the model. A step starts when its CPU work (copy
/// submission on the critical path, VMM calls made inline) is done, its synchronous copies have
/// ended, the memory it needs (freed by swap-outs) is free and earlier background VMM work has
/// caught up; it then takes [`StepModel::step_s`]. A request joins the batch once its
/// asynchronous copies have ended.
///
/// # Errors
/// The allocator's errors; [`Error::InvalidConfig`] if a request cannot run even alone.
pub fn simulate(
    alloc: &mut dyn KvAllocator,
    jobs: &[Job],
    config: &SchedConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<RunResult> {
    config.validate()?;
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
            ready_at: 0.0,
            joins_at: 0,
            prefill: 0,
            last_token: None,
            stalled_since: None,
        })
        .collect();
    let budget = alloc.free_bytes();
    let watermark = if alloc.grows() {
        (budget as f64 * config.watermark) as u64
    } else {
        0
    };
    let m = &config.step;
    let mut engine = Engine {
        m,
        copies: CopyEngines::default(),
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
    let (mut ttft, mut tbt, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    let mut generated_total = 0u64;
    let (mut stall_s, mut copy_wait_s, mut vmm_step_s, mut vmm_bg_s) = (0.0, 0.0, 0.0, 0.0);
    let (mut cached_prompt, mut recomputed) = (0u64, 0u64);
    let mut vmm_seen = VmmCounters::default();
    let mut background_free = 0.0f64;
    // CPU work of the previous step's end (offload submission) that delays this step.
    let mut carried_cpu = 0.0f64;
    let mut tokens_at: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut iteration = 0u64;
    // Priority: seconds waited minus seconds run (virtual-time fairness): waiting raises it,
    // running lowers it.
    let prio = |l: &Live, now: f64| match l.state {
        State::Queued | State::Preempted(_) => l.waited + (now - l.queued_since) - l.ran,
        State::Running => l.waited - l.ran - (now - l.running_since),
        _ => l.waited - l.ran,
    };

    while done < n {
        iteration += 1;
        while next < n && jobs[next].arrival_s <= now {
            live[next].state = State::Queued;
            queue.push(next);
            next += 1;
        }
        if running.is_empty() && queue.is_empty() {
            now = jobs[next].arrival_s;
            continue;
        }
        let mut clock = StepClock {
            cpu_s: std::mem::take(&mut carried_cpu),
            wait_until: now,
            mem_ready: now,
        };

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
                    let (how, out) =
                        preempt(alloc, jobs, k, &mut running, &mut queue, &mut live, now)?;
                    engine.issue(&out.transfers, now, &mut clock);
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
            let out: Option<Outcome> = match live[i].state {
                State::Queued => alloc.admit(&jobs[i], tokens)?,
                State::Preempted(_) => alloc.resume(&jobs[i], tokens)?,
                _ => None,
            };
            let Some(out) = out else { break };
            let cached = out.cached_tokens.min(tokens);
            if fresh {
                cached_prompt += cached as u64;
            } else {
                recomputed += (tokens - cached) as u64;
            }
            let ready = engine.issue(&out.transfers, now, &mut clock);
            let l = &mut live[i];
            l.waited += now - l.queued_since;
            l.running_since = now;
            l.tokens = tokens;
            l.prefill = tokens - cached;
            // A request admitted into memory a swap-out of this step frees waits for it; one
            // waiting for a copy joins the next step, which waits for the copy if it has not
            // ended by then.
            l.ready_at = ready.max(clock.mem_ready);
            l.joins_at = if l.ready_at > now {
                iteration + 1
            } else {
                iteration
            };
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

        // The batch: running requests not waiting for a copy started in this iteration.
        pressure = false;
        let mut batch: Vec<usize>;
        loop {
            batch = running
                .iter()
                .copied()
                .filter(|&i| live[i].joins_at <= iteration)
                .collect();
            if batch.is_empty() {
                break;
            }
            let grow: Vec<(u64, usize)> = batch
                .iter()
                .map(|&i| (jobs[i].id, live[i].tokens + 1))
                .collect();
            if alloc.grow(&grow)? {
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
                let (how, out) = preempt(alloc, jobs, k, &mut running, &mut queue, &mut live, now)?;
                engine.issue(&out.transfers, now, &mut clock);
                // The growth needs the memory the swap-out frees.
                clock.wait_until = clock.wait_until.max(clock.mem_ready);
                preemptions += 1;
                recomputes += u64::from(how == Preempted::Dropped);
            }
        }

        // VMM calls since the last step: the caller's on the step, the background threads' on
        // their own timeline, which the step waits for if it fell behind.
        let vmm = alloc.vmm_calls();
        let fg = vmm.foreground.since(&vmm_seen.foreground).seconds(m);
        let bg = vmm.background.since(&vmm_seen.background).seconds(m);
        vmm_seen = vmm;
        clock.cpu_s += fg;
        vmm_step_s += fg;
        vmm_bg_s += bg;
        let behind = background_free;
        background_free = background_free.max(now) + bg;

        if batch.is_empty() {
            // Every running request was resumed in this iteration and waits for its copy: no
            // step runs; the next one will wait for the copies.
            let wake = (now + clock.cpu_s).max(clock.wait_until);
            let usage = alloc.usage();
            area_live += usage.live_bytes as f64 * (wake - now);
            area_held += usage.held_bytes as f64 * (wake - now);
            now = wake;
            continue;
        }

        let cpu_ready = now + clock.cpu_s;
        // The step waits for the copies of the requests it resumes (their data) and for the
        // synchronous copies and the memory it needs.
        let data = batch.iter().map(|&i| live[i].ready_at).fold(now, f64::max);
        let mut start = cpu_ready.max(clock.wait_until).max(data);
        copy_wait_s += start - now - fg;
        if behind > start {
            vmm_step_s += behind - start;
            start = behind;
        }
        let kv_tokens: usize = batch.iter().map(|&i| live[i].tokens + 1).sum();
        let tokens: usize = batch.len() + batch.iter().map(|&i| live[i].prefill).sum::<usize>();
        let end = start + m.step_s(kv_tokens, tokens);
        let dt = end - now;
        let usage = alloc.usage();
        area_live += usage.live_bytes as f64 * dt;
        area_held += usage.held_bytes as f64 * dt;
        peak_held = peak_held.max(usage.held_bytes);
        batch_sum += batch.len() as u64;
        peak_batch = peak_batch.max(batch.len());
        if now - last_sample >= config.sample_s {
            samples.push(Sample {
                t: now,
                live_bytes: usage.live_bytes,
                held_bytes: usage.held_bytes,
                batch: batch.len(),
            });
            last_sample = now;
        }
        now = end;
        steps += 1;

        // Copies started after the step (offload of the blocks it filled); their submission
        // delays the next step.
        let stores = alloc.after_step();
        let mut after = StepClock {
            cpu_s: 0.0,
            wait_until: now,
            mem_ready: now,
        };
        engine.issue(&stores, now, &mut after);
        carried_cpu = after.cpu_s;

        let before = done;
        for &i in &batch {
            let l = &mut live[i];
            l.tokens += 1;
            l.generated += 1;
            l.prefill = 0;
            match l.last_token {
                None => ttft.push(now - jobs[i].arrival_s),
                Some(t) => tbt.push(now - t),
            }
            if let Some(t) = l.stalled_since.take() {
                stall_s += now - t;
            }
            l.last_token = Some(now);
            tokens_at[i].push(now);
            generated_total += 1;
            if l.generated >= jobs[i].output {
                alloc.finish(jobs[i].id)?;
                l.state = State::Done;
                latency_sum += now - jobs[i].arrival_s;
                e2e.push(now - jobs[i].arrival_s);
                if let Some(k) = running.iter().position(|&r| r == i) {
                    running.swap_remove(k);
                }
                done += 1;
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
    let ttft_p = Percentiles::of(&mut ttft);
    let tbt_p = Percentiles::of(&mut tbt);
    Ok(RunResult {
        allocator: alloc.name(),
        kind: if alloc.is_model() { "model" } else { "real" },
        preemption: alloc.preemption().to_string(),
        ttft: ttft_p,
        tbt: tbt_p,
        e2e: Percentiles::of(&mut e2e),
        throughput_tokens_per_s: if now > 0.0 {
            generated_total as f64 / now
        } else {
            0.0
        },
        preempt_stall_s: stall_s,
        copy_wait_s,
        vmm_step_s,
        vmm_background_s: vmm_bg_s,
        copy_engine_s: engine.copies.busy_s,
        cached_prompt_tokens: cached_prompt,
        recomputed_tokens: recomputed,
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
        ttft_samples: ttft,
        tbt_samples: tbt,
        token_times: tokens_at,
    })
}

/// Preempts `running[k]` and queues it.
fn preempt(
    alloc: &mut dyn KvAllocator,
    jobs: &[Job],
    k: usize,
    running: &mut Vec<usize>,
    queue: &mut Vec<usize>,
    live: &mut [Live],
    now: f64,
) -> Result<(Preempted, Outcome)> {
    let i = running.swap_remove(k);
    let (how, out) = alloc.preempt(jobs[i].id)?;
    let l = &mut live[i];
    l.state = State::Preempted(how);
    l.queued_since = now;
    l.ran += now - l.running_since;
    l.prefill = 0;
    if l.stalled_since.is_none() {
        l.stalled_since = l.last_token;
    }
    queue.push(i);
    Ok((how, out))
}
