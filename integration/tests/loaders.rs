//! Several loaders of one source divide its tables (README "Several loaders",
//! ARCHITECTURE.md invariant 11): each table is applied by one loader at a
//! time, a killed loader's tables move to the others within
//! `loader.lease_ttl`, a loader that joins takes its share, one that stops
//! hands its tables over at once; nothing is lost and nothing resynced.

use std::collections::BTreeMap;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use sluice_broker::TableName;
use sluice_integration::pipeline::{Pipeline, Rng, metric, run_workload, scrape};
use sluice_loader::share::owner;

const TABLES: [&str; 8] = [
    "l_one", "l_two", "l_three", "l_four", "l_five", "l_six", "l_seven", "l_eight",
];

/// How long a loader may take to take or hand over its tables in the
/// smaller tests.
const WAIT: Duration = Duration::from_secs(60);

/// Loaders the test started itself, killed when it ends however it ends.
#[derive(Default)]
struct Loaders(BTreeMap<&'static str, (Child, u16)>);

impl Drop for Loaders {
    fn drop(&mut self) {
        for (child, _) in self.0.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Loaders {
    fn start(&mut self, p: &mut Pipeline, name: &'static str) -> anyhow::Result<()> {
        let started = p.spawn_named_loader(name)?;
        self.0.insert(name, started);
        Ok(())
    }

    /// The tables each running loader holds (0 until its metrics answer).
    async fn held(&mut self) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        let mut held = BTreeMap::new();
        for (name, (child, port)) in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                bail!("loader {name} exited ({status})");
            }
            let text = scrape(&format!("http://127.0.0.1:{port}/metrics"))
                .await
                .unwrap_or_default();
            let n = metric(&text, "sluice_loader_tables_held").unwrap_or(0.0);
            held.insert(*name, n as u64);
        }
        Ok(held)
    }

    /// Waits until `check` accepts the tables each running loader holds;
    /// returns them.
    async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&BTreeMap<&'static str, u64>) -> bool,
    ) -> anyhow::Result<BTreeMap<&'static str, u64>> {
        let deadline = Instant::now() + timeout;
        loop {
            let held = self.held().await?;
            if check(&held) {
                return Ok(held);
            }
            if Instant::now() > deadline {
                bail!("{what}: not within {timeout:?}; tables held: {held:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How many tables each of `members` holds once they agree: rendezvous
/// hashing (`sluice_loader::share::owner`), every member at least one.
fn division(members: &[&'static str]) -> BTreeMap<&'static str, u64> {
    let names: Vec<String> = members.iter().map(|m| (*m).to_owned()).collect();
    let mut counts: BTreeMap<&'static str, u64> = members.iter().map(|m| (*m, 0)).collect();
    for table in TABLES {
        let owner = owner(&TableName::new("public", table), &names).expect("members");
        let member = members.iter().find(|m| **m == owner).expect("a member");
        *counts.entry(member).or_default() += 1;
    }
    counts
}

/// The wall clock as the loaders' log lines start with it (UTC, microseconds).
fn now_stamp() -> anyhow::Result<String> {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%6NZ"])
        .output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// One loader's lease events from its log: (time, table, took it).
fn lease_events(p: &Pipeline, loader: &str) -> Vec<(String, String, bool)> {
    let mut events = Vec::new();
    for (needle, took) in [
        ("applying a table", true),
        ("giving a table up to another loader", false),
    ] {
        for line in p.log_lines_containing(&format!("loader-{loader}"), needle) {
            let stamp = line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            let table = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("table="))
                .unwrap_or_default()
                .to_owned();
            events.push((stamp, table, took));
        }
    }
    events.sort();
    events
}

/// Per table, the time spans (from, until) in which `loader` held it; a span
/// still open ends at `end` (its death or stop), or never.
fn spans(p: &Pipeline, loader: &str, end: Option<&str>) -> BTreeMap<String, Vec<(String, String)>> {
    let mut open: BTreeMap<String, String> = BTreeMap::new();
    let mut spans: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (stamp, table, took) in lease_events(p, loader) {
        if took {
            open.insert(table, stamp);
        } else if let Some(from) = open.remove(&table) {
            spans.entry(table).or_default().push((from, stamp));
        }
    }
    let end = end.unwrap_or("9999");
    for (table, from) in open {
        spans.entry(table).or_default().push((from, end.to_owned()));
    }
    spans
}

#[tokio::test]
async fn loaders_divide_the_tables_survive_a_kill_and_take_in_newcomers() -> anyhow::Result<()> {
    let mut p = Pipeline::start("loaders").await?;
    p.publish_workload_tables(&TABLES).await?;
    p.set_config("loader", "lease_ttl", "\"2s\"")?;
    p.spawn_replicator()?;
    let mut loaders = Loaders::default();
    loaders.start(&mut p, "a")?;
    loaders.start(&mut p, "b")?;
    // Each takes its share (rendezvous hashing of these eight names over the
    // loaders' names gives every loader of each set below at least one).
    for members in [
        &["a", "b"][..],
        &["a", "b", "c"],
        &["b", "c"],
        &["b", "c", "d"],
    ] {
        ensure!(division(members).values().all(|&n| n > 0), "{members:?}");
    }
    let two = loaders
        .wait_for("a and b divide the tables", Duration::from_secs(60), |h| {
            *h == division(&["a", "b"])
        })
        .await?;
    eprintln!("two loaders: {two:?}");

    // Changes to every table until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut rng = Rng::from_clock();
    let mut workload = Vec::new();
    for table in TABLES {
        let pg = p.pg().await?;
        let seed = rng.next_u64();
        let stop = stop.clone();
        workload.push(tokio::spawn(async move {
            let mut changes = 0;
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                changes += run_workload(&pg, table, 4, 40, Rng::new(seed + round)).await?;
                round += 1;
            }
            anyhow::Ok(changes)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A third loader joins under load and takes its share from the others.
    loaders.start(&mut p, "c")?;
    let three = loaders
        .wait_for("c takes its share", Duration::from_secs(30), |h| {
            *h == division(&["a", "b", "c"])
        })
        .await?;
    eprintln!("three loaders: {three:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // kill -9 of `a`: `b` and `c` take its tables once it has not renewed
    // its membership for lease_ttl (2 s).
    let (mut a, _) = loaders.0.remove("a").context("a")?;
    a.kill()?;
    a.wait()?;
    let a_died = now_stamp()?;
    let killed = Instant::now();
    let after_kill = loaders
        .wait_for("b and c take a's tables", Duration::from_secs(30), |h| {
            *h == division(&["b", "c"])
        })
        .await?;
    let takeover = killed.elapsed();
    eprintln!("after a was killed: {after_kill:?}, {takeover:?} after the kill");
    ensure!(
        takeover < Duration::from_secs(10),
        "a's tables moved only after {takeover:?} (lease_ttl 2 s)"
    );
    let taken_over = p.log_lines_containing("loader-b", "from=a").len()
        + p.log_lines_containing("loader-c", "from=a").len();
    ensure!(
        taken_over == three["a"] as usize,
        "{taken_over} tables were taken over from the dead a, which held {}",
        three["a"]
    );

    // Another newcomer, under load.
    loaders.start(&mut p, "d")?;
    let with_d = loaders
        .wait_for("d takes its share", Duration::from_secs(30), |h| {
            *h == division(&["b", "c", "d"])
        })
        .await?;
    eprintln!("after d joined: {with_d:?}");
    // `status` names the loader of each table as the leases say.
    let (status, _) = p.cli("loader", &["status", "--json"])?;
    for (loader, held) in &with_d {
        let shown = status.matches(&format!("\"loader\": \"{loader}\"")).count();
        ensure!(
            shown as u64 == *held,
            "status shows {shown} tables of {loader}, which holds {held}:\n{status}"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut changes = 0;
    for task in workload {
        changes += task.await??;
    }
    let reports = p.wait_until_equal(Duration::from_secs(120)).await?;
    eprintln!("{changes} changes; {} tables equal", reports.len());

    // `d` stops cleanly: it gives its leases up, and the others take them
    // as free leases, not over a dead loader after lease_ttl.
    let stopping = Instant::now();
    let (d, _) = loaders.0.remove("d").context("d")?;
    sluice_integration::pipeline::stop_child(Some(d), "loader d").await?;
    // `d` applied nothing after it said it leaves; its leases were deleted
    // after that line, so another loader may take them before `d` exits.
    let d_stopped = p
        .log_lines_containing("loader-d", "leaving the source's loaders")
        .first()
        .and_then(|line| line.split_whitespace().next().map(str::to_owned))
        .context("d did not log that it leaves")?;
    loaders
        .wait_for("b and c take d's tables", Duration::from_secs(30), |h| {
            *h == division(&["b", "c"])
        })
        .await?;
    eprintln!(
        "b and c took d's tables {:?} after d was asked to stop",
        stopping.elapsed()
    );
    for loader in ["b", "c"] {
        let over = p.log_lines_containing(&format!("loader-{loader}"), "from=d");
        ensure!(
            over.is_empty(),
            "{loader} waited for d's leases to lapse: {over:#?}"
        );
    }

    // Nothing needed a resync, and no loader saw a gap.
    for loader in ["a", "b", "c", "d"] {
        let gaps = p.log_lines_containing(&format!("loader-{loader}"), "gap in the table's chain");
        ensure!(gaps.is_empty(), "loader {loader} saw gaps: {gaps:#?}");
    }
    let resyncs = p
        .resyncs_begun_in_stream()
        .await?
        .iter()
        .filter(|(_, reason)| reason != "initial")
        .count();
    ensure!(
        resyncs == 0,
        "{resyncs} resyncs were started (beyond the initial snapshot's)"
    );

    // No table was held by two loaders at once: per table, the spans in
    // which each loader held it (from its log; `a` until it was killed, `d`
    // until it stopped) do not overlap.
    let mut by_table: BTreeMap<String, Vec<(String, String, &str)>> = BTreeMap::new();
    for (loader, end) in [
        ("a", Some(a_died.as_str())),
        ("b", None),
        ("c", None),
        ("d", Some(d_stopped.as_str())),
    ] {
        for (table, spans) in spans(&p, loader, end) {
            for (from, until) in spans {
                by_table
                    .entry(table.clone())
                    .or_default()
                    .push((from, until, loader));
            }
        }
    }
    ensure!(
        by_table.len() == TABLES.len(),
        "every table was applied by some loader: {by_table:#?}"
    );
    for (table, spans) in by_table {
        for (i, (from_1, until_1, first)) in spans.iter().enumerate() {
            for (from_2, until_2, second) in &spans[i + 1..] {
                ensure!(
                    until_1 <= from_2 || until_2 <= from_1,
                    "{table} was held by {first} from {from_1} until {until_1} \
                     and by {second} from {from_2} until {until_2}"
                );
            }
        }
        eprintln!("{table}: {spans:?}");
    }
    Ok(())
}

/// Two loaders started with the same `loader.consumer` would pull from one
/// durable consumer: the newer takes the name and the older stops with an
/// error that says why (or, when the older's run restarted first and found
/// the name taken, it stops all the same); the source goes on with the other.
#[tokio::test]
async fn a_loader_started_with_a_running_loaders_name_replaces_it() -> anyhow::Result<()> {
    let mut p = Pipeline::start("loaders_dup").await?;
    p.publish_workload_tables(&["dup_items"]).await?;
    p.set_config("loader", "lease_ttl", "\"2s\"")?;
    p.spawn_replicator()?;
    // Both processes are named `dup`; the guard knows them apart as 1 and 2.
    let mut loaders = Loaders::default();
    let first = p.spawn_named_loader("dup")?;
    loaders.0.insert("1", first);
    loaders
        .wait_for("the first loader takes the table", WAIT, |h| {
            h.values().eq([&1])
        })
        .await?;
    let second = p.spawn_named_loader("dup")?;
    loaders.0.insert("2", second);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (stopped, status) = 'wait: loop {
        for (name, (child, _)) in &mut loaders.0 {
            if let Some(status) = child.try_wait()? {
                break 'wait (*name, status);
            }
        }
        ensure!(
            Instant::now() < deadline,
            "both loaders of the name still run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loaders.0.remove(stopped);
    ensure!(
        status.code() == Some(1),
        "the replaced loader exited with {status}"
    );
    let said = p.log_lines_containing("loader-dup", "took this one's place");
    ensure!(
        !said.is_empty(),
        "the replaced loader did not say why it stopped"
    );
    let pg = p.pg().await?;
    run_workload(&pg, "dup_items", 20, 50, Rng::from_clock()).await?;
    p.wait_until_equal(Duration::from_secs(120)).await?;
    // The other one goes on and holds the table.
    loaders
        .wait_for("the remaining loader holds the table", WAIT, |h| {
            h.values().eq([&1])
        })
        .await?;
    Ok(())
}

/// A loader that dies in the middle of a resync (right after it created the
/// shadow table: failpoint `loader::resync::after_create`) leaves the resync
/// to the loader that takes its table over: it finds the shadow in
/// `_sluice_positions`, fills it and swaps it in; no second resync.
#[tokio::test]
async fn a_resync_goes_on_when_its_loader_dies_and_another_takes_the_table() -> anyhow::Result<()> {
    let mut p = Pipeline::start("loaders_resync").await?;
    p.publish_workload_tables(&["rs_big", "rs_small"]).await?;
    p.set_config("loader", "lease_ttl", "\"2s\"")?;
    p.pg()
        .await?
        .batch_execute(
            "INSERT INTO rs_big SELECT g, g, md5(g::text) FROM generate_series(1, 20000) g",
        )
        .await?;
    let names = ["a".to_owned(), "b".to_owned()];
    let big = TableName::new("public", "rs_big");
    let holder: &'static str = if owner(&big, &names) == Some("a") {
        "a"
    } else {
        "b"
    };
    let other: &'static str = if holder == "a" { "b" } else { "a" };
    p.spawn_replicator()?;
    let mut loaders = Loaders::default();
    // The other loader alone applies the initial snapshot of both tables.
    loaders.start(&mut p, other)?;
    loaders
        .wait_for("the first loader takes both tables", WAIT, |h| {
            h.values().eq([&2])
        })
        .await?;
    p.wait_until_equal(Duration::from_secs(120)).await?;
    // The table's loader joins, with the failpoint, and takes it.
    p.set_failpoints(Some("loader::resync::after_create=return"));
    loaders.start(&mut p, holder)?;
    p.set_failpoints(None);
    loaders
        .wait_for("the second loader takes its share", WAIT, |h| {
            h.values().sum::<u64>() == 2 && h.values().all(|&n| n > 0)
        })
        .await?;

    let mut resync = p.replicator_command(&["resync", "--table", "public.rs_big"])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = loaders.0.get_mut(holder).context("holder")?.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = resync.kill();
            let _ = resync.wait();
            bail!("the table's loader did not reach the failpoint");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    loaders.0.remove(holder);
    ensure!(
        status.code() == Some(86),
        "the loader exited with {status}, not at the failpoint"
    );
    loaders
        .wait_for("the other loader takes the table over", WAIT, |h| {
            h.values().eq([&2])
        })
        .await?;
    let resynced = resync.wait()?;
    ensure!(resynced.success(), "resync command failed: {resynced}");
    p.wait_until_equal(Duration::from_secs(120)).await?;
    let swapped = p.log_lines_containing(
        &format!("loader-{other}"),
        "resync complete: shadow table swapped in table=public.rs_big",
    );
    ensure!(
        !swapped.is_empty(),
        "the loader that took the table over did not finish its resync"
    );
    let gaps = p.log_lines_containing(&format!("loader-{other}"), "gap in the table's chain");
    ensure!(gaps.is_empty(), "gaps: {gaps:#?}");
    let begins: Vec<String> = p
        .resyncs_begun_in_stream()
        .await?
        .into_iter()
        .filter(|(table, _)| table == "rs_big")
        .map(|(_, reason)| reason)
        .collect();
    ensure!(
        begins == ["initial", "manual"],
        "resyncs of rs_big: {begins:?} (one manual resync, no second one)"
    );
    Ok(())
}
