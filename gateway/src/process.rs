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
