//! Agents whose wall clock is not the machine's: host `i`'s agent under
//! libfaketime, with an offset the test can change while it runs, and a
//! way to read back which clock an agent's log lines were stamped with.
//!
//! Only the agent's process sees the fake clock (LD_PRELOAD); its monotonic
//! clock stays real (`FAKETIME_DONT_FAKE_MONOTONIC`), as after an NTP step
//! or an operator's `date -s`. Must never: change the machine's clock.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use super::Testbed;

/// Where Debian's `libfaketime` package puts the preload library.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The file a faked agent reads its clock offset from.
pub struct FakeClock {
    file: PathBuf,
}

impl FakeClock {
    /// Sets the agent's wall clock to the machine's plus `offset`
    /// (libfaketime syntax: "-1h", "+30m", "+0"); it takes effect within
    /// a second (the agent re-reads the file once a second).
    pub fn set(&self, offset: &str) -> Result<()> {
        std::fs::write(&self.file, format!("{offset}\n"))
            .with_context(|| format!("writing {}", self.file.display()))
    }
}

impl Testbed {
    /// Starts host `i`'s agent with its wall clock at the machine's plus
    /// `offset` (see `FakeClock::set`) and waits until it answers.
    pub fn start_with_fake_clock(&mut self, i: usize, offset: &str) -> Result<FakeClock> {
        ensure!(
            Path::new(LIBFAKETIME).is_file(),
            "{LIBFAKETIME} is missing: run scripts/test.sh, which installs the faketime package"
        );
        let clock = FakeClock {
            file: self.dir().join(format!("{}-faketime", self.hosts[i].name)),
        };
        clock.set(offset)?;
        let file = clock.file.display().to_string();
        self.spawn_agent(
            i,
            &[
                ("LD_PRELOAD", LIBFAKETIME),
                ("FAKETIME_TIMESTAMP_FILE", &file),
                ("FAKETIME_CACHE_DURATION", "1"),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ],
        )?;
        self.wait_answering(i)?;
        Ok(clock)
    }

    /// How far (in seconds, negative when behind) the wall clock that
    /// stamped the last line of host `i`'s log was from the machine's
    /// clock when read; None when the log has no stamped line.
    pub fn log_clock_offset_secs(&self, i: usize) -> Result<Option<i64>> {
        let log = self.log(i);
        let Some(stamp) = log
            .lines()
            .rev()
            .filter_map(|l| l.split_whitespace().next())
            .find(|w| w.len() > 20 && w.ends_with('Z') && w.as_bytes().get(10) == Some(&b'T'))
        else {
            return Ok(None);
        };
        let logged = unix_seconds(stamp)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        Ok(Some(logged - i64::try_from(now)?))
    }
}

/// An RFC 3339 time as Unix seconds, through `date` (test tooling: not
/// worth a date crate).
fn unix_seconds(stamp: &str) -> Result<i64> {
    let out = Command::new("date")
        .args(["-u", "-d", stamp, "+%s"])
        .output()
        .context("running date")?;
    ensure!(out.status.success(), "date cannot read {stamp:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}
