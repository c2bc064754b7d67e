//! The agent's control socket: a Unix socket, mode 0600, that answers
//! `meshctl`.
//!
//! Connections are served by a small task each; requests are handed to the
//! agent's owning task over a channel, so no state is shared or locked.
//! Must never: follow or remove anything but a stale socket at its own path.

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::control::{MAX_REQUEST, Request, Response};

pub type ControlRequest = (Request, oneshot::Sender<Response>);

#[derive(Debug, thiserror::Error)]
pub enum ControlSocketError {
    #[error("another meshd is already running on {}", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot create control socket {}: {}", .0.display(), .1)]
    Io(PathBuf, std::io::Error),
}

/// Makes sure nothing live is at `path`: fails if an agent answers there,
/// removes a stale socket left by a crash.
pub fn clear_stale(path: &Path) -> Result<(), ControlSocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ControlSocketError::Io(path.to_owned(), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ControlSocketError::NotASocket(path.to_owned()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ControlSocketError::AlreadyRunning(path.to_owned())),
        Err(_) => {
            tracing::info!(path = %path.display(), "removing stale control socket");
            std::fs::remove_file(path).map_err(|e| ControlSocketError::Io(path.to_owned(), e))
        }
    }
}

/// A Unix socket only root can use (mode 0600), removed when dropped.
pub struct PrivateSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
}

/// The agent's control socket.
pub type ControlSocket = PrivateSocket;

impl PrivateSocket {
    /// Binds `path`, replacing a stale socket and refusing a live one.
    pub fn bind(path: &Path) -> Result<Self, ControlSocketError> {
        let fail = |e| ControlSocketError::Io(path.to_owned(), e);
        clear_stale(path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        // The socket is born 0600: a umask for the bind, not a chmod after
        // it, so there is no moment when others could connect.
        let previous = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let bound = UnixListener::bind(path);
        rustix::process::umask(previous);
        let listener = bound.map_err(fail)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        Ok(Self {
            path: path.to_owned(),
            listener: Some(listener),
        })
    }

    /// Serves the control protocol.
    pub fn serve(&mut self, requests: mpsc::Sender<ControlRequest>) {
        self.serve_with(requests, "control", answer);
    }

    /// Serves each connection with `handle`, in a task of its own, passing
    /// it the channel to the agent's owning task.
    pub fn serve_with<F, Fut>(
        &mut self,
        requests: mpsc::Sender<ControlRequest>,
        what: &'static str,
        handle: F,
    ) where
        F: Fn(UnixStream, mpsc::Sender<ControlRequest>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::io::Result<()>> + Send + 'static,
    {
        let Some(listener) = self.listener.take() else {
            return;
        };
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, say: back off, don't spin.
                        tracing::warn!(error = %e, "{what} socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let conversation = handle(stream, requests.clone());
                tokio::spawn(async move {
                    if let Err(e) = conversation.await {
                        tracing::debug!(error = %e, "{what} connection failed");
                    }
                });
            }
        });
    }
}

impl Drop for PrivateSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(stream: UnixStream, requests: mpsc::Sender<ControlRequest>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let timeout = crate::control::REQUEST_TIMEOUT;
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    tokio::time::timeout(timeout, reader.read_line(&mut line))
        .await
        .map_err(|_| ErrorKind::TimedOut)??;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => {
            let (tx, rx) = oneshot::channel();
            if requests.send((req, tx)).await.is_err() {
                return Ok(());
            }
            rx.await
                .unwrap_or_else(|_| Response::Error("agent is shutting down".into()))
        }
        Err(e) => Response::Error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn the_socket_is_private_and_the_umask_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("meshd.sock");
        let before = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
        let socket = PrivateSocket::bind(&path).unwrap();
        let after = rustix::process::umask(before);
        assert_eq!(after.as_raw_mode(), 0o022, "umask restored");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(socket);
        assert!(!path.exists(), "removed on drop");
    }
}
