//! Decision records read back as data, for `gateway replay` and
//! `gateway what-if`: the fields they use, typed. Fields a later schema
//! adds are ignored; a record of another schema is refused by name.

use std::io::BufRead as _;
use std::path::Path;

use super::{RecordedTensor, SCHEMA};
use crate::router::Draw;

/// One decision record (see the README's schema).
#[derive(serde::Deserialize, Clone, Debug)]
pub(crate) struct Recorded {
    pub schema: u32,
    pub time: String,
    pub request_id: String,
    pub model: String,
    pub version: Option<String>,
    pub route: String,
    pub canary: Option<Draw>,
    pub artifacts: Option<RecordedArtifacts>,
    pub inputs_sha256: Option<String>,
    pub outputs_sha256: Option<String>,
    pub inputs: Option<Vec<RecordedTensor>>,
    pub outputs: Option<Vec<RecordedTensor>>,
    pub payload_omitted: Option<String>,
    pub validation: String,
    pub status: u16,
    pub error_kind: Option<String>,
    pub latency_ms: f64,
}

#[derive(serde::Deserialize, Clone, Debug, Default)]
pub(crate) struct RecordedArtifacts {
    pub plugin: Option<RecordedFile>,
    #[serde(default)]
    pub models: Vec<RecordedFile>,
}

/// A plugin or model file as a record names it.
#[derive(serde::Deserialize, Clone, Debug)]
pub(crate) struct RecordedFile {
    /// The plugin's policy name, or the name a plugin loads a model with.
    pub name: Option<String>,
    pub file: String,
    pub sha256: String,
}

impl Recorded {
    /// Whether this is the record of a request as served (not a shadow
    /// copy, not a request for something the policies did not have).
    pub(crate) fn is_served(&self) -> bool {
        matches!(self.route.as_str(), "champion" | "canary" | "pinned")
    }
}

/// Calls `each` with every record of `path` (a log folder, its files
/// oldest first, or one log file), with where it is; lines that are not
/// records of this schema are counted and skipped. Returns how many were
/// skipped, with the first one's place and problem.
pub(crate) fn scan(
    path: &Path,
    mut each: impl FnMut(Recorded) -> std::ops::ControlFlow<()>,
) -> Result<Skipped, String> {
    let files = if path.is_dir() {
        let files =
            super::verify::log_files(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if files.is_empty() {
            return Err(format!("{}: no decision log here", path.display()));
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut skipped = Skipped::default();
    for file in &files {
        let reader = std::fs::File::open(file)
            .map(std::io::BufReader::new)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        for (n, line) in reader.split(b'\n').enumerate() {
            let line = line.map_err(|e| format!("{}: {e}", file.display()))?;
            match serde_json::from_slice::<Recorded>(&line) {
                Ok(record) if record.schema == SCHEMA => {
                    if each(record).is_break() {
                        return Ok(skipped);
                    }
                }
                other => {
                    skipped.count += 1;
                    skipped.first.get_or_insert_with(|| {
                        let problem = match other {
                            Ok(record) => format!(
                                "schema {} (this gateway reads schema {SCHEMA})",
                                record.schema
                            ),
                            Err(e) => e.to_string(),
                        };
                        format!("{} line {}: {problem}", file.display(), n + 1)
                    });
                }
            }
        }
    }
    Ok(skipped)
}

/// Lines `scan` could not read as records.
#[derive(Debug, Default)]
pub(crate) struct Skipped {
    pub count: u64,
    /// Where the first one is, and why.
    pub first: Option<String>,
}
