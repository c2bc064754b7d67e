//! The agent's persistent state: which container holds which address.
//!
//! Written after every change, atomically (a temporary file, fsync, rename,
//! fsync of the directory), so a crash leaves the old or the new table,
//! never a torn one. Must never: silently start from an empty table when a
//! state file exists but cannot be read.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::core::ipam::Container;

const FILE: &str = "containers.json";
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("state file {path} is not valid ({reason}); fix or move it away to start over")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write state file {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    containers: Vec<Container>,
}

#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join(FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved containers; none when no state was ever saved.
    pub fn load(&self) -> Result<Vec<Container>, StateError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    reason: e.to_string(),
                });
            }
        };
        let corrupt = |reason: String| StateError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let on_disk: OnDisk = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if on_disk.version != VERSION {
            return Err(corrupt(format!(
                "version {} is not {VERSION}",
                on_disk.version
            )));
        }
        Ok(on_disk.containers)
    }

    pub fn save<'a>(
        &self,
        containers: impl Iterator<Item = &'a Container>,
    ) -> Result<(), StateError> {
        let on_disk = OnDisk {
            version: VERSION,
            containers: containers.cloned().collect(),
        };
        self.write_atomically(&on_disk)
            .map_err(|e| StateError::Write {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    fn write_atomically(&self, on_disk: &OnDisk) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let tmp = self.path.with_extension("json.tmp");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(on_disk).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        File::open(dir)?.sync_all()
    }
}

/// Writes the container table off the packet task: one write at a time,
/// in the order they were asked for, each on the blocking pool, so the
/// file always ends with the newest table and an fsync never stalls
/// packets.
#[derive(Clone)]
pub struct StateWriter {
    jobs: mpsc::Sender<SaveJob>,
}

struct SaveJob {
    containers: Vec<Container>,
    done: oneshot::Sender<Result<(), StateError>>,
}

impl StateWriter {
    pub fn start(state: StateFile) -> Self {
        let (jobs, mut queue) = mpsc::channel::<SaveJob>(64);
        tokio::spawn(async move {
            while let Some(job) = queue.recv().await {
                let file = state.clone();
                let containers = job.containers;
                let written = tokio::task::spawn_blocking(move || file.save(containers.iter()))
                    .await
                    .unwrap_or_else(|e| {
                        Err(StateError::Write {
                            path: state.path.clone(),
                            reason: e.to_string(),
                        })
                    });
                let _ = job.done.send(written);
            }
        });
        Self { jobs }
    }

    /// Saves `containers` as the whole table, once earlier saves are done.
    pub async fn save(&self, containers: Vec<Container>) -> Result<(), StateError> {
        let (done, result) = oneshot::channel();
        let gone = || StateError::Write {
            path: PathBuf::from("(state writer)"),
            reason: "the agent is shutting down".into(),
        };
        self.jobs
            .send(SaveJob { containers, done })
            .await
            .map_err(|_| gone())?;
        result.await.unwrap_or_else(|_| Err(gone()))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::core::ethernet::Mac;

    fn container(i: u8) -> Container {
        let address = Ipv4Addr::new(10, 42, 1, i);
        Container {
            name: format!("c{i}"),
            stack: "shop".into(),
            service: Some("web".into()),
            netns: format!("ns{i}"),
            address,
            mac: Mac::of_container(address),
            host_veth: format!("mv{i}"),
            ports: Vec::new(),
        }
    }

    #[test]
    fn saved_state_loads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::in_dir(&dir.path().join("nested"));
        assert_eq!(state.load().unwrap(), Vec::new());
        let saved = vec![container(2), container(3)];
        state.save(saved.iter()).unwrap();
        assert_eq!(state.load().unwrap(), saved);
        state.save([container(4)].iter()).unwrap();
        assert_eq!(state.load().unwrap(), vec![container(4)]);
        assert!(!state.path().with_extension("json.tmp").exists());
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_not_an_empty_table() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::in_dir(dir.path());
        std::fs::write(state.path(), "{ not json").unwrap();
        let err = state.load().unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        std::fs::write(state.path(), r#"{"version": 9, "containers": []}"#).unwrap();
        assert!(state.load().unwrap_err().to_string().contains("version 9"));
    }

    #[tokio::test]
    async fn the_writer_saves_in_order_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let writer = StateWriter::start(StateFile::in_dir(dir.path()));
        let (a, b) = (writer.clone(), writer.clone());
        let first = a.save(vec![container(2)]);
        let second = b.save(vec![container(2), container(3)]);
        let (r1, r2) = tokio::join!(first, second);
        r1.unwrap();
        r2.unwrap();
        let saved = StateFile::in_dir(dir.path()).load().unwrap();
        assert_eq!(
            saved,
            vec![container(2), container(3)],
            "the later table wins"
        );
        let blocked = dir.path().join("not-a-dir");
        std::fs::write(&blocked, "").unwrap();
        let failing = StateWriter::start(StateFile::in_dir(&blocked));
        assert!(failing.save(vec![container(4)]).await.is_err());
    }
}
