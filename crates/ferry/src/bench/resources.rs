//! What the servers under test spent during a run, read from `/proc/PID/{stat,status,io}` of
//! the processes named by `--pids`: CPU seconds, bytes written to storage, peak resident
//! memory. Works for any server process (Ferry or NATS), so both are measured alike.

use anyhow::Context;
use serde::Serialize;

/// One reading of one process.
#[derive(Debug, Clone, Copy)]
struct Reading {
    cpu_seconds: f64,
    write_bytes: u64,
}

/// Readings of every watched process at the start of a run.
pub(crate) struct Watch {
    pids: Vec<u32>,
    start: Vec<Reading>,
}

/// What the watched processes spent.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Resources {
    /// The processes watched.
    pub(crate) pids: Vec<u32>,
    /// CPU seconds (user + system) of all of them, per million events.
    pub(crate) cpu_seconds_per_million_events: f64,
    /// Peak resident memory of each during the run (VmHWM, reset at the start), MiB.
    pub(crate) peak_rss_mib: Vec<f64>,
    /// Bytes they wrote to storage per byte of event payload, divided by `replicas`: what
    /// one replica writes per payload byte.
    pub(crate) write_amplification_per_replica: f64,
}

impl Watch {
    /// Takes the first reading, and resets each process's peak RSS so the run's own peak is
    /// reported (writing 5 to `/proc/PID/clear_refs`; where that is not allowed the peak is
    /// the process's since it started).
    pub(crate) fn start(pids: &[u32]) -> anyhow::Result<Self> {
        for pid in pids {
            let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        }
        let start = pids
            .iter()
            .map(|p| read(*p))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            pids: pids.to_vec(),
            start,
        })
    }

    /// Takes the second reading and relates it to `events` of `payload_bytes` stored on
    /// `replicas` replicas.
    pub(crate) fn finish(
        &self,
        events: u64,
        payload_bytes: u64,
        replicas: u32,
    ) -> anyhow::Result<Resources> {
        let (mut cpu, mut written) = (0.0, 0u64);
        let mut peak_rss_mib = Vec::new();
        for (pid, before) in self.pids.iter().zip(&self.start) {
            let after = read(*pid)?;
            cpu += after.cpu_seconds - before.cpu_seconds;
            written += after.write_bytes.saturating_sub(before.write_bytes);
            peak_rss_mib.push(status_kib(*pid, "VmHWM:")? as f64 / 1024.0);
        }
        let payload = (events * payload_bytes).max(1) as f64;
        Ok(Resources {
            pids: self.pids.clone(),
            cpu_seconds_per_million_events: cpu / events.max(1) as f64 * 1e6,
            peak_rss_mib,
            write_amplification_per_replica: written as f64 / payload / f64::from(replicas.max(1)),
        })
    }
}

/// CPU seconds (user + system) a process has spent so far.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (is process {pid} running?)"))?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .with_context(|| format!("/proc/{pid}/stat: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat: field {} missing", i + 3))
    };
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11)? + ticks(12)?) as f64 / per_second)
}

fn read(pid: u32) -> anyhow::Result<Reading> {
    let cpu_seconds = cpu_seconds(pid)?;
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("reading /proc/{pid}/io"))?;
    let write_bytes = io
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("/proc/{pid}/io has no write_bytes"))?;
    Ok(Reading {
        cpu_seconds,
        write_bytes,
    })
}

/// A `kB` field of `/proc/PID/status`.
pub(crate) fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("/proc/{pid}/status has no {field}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_can_be_watched() {
        let me = std::process::id();
        let watch = Watch::start(&[me]).unwrap();
        // Spend some CPU so the reading moves.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let r = watch.finish(1_000, 100, 1).unwrap();
        assert!(r.cpu_seconds_per_million_events >= 0.0);
        assert_eq!(r.peak_rss_mib.len(), 1);
        assert!(r.peak_rss_mib[0] > 0.0);
        assert!(
            Watch::start(&[u32::MAX]).is_err(),
            "a missing process is an error"
        );
    }
}
