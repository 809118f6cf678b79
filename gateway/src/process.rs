//! The process's own resources, read from `/proc` when a scrape asks
//! (Linux; elsewhere the series are left out): resident memory, CPU time,
//! open and allowed file descriptors, under the names every Prometheus
//! client library uses, so existing dashboards and alerts apply. The
//! tests and benchmarks read other processes' resident memory through
//! [`resident_kib`].

use std::fmt::Write;

/// Resident memory of process `pid`, in KiB (`VmRSS`).
pub fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// mimalloc's `purge_delay` option (`mi_option_e` in the `mimalloc.h` of
/// mimalloc 3, which libmimalloc-sys builds; it does not name the option).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc waits, after the first page of an arena is freed,
/// before the arena's freed pages may go back to the system (mimalloc 3:
/// they go at the first page free or collection, by any thread, once the
/// delay has passed; an allocation does not purge). Its default, 1000 ms,
/// kept what a burst freed: four 340,000-row requests left the binary
/// 9 MiB (+30 %) above its baseline a minute later. At 0 every freed page
/// went back at once, and a busy server paid for it: in 5 runs of 8, about
/// 0.5 `madvise` and 1 page fault per request and 118-140 µs of CPU per
/// request at 64 connections (92-98 µs in the other 3); at 10 ms,
/// 89-119 µs, 99 or less in 7 runs of 8 (`load --connections 64
/// --scenarios gateway`, runs interleaved).
const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Sets the binary's allocator (mimalloc) up: freed pages go back to the
/// system [`PURGE_DELAY_MS`] or more after they are freed.
pub fn tune_allocator() {
    // SAFETY: mi_option_set only stores the value; mimalloc reads it at
    // each purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}

/// How often a serving gateway sweeps the pages freed past the purge
/// delay ([`sweep_freed_memory`]).
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Every [`SWEEP_EVERY`], returns to the system the pages freed at least
/// [`PURGE_DELAY_MS`] before. mimalloc sweeps only when some thread frees
/// a page or collects: without this, a gateway that goes idle after a
/// burst would keep the last pages it freed until its next request.
pub(crate) async fn sweep_freed_memory() {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        every.tick().await;
        // SAFETY: mi_collect has no preconditions; not forced, so it
        // frees what is free in this thread's heap and purges what is due.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}

/// The runtime the binary serves on (the benchmarks too): a thread that
/// goes idle hands back what was freed for it ([`release_idle_memory`]).
/// `worker_threads` defaults to one per core.
pub fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .on_thread_park(release_idle_memory)
        .build()
}

/// How often, at most, a thread that goes idle hands memory back.
const RELEASE_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// Called by a server thread that goes idle (tokio's `on_thread_park`):
/// hands back to the system the memory other threads freed for it. A
/// block freed by a thread other than the one that allocated it (a body
/// read on one thread, decoded and dropped on the bulk pool) waits on its
/// owner's list until the owner allocates again or collects; a server
/// thread that goes idle after a burst may never do either, and four
/// 340,000-row requests left the binary 3-6 MiB (+10-22 %) above its
/// baseline a minute later, serving light traffic; with this, +1-2 %.
/// At most once per [`RELEASE_EVERY`] per thread: the collection visits
/// the thread's pages, and at every park it cost 12 % of the throughput
/// at 64 connections (wrk, 13.9k against 12.2k req/s, medians of five
/// interleaved runs).
pub fn release_idle_memory() {
    use std::cell::Cell;
    use std::time::Instant;
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    let due = LAST.with(|last| match last.get() {
        Some(at) if now.duration_since(at) < RELEASE_EVERY => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        // SAFETY: mi_collect has no preconditions; not forced, so it only
        // frees what is free and purges what is due.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}

fn gauge(out: &mut String, name: &str, help: &str, kind: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Appends the process series to a Prometheus text exposition.
pub(crate) fn render(out: &mut String) {
    if let Some(kib) = resident_kib(std::process::id()) {
        gauge(
            out,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            "gauge",
            (kib * 1024) as f64,
        );
    }
    #[cfg(target_os = "linux")]
    if let Some(cpu) = crate::cpu::clock_time(libc::CLOCK_PROCESS_CPUTIME_ID) {
        gauge(
            out,
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            "counter",
            cpu.as_secs_f64(),
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            out,
            "process_open_fds",
            "Number of open file descriptors.",
            "gauge",
            // Less the descriptor that lists them.
            fds.count().saturating_sub(1) as f64,
        );
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        gauge(
            out,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            "gauge",
            limit.rlim_cur as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // mimalloc 3's default purge delay is 1000 ms; its neighbours in
        // the enum (eager_commit_delay, use_numa_nodes) default to 1 and 0.
        // SAFETY: reading an option has no preconditions.
        let delay = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay, 1000);
    }

    #[test]
    fn the_series_of_this_process() {
        let mut out = String::new();
        super::render(&mut out);
        let value = |name: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing in\n{out}"))
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_cpu_seconds_total") > 0.0);
        let own = super::resident_kib(std::process::id()).unwrap();
        assert!(own > 1000, "{own} KiB");
        assert_eq!(super::resident_kib(u32::MAX), None);
    }
}
