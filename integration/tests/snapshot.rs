//! Snapshots of big tables (issue: big tables): one table is read in chunks of
//! pages by several connections that share the exported snapshot, and every
//! row arrives exactly once, whether changes run during the snapshot or a
//! resync reads the table again.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sluice_integration::pipeline::{self, Pipeline};

const CONVERGE: Duration = Duration::from_secs(180);
/// Pages per chunk in these tests: a table of 20,000 rows has about 170.
const CHUNK_PAGES: i64 = 16;
const PARALLELISM: usize = 3;

fn metric(text: &str, series: &str) -> f64 {
    pipeline::metric(text, series).unwrap_or(0.0)
}

/// How many of the replicator's snapshot connections run a `COPY` at once,
/// at most, until `done` holds.
async fn watch_copies(
    pg: &tokio_postgres::Client,
    deadline: Instant,
    mut done: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<usize> {
    let mut most = 0;
    while !done().await? {
        let pids: BTreeSet<i32> = pg
            .query(
                "SELECT pid FROM pg_stat_activity \
                 WHERE query LIKE 'COPY (SELECT %' AND pid <> pg_backend_pid()",
                &[],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        most = most.max(pids.len());
        anyhow::ensure!(Instant::now() < deadline, "the snapshot did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(most)
}

/// Two tables of 20,000 rows, read in chunks of 16 pages by 3 connections,
/// one of them changed throughout the snapshot; then a manual resync of the
/// other, chunked the same way. Each ends with `verify` equal, and the rows
/// the replicator read equal the table's rows: no chunk read twice, none
/// left out.
#[tokio::test]
async fn a_table_read_in_chunks_by_several_connections_arrives_whole_and_once() -> anyhow::Result<()>
{
    let mut p = Pipeline::start("chunked_snapshot").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE still (id bigint PRIMARY KEY, v text, n int);
         INSERT INTO still SELECT g, md5(g::text), g % 100 FROM generate_series(1, 20000) g;
         DELETE FROM still WHERE id % 7 = 0;
         CREATE TABLE busy (id bigint PRIMARY KEY, v text, n int);
         INSERT INTO busy SELECT g, md5(g::text), 0 FROM generate_series(1, 20000) g;
         CREATE PUBLICATION sluice FOR TABLE still, busy;",
    )
    .await?;
    pg.batch_execute("VACUUM ANALYZE still, busy").await?;
    let still_rows: i64 = pg
        .query_one("SELECT count(*) FROM still", &[])
        .await?
        .get(0);
    let still_chunks = pipeline::snapshot_chunks(&pg, "still", CHUNK_PAGES).await?;
    let busy_chunks = pipeline::snapshot_chunks(&pg, "busy", CHUNK_PAGES).await?;
    p.set_configs(
        "replicator",
        &[
            ("snapshot_parallelism", &PARALLELISM.to_string()),
            ("snapshot_chunk_pages", &CHUNK_PAGES.to_string()),
            ("package_max_rows", "200"),
        ],
    )?;
    // 20 ms after each package: the snapshot lasts a few seconds, long
    // enough to watch its connections and to change `busy` under it.
    p.set_failpoints(Some("replicator::snapshot::package=return(20)"));
    p.spawn_replicator()?;
    p.set_failpoints(None);
    p.spawn_loader()?;

    let writer = {
        let pg = p.pg().await?;
        tokio::spawn(async move {
            for i in 0..40i64 {
                pg.batch_execute(&format!(
                    "UPDATE busy SET n = n + 1, v = 'changed' WHERE id % 40 = {i};
                     DELETE FROM busy WHERE id = {};
                     INSERT INTO busy VALUES ({}, 'new', {i});",
                    i * 500 + 1,
                    100_000 + i
                ))
                .await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        })
    };
    let most = {
        let p = &p;
        watch_copies(&pg, Instant::now() + CONVERGE, async || {
            // Not listening yet while the replicator starts.
            let Ok(metrics) = p.replicator_metrics().await else {
                return Ok(false);
            };
            Ok(["public.still", "public.busy"].iter().all(|table| {
                metric(
                    &metrics,
                    &format!("sluice_snapshot_chunks_total{{table=\"{table}\"}}"),
                ) >= 1.0
                    && metric(
                        &metrics,
                        &format!("sluice_resync_in_progress{{table=\"{table}\"}}"),
                    ) == 0.0
            }))
        })
        .await?
    };
    writer.await??;
    p.wait_until_equal(CONVERGE).await?;

    let metrics = p.replicator_metrics().await?;
    let server_chunks = still_chunks > 1.0;
    if server_chunks {
        assert!(
            still_chunks >= 5.0,
            "a test table too small: {still_chunks}"
        );
        assert_eq!(
            most, PARALLELISM,
            "connections running a COPY at once, at most"
        );
    } else {
        // Postgres 13: one connection per table.
        assert_eq!(most, 2, "connections running a COPY at once, at most");
    }
    assert_eq!(
        metric(
            &metrics,
            "sluice_snapshot_chunks_total{table=\"public.still\"}"
        ),
        still_chunks,
        "chunks of still"
    );
    // `busy` grows while it is read: its size, and so its chunks, are taken
    // inside the snapshot, after the first changes.
    let busy = metric(
        &metrics,
        "sluice_snapshot_chunks_total{table=\"public.busy\"}",
    );
    assert!(
        busy >= busy_chunks && busy <= busy_chunks + 2.0,
        "chunks of busy: {busy}, {busy_chunks} before the changes"
    );
    assert_eq!(
        metric(
            &metrics,
            "sluice_snapshot_rows_total{table=\"public.still\"}"
        ),
        still_rows as f64,
        "rows the snapshot read of a table nobody changed"
    );

    // A manual resync reads `still` in chunks again, under the resync's own
    // temporary slot.
    let mut resync = p.replicator_command(&["resync", "--table", "public.still"])?;
    let status = tokio::time::timeout(CONVERGE, async {
        loop {
            if let Some(status) = resync.try_wait()? {
                return anyhow::Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .context("the resync command did not return")??;
    assert!(status.success(), "resync command failed: {status}");
    let deadline = Instant::now() + CONVERGE;
    loop {
        let metrics = p.loader_metrics().await?;
        if metric(
            &metrics,
            "sluice_loader_resyncs_completed_total{table=\"public.still\"}",
        ) >= 2.0
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the resync never swapped in");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.wait_until_equal(CONVERGE).await?;
    let metrics = p.replicator_metrics().await?;
    assert_eq!(
        metric(
            &metrics,
            "sluice_snapshot_chunks_total{table=\"public.still\"}"
        ),
        2.0 * still_chunks,
        "chunks of still after the resync"
    );
    assert_eq!(
        metric(
            &metrics,
            "sluice_snapshot_rows_total{table=\"public.still\"}"
        ),
        2.0 * still_rows as f64,
        "rows of still after the resync"
    );
    p.check_chains_have_no_duplicates().await?;
    p.check_alive()?;
    Ok(())
}
