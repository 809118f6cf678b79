//! Reading a decision log back: its files in order, the check of its hash
//! chain (`gateway log verify`), and the records of one request
//! (`gateway log show`).

use std::io::BufRead as _;
use std::path::{Path, PathBuf};

use super::sink::{CURRENT, GENESIS};
use crate::contract::Sha256;

/// The log's files, oldest first: the rotated ones (`decisions-<last
/// seq>.jsonl`, whose names sort by age), then the current one.
pub fn log_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("decisions-"))
                .and_then(|n| n.strip_suffix(".jsonl"))
                .is_some_and(|seq| seq.len() == 20 && seq.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    rotated.sort();
    let current = dir.join(CURRENT);
    if current.is_file() {
        rotated.push(current);
    }
    Ok(rotated)
}

/// What `verify` found.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Records the log says were dropped (`dropped_before`).
    pub dropped: u64,
    /// Breaks of the chain, each naming the file and line; empty when the
    /// log is whole.
    pub problems: Vec<String>,
}

/// At most this many problems are listed.
const MAX_PROBLEMS: usize = 20;

/// Checks the chain of every record in `dir`: each line is a record whose
/// `seq` follows the one before and whose `prev` is the SHA-256 of the line
/// before. A removed, inserted or changed record breaks it where it was.
/// The first record may follow records that retention removed; the last
/// one is vouched for by no later record, so a change to it alone is not
/// found.
pub fn verify(dir: &Path) -> Result<Report, String> {
    let files = log_files(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if files.is_empty() {
        return Err(format!("{}: no decision log here", dir.display()));
    }
    let mut report = Report {
        files: files.len(),
        ..Report::default()
    };
    let mut previous: Option<(u64, String)> = None;
    for file in &files {
        let reader = std::fs::File::open(file)
            .map(std::io::BufReader::new)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        for (n, line) in reader.split(b'\n').enumerate() {
            let line = line.map_err(|e| format!("{}: {e}", file.display()))?;
            let at = || format!("{} line {}", file.display(), n + 1);
            let hash = Sha256::of(&line).to_string();
            let record: Option<serde_json::Value> = serde_json::from_slice(&line).ok();
            let seq = record.as_ref().and_then(|r| r["seq"].as_u64());
            let prev = record.as_ref().and_then(|r| r["prev"].as_str());
            let (Some(seq), Some(prev)) = (seq, prev) else {
                report
                    .problems
                    .push(format!("{}: not a decision record", at()));
                previous = None;
                continue;
            };
            report.records += 1;
            report.first_seq.get_or_insert(seq);
            report.last_seq = Some(seq);
            report.dropped += record
                .as_ref()
                .and_then(|r| r["dropped_before"].as_u64())
                .unwrap_or(0);
            match &previous {
                Some((last_seq, last_hash)) => {
                    if seq != last_seq + 1 {
                        report.problems.push(format!(
                            "{}: record {seq} follows record {last_seq}: records are missing or out of order",
                            at()
                        ));
                    } else if prev != last_hash {
                        report.problems.push(format!(
                            "{}: record {seq} does not follow the line before it (its `prev` is not that line's SHA-256): that record was changed, or this one",
                            at()
                        ));
                    }
                }
                None if report.records == 1 && seq == 1 && prev != GENESIS => {
                    report.problems.push(format!(
                        "{}: the first record's `prev` is not {GENESIS}",
                        at()
                    ));
                }
                // Retention removes rotated files only, and keeps at least
                // one: a log of one file must begin at record 1.
                None if report.records == 1 && seq > 1 && files.len() == 1 => {
                    report.problems.push(format!(
                        "{}: the log begins at record {seq}, and no rotated file holds the ones before",
                        at()
                    ));
                }
                None => {}
            }
            previous = Some((seq, hash));
            if report.problems.len() >= MAX_PROBLEMS {
                return Ok(report);
            }
        }
    }
    Ok(report)
}

/// The records of request `id` (its answer and its shadow copies), oldest
/// first and as written, at most `limit` of them.
pub fn find(dir: &Path, id: &str, limit: usize) -> Result<Vec<String>, String> {
    let files = log_files(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut found = Vec::new();
    // A cheap test before parsing: the id as it appears in the JSON.
    let needle = serde_json::to_string(id).unwrap_or_default();
    for file in &files {
        let reader = std::fs::File::open(file)
            .map(std::io::BufReader::new)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        for line in reader.lines() {
            let line = line.map_err(|e| format!("{}: {e}", file.display()))?;
            if !line.contains(&needle) {
                continue;
            }
            if let Ok(record) = serde_json::from_str::<serde_json::Value>(&line)
                && record["request_id"] == id
            {
                found.push(line);
                if found.len() >= limit {
                    return Ok(found);
                }
            }
        }
    }
    Ok(found)
}
