//! Decision records read back as data, for `gateway replay` and
//! `gateway what-if`: the fields they use, typed. Fields a later schema
//! adds are ignored; a record of another schema is refused by name.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};

use super::{RecordedTensor, SCHEMA};
use crate::router::Draw;

/// One decision record (see the README's schema).
#[derive(serde::Deserialize, Clone, Debug)]
pub(crate) struct Recorded {
    pub schema: u32,
    pub seq: u64,
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
        matches!(
            self.route.as_str(),
            "champion" | "canary" | "pinned" | "control"
        )
    }
}

/// The records of a log, read one at a time (a log can be gigabytes):
/// `path` is a log folder (its files oldest first) or one log file.
/// Lines that are not records of this schema are counted in `skipped`.
pub(crate) struct Records {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<(
        PathBuf,
        std::io::Split<std::io::BufReader<std::fs::File>>,
        usize,
    )>,
    pub skipped: Skipped,
}

impl Records {
    pub(crate) fn open(path: &Path) -> Result<Self, String> {
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
        Ok(Records {
            files: files.into_iter(),
            current: None,
            skipped: Skipped::default(),
        })
    }

    /// The next record; `None` at the end of the last file.
    pub(crate) fn next_record(&mut self) -> Option<Result<Recorded, String>> {
        loop {
            let (file, lines, n) = match &mut self.current {
                Some(current) => current,
                None => {
                    let file = self.files.next()?;
                    match std::fs::File::open(&file) {
                        Ok(f) => {
                            let lines = std::io::BufReader::new(f).split(b'\n');
                            self.current.insert((file, lines, 0))
                        }
                        Err(e) => return Some(Err(format!("{}: {e}", file.display()))),
                    }
                }
            };
            let Some(line) = lines.next() else {
                self.current = None;
                continue;
            };
            *n += 1;
            let line = match line {
                Ok(line) => line,
                Err(e) => return Some(Err(format!("{}: {e}", file.display()))),
            };
            if is_note(&line) {
                continue;
            }
            match serde_json::from_slice::<Recorded>(&line) {
                Ok(record) if record.schema == SCHEMA => return Some(Ok(record)),
                other => {
                    self.skipped.count += 1;
                    if self.skipped.first.is_none() {
                        let problem = match other {
                            Ok(record) => format!(
                                "schema {} (this gateway reads schema {SCHEMA})",
                                record.schema
                            ),
                            Err(e) => e.to_string(),
                        };
                        self.skipped.first =
                            Some(format!("{} line {n}: {problem}", file.display()));
                    }
                }
            }
        }
    }
}

/// Whether a line is a note (a rollout's decision, say) rather than a
/// request's record: its `kind` comes right after `time`.
fn is_note(line: &[u8]) -> bool {
    let head = &line[..line.len().min(128)];
    head.windows(8).any(|w| w == b"\"kind\":\"")
}

/// Lines [`Records`] could not read as records.
#[derive(Debug, Default)]
pub(crate) struct Skipped {
    pub count: u64,
    /// Where the first one is, and why.
    pub first: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_skipped_and_requests_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("decisions.jsonl");
        let request = r#"{"schema":1,"seq":1,"time":"t","request_id":"a \"kind\":\"x","model":"m","version":"v1","route":"champion","validation":"passed","status":200,"latency_ms":1.0,"prev":"0"}"#;
        let note = r#"{"schema":1,"seq":2,"time":"t","kind":"rollout","request_id":"rollout:m","model":"m","rollout":{},"prev":"1"}"#;
        std::fs::write(&file, format!("{request}\n{note}\nnot json\n")).unwrap();
        let mut records = Records::open(&file).unwrap();
        let first = records.next_record().unwrap().unwrap();
        assert_eq!(first.request_id, "a \"kind\":\"x");
        assert!(records.next_record().is_none());
        // The note is not a problem; the broken line is.
        assert_eq!(records.skipped.count, 1);
    }
}
