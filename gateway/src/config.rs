//! Where `gateway serve`'s settings come from: the defaults, then the
//! configuration file (`--config`), then the flags and their environment
//! variables. The file is as strict as a policy: an unknown key, a wrong
//! type or a value out of range is an error naming its file, line and key,
//! and every problem is reported at once.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::policy::{self, PolicyError};
use crate::server::{AdminConfig, ServeOptions, TlsConfig};

// The bounds of the numeric settings, shared by the file and the flags.
pub(crate) const CONNECTIONS: RangeInclusive<i64> = 1..=1_000_000;
pub(crate) const CONNECTIONS_PER_PEER: RangeInclusive<i64> = 0..=1_000_000;
pub(crate) const TIMEOUT_MS: RangeInclusive<i64> = 1..=3_600_000;
pub(crate) const TIMEOUT_SECS: RangeInclusive<i64> = 1..=86_400;
pub(crate) const DRAIN_SECS: RangeInclusive<i64> = 0..=3_600;
/// A fleet's evaluation interval, and the delay after each boundary.
pub(crate) const FLEET_INTERVAL_SECS: RangeInclusive<i64> = 1..=86_400;
pub(crate) const FLEET_DELAY_SECS: RangeInclusive<i64> = 0..=3_600;
/// Their defaults: Prometheus's usual scrape interval, and two of them.
pub(crate) const FLEET_INTERVAL: Duration = Duration::from_secs(15);
pub(crate) const FLEET_DELAY: Duration = Duration::from_secs(30);
pub(crate) const HEADER_BYTES: RangeInclusive<i64> = 1_024..=(1 << 20);
pub(crate) const HEADERS: RangeInclusive<i64> = 1..=10_000;
pub(crate) const H2_STREAMS: RangeInclusive<i64> = 1..=10_000;
pub(crate) const H2_WINDOW: RangeInclusive<i64> = 65_535..=((1 << 31) - 1);
pub(crate) const H2_RESETS: RangeInclusive<i64> = 1..=100_000;
pub(crate) const BODY_BYTES: RangeInclusive<i64> = 1..=(4 << 30);
pub(crate) const COUNT: RangeInclusive<i64> = 1..=(1 << 40);
pub(crate) const MEBIBYTES: RangeInclusive<i64> = 1..=(1 << 20);
pub(crate) const INSTANCES: RangeInclusive<i64> = 1..=100_000;
pub(crate) const KEEP_RESIDENT_KIB: RangeInclusive<i64> = 0..=(64 << 10);
pub(crate) const QUEUE: RangeInclusive<i64> = 1..=1_000_000;
pub(crate) const DEBOUNCE_MS: RangeInclusive<i64> = 0..=600_000;

/// TLS files of one listener, as they are being gathered: a certificate
/// and a key make TLS; a CA bundle alone is an error.
#[derive(Clone, Debug, Default)]
pub(crate) struct TlsFiles {
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    pub(crate) client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn finish(self, what: &str) -> Result<Option<TlsConfig>, String> {
        match (self.cert, self.key) {
            (Some(cert), Some(key)) => Ok(Some(TlsConfig {
                cert,
                key,
                client_ca: self.client_ca,
            })),
            (None, None) if self.client_ca.is_none() => Ok(None),
            (None, None) => Err(format!(
                "{what}: a client CA bundle is set without a certificate and a key"
            )),
            _ => Err(format!(
                "{what}: TLS needs both a certificate chain and its key"
            )),
        }
    }
}

/// `gateway serve`'s settings while they are being gathered.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// Everything but what [`Settings::finish`] completes.
    pub(crate) options: ServeOptions,
    /// Plugin folders named by the operator (the built-in one is added by
    /// `finish`, last).
    pub(crate) plugin_dirs: Vec<PathBuf>,
    pub(crate) tls: TlsFiles,
    pub(crate) admin_listen: Option<SocketAddr>,
    pub(crate) admin_tls: TlsFiles,
    pub(crate) admin_token_file: Option<PathBuf>,
    pub(crate) feedback_token_file: Option<PathBuf>,
    pub(crate) watch: bool,
    pub(crate) reload_debounce: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        let mut options = ServeOptions::new(
            SocketAddr::from(([127, 0, 0, 1], 8080)),
            PathBuf::from("policies"),
            Vec::new(),
        );
        // The binary keeps compiled plugins (the library's default is none,
        // so tests and embedders choose).
        options.runtime.compile_cache = crate::runtime::cache::default_dir();
        Settings {
            reload_debounce: options.watch_debounce.unwrap_or(Duration::from_millis(500)),
            options,
            plugin_dirs: Vec::new(),
            tls: TlsFiles::default(),
            admin_listen: None,
            admin_tls: TlsFiles::default(),
            admin_token_file: None,
            feedback_token_file: None,
            watch: true,
        }
    }
}

impl Settings {
    /// Reads a configuration file over the settings so far; every problem
    /// of the file, or none applied.
    pub(crate) fn read_file(&mut self, file: &Path) -> Result<(), Vec<PolicyError>> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| vec![PolicyError::file(file, format!("cannot read: {e}"))])?;
        let raw: ConfigFile =
            toml::from_str(&text).map_err(|e| vec![policy::syntax_error(file, &text, &e)])?;
        let base = file.parent().unwrap_or(Path::new("."));
        let mut next = self.clone();
        let mut reader = Reader {
            file,
            text: &text,
            base,
            errors: Vec::new(),
        };
        reader.apply(&raw, &mut next);
        // In the order of the file, as people read it.
        reader.errors.sort_by_key(|e| (e.line, e.column));
        if reader.errors.is_empty() {
            *self = next;
            Ok(())
        } else {
            Err(reader.errors)
        }
    }

    /// The options `serve` runs with: TLS and the admin listener checked
    /// complete, the admin token read.
    pub(crate) fn finish(self) -> Result<ServeOptions, String> {
        let mut options = self.options;
        options.plugin_dirs = self.plugin_dirs;
        options
            .plugin_dirs
            .push(PathBuf::from(crate::artifacts::BUILT_PLUGIN_DIR));
        options.server.tls = self.tls.finish("the inference listener")?;
        let admin_tls = self.admin_tls.finish("the admin listener")?;
        options.server.admin = match (self.admin_listen, admin_tls) {
            (Some(listen), tls) => Some(AdminConfig { listen, tls }),
            (None, Some(_)) => {
                return Err("admin TLS is set but the admin listener is not".into());
            }
            (None, None) => None,
        };
        options.server.admin_token = token(self.admin_token_file.as_deref(), "admin")?;
        options.server.feedback_token = token(self.feedback_token_file.as_deref(), "feedback")?;
        options.watch_debounce = self.watch.then_some(self.reload_debounce);
        Ok(options)
    }
}

/// The `what` (admin, feedback) token: the file's first line, or
/// `GATEWAY_{WHAT}_TOKEN`.
fn token(file: Option<&Path>, what: &str) -> Result<Option<String>, String> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the {what} token file {}: {e}", path.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        None => std::env::var(format!("GATEWAY_{}_TOKEN", what.to_uppercase())).unwrap_or_default(),
    };
    if file.is_some() && token.is_empty() {
        return Err(format!("the {what} token file is empty"));
    }
    if !token.is_empty() && token.len() < 16 {
        return Err(format!("the {what} token is shorter than 16 characters"));
    }
    Ok((!token.is_empty()).then_some(token))
}

// ---- The file format. Every table refuses unknown keys. ----

type Int = Option<Spanned<i64>>;
type Text = Option<Spanned<String>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Text,
    #[serde(default)]
    policies: PoliciesTable,
    tls: Option<Spanned<TlsTable>>,
    admin: Option<Spanned<AdminTable>>,
    #[serde(default)]
    connections: ConnectionsTable,
    #[serde(default)]
    http2: Http2Table,
    #[serde(default)]
    requests: RequestsTable,
    #[serde(default)]
    sandboxes: SandboxesTable,
    #[serde(default)]
    shadows: ShadowsTable,
    #[serde(default)]
    shutdown: ShutdownTable,
    #[serde(default)]
    decisions: DecisionsTable,
    #[serde(default)]
    rollouts: RolloutsTable,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutsTable {
    state_dir: Text,
    tick_ms: Int,
    prometheus_url: Text,
    prometheus_match: Text,
    interval_secs: Int,
    delay_secs: Int,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoliciesTable {
    folder: Text,
    plugin_dirs: Option<Vec<Spanned<String>>>,
    watch: Option<bool>,
    reload_debounce_ms: Int,
    allow_empty: Option<bool>,
    compile_cache: Option<CompileCache>,
}

/// `policies.compile_cache`: a folder, or `false` for none.
#[derive(Deserialize)]
#[serde(untagged)]
enum CompileCache {
    Folder(String),
    Enabled(bool),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsTable {
    cert: Text,
    key: Text,
    client_ca: Text,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminTable {
    listen: Text,
    token_file: Text,
    tls: Option<Spanned<TlsTable>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionsTable {
    max: Int,
    max_per_peer: Int,
    first_byte_timeout_ms: Int,
    tls_handshake_timeout_ms: Int,
    header_read_timeout_secs: Int,
    idle_timeout_secs: Int,
    write_timeout_secs: Int,
    max_header_bytes: Int,
    max_headers: Int,
    max_header_value_bytes: Int,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Http2Table {
    max_concurrent_streams: Int,
    stream_window_bytes: Int,
    connection_window_bytes: Int,
    keep_alive_interval_secs: Int,
    keep_alive_timeout_secs: Int,
    max_pending_accept_reset_streams: Int,
    max_local_error_reset_streams: Int,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestsTable {
    max_body_bytes: Int,
    body_read_timeout_secs: Int,
    max_inputs: Int,
    max_tensor_elements: Int,
    max_bytes_element: Int,
    max_id_bytes: Int,
    max_parameters_bytes: Int,
    max_inflight_mebibytes: Int,
    bulk_kib: Int,
    bulk_queue: Int,
    ground_truth_keep: Int,
    feedback_token_file: Text,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SandboxesTable {
    max_instances: Int,
    max_memory_mebibytes: Int,
    max_total_memory_mebibytes: Int,
    keep_resident_kib: Int,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShadowsTable {
    cpu_percent: Option<Spanned<f64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionsTable {
    dir: Text,
    max_file_mebibytes: Int,
    max_files: Int,
    sink_url: Text,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShutdownTable {
    drain_delay_secs: Int,
    grace_secs: Int,
}

/// Checks a file's values and applies them, collecting every problem.
struct Reader<'a> {
    file: &'a Path,
    text: &'a str,
    /// Relative paths in the file are relative to its folder.
    base: &'a Path,
    errors: Vec<PolicyError>,
}

impl Reader<'_> {
    fn error(&mut self, span: std::ops::Range<usize>, key: &str, message: impl Into<String>) {
        let location = policy::locate(self.file, self.text, span.start, key);
        self.errors.push(PolicyError::at(&location, message));
    }

    fn int<T: TryFrom<i64>>(
        &mut self,
        value: &Int,
        key: &str,
        range: RangeInclusive<i64>,
    ) -> Option<T> {
        let value = value.as_ref()?;
        let v = *value.get_ref();
        match T::try_from(v) {
            Ok(t) if range.contains(&v) => Some(t),
            _ => {
                let message = format!(
                    "{v} is out of range; allowed: {} to {}",
                    range.start(),
                    range.end()
                );
                self.error(value.span(), key, message);
                None
            }
        }
    }

    fn millis(&mut self, value: &Int, key: &str, range: RangeInclusive<i64>) -> Option<Duration> {
        self.int(value, key, range).map(Duration::from_millis)
    }

    fn secs(&mut self, value: &Int, key: &str, range: RangeInclusive<i64>) -> Option<Duration> {
        self.int(value, key, range).map(Duration::from_secs)
    }

    fn mebibytes(&mut self, value: &Int, key: &str) -> Option<usize> {
        self.int::<usize>(value, key, MEBIBYTES)
            .map(|m| m.saturating_mul(1 << 20))
    }

    fn path(&mut self, value: &Text, key: &str) -> Option<PathBuf> {
        let value = value.as_ref()?;
        if value.get_ref().is_empty() {
            self.error(value.span(), key, "is empty; name a file or folder");
            return None;
        }
        Some(self.base.join(value.get_ref()))
    }

    fn addr(&mut self, value: &Text, key: &str) -> Option<SocketAddr> {
        let value = value.as_ref()?;
        match value.get_ref().parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                let message = format!(
                    "{:?} is not an address and port such as \"127.0.0.1:8080\" or \"[::]:8080\"",
                    value.get_ref()
                );
                self.error(value.span(), key, message);
                None
            }
        }
    }

    fn tls(&mut self, table: &Spanned<TlsTable>, key: &str, into: &mut TlsFiles) {
        let t = table.get_ref();
        let files = TlsFiles {
            cert: self.path(&t.cert, &format!("{key}.cert")),
            key: self.path(&t.key, &format!("{key}.key")),
            client_ca: self.path(&t.client_ca, &format!("{key}.client_ca")),
        };
        if files.cert.is_none() || files.key.is_none() {
            if t.cert.is_none() || t.key.is_none() {
                self.error(table.span(), key, "needs both `cert` and `key`");
            }
            return;
        }
        *into = files;
    }

    fn apply(&mut self, raw: &ConfigFile, s: &mut Settings) {
        macro_rules! set {
            ($target:expr, $value:expr) => {
                if let Some(v) = $value {
                    $target = v;
                }
            };
        }
        set!(s.options.listen, self.addr(&raw.listen, "listen"));

        let p = &raw.policies;
        set!(s.options.policies, self.path(&p.folder, "policies.folder"));
        if let Some(dirs) = &p.plugin_dirs {
            let dirs: Vec<_> = dirs
                .iter()
                .filter_map(|d| self.path(&Some(d.clone()), "policies.plugin_dirs"))
                .collect();
            s.plugin_dirs = dirs;
        }
        set!(s.watch, p.watch);
        match &p.compile_cache {
            None => {}
            Some(CompileCache::Folder(dir)) if dir.is_empty() => {
                self.errors.push(PolicyError::key(
                    self.file,
                    "policies.compile_cache",
                    "is empty; name a folder, or write `false` for no cache",
                ));
            }
            Some(CompileCache::Folder(dir)) => {
                s.options.runtime.compile_cache = Some(self.base.join(dir));
            }
            Some(CompileCache::Enabled(false)) => s.options.runtime.compile_cache = None,
            Some(CompileCache::Enabled(true)) => {
                s.options.runtime.compile_cache = crate::runtime::cache::default_dir();
            }
        }
        set!(
            s.reload_debounce,
            self.millis(
                &p.reload_debounce_ms,
                "policies.reload_debounce_ms",
                DEBOUNCE_MS
            )
        );
        set!(s.options.allow_empty_policies, p.allow_empty);

        if let Some(tls) = &raw.tls {
            self.tls(tls, "tls", &mut s.tls);
        }
        if let Some(admin) = &raw.admin {
            let a = admin.get_ref();
            match self.addr(&a.listen, "admin.listen") {
                Some(listen) => s.admin_listen = Some(listen),
                None if a.listen.is_none() => self.error(
                    admin.span(),
                    "admin",
                    "needs `listen`: the admin listener is off without an address",
                ),
                None => {}
            }
            set!(
                s.admin_token_file,
                self.path(&a.token_file, "admin.token_file").map(Some)
            );
            if let Some(tls) = &a.tls {
                self.tls(tls, "admin.tls", &mut s.admin_tls);
            }
        }

        let c = &raw.connections;
        let limits = &mut s.options.server.connections;
        set!(
            limits.max_connections,
            self.int(&c.max, "connections.max", CONNECTIONS)
        );
        set!(
            limits.max_connections_per_peer,
            self.int(
                &c.max_per_peer,
                "connections.max_per_peer",
                CONNECTIONS_PER_PEER
            )
        );
        set!(
            limits.first_byte_timeout,
            self.millis(
                &c.first_byte_timeout_ms,
                "connections.first_byte_timeout_ms",
                TIMEOUT_MS
            )
        );
        set!(
            limits.tls_handshake_timeout,
            self.millis(
                &c.tls_handshake_timeout_ms,
                "connections.tls_handshake_timeout_ms",
                TIMEOUT_MS
            )
        );
        set!(
            limits.header_read_timeout,
            self.secs(
                &c.header_read_timeout_secs,
                "connections.header_read_timeout_secs",
                TIMEOUT_SECS
            )
        );
        set!(
            limits.idle_timeout,
            self.secs(
                &c.idle_timeout_secs,
                "connections.idle_timeout_secs",
                TIMEOUT_SECS
            )
        );
        set!(
            limits.write_timeout,
            self.secs(
                &c.write_timeout_secs,
                "connections.write_timeout_secs",
                TIMEOUT_SECS
            )
        );
        set!(
            limits.max_header_bytes,
            self.int(
                &c.max_header_bytes,
                "connections.max_header_bytes",
                HEADER_BYTES
            )
        );
        set!(
            limits.max_headers,
            self.int(&c.max_headers, "connections.max_headers", HEADERS)
        );
        set!(
            s.options.server.max_header_value_bytes,
            self.int(
                &c.max_header_value_bytes,
                "connections.max_header_value_bytes",
                HEADER_BYTES
            )
        );

        let h = &raw.http2;
        let h2 = &mut s.options.server.connections.http2;
        set!(
            h2.max_concurrent_streams,
            self.int(
                &h.max_concurrent_streams,
                "http2.max_concurrent_streams",
                H2_STREAMS
            )
        );
        set!(
            h2.stream_window_bytes,
            self.int(
                &h.stream_window_bytes,
                "http2.stream_window_bytes",
                H2_WINDOW
            )
        );
        set!(
            h2.connection_window_bytes,
            self.int(
                &h.connection_window_bytes,
                "http2.connection_window_bytes",
                H2_WINDOW
            )
        );
        set!(
            h2.keep_alive_interval,
            self.secs(
                &h.keep_alive_interval_secs,
                "http2.keep_alive_interval_secs",
                TIMEOUT_SECS
            )
        );
        set!(
            h2.keep_alive_timeout,
            self.secs(
                &h.keep_alive_timeout_secs,
                "http2.keep_alive_timeout_secs",
                TIMEOUT_SECS
            )
        );
        set!(
            h2.max_pending_accept_reset_streams,
            self.int(
                &h.max_pending_accept_reset_streams,
                "http2.max_pending_accept_reset_streams",
                H2_RESETS
            )
        );
        set!(
            h2.max_local_error_reset_streams,
            self.int(
                &h.max_local_error_reset_streams,
                "http2.max_local_error_reset_streams",
                H2_RESETS
            )
        );

        let r = &raw.requests;
        let server = &mut s.options.server;
        set!(
            server.max_body_bytes,
            self.int(&r.max_body_bytes, "requests.max_body_bytes", BODY_BYTES)
        );
        set!(
            server.body_read_timeout,
            self.secs(
                &r.body_read_timeout_secs,
                "requests.body_read_timeout_secs",
                TIMEOUT_SECS
            )
        );
        let decode = &mut server.decode;
        set!(
            decode.max_inputs,
            self.int(&r.max_inputs, "requests.max_inputs", COUNT)
        );
        set!(
            decode.max_elements,
            self.int(
                &r.max_tensor_elements,
                "requests.max_tensor_elements",
                COUNT
            )
        );
        set!(
            decode.max_bytes_element,
            self.int(
                &r.max_bytes_element,
                "requests.max_bytes_element",
                BODY_BYTES
            )
        );
        set!(
            decode.max_id_bytes,
            self.int(&r.max_id_bytes, "requests.max_id_bytes", BODY_BYTES)
        );
        set!(
            decode.max_parameters_bytes,
            self.int(
                &r.max_parameters_bytes,
                "requests.max_parameters_bytes",
                BODY_BYTES
            )
        );
        let pipeline = &mut s.options.pipeline;
        set!(
            pipeline.max_inflight_bytes,
            self.mebibytes(&r.max_inflight_mebibytes, "requests.max_inflight_mebibytes")
        );
        set!(
            pipeline.bulk_bytes,
            self.int::<usize>(&r.bulk_kib, "requests.bulk_kib", MEBIBYTES)
                .map(|k| k.saturating_mul(1 << 10))
        );
        set!(
            pipeline.bulk_queue,
            self.int(&r.bulk_queue, "requests.bulk_queue", QUEUE)
        );
        set!(
            pipeline.ground_truth_keep,
            self.int(&r.ground_truth_keep, "requests.ground_truth_keep", QUEUE)
        );
        set!(
            s.feedback_token_file,
            self.path(&r.feedback_token_file, "requests.feedback_token_file")
                .map(Some)
        );

        let b = &raw.sandboxes;
        set!(
            s.options.runtime.max_instances,
            self.int(&b.max_instances, "sandboxes.max_instances", INSTANCES)
        );
        set!(
            s.options.runtime.max_memory_bytes,
            self.mebibytes(&b.max_memory_mebibytes, "sandboxes.max_memory_mebibytes")
        );
        set!(
            s.options.pipeline.max_sandbox_memory_bytes,
            self.mebibytes(
                &b.max_total_memory_mebibytes,
                "sandboxes.max_total_memory_mebibytes"
            )
        );
        set!(
            s.options.runtime.keep_resident_bytes,
            self.int::<usize>(
                &b.keep_resident_kib,
                "sandboxes.keep_resident_kib",
                KEEP_RESIDENT_KIB
            )
            .map(|k| k << 10)
        );

        if let Some(p) = &raw.shadows.cpu_percent {
            match percent(*p.get_ref()) {
                Ok(p) => s.options.pipeline.shadow_cpu_percent = p,
                Err(e) => self.error(p.span(), "shadows.cpu_percent", e),
            }
        }

        let r = &raw.rollouts;
        if let Some(dir) = self.path(&r.state_dir, "rollouts.state_dir") {
            s.options.state_dir = Some(dir);
        }
        set!(
            s.options.rollout_tick,
            self.int::<u64>(&r.tick_ms, "rollouts.tick_ms", 10..=60_000)
                .map(Duration::from_millis)
        );
        let prometheus = r.prometheus_url.as_ref().and_then(|url| {
            crate::http_url::HttpUrl::parse(url.get_ref())
                .map_err(|e| self.error(url.span(), "rollouts.prometheus_url", e))
                .ok()
        });
        let matchers = r.prometheus_match.as_ref().and_then(|m| {
            crate::rollout::fleet::Matchers::parse(m.get_ref())
                .map_err(|e| self.error(m.span(), "rollouts.prometheus_match", e))
                .ok()
        });
        let every = self.secs(
            &r.interval_secs,
            "rollouts.interval_secs",
            FLEET_INTERVAL_SECS,
        );
        let delay = self.secs(&r.delay_secs, "rollouts.delay_secs", FLEET_DELAY_SECS);
        match prometheus {
            Some(prometheus) => {
                s.options.fleet = Some(crate::rollout::fleet::Settings {
                    prometheus,
                    every: every.unwrap_or(FLEET_INTERVAL),
                    delay: delay.unwrap_or(FLEET_DELAY),
                    matchers: matchers.unwrap_or_default(),
                })
            }
            None if every.is_some() || delay.is_some() || matchers.is_some() => self.errors.push(PolicyError::key(
                self.file,
                "rollouts",
                "sets a fleet's interval, delay or matchers but no `prometheus_url`: rollouts are judged by this gateway alone without one",
            )),
            None => {}
        }

        let l = &raw.decisions;
        if let Some(dir) = self.path(&l.dir, "decisions.dir") {
            s.options.decisions = Some(crate::decisions::DecisionLogConfig::new(dir));
        }
        let file_bytes = self.mebibytes(&l.max_file_mebibytes, "decisions.max_file_mebibytes");
        let files = self.int::<usize>(&l.max_files, "decisions.max_files", 1..=100_000);
        let sink = l.sink_url.as_ref().and_then(|url| {
            crate::decisions::SinkUrl::parse(url.get_ref())
                .map_err(|e| self.error(url.span(), "decisions.sink_url", e))
                .ok()
        });
        match s.options.decisions.as_mut() {
            Some(log) => {
                set!(log.max_file_bytes, file_bytes.map(|b| b as u64));
                set!(log.max_files, files);
                if sink.is_some() {
                    log.sink = sink;
                }
            }
            None if file_bytes.is_some() || files.is_some() || sink.is_some() => self.errors.push(PolicyError::key(
                self.file,
                "decisions",
                "sets the log's limits or sink but no `dir`: the decision log is off without one (the sink sends what the log writes)",
            )),
            None => {}
        }

        let d = &raw.shutdown;
        set!(
            s.options.server.drain_delay,
            self.secs(&d.drain_delay_secs, "shutdown.drain_delay_secs", DRAIN_SECS)
        );
        set!(
            s.options.server.shutdown_grace,
            self.secs(&d.grace_secs, "shutdown.grace_secs", DRAIN_SECS)
        );
    }
}

/// A percentage from 0 to 100.
pub(crate) fn percent(p: f64) -> Result<f64, String> {
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{p} is not a percentage from 0 to 100"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Settings, Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, text).unwrap();
        let mut settings = Settings::default();
        settings
            .read_file(&file)
            .map(|()| settings)
            .map_err(|errors| {
                errors
                    .iter()
                    .map(|e| {
                        e.to_string()
                            .replace(&dir.path().display().to_string(), "DIR")
                    })
                    .collect()
            })
    }

    /// The example in the repository sets every key to its default.
    #[test]
    fn the_example_file_is_the_defaults() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway.toml");
        let mut settings = Settings::default();
        settings.read_file(&file).unwrap();
        let dir = file.parent().unwrap();
        assert_eq!(settings.options.policies, dir.join("policies"));
        settings.options.policies = Settings::default().options.policies;
        assert_eq!(
            format!("{:?}", settings.options),
            format!("{:?}", Settings::default().options)
        );
        assert!(settings.plugin_dirs.is_empty() && settings.watch);
    }

    #[test]
    fn applies_values_with_paths_relative_to_the_file() {
        let s = read(
            "listen = \"0.0.0.0:9000\"\n\
             [policies]\nfolder = \"p\"\nplugin_dirs = [\"a\", \"/abs\"]\nwatch = false\n\
             [tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
             [connections]\nmax = 5\nfirst_byte_timeout_ms = 250\n\
             [http2]\nstream_window_bytes = 1048576\n\
             [sandboxes]\nmax_total_memory_mebibytes = 2\nkeep_resident_kib = 0\n\
             [shadows]\ncpu_percent = 2.5\n\
             [decisions]\ndir = \"log\"\nmax_files = 3\nsink_url = \"http://127.0.0.1:9000/e\"\n",
        )
        .unwrap();
        let log = s.options.decisions.as_ref().unwrap();
        assert!(log.dir.ends_with("log") && log.dir.is_absolute());
        assert_eq!((log.max_files, log.max_file_bytes), (3, 64 << 20));
        assert_eq!(
            log.sink.as_ref().map(ToString::to_string).as_deref(),
            Some("http://127.0.0.1:9000/e")
        );
        let e = read("[decisions]\nmax_files = 3\n").unwrap_err();
        assert!(e[0].contains("no `dir`"), "{e:?}");
        let e = read("[decisions]\ndir = \"log\"\nsink_url = \"https://c/e\"\n").unwrap_err();
        assert!(
            e[0].contains(
                ":3:12: `decisions.sink_url`: `https://c/e`: only http:// is spoken, not https"
            ),
            "{e:?}"
        );
        assert_eq!(s.options.listen, "0.0.0.0:9000".parse().unwrap());
        assert!(s.options.policies.ends_with("p") && s.options.policies.is_absolute());
        assert_eq!(s.plugin_dirs[1], PathBuf::from("/abs"));
        assert!(!s.watch);
        assert!(s.tls.cert.as_ref().unwrap().ends_with("c.pem"));
        assert_eq!(s.options.server.connections.max_connections, 5);
        assert_eq!(
            s.options.server.connections.first_byte_timeout,
            Duration::from_millis(250)
        );
        assert_eq!(
            s.options.server.connections.http2.stream_window_bytes,
            1 << 20
        );
        assert_eq!(s.options.pipeline.max_sandbox_memory_bytes, 2 << 20);
        assert_eq!(s.options.runtime.keep_resident_bytes, 0);
        assert_eq!(s.options.pipeline.shadow_cpu_percent, 2.5);
    }

    #[test]
    fn reports_every_problem_with_line_and_key() {
        let errors = read(
            "listen = \"localhost\"\n\
             [connections]\nmax = 0\nidle_timeout_secs = 100000\n\
             [tls]\ncert = \"c.pem\"\n\
             [admin]\ntoken_file = \"t\"\n\
             [shadows]\ncpu_percent = 101.0\n",
        )
        .unwrap_err();
        assert_eq!(
            errors,
            [
                "DIR/gateway.toml:1:10: `listen`: \"localhost\" is not an address and port \
                 such as \"127.0.0.1:8080\" or \"[::]:8080\"",
                "DIR/gateway.toml:3:7: `connections.max`: 0 is out of range; allowed: 1 to 1000000",
                "DIR/gateway.toml:4:21: `connections.idle_timeout_secs`: 100000 is out of \
                 range; allowed: 1 to 86400",
                "DIR/gateway.toml:5:1: `tls`: needs both `cert` and `key`",
                "DIR/gateway.toml:7:1: `admin`: needs `listen`: the admin listener is off \
                 without an address",
                "DIR/gateway.toml:10:15: `shadows.cpu_percent`: 101 is not a percentage from \
                 0 to 100",
            ]
        );
    }

    #[test]
    fn refuses_unknown_keys_and_wrong_types() {
        let errors = read("[connections]\nmax_conections = 5\n").unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("DIR/gateway.toml:2:1: unknown field `max_conections`"),
            "{errors:?}"
        );
        let errors = read("[connections]\nmax = \"5\"\n").unwrap_err();
        assert!(
            errors[0].starts_with("DIR/gateway.toml:2:7: invalid type"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_file_with_errors_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, "[connections]\nmax = 7\nmax_per_peer = -1\n").unwrap();
        let mut settings = Settings::default();
        assert!(settings.read_file(&file).is_err());
        assert_eq!(settings.options.server.connections.max_connections, 20_000);
    }

    #[test]
    fn tls_needs_a_pair_and_admin_tls_a_listener() {
        let mut s = Settings::default();
        s.tls.client_ca = Some("ca.pem".into());
        assert!(s.clone().finish().unwrap_err().contains("client CA bundle"));
        s.tls = TlsFiles::default();
        s.admin_tls.cert = Some("c".into());
        assert!(
            s.clone()
                .finish()
                .unwrap_err()
                .contains("both a certificate")
        );
        s.admin_tls.key = Some("k".into());
        assert!(
            s.clone()
                .finish()
                .unwrap_err()
                .contains("admin listener is not")
        );
    }

    #[test]
    fn a_fleet_needs_prometheus() {
        let s = read("[rollouts]\nprometheus_url = \"http://127.0.0.1:9090\"\ninterval_secs = 5\n")
            .unwrap();
        let fleet = s.options.fleet.unwrap();
        assert_eq!(fleet.prometheus.to_string(), "http://127.0.0.1:9090/");
        assert_eq!(fleet.matchers, Default::default());
        let s = read(
            "[rollouts]\nprometheus_url = \"http://p:9090\"\nprometheus_match = 'job=\"prod\"'\n",
        )
        .unwrap();
        assert_eq!(
            s.options.fleet.unwrap().matchers.to_string(),
            "job=\"prod\""
        );
        let e = read(
            "[rollouts]\nprometheus_url = \"http://p:9090\"\nprometheus_match = 'model=\"m\"'\n",
        )
        .unwrap_err();
        assert!(e[0].contains("rollouts.prometheus_match"), "{e:?}");
        assert_eq!(
            (fleet.every, fleet.delay),
            (Duration::from_secs(5), FLEET_DELAY)
        );
        let e = read("[rollouts]\ndelay_secs = 5\n").unwrap_err();
        assert!(e[0].contains("no `prometheus_url`"), "{e:?}");
        let e =
            read("[rollouts]\nprometheus_url = \"https://p\"\ninterval_secs = 0\n").unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].contains("rollouts.prometheus_url") && e[0].contains("not https"),
            "{e:?}"
        );
        assert!(e[1].contains("rollouts.interval_secs"), "{e:?}");
    }
}
