//! GPU profiles: the hardware constants the step-time model is built from, each with its source
//! (`docs/replay.md` lists them with links), and the text format they are printed and read in.
//!
//! A profile is a list of `key = value` lines (`#` starts a comment), a subset of TOML:
//!
//! ```text
//! name = "h100-pcie5"
//! h2d_bytes_per_s = 5.4e10   # pinned host->device copies, large contiguous runs
//! ```
//!
//! `kvvm replay --print-profile` prints the selected profile in this format and
//! `kvvm replay --profile FILE` reads one: the keys it sets replace the `--gpu` profile's, so a
//! file of measured constants (what a GPU check prints) may hold only the keys it measured.

use std::fmt::Write as _;

use crate::error::{Error, Result};
use kvvm::{DType, ModelShape, PRESETS};

use crate::quote;

/// Hardware constants of one GPU and its host link. All times in seconds, rates per second.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GpuProfile {
    /// Profile name (`h100-pcie5`, `h200`, `a100`, or what a file says).
    pub name: String,
    /// Host-to-device copy bandwidth of large contiguous pinned copies.
    pub h2d_bytes_per_s: f64,
    /// Device-to-host copy bandwidth of large contiguous pinned copies.
    pub d2h_bytes_per_s: f64,
    /// CPU time to issue one `cudaMemcpyAsync`.
    pub copy_call_s: f64,
    /// CPU time per descriptor of one `cuMemcpyBatchAsync` submission.
    pub batch_descriptor_s: f64,
    /// Copy-engine time per descriptor beyond its bytes (what makes many small copies slow
    /// even when they are submitted in one batch).
    pub copy_descriptor_s: f64,
    /// `cuMemCreate` of one page.
    pub create_s: f64,
    /// `cuMemMap` of one page.
    pub map_s: f64,
    /// `cuMemSetAccess` of one mapped run.
    pub set_access_s: f64,
    /// `cuMemUnmap` of one run.
    pub unmap_s: f64,
    /// Device memory bandwidth (datasheet).
    pub hbm_bytes_per_s: f64,
    /// Dense BF16 tensor throughput, FLOP/s (datasheet).
    pub flops: f64,
    /// Fraction of `hbm_bytes_per_s` a decode step achieves reading weights and KV.
    pub hbm_efficiency: f64,
    /// Fraction of `flops` a step achieves on its matrix multiplications (model FLOPs
    /// utilization).
    pub mfu: f64,
}

/// The profiles `--gpu` accepts.
pub const GPU_NAMES: [&str; 3] = ["h100-pcie5", "h200", "a100"];

impl GpuProfile {
    /// The built-in profile `name` (one of [`GPU_NAMES`]).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an unknown name.
    pub fn named(name: &str) -> Result<GpuProfile> {
        let gen5 = GpuProfile::h100_pcie5();
        match name {
            "h100-pcie5" => Ok(gen5),
            "h200" => Ok(GpuProfile {
                name: name.into(),
                hbm_bytes_per_s: 4.8e12,
                ..gen5
            }),
            "a100" => Ok(GpuProfile {
                name: name.into(),
                // PCIe Gen4 x16: half of Gen5's 54 GB/s.
                h2d_bytes_per_s: 27e9,
                d2h_bytes_per_s: 27e9,
                hbm_bytes_per_s: 2.039e12,
                flops: 312e12,
                ..gen5
            }),
            _ => Err(Error::InvalidConfig(format!(
                "unknown GPU profile {} (known: {})",
                quote(name),
                GPU_NAMES.join(", ")
            ))),
        }
    }

    /// The default profile: an H100 SXM5 80 GB whose host link is PCIe Gen5 x16.
    pub fn h100_pcie5() -> GpuProfile {
        // Host-link and VMM constants shared by the PCIe Gen5 profiles (sources in
        // docs/replay.md): vLLM PR #48434 (H100, PCIe Gen5): merged runs 54.1 GB/s, 8192
        // unmerged 8 KiB descriptors submitted in 5153 us (0.63 us each) and run in 10.3 ms
        // (1.1 us each beyond their bytes); cudaMemcpyAsync 3.45-3.98 us per call on H100
        // (torchcomms PR #2195); VMM calls from kvcached's microbenchmark (A100, 2 MiB pages).
        GpuProfile {
            name: "h100-pcie5".into(),
            h2d_bytes_per_s: 54e9,
            d2h_bytes_per_s: 54e9,
            copy_call_s: 3.5e-6,
            batch_descriptor_s: 0.63e-6,
            copy_descriptor_s: 1.1e-6,
            create_s: 193e-6,
            map_s: 1.45e-6,
            set_access_s: 36e-6,
            unmap_s: 25.6e-6,
            hbm_bytes_per_s: 3.35e12,
            flops: 989e12,
            hbm_efficiency: 0.7,
            mfu: 0.5,
        }
    }

    fn fields_mut(&mut self) -> [(&'static str, &mut f64); 13] {
        [
            ("h2d_bytes_per_s", &mut self.h2d_bytes_per_s),
            ("d2h_bytes_per_s", &mut self.d2h_bytes_per_s),
            ("copy_call_s", &mut self.copy_call_s),
            ("batch_descriptor_s", &mut self.batch_descriptor_s),
            ("copy_descriptor_s", &mut self.copy_descriptor_s),
            ("create_s", &mut self.create_s),
            ("map_s", &mut self.map_s),
            ("set_access_s", &mut self.set_access_s),
            ("unmap_s", &mut self.unmap_s),
            ("hbm_bytes_per_s", &mut self.hbm_bytes_per_s),
            ("flops", &mut self.flops),
            ("hbm_efficiency", &mut self.hbm_efficiency),
            ("mfu", &mut self.mfu),
        ]
    }

    /// The profile in its text format, one commented `key = value` line per constant.
    pub fn to_text(&self) -> String {
        let notes = [
            "pinned host->device copies, large contiguous runs",
            "pinned device->host copies, large contiguous runs",
            "CPU time of one cudaMemcpyAsync",
            "CPU time per descriptor of cuMemcpyBatchAsync",
            "copy-engine time per descriptor beyond its bytes",
            "cuMemCreate, one page",
            "cuMemMap, one page",
            "cuMemSetAccess, one run",
            "cuMemUnmap, one run",
            "device memory bandwidth (datasheet)",
            "dense BF16 FLOP/s (datasheet)",
            "fraction of HBM bandwidth a decode step reaches (assumed)",
            "fraction of FLOP/s a step reaches (assumed)",
        ];
        let mut s = String::new();
        let _ = writeln!(s, "# kvvm GPU profile (docs/replay.md gives every source)");
        let _ = writeln!(s, "name = \"{}\"", self.name);
        let mut copy = self.clone();
        for ((k, v), note) in copy.fields_mut().into_iter().zip(notes) {
            let _ = writeln!(s, "{k} = {}   # {note}", number(*v));
        }
        s
    }

    /// Applies the `key = value` lines of `text` (the format of [`GpuProfile::to_text`]) on top
    /// of this profile; `source` names the text in errors.
    ///
    /// # Errors
    /// [`Error::Input`] with `SOURCE:LINE:` for an unknown key, a malformed line or a value that
    /// is not a positive finite number (efficiencies at most 1).
    pub fn apply_text(&mut self, source: &str, text: &str) -> Result<()> {
        for (i, raw) in text.lines().enumerate() {
            let at = |m: String| Error::Input(format!("{source}:{}: {m}", i + 1));
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(at(format!("expected KEY = VALUE, got {}", quote(line))));
            };
            let (k, v) = (k.trim(), v.trim());
            if k == "name" {
                let name = v.trim_matches('"');
                if name.is_empty() || name.len() > 64 {
                    return Err(at("name must have 1 to 64 characters".into()));
                }
                self.name = name.to_string();
                continue;
            }
            let value: f64 = v
                .parse()
                .map_err(|_| at(format!("bad number {} for {k}", quote(v))))?;
            let limit = if k == "hbm_efficiency" || k == "mfu" {
                1.0
            } else {
                f64::INFINITY
            };
            if !(value.is_finite() && value > 0.0 && value <= limit) {
                return Err(at(format!(
                    "{k} must be a positive finite number{}, got {value}",
                    if limit == 1.0 { " at most 1" } else { "" }
                )));
            }
            let mut found = false;
            for (name, slot) in self.fields_mut() {
                if name == k {
                    *slot = value;
                    found = true;
                }
            }
            if !found {
                return Err(at(format!("unknown key {}", quote(k))));
            }
        }
        Ok(())
    }
}

/// `v` as `0.7` or `5.4e10`: plain between 0.001 and 10,000, else in exponent form; always
/// read back exactly by `str::parse::<f64>`.
fn number(v: f64) -> String {
    if (1e-3..1e4).contains(&v.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

/// Parameters of the model presets (published model sizes), for the compute side of the step
/// model.
pub fn parameters(model: &ModelShape) -> Result<f64> {
    const PARAMS: [(&str, f64); 7] = [
        ("llama-3-8b", 8.03e9),
        ("llama-3-70b", 70.6e9),
        ("llama-2-7b", 6.74e9),
        ("mistral-7b", 7.24e9),
        ("qwen2.5-7b", 7.62e9),
        ("qwen2.5-32b", 32.8e9),
        ("yi-34b", 34.4e9),
    ];
    let (_, p) = PARAMS
        .iter()
        .find(|(n, _)| *n == model.name)
        .ok_or_else(|| {
            Error::InvalidConfig(format!("no parameter count for model {}", model.name))
        })?;
    // A tensor-parallel rank holds 1/tp of the weights.
    let base = PRESETS.iter().find(|s| s.name == model.name);
    let tp = base
        .map(|b| (b.q_heads / model.q_heads.max(1)).max(1))
        .unwrap_or(1);
    Ok(p / tp as f64)
}

/// The step-time model of one model on one GPU: what the scheduler charges for a step, a copy
/// and a VMM call. Built by [`StepModel::new`] from a [`GpuProfile`]; tests build it by hand.
///
/// A step that reads `kv_tokens` tokens of KV and computes `tokens` tokens (decode tokens plus
/// prefill tokens) takes the roofline time
/// `max(weights_s + kv_tokens · kv_token_s, tokens · token_s)`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StepModel {
    /// The profile it was built from.
    pub gpu: GpuProfile,
    /// Reading the weights once (a decode step's floor).
    pub weights_s: f64,
    /// Reading one token's KV (all layers).
    pub kv_token_s: f64,
    /// Computing one token (2 FLOPs per parameter).
    pub token_s: f64,
}

impl StepModel {
    /// The step model of `model` (element type `dtype`, weights in 16 bits) on `gpu`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a model without a known parameter count.
    pub fn new(gpu: &GpuProfile, model: &ModelShape, dtype: DType) -> Result<StepModel> {
        Ok(Self::from_parameters(
            gpu,
            parameters(model)?,
            model.token_bytes(dtype) as u64,
        ))
    }

    /// The step model of a model of `params` parameters (16-bit weights) and `token_bytes` of
    /// KV per token on `gpu`.
    pub fn from_parameters(gpu: &GpuProfile, params: f64, token_bytes: u64) -> StepModel {
        let hbm = gpu.hbm_bytes_per_s * gpu.hbm_efficiency;
        StepModel {
            gpu: gpu.clone(),
            weights_s: 2.0 * params / hbm,
            kv_token_s: token_bytes as f64 / hbm,
            token_s: 2.0 * params / (gpu.flops * gpu.mfu),
        }
    }

    /// Seconds of one step that reads `kv_tokens` tokens of KV and computes `tokens` tokens.
    pub fn step_s(&self, kv_tokens: usize, tokens: usize) -> f64 {
        (self.weights_s + kv_tokens as f64 * self.kv_token_s).max(tokens as f64 * self.token_s)
    }

    /// Prefill rate (tokens/s) of a step made of prefill only.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        1.0 / self.token_s
    }

    /// The derived rates as commented lines (printed after the profile).
    pub fn to_text(&self) -> String {
        format!(
            "# derived for the model: weights read {:.3} ms per step, KV read {:.1} ns per token, \
             compute {:.1} us per token ({:.0} prefill tokens/s)\n",
            self.weights_s * 1e3,
            self.kv_token_s * 1e9,
            self.token_s * 1e6,
            self.prefill_tokens_per_s()
        )
    }
}

impl Default for StepModel {
    /// Llama-3-8B (f16 KV, 128 KiB per token) on [`GpuProfile::h100_pcie5`].
    fn default() -> Self {
        StepModel::from_parameters(&GpuProfile::h100_pcie5(), 8.03e9, 128 << 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_round_trips_through_its_text() {
        for n in GPU_NAMES {
            let p = GpuProfile::named(n).unwrap();
            let mut q = GpuProfile::named("a100").unwrap();
            q.apply_text("p", &p.to_text()).unwrap();
            assert_eq!(p, q, "{n}");
        }
    }

    #[test]
    fn a_partial_file_replaces_only_its_keys() {
        let mut p = GpuProfile::named("h100-pcie5").unwrap();
        p.apply_text(
            "m",
            "# measured\nname = \"mine\"\nh2d_bytes_per_s = 5e10 # x\n",
        )
        .unwrap();
        assert_eq!(p.name, "mine");
        assert_eq!(p.h2d_bytes_per_s, 5e10);
        assert_eq!(p.d2h_bytes_per_s, 54e9);
    }

    #[test]
    fn bad_profile_lines_name_the_line() {
        let mut p = GpuProfile::named("h200").unwrap();
        for (text, want) in [
            ("a = 1", "m:1: unknown key"),
            ("\nmfu = 2", "m:2: mfu must be"),
            ("map_s = NaN", "m:1: map_s must be"),
            ("map_s = -1", "m:1: map_s must be"),
            ("map_s", "m:1: expected KEY = VALUE"),
            ("map_s = x", "m:1: bad number"),
        ] {
            let e = p.apply_text("m", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(GpuProfile::named("b100").is_err());
    }

    #[test]
    fn quote_cuts_long_input() {
        let long = "x".repeat(10_000);
        let q = quote(&long);
        assert!(q.len() < 80, "{q}");
        assert!(q.ends_with("...\""));
        assert_eq!(quote("ab"), "\"ab\"");
    }
}
