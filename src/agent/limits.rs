//! Process limits the agent sets for itself at start.
//!
//! Every container can open DNS connections and every attach spawns `ip`:
//! the soft open-file limit (often 1024) is far below what the kernel
//! allows the process (the hard limit), so it is raised once, at start.
//! Must never: fail the agent (a limit that cannot be raised is a warning),
//! or lower a limit.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Raises the soft RLIMIT_NOFILE to the hard limit.
pub fn raise_open_files() {
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        tracing::debug!(limit = ?limit.current, "open-file limit already at the hard limit");
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(
            from = ?limit.current,
            to = ?limit.maximum,
            "raised the open-file limit to the hard limit"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            limit = ?limit.current,
            "cannot raise the open-file limit; DNS and control connections may run out"
        ),
    }
}
