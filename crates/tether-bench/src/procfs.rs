//! What the bench reads from `/proc` about the machine and about the
//! processes it measures (a head, the floor's server, itself): CPU time, resident memory,
//! open descriptors, and the open-file limit.

use crate::report::{obj, Json};
use std::time::{Duration, Instant};

/// Whose `/proc` entry to read.
#[derive(Debug, Clone, Copy)]
pub enum Pid {
    /// The bench itself.
    Me,
    /// Another process.
    Of(u32),
}

impl Pid {
    fn dir(self) -> String {
        match self {
            Pid::Me => "/proc/self".to_owned(),
            Pid::Of(pid) => format!("/proc/{pid}"),
        }
    }
}

/// Clock ticks per second of `utime`/`stime` in `/proc/PID/stat`.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// CPU time a process used so far (user + system), and when it was read.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    pub cpu: Duration,
    /// The part spent in the kernel (system time).
    pub sys: Duration,
    pub at: Instant,
}

/// Reads user + system time from `/proc/PID/stat` (fields 14 and 15).
pub fn cpu(pid: Pid) -> Option<CpuSample> {
    let stat = std::fs::read_to_string(format!("{}/stat", pid.dir())).ok()?;
    // The command name (field 2) may hold spaces: fields start after ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field n is at index n - 3.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(CpuSample {
        cpu: Duration::from_secs_f64((utime + stime) / clock_ticks()),
        sys: Duration::from_secs_f64(stime / clock_ticks()),
        at: Instant::now(),
    })
}

/// CPU time (user + system) used between two samples.
pub fn cpu_between(before: CpuSample, after: CpuSample) -> Duration {
    after.cpu.saturating_sub(before.cpu)
}

/// CPU used between two samples, in percent of one core.
pub fn cpu_percent(before: CpuSample, after: CpuSample) -> f64 {
    let wall = after.at.duration_since(before.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    after.cpu.saturating_sub(before.cpu).as_secs_f64() / wall * 100.0
}

/// Kernel (system) CPU used between two samples, in percent of one core.
pub fn sys_percent(before: CpuSample, after: CpuSample) -> f64 {
    let wall = after.at.duration_since(before.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    after.sys.saturating_sub(before.sys).as_secs_f64() / wall * 100.0
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: Pid, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("{}/status", pid.dir())).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// How many descriptors the process has open.
pub fn open_fds(pid: Pid) -> Option<usize> {
    std::fs::read_dir(format!("{}/fd", pid.dir()))
        .ok()
        .map(|d| d.count())
}

/// The soft open-file limit of a process, from `/proc/PID/limits`.
pub fn nofile_limit(pid: Pid) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("{}/limits", pid.dir())).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Raises this process's open-file limit (soft and hard) to `want` if it
/// may; returns the soft limit in force afterwards. Children inherit it:
/// see [`set_nofile_of`].
pub fn raise_own_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur >= want {
        return lim.rlim_cur;
    }
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(lim.rlim_max),
    };
    // SAFETY: a valid rlimit; failing (no privilege) leaves the old one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return want;
    }
    // Without privilege, at least the soft limit can reach the hard one.
    let soft = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } == 0 {
        lim.rlim_max
    } else {
        lim.rlim_cur
    }
}

/// Sets the open-file limit (soft and hard) of process `pid`, so that a
/// head runs under the machine's limit even when the bench raised its own.
pub fn set_nofile_of(pid: u32, limit: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: a valid rlimit in, no old value requested.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    read_trimmed("/proc/loadavg")
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

/// Processes named `tether-head` or `tether-worker` that the bench did not
/// start (someone else's tests or demo), which share the machine.
pub fn foreign_tether_processes(ours: &[u32]) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !ours.contains(pid))
        .filter(|pid| {
            let comm = read_trimmed(&format!("/proc/{pid}/comm"));
            comm == "tether-head" || comm == "tether-worker"
        })
        .count()
}

/// The machine, as `/proc` describes it, for the JSON report.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub mem_total_kib: u64,
    pub kernel: String,
    pub loadavg_start: f64,
    pub foreign_start: usize,
}

impl Machine {
    /// Reads the machine's description now.
    pub fn read() -> Self {
        let cpuinfo = read_trimmed("/proc/cpuinfo");
        let cores = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default();
        let mem_total_kib = read_trimmed("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        Self {
            cores,
            cpu_model,
            mem_total_kib,
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            loadavg_start: loadavg(),
            foreign_start: foreign_tether_processes(&[]),
        }
    }

    /// The JSON description, with the load at the end of the run (after
    /// the bench's own heads were stopped).
    pub fn json(&self) -> Json {
        obj([
            ("cores", Json::from(self.cores)),
            ("cpu_model", Json::from(self.cpu_model.as_str())),
            ("mem_total_kib", Json::from(self.mem_total_kib)),
            ("kernel", Json::from(self.kernel.as_str())),
            ("loadavg_1m_start", Json::from(self.loadavg_start)),
            ("loadavg_1m_end", Json::from(loadavg())),
            (
                "foreign_tether_processes_start",
                Json::from(self.foreign_start),
            ),
            (
                "foreign_tether_processes_end",
                Json::from(foreign_tether_processes(&[])),
            ),
            (
                "bench_nofile_limit",
                Json::from(nofile_limit(Pid::Me).unwrap_or(0)),
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_readable() {
        assert!(cpu(Pid::Me).is_some());
        assert!(status_kib(Pid::Me, "VmRSS").unwrap() > 0);
        assert!(open_fds(Pid::Me).unwrap() > 0);
        assert!(nofile_limit(Pid::Me).unwrap() > 0);
    }
}
