//! The file watcher: reloads when the policy folder changes, or a plugin
//! or model file a policy names, after a trailing debounce (no event for
//! the debounce time). It is built for what Kubernetes does to a mounted
//! ConfigMap or Secret: the files are symlinks into a `..data` folder that
//! is swapped atomically, so every event in the policy folder counts, not
//! only those naming a `*.toml`. A folder deleted and recreated (or
//! replaced by a new mount) is noticed within [`RECHECK`] and watched
//! again; while it cannot be watched, a log line and
//! `gateway_policy_watch_up 0` say so, and the last good policies serve.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

use super::Reloader;

/// How often the folder's identity is checked (deleted, recreated,
/// remounted), and how often watching is retried while it fails.
const RECHECK: Duration = Duration::from_secs(1);

/// Watches while it lives.
pub(crate) struct PolicyWatch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PolicyWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PolicyWatch {
    /// Starts watching `reloader`'s folder and files.
    /// The first watches are in place when this returns: a change made
    /// right after start is seen.
    pub(crate) fn start(reloader: Arc<Reloader>, debounce: Duration) -> Self {
        let files = reloader.artifact_files();
        let first = Watching::start(reloader.dir(), &files, debounce);
        PolicyWatch {
            task: tokio::spawn(run(reloader, debounce, Some(first))),
        }
    }
}

/// What identifies a folder: a new one at the same path differs.
fn identity(dir: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(dir).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Some((0, 0))
    }
}

/// The watches of one folder identity.
struct Watching {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    events: tokio::sync::mpsc::Receiver<()>,
    identity: Option<(u64, u64)>,
}

impl Watching {
    fn start(dir: &Path, files: &BTreeSet<PathBuf>, debounce: Duration) -> notify::Result<Self> {
        let identity = identity(dir);
        if identity.is_none() {
            return Err(notify::Error::path_not_found().add_path(dir.to_path_buf()));
        }
        let (tx, events) = tokio::sync::mpsc::channel(1);
        let folder = dir.to_path_buf();
        let named = files.clone();
        let mut debouncer = new_debouncer(debounce, None, move |result: DebounceEventResult| {
            let relevant = match result {
                Ok(events) => events.iter().any(|e| {
                    !e.kind.is_access() && e.paths.iter().any(|p| relevant(p, &folder, &named))
                }),
                // A watch that broke (its folder went away): looked at
                // by the next check.
                Err(_) => true,
            };
            if relevant {
                // Full means a reload is already pending: nothing is lost.
                let _ = tx.try_send(());
            }
        })?;
        debouncer.watch(dir, RecursiveMode::NonRecursive)?;
        // The folders of the plugin and model files, each once.
        let parents: BTreeSet<&Path> = files
            .iter()
            .filter_map(|f| f.parent())
            .filter(|p| *p != dir)
            .collect();
        for parent in parents {
            if let Err(e) = debouncer.watch(parent, RecursiveMode::NonRecursive) {
                tracing::warn!(folder = %parent.display(), error = %e, "cannot watch a plugin or model folder; its changes need SIGHUP or POST /admin/reload");
            }
        }
        Ok(Watching {
            _debouncer: debouncer,
            events,
            identity,
        })
    }
}

/// An event about `path` matters if it is in the policy folder, names a
/// plugin or model file, or is Kubernetes' atomic swap (`..data`,
/// `..2026_12_02_...`) beside one.
fn relevant(path: &Path, folder: &Path, files: &BTreeSet<PathBuf>) -> bool {
    path.parent() == Some(folder)
        || path == folder
        || files.contains(path)
        || path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".."))
}

async fn run(
    reloader: Arc<Reloader>,
    debounce: Duration,
    mut first: Option<notify::Result<Watching>>,
) {
    let telemetry = reloader.telemetry().clone();
    let dir = reloader.dir().to_path_buf();
    // Whether watching has failed since it last worked.
    let mut down = false;
    loop {
        let files = reloader.artifact_files();
        let started = first
            .take()
            .unwrap_or_else(|| Watching::start(&dir, &files, debounce));
        let mut watching = match started {
            Ok(watching) => watching,
            Err(e) => {
                if !down {
                    tracing::warn!(folder = %dir.display(), error = %e, "cannot watch the policy folder; the last good policies keep serving, retrying every second");
                    telemetry.record_watching(false);
                    down = true;
                }
                tokio::time::sleep(RECHECK).await;
                continue;
            }
        };
        telemetry.record_watching(true);
        if std::mem::take(&mut down) {
            tracing::info!(folder = %dir.display(), "watching the policy folder again");
            // What changed while it was not watched.
            let _ = reloader.reload("file").await;
        }
        loop {
            tokio::select! {
                event = watching.events.recv() => {
                    if event.is_none() {
                        break;
                    }
                    // Errors are logged and counted by `reload`.
                    let _ = reloader.reload("file").await;
                    if reloader.artifact_files() != files {
                        // Other plugin or model folders to watch.
                        break;
                    }
                }
                _ = tokio::time::sleep(RECHECK) => {
                    let now = identity(&dir);
                    if now != watching.identity {
                        tracing::warn!(folder = %dir.display(), present = now.is_some(), "the policy folder was removed or replaced; watching it again");
                        if now.is_some() {
                            // A new folder at the path: read it now.
                            let _ = reloader.reload("file").await;
                        }
                        break;
                    }
                }
            }
        }
    }
}
