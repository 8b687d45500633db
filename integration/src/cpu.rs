//! CPU time of the processes of a pipeline, from `/proc`, for benchmarks that
//! say which stage a workload saturates: Postgres' walsender, the replicator,
//! NATS, the loader and ClickHouse (each found by PID, the servers by the
//! loopback port they listen on).

use std::time::{Duration, Instant};

/// A process of the pipeline, by the stage it is.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: &'static str,
    pub pid: u32,
}

/// CPU time used so far by each stage, and when it was read.
pub struct Sample {
    at: Instant,
    ticks: Vec<Option<u64>>,
}

/// Reads [`Sample`]s of a fixed set of stages.
pub struct StageCpu {
    stages: Vec<Stage>,
}

/// `/proc` counts in USER_HZ, 100 on every Linux architecture this runs on
/// (`getconf CLK_TCK`).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU ticks ([`cpu_ticks`], [`tree_ticks`]) in seconds; NaN when the
/// process could not be read.
pub fn seconds(ticks: Option<u64>) -> f64 {
    ticks.map_or(f64::NAN, |t| t as f64 / TICKS_PER_SECOND)
}

impl StageCpu {
    pub fn new(stages: Vec<Stage>) -> StageCpu {
        StageCpu { stages }
    }

    pub fn sample(&self) -> Sample {
        Sample {
            at: Instant::now(),
            ticks: self.stages.iter().map(|s| cpu_ticks(s.pid)).collect(),
        }
    }

    /// One line per stage: its share of one core between the samples, and
    /// its CPU time per row for `rows` rows handled meanwhile.
    pub fn report(&self, from: &Sample, to: &Sample, rows: u64) -> String {
        let wall = to.at.duration_since(from.at).as_secs_f64();
        let mut lines = Vec::new();
        let mut total = 0.0;
        for (i, stage) in self.stages.iter().enumerate() {
            let (Some(a), Some(b)) = (from.ticks[i], to.ticks[i]) else {
                lines.push(format!(
                    "  {:<12} (pid {}) not readable",
                    stage.name, stage.pid
                ));
                continue;
            };
            let cpu = b.saturating_sub(a) as f64 / TICKS_PER_SECOND;
            total += cpu;
            lines.push(format!(
                "  {:<12} {:>5.1} % of a core, {:>6.2} µs/row ({:.0} rows/s per core)",
                stage.name,
                cpu / wall * 100.0,
                cpu / rows.max(1) as f64 * 1e6,
                if cpu > 0.0 {
                    rows as f64 / cpu
                } else {
                    f64::INFINITY
                }
            ));
        }
        lines.push(format!(
            "  {:<12} {:>5.1} % of a core over {:.1?}, {rows} rows",
            "all above",
            total / wall * 100.0,
            Duration::from_secs_f64(wall)
        ));
        lines.join("\n")
    }
}

/// The machine's free memory and dirty page cache, from `/proc/meminfo`, as
/// a line for a benchmark's output. Once free memory runs out, every page
/// NATS writes to its stream's files must first be reclaimed from the page
/// cache: on one stack after a day of benchmarks (19 GiB cached, 2 GiB
/// dirty) NATS took 180–500 ns per snapshot row instead of about 100.
pub fn memory_line() -> String {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |name: &str| {
        meminfo
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
    };
    match (kib("MemFree"), kib("Cached"), kib("Dirty")) {
        (Some(free), Some(cached), Some(dirty)) => format!(
            "memory: {:.1} GiB free, {:.1} GiB page cache, {} MiB dirty (a full page cache slows NATS' writes: compare runs on a fresh stack, see BENCHMARKS.md)",
            free as f64 / 1048576.0,
            cached as f64 / 1048576.0,
            dirty / 1024
        ),
        _ => "memory: /proc/meminfo unreadable".to_owned(),
    }
}

/// Writes every dirty page out (`sync`), so that a benchmark's setup does
/// not leave the kernel writing back while the timed part runs.
pub fn sync_disks() -> anyhow::Result<()> {
    let status = std::process::Command::new("sync").status()?;
    anyhow::ensure!(status.success(), "sync failed: {status}");
    Ok(())
}

/// User plus system CPU ticks of `pid` (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = Stat::of(pid)?;
    Some(stat.user + stat.system)
}

/// CPU ticks of `pid` and of its children: those running and those that
/// ended and were waited for (`cutime`, `cstime`). For a Postgres server,
/// its postmaster's PID gives every backend's CPU, short-lived ones (a
/// snapshot's reader connections) included.
pub fn tree_ticks(pid: u32) -> Option<u64> {
    let parent = Stat::of(pid)?;
    let mut ticks = parent.user + parent.system + parent.children;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        if let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .and_then(Stat::of)
            .filter(|stat| stat.parent == pid)
        {
            ticks += child.user + child.system + child.children;
        }
    }
    Some(ticks)
}

/// What benchmarks read of `/proc/PID/stat`.
struct Stat {
    parent: u32,
    user: u64,
    system: u64,
    /// Of its children that ended and were waited for.
    children: u64,
}

impl Stat {
    fn of(pid: u32) -> Option<Stat> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command (field 2) may hold spaces and parentheses: skip past
        // its end. Fields from there: state, ppid, …, utime (14), stime,
        // cutime, cstime (17).
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| fields.get(i)?.parse::<u64>().ok();
        Some(Stat {
            parent: u32::try_from(field(1)?).ok()?,
            user: field(11)?,
            system: field(12)?,
            children: field(13)? + field(14)?,
        })
    }
}

/// The PID of the local process listening on TCP `port` (IPv4 or IPv6), if
/// this user may see it.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEX_IP:HEX_PORT; state 0A is LISTEN.
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let listening_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && listening_port == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    // A forking server's children inherit the socket; the lowest PID is
    // the parent that opened it.
    let mut owner: Option<u32> = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| target.as_os_str() == i.as_str())
            {
                owner = Some(owner.map_or(pid, |o| o.min(pid)));
            }
        }
    }
    owner
}

/// The PID of the local server `name` that listens on the port of `url`.
pub fn server_pid(name: &str, url: &str) -> anyhow::Result<u32> {
    port_of(url)
        .and_then(pid_listening_on)
        .ok_or_else(|| anyhow::anyhow!("no local process listens on {name}'s {url}"))
}

/// The port a `scheme://host:port…` URL names (`None` without one).
pub fn port_of(url: &str) -> Option<u16> {
    url::Url::parse(url).ok()?.port()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_of_urls() {
        assert_eq!(port_of("nats://127.0.0.1:4222"), Some(4222));
        assert_eq!(port_of("http://u:p@127.0.0.1:8123/?x=1"), Some(8123));
        assert_eq!(port_of("http://localhost"), None);
    }

    #[test]
    fn this_process_uses_cpu_and_its_listener_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(pid_listening_on(port), Some(std::process::id()));
        let before = cpu_ticks(std::process::id()).unwrap();
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(cpu_ticks(std::process::id()).unwrap() > before);
    }
}
