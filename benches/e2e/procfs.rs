//! CPU time and peak memory of a process, from /proc (Linux only).

use std::time::Duration;

/// Clock ticks per second for /proc/<pid>/stat times (`getconf CLK_TCK`;
/// 100 on every common Linux). Read by running `getconf` once because the
/// `nix` feature that exposes `sysconf` is not enabled in this crate.
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// utime + stime of `pid` (all threads), as a duration.
pub fn cpu_time(pid: u32, ticks_per_s: u64) -> Result<Duration, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("{path}: no `)` in {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime is field 14, stime field 15.
    let field = |n: usize| -> Result<u64, String> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{path}: field {n} missing or not a number"))
    };
    let ticks = field(14)? + field(15)?;
    Ok(Duration::from_secs_f64(ticks as f64 / ticks_per_s as f64))
}

/// A `kB` field of /proc/<pid>/status (`VmHWM`: peak RSS; `VmRSS`: now), in bytes.
pub fn status_bytes(pid: u32, key: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("{path}: no {key} line"))
}

/// Busy and total time of the whole machine (every core), in clock ticks,
/// from the `cpu` line of /proc/stat. Busy is everything but idle and
/// iowait: the load generator, the sink, the agent, and the kernel work
/// (softirqs, writeback) that no process is charged for.
pub fn machine_ticks() -> Result<(u64, u64), String> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or("/proc/stat: no `cpu` line")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| {
            v.parse()
                .map_err(|_| format!("/proc/stat: {v:?} is not a number"))
        })
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let field = |n: usize| ticks.get(n).copied().unwrap_or(0);
    let total: u64 = (0..8).map(field).sum();
    let busy = total - field(3) - field(4);
    Ok((busy, total))
}

/// Where the CPU of one load run went: this process (the load generator and
/// the sink), the whole machine, over the run's wall time.
pub struct CpuMeter {
    ticks_per_s: u64,
    bench0: Duration,
    machine0: (u64, u64),
    started: std::time::Instant,
}

/// [`CpuMeter::finish`]: CPU-seconds per million items, and cores in use.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUse {
    /// This process (generator + sink), CPU-s per million items.
    pub bench_per_m: f64,
    /// The whole machine, CPU-s per million items.
    pub machine_per_m: f64,
    /// Mean busy cores of the machine over the run.
    pub busy_cores: f64,
}

impl CpuMeter {
    pub fn start() -> Result<CpuMeter, String> {
        let ticks_per_s = clock_ticks();
        Ok(CpuMeter {
            ticks_per_s,
            bench0: cpu_time(std::process::id(), ticks_per_s)?,
            machine0: machine_ticks()?,
            started: std::time::Instant::now(),
        })
    }

    pub fn finish(&self, items: u64) -> Result<CpuUse, String> {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let bench = cpu_time(std::process::id(), self.ticks_per_s)?.saturating_sub(self.bench0);
        let (busy, _) = machine_ticks()?;
        let busy_s = busy.saturating_sub(self.machine0.0) as f64 / self.ticks_per_s as f64;
        let millions = (items as f64 / 1e6).max(1e-9);
        Ok(CpuUse {
            bench_per_m: bench.as_secs_f64() / millions,
            machine_per_m: busy_s / millions,
            busy_cores: busy_s / wall,
        })
    }
}
