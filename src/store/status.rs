//! What `meshctl store` shows: the backend's connection, revision, lease
//! and last error, as the store task last reported them.
//!
//! Pure values; the lease's time left is computed from an `Instant` given
//! by the caller. Must never: carry credentials (TLS file paths only).

use std::time::Instant;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// `meshctl store` output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub backend: String,
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub connected: bool,
    /// The store revision this host's view includes.
    pub revision: i64,
    pub block: Option<Ipv4Net>,
    pub lease_id: Option<i64>,
    pub lease_secs_left: Option<u64>,
    /// Live hosts in the view (this one included).
    pub hosts: usize,
    pub blocks: usize,
    /// Full re-lists after a compacted watch.
    pub relists: u64,
    pub last_error: Option<String>,
}

/// The store task's live report; `status` turns it into what is shown.
#[derive(Debug, Clone, Default)]
pub struct StoreReport {
    pub status: StoreStatus,
    /// When the lease runs out unless renewed.
    pub lease_expires: Option<Instant>,
}

impl StoreReport {
    pub fn status(&self, now: Instant) -> StoreStatus {
        let mut s = self.status.clone();
        s.lease_secs_left = self
            .lease_expires
            .map(|at| at.saturating_duration_since(now).as_secs());
        s
    }
}

impl StoreStatus {
    /// `meshctl store` as text.
    pub fn to_text(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        format!(
            "backend:     {}\nendpoints:   {}\nprefix:      {}\nconnected:   {}\nrevision:    {}\nblock:       {}\nlease:       {}\nlease left:  {}\nhosts:       {} live, {} blocks owned\nrelists:     {}\nlast error:  {}\n",
            self.backend,
            self.endpoints.join(", "),
            self.prefix,
            if self.connected { "yes" } else { "no" },
            self.revision,
            opt(self.block.map(|b| b.to_string())),
            opt(self.lease_id.map(|l| format!("{l:x}"))),
            opt(self.lease_secs_left.map(|s| format!("{s} s"))),
            self.hosts,
            self.blocks,
            self.relists,
            opt(self.last_error.clone()),
        )
    }
}
