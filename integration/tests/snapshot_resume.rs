//! An interrupted initial snapshot continues with the chunks it did not
//! finish (issue: big tables). Needs Postgres 14+, where a table is read in
//! chunks of pages (TID range scans); on 13 a table is one chunk, read again
//! whole after a restart.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sluice_integration::pipeline::{self, Pipeline};

const CONVERGE: Duration = Duration::from_secs(180);
/// Pages per chunk: a table of 40,000 rows has about 25 chunks.
const CHUNK_PAGES: i64 = 16;

fn metric(text: &str, series: &str) -> f64 {
    pipeline::metric(text, series).unwrap_or(0.0)
}

/// The "snapshot resumed" log lines of `table`, oldest first.
fn resumed_lines(p: &Pipeline, table: &str) -> Vec<String> {
    lines_of(p, table, "snapshot resumed")
}

/// The replicator's log lines saying `message` of `table`, oldest first.
fn lines_of(p: &Pipeline, table: &str, message: &str) -> Vec<String> {
    p.log_lines_containing("replicator", message)
        .into_iter()
        .filter(|line| line.contains(&format!("table={table} ")))
        .collect()
}

/// `finished=N` of the newest "snapshot resumed" log line of `table`.
fn finished_when_resumed(p: &Pipeline, table: &str) -> Option<u64> {
    finished_in(resumed_lines(p, table).last())
}

/// `finished=N` of a log line.
fn finished_in(line: Option<&String>) -> Option<u64> {
    line.and_then(|line| {
        line.split_whitespace()
            .find_map(|field| field.strip_prefix("finished="))
            .and_then(|n| n.parse().ok())
    })
}

const SLOW: &str = "replicator::snapshot::package=return(20)";
const BIG_CHUNKS: &str = "sluice_snapshot_chunks_total{table=\"public.big\"}";

/// A pipeline whose snapshots of `big` (40,000 rows, 24 chunks; and of
/// `small` when `with_small`) are read slowly by 2 connections, both
/// programs started.
async fn start_slowly(
    name: &str,
    with_small: bool,
) -> anyhow::Result<(Pipeline, tokio_postgres::Client)> {
    let mut p = Pipeline::start(name).await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE big (id bigint PRIMARY KEY, v text, n int);
         CREATE INDEX ON big (n);
         INSERT INTO big SELECT g, md5(g::text), g % 1000 FROM generate_series(1, 40000) g;
         CREATE TABLE small (id bigint PRIMARY KEY, v text);
         INSERT INTO small SELECT g, md5(g::text) FROM generate_series(1, 3000) g;",
    )
    .await?;
    pg.batch_execute("VACUUM ANALYZE big, small").await?;
    pg.batch_execute(if with_small {
        "CREATE PUBLICATION sluice FOR TABLE big, small"
    } else {
        "CREATE PUBLICATION sluice FOR TABLE big"
    })
    .await?;
    p.set_configs(
        "replicator",
        &[
            ("snapshot_parallelism", "2"),
            ("snapshot_chunk_pages", &CHUNK_PAGES.to_string()),
            ("package_max_rows", "200"),
        ],
    )?;
    p.set_failpoints(Some(SLOW));
    p.spawn_replicator()?;
    p.spawn_loader()?;
    Ok((p, pg))
}

/// A pipeline whose initial snapshot of `big` and `small` is read slowly by
/// 2 connections, the replicator killed with kill -9 once 4 chunks of `big`
/// are read; with the chunks run 1 read.
async fn start_and_kill_mid_snapshot(
    name: &str,
) -> anyhow::Result<(Pipeline, tokio_postgres::Client, f64)> {
    let (mut p, pg) = start_slowly(name, true).await?;
    let read = wait_for_chunks(&mut p, 4.0).await?;
    p.kill_9_replicator()?;
    Ok((p, pg, read))
}

/// While no replicator runs: rows of `big` move to other pages (`n` is
/// indexed, so no update stays on its page), rows go and come.
async fn change_big_while_down(pg: &tokio_postgres::Client) -> anyhow::Result<()> {
    pg.batch_execute(
        "UPDATE big SET n = n + 1, v = 'moved' WHERE id % 10 = 0;
         DELETE FROM big WHERE id % 97 = 0;
         INSERT INTO big SELECT g, 'new', 0 FROM generate_series(100001, 101000) g;",
    )
    .await?;
    Ok(())
}

/// After run 2 crashed: at most one chunk per connection was read again
/// (run 2 found `finished_2` of the `read_by_run_1` chunks run 1 read
/// finished), and `status`, with no replicator running, tells how far the
/// snapshot of `big` got (`state`, its `chunks`); then `big` changes again.
/// Returns the chunks `status` showed finished.
async fn after_run_2(
    p: &Pipeline,
    pg: &tokio_postgres::Client,
    state: &str,
    chunks: f64,
    read_by_run_1: f64,
    finished_2: u64,
) -> anyhow::Result<u64> {
    assert!(
        finished_2 as f64 >= read_by_run_1 - 2.0,
        "run 1 read {read_by_run_1} chunks, run 2 found {finished_2} finished: \
         more than one chunk per connection is read again"
    );
    let big = status_of(p, "public.big")?;
    assert_eq!(big["state"], state, "{big}");
    assert_eq!(big["snapshot"]["chunks"].as_f64(), Some(chunks), "{big}");
    let finished_in_status = big["snapshot"]["chunks_finished"]
        .as_u64()
        .with_context(|| format!("no chunks_finished: {big}"))?;
    pg.batch_execute("UPDATE big SET n = n + 1 WHERE id % 10 = 1")
        .await?;
    Ok(finished_in_status)
}

/// Run 3 (the replicator now running) read exactly the chunks of `big` its
/// progress record did not list as finished (`finished_3` of `chunks`), and
/// the stream holds one RESYNC_BEGIN of `big` for `reason`: the snapshot
/// went on, it did not start over.
async fn read_only_the_rest(
    p: &Pipeline,
    chunks: f64,
    finished_3: u64,
    reason: &str,
) -> anyhow::Result<()> {
    let metrics = p.replicator_metrics().await?;
    assert_eq!(
        metric(&metrics, BIG_CHUNKS),
        chunks - finished_3 as f64,
        "run 3 reads exactly the chunks not recorded as finished"
    );
    assert_eq!(
        p.resyncs_in_stream("big", reason).await?,
        1,
        "one RESYNC_BEGIN of big ({reason}): it went on, it did not start over"
    );
    Ok(())
}

/// Starts the replicator with `failpoint` (besides the slow reading) and
/// waits for it to crash there.
async fn run_until_crash_at(p: &mut Pipeline, failpoint: &str) -> anyhow::Result<()> {
    p.set_failpoints(Some(&format!("{SLOW};{failpoint}")));
    p.spawn_replicator()?;
    let status = p.wait_exit("replicator", Duration::from_secs(120)).await?;
    assert_eq!(
        status.code(),
        Some(86),
        "the replicator should crash at {failpoint}\n{}",
        p.log_tail("replicator", 20)
    );
    Ok(())
}

/// An initial snapshot interrupted three times: the replicator killed with
/// kill -9 while chunks are read, then crashed right after a progress record
/// was stored, and the loader killed with kill -9 while the last run reads.
/// Each start of the replicator reads only the chunks its progress record
/// does not list (at most one chunk per connection is read again), keeps the
/// slot and the table's one RESYNC_BEGIN, and the table changes (rows moved
/// to other pages, deleted, added) while nobody reads it. It ends with
/// `verify` equal and chains without repeats.
#[tokio::test]
async fn an_interrupted_initial_snapshot_continues_with_the_chunks_it_did_not_finish()
-> anyhow::Result<()> {
    let (mut p, pg, read_by_run_1) = start_and_kill_mid_snapshot("resumed_snapshot").await?;
    let chunks = pipeline::snapshot_chunks(&pg, "big", CHUNK_PAGES).await?;
    change_big_while_down(&pg).await?;

    // Run 2: crashes right after its third progress record.
    run_until_crash_at(
        &mut p,
        "replicator::snapshot::progress_recorded=2*off->return",
    )
    .await?;
    let finished_2 =
        finished_when_resumed(&p, "public.big").context("run 2 did not continue big's snapshot")?;
    let finished_in_status =
        after_run_2(&p, &pg, "snapshotting", chunks, read_by_run_1, finished_2).await?;

    // Run 3: the loader is killed while it reads.
    p.set_failpoints(Some(SLOW));
    p.spawn_replicator()?;
    p.set_failpoints(None);
    let deadline = Instant::now() + CONVERGE;
    let finished_3 = loop {
        if let Some(finished) = finished_when_resumed(&p, "public.big")
            && resumed_lines(&p, "public.big").len() >= 2
        {
            break finished;
        }
        p.check_alive()?;
        anyhow::ensure!(Instant::now() < deadline, "run 3 did not continue big");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        finished_in_status, finished_3,
        "status showed the progress record run 3 continued from"
    );
    assert!(
        finished_3 > finished_2,
        "run 2 recorded chunks before it crashed: {finished_2} then {finished_3}"
    );
    p.kill_9_loader()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;

    read_only_the_rest(&p, chunks, finished_3, "initial").await?;
    assert_eq!(p.resyncs_in_stream("big", "slot_lost").await?, 0);
    assert_eq!(p.resyncs_in_stream("small", "slot_lost").await?, 0);
    p.check_chains_have_no_duplicates().await?;
    p.check_alive()?;
    Ok(())
}

/// A table rewritten while its snapshot was interrupted (deleted rows, then
/// VACUUM FULL: the rows left move to the first pages, into chunks that were
/// finished) is read again whole: it ends with `verify` equal. Were the
/// finished chunks trusted, the rows moved into them would be missing.
#[tokio::test]
async fn a_table_rewritten_while_its_snapshot_was_interrupted_is_read_again_whole()
-> anyhow::Result<()> {
    let (mut p, pg, _) = start_and_kill_mid_snapshot("rewritten_snapshot").await?;
    pg.batch_execute("DELETE FROM big WHERE id % 3 <> 0")
        .await?;
    pg.batch_execute("VACUUM FULL big").await?;
    let chunks = pipeline::snapshot_chunks(&pg, "big", CHUNK_PAGES).await?;
    p.set_failpoints(None);
    p.spawn_replicator()?;
    p.wait_until_equal(CONVERGE).await?;
    assert_eq!(
        p.log_lines_containing("replicator", "table rewritten since its snapshot began")
            .len(),
        1,
        "{}",
        p.log_tail("replicator", 20)
    );
    let metrics = p.replicator_metrics().await?;
    assert_eq!(
        metric(&metrics, BIG_CHUNKS),
        chunks,
        "every chunk of the rewritten table is read"
    );
    assert_eq!(p.resyncs_in_stream("big", "initial").await?, 1);
    p.check_chains_have_no_duplicates().await?;
    Ok(())
}

/// A table whose columns changed while its snapshot was interrupted (ADD
/// COLUMN with a default: the rows read before lack it) starts over with a
/// new RESYNC_BEGIN, so the loader drops the rows of the old shape; no
/// resync is needed afterwards. It ends with `verify` equal.
#[tokio::test]
async fn a_table_whose_columns_changed_while_its_snapshot_was_interrupted_starts_over()
-> anyhow::Result<()> {
    let (mut p, pg, _) = start_and_kill_mid_snapshot("reshaped_snapshot").await?;
    pg.batch_execute("ALTER TABLE big ADD COLUMN extra int NOT NULL DEFAULT 7")
        .await?;
    restarted_snapshot_of_big_starts_over(&mut p, "columns changed since its snapshot began").await
}

/// A table whose row filter changed while its snapshot was interrupted
/// starts over (the rows read before follow the old filter), and so does
/// nothing else: `verify`, which applies the new filter, ends equal.
/// Postgres 15+ (row filters); on 14 it returns at once, and says so.
#[tokio::test]
async fn a_table_whose_row_filter_changed_while_its_snapshot_was_interrupted_starts_over()
-> anyhow::Result<()> {
    let (mut p, pg, _) = start_and_kill_mid_snapshot("refiltered_snapshot").await?;
    let version = sluice_postgres::version::server_version_num(&pg).await?;
    if !sluice_postgres::version::has_publication_column_lists(version) {
        eprintln!("skipped: Postgres {version} has no publication row filters");
        return Ok(());
    }
    pg.batch_execute("ALTER PUBLICATION sluice SET TABLE big WHERE (id % 2 = 0), small")
        .await?;
    restarted_snapshot_of_big_starts_over(
        &mut p,
        "publication of the table changed since its snapshot began",
    )
    .await
}

/// Starts the replicator again after `big`'s snapshot was interrupted and
/// changed, and checks that the snapshot of `big` started over: the log
/// says `warning` once, the stream holds a second RESYNC_BEGIN of `big` and
/// no schema-change resync, and it ends with `verify` equal and chains
/// without repeats.
async fn restarted_snapshot_of_big_starts_over(
    p: &mut Pipeline,
    warning: &str,
) -> anyhow::Result<()> {
    p.set_failpoints(None);
    p.spawn_replicator()?;
    p.wait_until_equal(CONVERGE).await?;
    assert_eq!(
        p.log_lines_containing("replicator", warning).len(),
        1,
        "{}",
        p.log_tail("replicator", 20)
    );
    assert_eq!(
        p.resyncs_in_stream("big", "initial").await?,
        2,
        "a second RESYNC_BEGIN of big"
    );
    assert_eq!(p.resyncs_in_stream("big", "schema_change").await?, 0);
    p.check_chains_have_no_duplicates().await?;
    Ok(())
}

/// `sluice-replicator status --json`'s entry of `table`.
fn status_of(p: &Pipeline, table: &str) -> anyhow::Result<serde_json::Value> {
    let (stdout, _) = p.cli("replicator", &["status", "--json"])?;
    let status: serde_json::Value = serde_json::from_str(&stdout)?;
    status["tables"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["table"] == table))
        .cloned()
        .with_context(|| format!("{table} missing:\n{stdout}"))
}

/// Waits until the replicator has read `chunks` chunks of `big`.
async fn wait_for_chunks(p: &mut Pipeline, chunks: f64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        if let Ok(metrics) = p.replicator_metrics().await {
            let read = metric(&metrics, BIG_CHUNKS);
            if read >= chunks {
                return Ok(read);
            }
        }
        p.check_alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "fewer than {chunks} chunks of big were read"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A resync interrupted twice, like the initial snapshot: the replicator
/// killed with kill -9 while it reads chunks, then crashed right after a
/// progress record of the resync was stored, while the table changes. Each
/// start continues the resync on its chain with only the chunks its record
/// does not list (at most one per connection read again), `status` shows
/// how far it got, the loader (running all along) swaps it in once, and
/// nothing asks for another resync. It ends with `verify` equal and chains
/// without repeats.
#[tokio::test]
async fn an_interrupted_resync_continues_with_the_chunks_it_did_not_finish() -> anyhow::Result<()> {
    let (mut p, pg) = start_slowly("resumed_resync", false).await?;
    p.wait_until_equal(CONVERGE).await?;
    let chunks = pipeline::snapshot_chunks(&pg, "big", CHUNK_PAGES).await?;

    // Run 1: killed with kill -9 once 4 chunks of the resync are read.
    let initial = metric(&p.replicator_metrics().await?, BIG_CHUNKS);
    let mut resync = p.replicator_command(&["resync", "--no-wait", "--table", "public.big"])?;
    assert!(resync.wait()?.success(), "resync request failed");
    let read_by_run_1 = wait_for_chunks(&mut p, initial + 4.0).await? - initial;
    p.kill_9_replicator()?;
    change_big_while_down(&pg).await?;

    // Run 2: crashes right after its third progress record of the resync.
    run_until_crash_at(
        &mut p,
        "replicator::resync::progress_recorded=2*off->return",
    )
    .await?;
    let resumed = lines_of(&p, "public.big", "resync resumed");
    let finished_2 = finished_in(resumed.last()).with_context(|| {
        format!(
            "run 2 did not continue the resync\n{}",
            p.log_tail("replicator", 30)
        )
    })?;
    let finished_in_status =
        after_run_2(&p, &pg, "resyncing", chunks, read_by_run_1, finished_2).await?;

    // Run 3: finishes it. (The live table stays equal all along: the
    // stream keeps it so; the swap is what ends the resync.)
    p.set_failpoints(Some(SLOW));
    p.spawn_replicator()?;
    p.set_failpoints(None);
    let completed = "sluice_loader_resyncs_completed_total{table=\"public.big\"}";
    let deadline = Instant::now() + CONVERGE;
    while metric(&p.loader_metrics().await?, completed) < 2.0 {
        p.check_alive()?;
        anyhow::ensure!(Instant::now() < deadline, "the resync was never swapped in");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.wait_until_equal(CONVERGE).await?;
    let resumed = lines_of(&p, "public.big", "resync resumed");
    assert_eq!(resumed.len(), 2, "runs 2 and 3 continued the resync");
    let finished_3 = finished_in(resumed.last()).context("no finished= in run 3's line")?;
    assert_eq!(
        finished_in_status, finished_3,
        "status showed the progress record run 3 continued from"
    );
    assert!(
        finished_3 > finished_2,
        "run 2 recorded chunks before it crashed: {finished_2} then {finished_3}"
    );
    read_only_the_rest(&p, chunks, finished_3, "manual").await?;
    assert_eq!(p.resyncs_in_stream("big", "stalled").await?, 0);
    assert_eq!(
        metric(&p.loader_metrics().await?, completed),
        2.0,
        "the initial snapshot and the resync were each swapped in once"
    );
    p.check_chains_have_no_duplicates().await?;
    p.check_alive()?;
    Ok(())
}
