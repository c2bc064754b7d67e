//! Serves the WireGuard UAPI (read side) on `/var/run/wireguard/<device>.sock`
//! so `wg show` works against meshd.
//!
//! A translator only: each `get=1` becomes the agent's own status and peers
//! control requests, formatted by `crate::uapi`. Best effort: when another
//! implementation already serves that name, meshd runs without it.
//! Must never: accept `set`, or answer anything but a well-formed `get=1`.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::control_server::{self, ControlRequest};
use crate::control::{MAX_REQUEST, REQUEST_TIMEOUT, Request, Response};

/// Where `wg` looks for userspace implementations.
pub const UAPI_DIR: &str = "/var/run/wireguard";

pub struct UapiSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl UapiSocket {
    /// Binds the device's UAPI socket; `None` (with a warning) when that
    /// cannot be done.
    pub fn bind(dir: &Path, device: &str) -> Option<Self> {
        let path = dir.join(format!("{device}.sock"));
        let bound = control_server::clear_stale(&path)
            .map_err(|e| e.to_string())
            .and_then(|()| std::fs::create_dir_all(dir).map_err(|e| e.to_string()))
            .and_then(|()| UnixListener::bind(&path).map_err(|e| e.to_string()))
            .and_then(|l| {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map(|()| l)
                    .map_err(|e| e.to_string())
            });
        match bound {
            Ok(listener) => Some(Self {
                path,
                listener: Some(listener),
            }),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "no WireGuard UAPI socket: `wg show` will not see this agent");
                None
            }
        }
    }

    pub fn serve(&mut self, requests: mpsc::Sender<ControlRequest>) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "UAPI accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let requests = requests.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, requests).await {
                        tracing::debug!(error = %e, "UAPI connection failed");
                    }
                });
            }
        });
    }
}

impl Drop for UapiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(stream: UnixStream, requests: mpsc::Sender<ControlRequest>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    let mut first = String::new();
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut first))
        .await
        .map_err(|_| ErrorKind::TimedOut)??;
    let reply = match first.trim_end() {
        "get=1" => {
            let status = ask(&requests, Request::Status).await;
            let peers = ask(&requests, Request::Peers).await;
            match (status, peers) {
                (Some(Response::Status(host)), Some(Response::Peers(peers))) => {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default();
                    crate::uapi::get_response(&host, &peers, now)
                }
                _ => return Ok(()),
            }
        }
        "set=1" => crate::uapi::NOT_SUPPORTED.to_owned(),
        _ => return Ok(()),
    };
    write.write_all(reply.as_bytes()).await
}

async fn ask(requests: &mpsc::Sender<ControlRequest>, req: Request) -> Option<Response> {
    let (tx, rx) = oneshot::channel();
    requests.send((req, tx)).await.ok()?;
    rx.await.ok()
}
