//! Serves the WireGuard UAPI (read side) on `/var/run/wireguard/<device>.sock`
//! so `wg show` works against meshd.
//!
//! A translator only: each `get=1` becomes the agent's own status and peers
//! control requests, formatted by `crate::uapi`. Best effort: when another
//! implementation already serves that name, meshd runs without it.
//! Must never: accept `set`, or answer anything but a well-formed `get=1`.

use std::io::ErrorKind;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use super::control_server::{ControlRequest, PrivateSocket};
use crate::control::{MAX_REQUEST, REQUEST_TIMEOUT, Request, Response};

/// Where `wg` looks for userspace implementations.
pub const UAPI_DIR: &str = "/var/run/wireguard";

/// Binds the device's UAPI socket and serves it; `None` (with a warning)
/// when that cannot be done. The socket goes when the value is dropped.
pub fn serve(
    dir: &Path,
    device: &str,
    requests: mpsc::Sender<ControlRequest>,
) -> Option<PrivateSocket> {
    let path = dir.join(format!("{device}.sock"));
    match PrivateSocket::bind(&path) {
        Ok(mut socket) => {
            socket.serve_with(requests, "UAPI", answer);
            Some(socket)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no WireGuard UAPI socket: `wg show` will not see this agent");
            None
        }
    }
}

async fn answer(stream: UnixStream, requests: mpsc::Sender<ControlRequest>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    let mut first = String::new();
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut first))
        .await
        .map_err(|_| ErrorKind::TimedOut)??;
    let reply = match crate::uapi::parse_request(&first) {
        crate::uapi::UapiRequest::Get => {
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
        crate::uapi::UapiRequest::Set => crate::uapi::NOT_SUPPORTED.to_owned(),
        crate::uapi::UapiRequest::Unknown => return Ok(()),
    };
    write.write_all(reply.as_bytes()).await
}

async fn ask(requests: &mpsc::Sender<ControlRequest>, req: Request) -> Option<Response> {
    let (tx, rx) = oneshot::channel();
    requests.send((req, tx)).await.ok()?;
    rx.await.ok()
}
