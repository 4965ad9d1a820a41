//! Trace readers: the Azure LLM inference CSV format and the Mooncake JSONL format.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One request of a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Position in the trace (0-based, in file order).
    pub id: u64,
    /// Arrival time in seconds after the trace's first request.
    pub arrival_s: f64,
    /// Prompt tokens.
    pub context_tokens: usize,
    /// Generated tokens.
    pub output_tokens: usize,
    /// Prefix-block hashes (Mooncake: 512 tokens per block; empty for Azure).
    pub hash_ids: Vec<u64>,
}

/// The format of a trace file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TraceFormat {
    /// `TIMESTAMP,ContextTokens,GeneratedTokens` with wall-clock timestamps.
    AzureCsv,
    /// One JSON object per line: `timestamp` (ms), `input_length`, `output_length`, `hash_ids`.
    MooncakeJsonl,
}

impl TraceFormat {
    /// The format's name in reports.
    pub const fn name(self) -> &'static str {
        match self {
            TraceFormat::AzureCsv => "azure-csv",
            TraceFormat::MooncakeJsonl => "mooncake-jsonl",
        }
    }

    /// Detects the format from the file extension (`.csv`, `.jsonl`/`.json`), or else from the
    /// first non-blank line (`{` means JSONL).
    pub fn detect(path: &Path, first_line: &str) -> TraceFormat {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("csv") => TraceFormat::AzureCsv,
            Some("jsonl") | Some("json") | Some("ndjson") => TraceFormat::MooncakeJsonl,
            _ if first_line.trim_start().starts_with('{') => TraceFormat::MooncakeJsonl,
            _ => TraceFormat::AzureCsv,
        }
    }
}

/// A parsed trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    /// The file it was read from.
    pub path: PathBuf,
    /// Its format.
    pub format: TraceFormat,
    /// The requests in file order (at most the `limit` given to the reader).
    pub requests: Vec<Request>,
}

/// Reads at most `limit` requests (all with `None`) of the trace at `path`, detecting its format.
///
/// # Errors
/// [`Error::Input`] naming the file (and the line, for a malformed line) when the file cannot be
/// read or a line cannot be parsed.
pub fn read_trace(path: &Path, limit: Option<usize>) -> Result<Trace> {
    let file = File::open(path)
        .map_err(|e| Error::Input(format!("{}: cannot open: {e}", path.display())))?;
    read_trace_from(path, BufReader::new(file), limit)
}

/// Longest line a trace may have, in bytes (a Mooncake line with the `hash_ids` of a
/// 200,000-token prompt is about 3 KiB).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Most blank lines a trace may have in a row.
pub const MAX_BLANK_LINES: usize = 1 << 20;

/// [`read_trace`] from any reader; `path` names the source in errors and picks the format.
///
/// # Errors
/// As [`read_trace`]; also for a line longer than [`MAX_LINE_BYTES`], more than
/// [`MAX_BLANK_LINES`] blank lines in a row, or a line that is not UTF-8.
pub fn read_trace_from(path: &Path, reader: impl Read, limit: Option<usize>) -> Result<Trace> {
    let mut reader = BufReader::new(reader);
    let limit = limit.unwrap_or(usize::MAX);
    let at =
        |n: usize, m: &dyn std::fmt::Display| Error::Input(format!("{}:{n}: {m}", path.display()));
    let mut requests = Vec::new();
    let mut format = None;
    let mut first_ts: Option<f64> = None;
    let mut last_arrival = 0.0f64;
    let mut buf = Vec::new();
    let mut n = 0usize;
    let mut blank = 0usize;
    while requests.len() < limit {
        n += 1;
        buf.clear();
        let got = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| at(n, &format!("cannot read: {e}")))?;
        if got == 0 {
            break;
        }
        if buf.len() > MAX_LINE_BYTES {
            return Err(at(
                n,
                &format!("line longer than {MAX_LINE_BYTES} bytes (not a trace?)"),
            ));
        }
        let line = std::str::from_utf8(&buf).map_err(|_| at(n, &"not UTF-8 text"))?;
        // A UTF-8 byte order mark may precede the first line (spreadsheet exports).
        let line = if n == 1 {
            line.strip_prefix('\u{feff}').unwrap_or(line)
        } else {
            line
        };
        let text = line.trim();
        if text.is_empty() {
            blank += 1;
            if blank > MAX_BLANK_LINES {
                return Err(at(
                    n,
                    &format!("more than {MAX_BLANK_LINES} blank lines in a row (not a trace?)"),
                ));
            }
            continue;
        }
        blank = 0;
        let fmt = *format.get_or_insert_with(|| TraceFormat::detect(path, text));
        let (ts, context_tokens, output_tokens, hash_ids) = match fmt {
            TraceFormat::AzureCsv => {
                if n == 1 || text.starts_with("TIMESTAMP") {
                    if !text.to_ascii_lowercase().starts_with("timestamp") {
                        return Err(at(
                            n,
                            &"expected the header TIMESTAMP,ContextTokens,GeneratedTokens",
                        ));
                    }
                    continue;
                }
                let (ts, c, o) = parse_azure_line(text).map_err(|m| at(n, &m))?;
                (ts, c, o, Vec::new())
            }
            TraceFormat::MooncakeJsonl => {
                let r: MooncakeLine = serde_json::from_str(text)
                    .map_err(|e| at(n, &format!("bad JSON line: {e}")))?;
                if !r.timestamp.is_finite() || r.timestamp < 0.0 {
                    return Err(at(n, &format!("bad timestamp {}", r.timestamp)));
                }
                (
                    r.timestamp / 1000.0,
                    r.input_length,
                    r.output_length,
                    r.hash_ids,
                )
            }
        };
        let base = *first_ts.get_or_insert(ts);
        // Traces are in arrival order; a timestamp going backwards is clamped (never reordered).
        let arrival = (ts - base).max(last_arrival);
        last_arrival = arrival;
        requests.push(Request {
            id: requests.len() as u64,
            arrival_s: arrival,
            context_tokens,
            output_tokens,
            hash_ids,
        });
    }
    Ok(Trace {
        path: path.to_path_buf(),
        format: format.unwrap_or_else(|| TraceFormat::detect(path, "")),
        requests,
    })
}

#[derive(serde::Deserialize)]
struct MooncakeLine {
    timestamp: f64,
    input_length: usize,
    output_length: usize,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

/// Parses `2023-11-16 18:15:46.6805900,374,44` into (seconds since the Unix epoch, context,
/// generated).
fn parse_azure_line(line: &str) -> std::result::Result<(f64, usize, usize), String> {
    let mut fields = line.split(',');
    let (Some(ts), Some(c), Some(o), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(format!(
            "expected 3 comma-separated fields, got {}",
            crate::quote(line)
        ));
    };
    let ts = parse_datetime(ts.trim())?;
    let num = |s: &str, what: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|e| format!("bad {what} {}: {e}", crate::quote(s)))
    };
    Ok((ts, num(c, "ContextTokens")?, num(o, "GeneratedTokens")?))
}

/// Parses `YYYY-MM-DD HH:MM:SS[.fraction]` (a `T` separator is accepted too) into seconds since
/// the Unix epoch (UTC, proleptic Gregorian calendar).
fn parse_datetime(s: &str) -> std::result::Result<f64, String> {
    let bad = || {
        format!(
            "bad timestamp {} (expected YYYY-MM-DD HH:MM:SS.fraction)",
            crate::quote(s)
        )
    };
    let (date, time) = s.split_once([' ', 'T']).ok_or_else(bad)?;
    let mut d = date.split('-');
    let (Some(y), Some(mo), Some(da), None) = (d.next(), d.next(), d.next(), d.next()) else {
        return Err(bad());
    };
    let y: i64 = y.parse().map_err(|_| bad())?;
    if !(0..=9999).contains(&y) {
        return Err(bad());
    }
    let mo: u32 = mo.parse().map_err(|_| bad())?;
    let da: u32 = da.parse().map_err(|_| bad())?;
    let mut t = time.split(':');
    let (Some(h), Some(mi), Some(sec), None) = (t.next(), t.next(), t.next(), t.next()) else {
        return Err(bad());
    };
    let h: u32 = h.parse().map_err(|_| bad())?;
    let mi: u32 = mi.parse().map_err(|_| bad())?;
    if !sec.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    let sec: f64 = sec.parse().map_err(|_| bad())?;
    if !(1..=12).contains(&mo)
        || !(1..=31).contains(&da)
        || h > 23
        || mi > 59
        || !(0.0..61.0).contains(&sec)
    {
        return Err(bad());
    }
    let days = days_from_civil(y, mo, da);
    Ok(days as f64 * 86_400.0 + f64::from(h * 3600 + mi * 60) + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetime() {
        assert_eq!(parse_datetime("1970-01-01 00:00:00").unwrap(), 0.0);
        assert_eq!(parse_datetime("1970-01-02 00:00:01.5").unwrap(), 86_401.5);
        // 2023-11-16 is day 19677 since the epoch.
        assert_eq!(days_from_civil(2023, 11, 16), 19_677);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert!(parse_datetime("2023-13-01 00:00:00").is_err());
        assert!(parse_datetime("2023-11-16").is_err());
        assert!(parse_datetime("2023-11-16 1:2:x").is_err());
    }

    #[test]
    fn azure_relative_seconds() {
        let csv = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                   2023-11-16 23:59:59.5000000,10,2\n\
                   2023-11-17 00:00:01.2500000,20,3\n";
        let t = read_trace_from(Path::new("x.csv"), csv.as_bytes(), None).unwrap();
        assert_eq!(t.format, TraceFormat::AzureCsv);
        assert_eq!(t.requests.len(), 2);
        assert_eq!(t.requests[0].arrival_s, 0.0);
        assert!((t.requests[1].arrival_s - 1.75).abs() < 1e-9);
        assert_eq!(
            (t.requests[1].context_tokens, t.requests[1].output_tokens),
            (20, 3)
        );
    }
}
