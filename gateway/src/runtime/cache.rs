//! Compiled plugins on disk, so a large component (a Python or JavaScript
//! runtime is 12-18 MB and takes seconds to compile) loads in milliseconds
//! after its first compilation.
//!
//! An entry is named by the component's SHA-256 and a hash of the engine's
//! compilation settings (wasmtime's `precompile_compatibility_hash`, which
//! covers its version, target and every setting that changes the code), so
//! a changed component or engine never finds an entry of another; wasmtime
//! checks the same again when it loads one. An entry ends with the SHA-256
//! of what precedes it: a truncated or damaged file is refused and
//! removed, never loaded.
//!
//! Loading compiled code runs it as native code: whoever can write the
//! folder can run code in the gateway. So the folder is created private
//! (0700); it is refused when it is a symbolic link, when another user owns
//! it or others may write to it, or when a folder above it could be
//! swapped by someone else (owned by another user than root or this one,
//! or writable by others without the sticky bit). An entry is opened
//! without following links and read only if it is a regular file of this
//! user that others cannot write. Writes go to a new temporary file with a
//! random name, synced, then renamed into place, so two gateways sharing
//! the folder never see each other's half-written files.
//!
//! The folder is kept within 2 GiB: after each store, the entries loaded
//! or stored least recently are removed past it (a load renews an entry's
//! modification time), and temporary files an hour old are removed.

use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

use crate::contract::Sha256;

/// A folder of compiled components.
#[derive(Debug)]
pub(crate) struct CompileCache {
    dir: PathBuf,
    /// Names this engine's entries apart from other engines'.
    engine_key: u64,
}

/// What a lookup found.
pub(crate) enum Lookup {
    Hit(Component),
    /// Nothing usable: compile, then [`CompileCache::store`].
    Miss,
    /// An entry that did not verify or load; removed. Compile again.
    Refused(String),
}

impl CompileCache {
    /// Opens (creating it private if needed) the folder at `dir` for
    /// `engine`'s components.
    pub(crate) fn open(dir: &Path, engine: &Engine) -> Result<Self, String> {
        let problem = |e: std::io::Error| format!("compile cache {}: {e}", dir.display());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(problem)?;
        let meta = std::fs::symlink_metadata(dir).map_err(problem)?;
        let refuse = |why: String| {
            Err(format!(
                "compile cache {}: {why}; compiled code loaded from it would run in the gateway",
                dir.display()
            ))
        };
        if meta.file_type().is_symlink() {
            return refuse("is a symbolic link".into());
        }
        let me = euid();
        if meta.uid() != me {
            return refuse(format!(
                "owned by user {}, not by this process's user {me}",
                meta.uid()
            ));
        }
        if meta.permissions().mode() & 0o022 != 0 {
            return refuse(format!(
                "others may write to it (mode {:o}): chmod go-w it",
                meta.permissions().mode() & 0o777
            ));
        }
        let absolute = std::path::absolute(dir).map_err(problem)?;
        for above in absolute.ancestors().skip(1) {
            let meta = std::fs::metadata(above).map_err(problem)?;
            let mode = meta.permissions().mode();
            let swappable = mode & 0o022 != 0 && mode & 0o1000 == 0;
            if (meta.uid() != 0 && meta.uid() != me) || swappable {
                return refuse(format!(
                    "the folder above it, {}, could be replaced by another user (owner {}, mode {:o})",
                    above.display(),
                    meta.uid(),
                    mode & 0o7777
                ));
            }
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(CompileCache {
            dir: dir.to_path_buf(),
            engine_key: hasher.finish(),
        })
    }

    fn entry(&self, sha256: &Sha256) -> PathBuf {
        self.dir
            .join(format!("{sha256}-{:016x}.cwasm", self.engine_key))
    }

    /// The compiled form of the component whose bytes hash to `sha256`.
    pub(crate) fn load(&self, engine: &Engine, sha256: &Sha256) -> Lookup {
        let path = self.entry(sha256);
        let refuse = |why: String| {
            let _ = std::fs::remove_file(&path);
            Lookup::Refused(format!("{}: {why}", path.display()))
        };
        let bytes = match read_entry(&path) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Lookup::Miss,
            Err(why) => return refuse(why),
        };
        let Some(split) = bytes.len().checked_sub(32) else {
            return refuse("shorter than its checksum".into());
        };
        let (code, checksum) = bytes.split_at(split);
        if Sha256::of(code).0 != checksum {
            return refuse("its checksum does not match (a damaged or partial file)".into());
        }
        // SAFETY: the bytes are what `store` wrote from `Component::serialize`
        // of this engine (the checksum verifies them, and the folder is
        // private to this user, see `open`); wasmtime checks again that
        // they were compiled for an engine like this one.
        match unsafe { Component::deserialize(engine, code) } {
            Ok(component) => Lookup::Hit(component),
            Err(e) => refuse(format!("{e:#}")),
        }
    }

    /// Stores `component`, compiled from bytes that hash to `sha256`.
    pub(crate) fn store(&self, component: &Component, sha256: &Sha256) -> Result<(), String> {
        let path = self.entry(sha256);
        let mut code = component.serialize().map_err(|e| format!("{e:#}"))?;
        let checksum = Sha256::of(&code);
        code.extend_from_slice(&checksum.0);
        let mut nonce = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| "no random name for a temporary file".to_string())?;
        let temp = self.dir.join(format!(
            ".{:016x}.{}.tmp",
            u64::from_le_bytes(nonce),
            std::process::id()
        ));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)
            .and_then(|mut file| {
                file.write_all(&code)?;
                file.sync_all()
            })
            .and_then(|()| std::fs::rename(&temp, &path));
        written.map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            format!("{}: {e}", path.display())
        })?;
        self.prune(&path, MAX_CACHE_BYTES, STALE_TEMP);
        Ok(())
    }

    /// Keeps the folder within `budget` bytes: removes the entries used
    /// least recently (by modification time, which a load renews) until the
    /// rest fit, never `keep`; and removes temporary files older than
    /// `stale`, left by a process that stopped while writing. Other files
    /// are left alone.
    fn prune(&self, keep: &Path, budget: u64, stale: std::time::Duration) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = std::time::SystemTime::now();
        let mut entries = Vec::new();
        let mut total = 0u64;
        for item in dir.flatten() {
            // Not following links: a link is neither counted nor removed.
            let Ok(meta) = item.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let name = item.file_name();
            let name = name.to_string_lossy();
            let used = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            if is_temp_name(&name) {
                if now.duration_since(used).is_ok_and(|age| age > stale) {
                    let _ = std::fs::remove_file(item.path());
                }
            } else if is_entry_name(&name) {
                total += meta.len();
                entries.push((used, meta.len(), item.path()));
            }
        }
        entries.sort_by_key(|(used, ..)| *used);
        for (_, len, path) in entries {
            if total <= budget {
                break;
            }
            if path != keep && std::fs::remove_file(&path).is_ok() {
                tracing::info!(
                    "compile cache: removed {} ({len} bytes), used least recently, to stay within {budget} bytes",
                    path.display()
                );
                total -= len;
            }
        }
    }
}

/// `<sha256>-<engine key>.cwasm`, as [`CompileCache::entry`] names them:
/// the only files eviction removes (the folder may hold others).
fn is_entry_name(name: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    name.strip_suffix(".cwasm")
        .and_then(|stem| stem.split_once('-'))
        .is_some_and(|(sha, key)| hex(sha, 64) && hex(key, 16))
}

/// `.<16 hex>.<pid>.tmp`, as [`CompileCache::store`] names its temporary files.
fn is_temp_name(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .and_then(|n| n.split_once('.'))
        .is_some_and(|(nonce, pid)| {
            nonce.len() == 16
                && nonce.bytes().all(|b| b.is_ascii_hexdigit())
                && !pid.is_empty()
                && pid.bytes().all(|b| b.is_ascii_digit())
        })
}

/// The size the compile cache is kept within: after each store, the
/// entries used least recently are removed past it. A compiled Python
/// plugin is about 40 MB, a Rust one a few hundred KB.
const MAX_CACHE_BYTES: u64 = 2 << 30;

/// A temporary file older than this was left by a process that stopped
/// while writing it.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// The largest entry read (a compiled 18 MB Python runtime is ~40 MB).
const MAX_ENTRY_BYTES: u64 = 1 << 30;

/// This process's effective user.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// An entry's bytes: `None` when there is none; an error when it is not a
/// regular file of this user that others cannot write, or too large. The
/// file is opened without following links or waiting (a FIFO).
fn read_entry(path: &Path) -> Result<Option<Vec<u8>>, String> {
    use std::io::Read as _;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.file_type().is_file() {
        return Err("not a regular file".into());
    }
    if meta.uid() != euid() || meta.permissions().mode() & 0o022 != 0 {
        return Err(format!(
            "owned by user {} with mode {:o}: not this user's alone",
            meta.uid(),
            meta.permissions().mode() & 0o777
        ));
    }
    if meta.len() > MAX_ENTRY_BYTES {
        return Err(format!(
            "{} bytes, over the {MAX_ENTRY_BYTES} an entry may have",
            meta.len()
        ));
    }
    // Its time of last use, which eviction goes by (see `prune`); the
    // owner may set it through a read-only descriptor.
    let _ = file.set_modified(std::time::SystemTime::now());
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_ENTRY_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    Ok(Some(bytes))
}

/// Where the cache lives unless the configuration says otherwise: the
/// user's cache folder (`$XDG_CACHE_HOME`, else `~/.cache`).
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("wasm-model-gateway").join("compiled"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_others_can_write_is_refused() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("c");
        CompileCache::open(&cache, &engine).unwrap();
        assert_eq!(
            std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = CompileCache::open(&cache, &engine).unwrap_err();
        assert!(e.contains("others may write to it (mode 777)"), "{e}");
    }

    #[test]
    fn the_least_recently_used_entries_go_first() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path(), &engine).unwrap();
        let day = std::time::Duration::from_secs(86_400);
        let now = std::time::SystemTime::now();
        let file = |name: &str, bytes: usize, age_days: u32| {
            let path = dir.path().join(name);
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(bytes as u64).unwrap();
            f.set_modified(now - day * age_days).unwrap();
            path
        };
        let entry = |c: char| format!("{}-{}.cwasm", c.to_string().repeat(64), "0".repeat(16));
        let oldest = file(&entry('a'), 400, 3);
        let kept_new = file(&entry('b'), 400, 0);
        let middle = file(&entry('c'), 400, 2);
        let just_stored = file(&entry('d'), 400, 5);
        let stale_temp = file(".0123456789abcdef.42.tmp", 10, 1);
        let fresh_temp = file(".fedcba9876543210.42.tmp", 10, 0);
        let other = file("notes.txt", 10_000, 9);
        let not_ours = file("model.cwasm", 10_000, 9);
        let not_our_temp = file(".draft.tmp", 10, 9);
        // 1,600 bytes of entries in a budget of 900: the two used least
        // recently go, except the one just stored; files it did not name
        // are neither counted nor removed.
        cache.prune(&just_stored, 900, day / 2);
        assert!(!oldest.exists() && !middle.exists());
        assert!(kept_new.exists() && just_stored.exists());
        assert!(not_ours.exists() && not_our_temp.exists());
        assert!(!stale_temp.exists() && fresh_temp.exists() && other.exists());
    }

    #[test]
    fn entries_round_trip_and_damaged_ones_are_refused() {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        let engine = Engine::new(&config).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path(), &engine).unwrap();
        // The empty component, in its binary form.
        let empty = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
        let component = Component::new(&engine, empty).unwrap();
        let sha = Sha256::of(&empty);
        assert!(matches!(cache.load(&engine, &sha), Lookup::Miss));
        cache.store(&component, &sha).unwrap();
        assert!(matches!(cache.load(&engine, &sha), Lookup::Hit(_)));
        // One byte changed: refused and removed.
        let entry = cache.entry(&sha);
        let mut bytes = std::fs::read(&entry).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&entry, bytes).unwrap();
        assert!(matches!(cache.load(&engine, &sha), Lookup::Refused(m) if m.contains("checksum")));
        assert!(!entry.exists());
        // A link in the entry's place is not followed, and is removed.
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &entry).unwrap();
        assert!(matches!(cache.load(&engine, &sha), Lookup::Refused(_)));
        assert!(std::fs::symlink_metadata(&entry).is_err());
        // Another engine's settings name other entries.
        let mut config = wasmtime::Config::new();
        config
            .wasm_component_model(true)
            .cranelift_opt_level(wasmtime::OptLevel::None);
        let other = Engine::new(&config).unwrap();
        let other_cache = CompileCache::open(dir.path(), &other).unwrap();
        cache.store(&component, &sha).unwrap();
        assert!(matches!(other_cache.load(&other, &sha), Lookup::Miss));
    }
}
