//! Reading what the benchmark tools report: iperf3's JSON, ping's per-reply
//! times, and a process's CPU time and peak memory from /proc.
//!
//! Kept in the library, with tests, so the harness cannot silently misread
//! its tools. Must never: guess a value a tool did not report (a missing
//! field is an error, not a zero).

use anyhow::{Context, Result, bail};

/// What one iperf3 run measured, from the receiver's side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IperfResult {
    pub bits_per_second: f64,
    pub bytes: u64,
    /// UDP only: the share of datagrams lost, in percent.
    pub lost_percent: Option<f64>,
}

/// Parses `iperf3 -J` client output (TCP or UDP).
pub fn parse_iperf3(json: &str) -> Result<IperfResult> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 did not print JSON")?;
    if let Some(error) = v["error"].as_str() {
        bail!("iperf3: {error}");
    }
    let end = &v["end"];
    // TCP reports the receiver's view in sum_received; UDP in sum (client)
    // or sum_received (newer iperf3), with lost_percent.
    let sum = if end["sum_received"].is_object() {
        &end["sum_received"]
    } else {
        &end["sum"]
    };
    let bits_per_second = sum["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON lacks bits_per_second")?;
    let bytes = sum["bytes"].as_u64().context("iperf3 JSON lacks bytes")?;
    let lost_percent = end["sum"]["lost_percent"]
        .as_f64()
        .or_else(|| sum["lost_percent"].as_f64());
    Ok(IperfResult {
        bits_per_second,
        bytes,
        lost_percent,
    })
}

/// The round-trip times, in milliseconds, of every reply in ping's output.
pub fn parse_ping_rtts(output: &str) -> Vec<f64> {
    output
        .lines()
        .filter_map(|line| line.split("time=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|ms| ms.parse().ok())
        .collect()
}

/// The `p`th percentile (0-100) by nearest rank; `None` for no values.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The median of some values (the mean of the middle two for an even
/// count); `None` for none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// CPU time and peak memory of a running process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessSample {
    /// User plus system time, in seconds.
    pub cpu_seconds: f64,
    /// Peak resident set size (VmHWM), in KiB.
    pub peak_rss_kib: u64,
}

pub fn sample_process(pid: u32, clock_ticks_per_second: f64) -> Result<ProcessSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(ProcessSample {
        cpu_seconds: parse_stat_cpu_ticks(&stat)? as f64 / clock_ticks_per_second,
        peak_rss_kib: parse_status_hwm(&status)?,
    })
}

/// CPU time of each thread of a running process, in seconds of user plus
/// system time, by thread id (`/proc/PID/task/TID/stat`). A thread that
/// ends between the listing and the read is left out.
pub fn sample_threads(pid: u32, clock_ticks_per_second: f64) -> Result<Vec<(u32, f64)>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("process {pid} is gone"))?;
    let mut threads = Vec::new();
    for task in tasks {
        let task = task?;
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let seconds = parse_stat_cpu_ticks(&stat)? as f64 / clock_ticks_per_second;
        threads.push((tid, seconds));
    }
    Ok(threads)
}

/// utime + stime from /proc/PID/stat (fields 14 and 15, after the command
/// name, which may itself contain spaces and parentheses).
pub fn parse_stat_cpu_ticks(stat: &str) -> Result<u64> {
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state): utime is field 14, stime 15.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

pub fn parse_status_hwm(status: &str) -> Result<u64> {
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc status")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM")?
        .parse()?)
}

/// Clock ticks per second for /proc CPU times (`getconf CLK_TCK`).
pub fn clock_ticks_per_second() -> Result<f64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tcp_receiver_side_and_udp_loss() {
        let tcp = r#"{"end":{"sum_sent":{"bits_per_second":9e8,"bytes":400},
                      "sum_received":{"bits_per_second":8.5e8,"bytes":380}}}"#;
        let r = parse_iperf3(tcp).unwrap();
        assert_eq!(
            (r.bits_per_second, r.bytes, r.lost_percent),
            (8.5e8, 380, None)
        );
        let udp = r#"{"end":{"sum":{"bits_per_second":5e8,"bytes":1000,"lost_percent":12.5}}}"#;
        let r = parse_iperf3(udp).unwrap();
        assert_eq!((r.bits_per_second, r.lost_percent), (5e8, Some(12.5)));
    }

    #[test]
    fn iperf3_errors_and_missing_fields_are_errors() {
        assert!(
            parse_iperf3(r#"{"error":"unable to connect"}"#)
                .unwrap_err()
                .to_string()
                .contains("unable to connect")
        );
        assert!(parse_iperf3(r#"{"end":{}}"#).is_err());
        assert!(parse_iperf3("not json").is_err());
    }

    #[test]
    fn every_thread_of_a_process_is_sampled() {
        let me = std::fs::read_link("/proc/thread-self").unwrap();
        let tid: u32 = me.file_name().unwrap().to_str().unwrap().parse().unwrap();
        let ticks = 100.0;
        let threads = sample_threads(std::process::id(), ticks).unwrap();
        assert!(
            threads.iter().any(|&(t, _)| t == tid),
            "{threads:?} lacks {tid}"
        );
        let total = sample_process(std::process::id(), ticks)
            .unwrap()
            .cpu_seconds;
        let sum: f64 = threads.iter().map(|&(_, s)| s).sum();
        // Threads that already ended count in the process only.
        assert!(
            sum <= total + 0.01 * threads.len() as f64,
            "{sum} > {total}"
        );
        assert!(sample_threads(u32::MAX, ticks).is_err());
    }

    #[test]
    fn reads_every_ping_reply_time() {
        let out = "PING 10.42.2.1 (10.42.2.1) 56(84) bytes of data.\n\
                   64 bytes from 10.42.2.1: icmp_seq=1 ttl=64 time=0.312 ms\n\
                   64 bytes from 10.42.2.1: icmp_seq=2 ttl=64 time=1.05 ms\n\
                   From 10.42.2.1 icmp_seq=3 Destination Host Unreachable\n\
                   rtt min/avg/max/mdev = 0.298/0.303/0.312/0.006 ms\n";
        assert_eq!(parse_ping_rtts(out), vec![0.312, 1.05]);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn medians_average_the_middle_pair() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[0.68, 0.94]), Some(0.81));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn reads_cpu_ticks_even_with_odd_command_names() {
        let stat = "1234 (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 10";
        assert_eq!(parse_stat_cpu_ticks(stat).unwrap(), 300);
        assert_eq!(
            parse_status_hwm("Name:\tmeshd\nVmHWM:\t   5120 kB\n").unwrap(),
            5120
        );
    }

    #[test]
    fn samples_this_process() {
        let s = sample_process(std::process::id(), clock_ticks_per_second().unwrap()).unwrap();
        assert!(s.peak_rss_kib > 0);
    }
}
