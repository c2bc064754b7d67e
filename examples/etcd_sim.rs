//! Simulation: N hosts (default 1,000) registered against one etcd on
//! loopback, each a real store client (claim, lease, list + watch) in this
//! one process; then one more host joins and the time until every watcher
//! has it as a peer is measured, with etcd's CPU and this process's memory.
//!
//! `cargo run --release --example etcd_sim -- [HOSTS]` (etcd-server and
//! etcd-client installed). Not part of the test suite: its figures go in
//! the README. One thread runs all N watchers, so the propagation time is
//! an upper bound for a real fleet, where each agent decodes one event.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use meshnet::config::StoreConfig;
use meshnet::keys::PrivateKey;
use meshnet::store::etcd::{self, Member, Started};
use meshnet_testbed::etcd::Etcd;

/// Joins in flight at once: a fleet booting together, bounded.
const JOIN_BATCH: usize = 20;

fn main() -> Result<()> {
    let hosts: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("HOSTS must be a number")?
        .unwrap_or(1000);
    meshnet::agent::limits::raise_open_files();
    let etcd = Etcd::on_loopback()?;
    let pid = etcd.pid().context("etcd pid")?;
    let store = StoreConfig {
        endpoints: vec![etcd.url()],
        prefix: "/sim".into(),
        block_prefix: 24,
        advertise: "192.0.2.1:51820".parse()?,
        requested: None,
        lease_ttl: 45,
        keepalive: None,
        tls: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(simulate(hosts, &store, pid))
}

async fn simulate(hosts: usize, store: &StoreConfig, etcd_pid: u32) -> Result<()> {
    let rss0 = rss_kib("self")?;
    let cpu0 = cpu_ticks(etcd_pid)?;
    let t0 = Instant::now();
    let mut fleet: Vec<Started> = Vec::with_capacity(hosts);
    let mut retried = 0;
    for batch in (0..hosts).collect::<Vec<_>>().chunks(JOIN_BATCH) {
        let members = batch
            .iter()
            .map(|i| member(&format!("s{i}")))
            .collect::<Result<Vec<_>>>()?;
        let joins: Vec<_> = members
            .iter()
            .map(|m| etcd::start(m.clone(), store))
            .collect();
        for (m, started) in members.iter().zip(join_all(joins).await) {
            // One thread serves every client here, so under load a request
            // can outlast its 5 s bound; a real agent would be restarted.
            let started = match started {
                Ok(s) => s,
                Err(e) => {
                    retried += 1;
                    eprintln!("{}: {e}; joining again", m.name);
                    etcd::start(m.clone(), store).await?
                }
            };
            fleet.push(started);
        }
        if fleet.len().is_multiple_of(100) {
            eprintln!(
                "{} joined after {:.1} s",
                fleet.len(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let joined = t0.elapsed();
    let all_seen = wait_all(&fleet, hosts - 1, Duration::from_secs(300)).await;
    ensure!(all_seen, "the fleet did not converge");
    let converged = t0.elapsed();
    let cpu_join = cpu_ticks(etcd_pid)? - cpu0;
    let rss_fleet = rss_kib("self")?.saturating_sub(rss0);
    // Idle: only lease keep-alives.
    let idle = Duration::from_secs(30);
    let cpu1 = cpu_ticks(etcd_pid)?;
    tokio::time::sleep(idle).await;
    let cpu_idle = cpu_ticks(etcd_pid)? - cpu1;
    // One more host: how long until every watcher has it.
    let cpu2 = cpu_ticks(etcd_pid)?;
    let t1 = Instant::now();
    let newcomer = etcd::start(member("newcomer")?, store).await?;
    let registered = t1.elapsed();
    let first = loop {
        if fleet
            .iter()
            .any(|s| s.membership.borrow().peers.len() >= hosts)
        {
            break t1.elapsed();
        }
        ensure!(
            t1.elapsed() < Duration::from_secs(60),
            "no watcher saw the newcomer"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let ok = wait_all(&fleet, hosts, Duration::from_secs(60)).await;
    ensure!(ok, "the newcomer did not reach every watcher");
    let propagated = t1.elapsed();
    let cpu_new = cpu_ticks(etcd_pid)? - cpu2;
    drop(newcomer);
    let hz = 100.0;
    println!("hosts:                          {hosts}");
    println!("joins retried after a timeout:  {retried}");
    println!(
        "all joined (claim + lease):     {:.1} s",
        joined.as_secs_f64()
    );
    println!(
        "all watchers saw all hosts:     {:.1} s",
        converged.as_secs_f64()
    );
    println!(
        "etcd CPU for the joins:         {:.1} s",
        cpu_join as f64 / hz
    );
    println!(
        "etcd CPU idle (keep-alives):    {:.1} % of a core",
        cpu_idle as f64 / hz / idle.as_secs_f64() * 100.0
    );
    println!(
        "newcomer registered in:         {} ms",
        registered.as_millis()
    );
    println!(
        "newcomer at every watcher in:   {} ms",
        propagated.as_millis()
    );
    println!("newcomer at the first watcher:  {} ms", first.as_millis());
    println!(
        "etcd CPU for the newcomer:      {:.2} s",
        cpu_new as f64 / hz
    );
    println!(
        "etcd RSS:                       {} MiB",
        rss_kib(&etcd_pid.to_string())? / 1024
    );
    println!(
        "client memory per host:         {} KiB ({} MiB for {hosts})",
        rss_fleet / hosts as u64,
        rss_fleet / 1024
    );
    Ok(())
}

fn member(name: &str) -> Result<Member> {
    Ok(Member {
        name: name.into(),
        key: PrivateKey::generate()?.public_key(),
        psk: None,
        overlay: "10.64.0.0/12".parse()?,
        state_dir: None,
    })
}

/// Awaits every future concurrently (all on this thread), results in order.
async fn join_all<T>(futures: Vec<impl std::future::Future<Output = T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(futures.len());
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<T>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in pinned.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.extend(done.into_iter().flatten());
    out
}

/// Waits until every watcher lists `peers` peers.
async fn wait_all(fleet: &[Started], peers: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if fleet
            .iter()
            .all(|s| s.membership.borrow().peers.len() >= peers)
        {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn rss_kib(pid: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit(')').next().context("stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}
