//! `sluice-replicator status --json` against a running replicator: each
//! published table shows up with its state (streaming, or failed with the
//! reason for a table without replica identity), its last published chain
//! position, commit LSN and lag; secrets stay out; a one-shot command logs
//! only warnings.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sluice_integration::pipeline::{Pipeline, json_field, json_object_with};

const READY: Duration = Duration::from_secs(120);

/// The sequence of `"G/S"` (quoted) in `last_published`.
fn sequence_of(position: Option<&str>) -> Option<u64> {
    position?.trim_matches('"').split_once('/')?.1.parse().ok()
}

#[tokio::test]
async fn status_json_shows_each_published_table_with_state_and_position() -> anyhow::Result<()> {
    let mut p = Pipeline::start("replicator_status").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE shown (id int PRIMARY KEY, v text);
         INSERT INTO shown SELECT g, 'v' || g FROM generate_series(1, 20) g;
         CREATE TABLE nokey (a int);
         CREATE PUBLICATION sluice FOR TABLE shown, nokey;",
    )
    .await?;
    p.spawn_replicator()?;
    p.wait_replicator_ready(READY).await?;
    // Snapshot: RESYNC_BEGIN, SNAPSHOT, RESYNC_END (sequences 1 to 3); the
    // update is the 4th package of the chain.
    pg.batch_execute("UPDATE shown SET v = 'changed' WHERE id <= 5")
        .await?;

    let deadline = Instant::now() + Duration::from_secs(30);
    let (stdout, stderr, object) = loop {
        let (stdout, stderr) = p.cli("replicator", &["status", "--json"])?;
        // (sluice-integration has no JSON parser; `--json` is pretty-printed
        // serde_json, one `"key": value` per line.)
        let object = json_object_with(&stdout, "\"table\": \"public.shown\"")
            .with_context(|| format!("public.shown missing:\n{stdout}"))?
            .to_owned();
        if sequence_of(json_field(&object, "last_published")).is_some_and(|s| s >= 4) {
            break (stdout, stderr, object);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the update never showed in status:\n{stdout}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        json_field(&object, "state"),
        Some("\"streaming\""),
        "{stdout}"
    );
    assert!(
        json_field(&object, "last_commit_lsn").is_some_and(|lsn| lsn.contains('/')),
        "{stdout}"
    );
    assert!(
        json_field(&object, "lag_seconds").is_some_and(|lag| lag.parse::<f64>().is_ok()),
        "{stdout}"
    );
    let nokey = json_object_with(&stdout, "\"table\": \"public.nokey\"")
        .with_context(|| format!("public.nokey missing:\n{stdout}"))?;
    let state = json_field(nokey, "state").unwrap_or_default();
    assert!(
        state.starts_with("\"failed: ") && state.contains("replica identity"),
        "{stdout}"
    );
    if let Some(user) = &p.servers().nats_users.producer {
        assert!(!stdout.contains(&user.password), "{stdout}");
    }
    // A one-shot command logs warnings only (unless -v).
    assert!(
        !stderr.contains("INFO"),
        "status logged at info without -v:\n{stderr}"
    );

    // The text form names the table with its state and position.
    let position = json_field(&object, "last_published")
        .unwrap_or_default()
        .trim_matches('"')
        .to_owned();
    let (text, _) = p.cli("replicator", &["status"])?;
    assert!(
        text.lines().any(|l| l.contains("public.shown")
            && l.contains("streaming")
            && l.contains(&position)),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("public.nokey") && l.contains("failed: ")),
        "{text}"
    );
    p.check_alive()?;
    Ok(())
}

/// A snapshot in progress shows in `status --json` (and in text) with rows
/// read so far, the estimate, the rate and the time left, taken from the
/// stream alone; the same numbers are in the metrics.
#[tokio::test]
async fn status_shows_a_running_snapshot_with_rows_estimate_and_eta() -> anyhow::Result<()> {
    let mut p = Pipeline::start("snapshot_status").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, 'v' || g FROM generate_series(1, 3000) g;
         ANALYZE big;
         CREATE PUBLICATION sluice FOR TABLE big;",
    )
    .await?;
    // 30 packages of 100 rows, each followed by a 300 ms pause: about 9 s.
    p.set_config("replicator", "package_max_rows", "100")?;
    p.set_failpoints(Some("replicator::snapshot::package=return(300)"));
    p.spawn_replicator()?;
    p.set_failpoints(None);

    let deadline = Instant::now() + READY;
    let snapshot = loop {
        p.check_alive()?;
        let (stdout, _) = p.cli("replicator", &["status", "--json"])?;
        let status: serde_json::Value = serde_json::from_str(&stdout)?;
        let table = status["tables"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["table"] == "public.big"))
            .with_context(|| format!("public.big missing:\n{stdout}"))?
            .clone();
        let rows = table["snapshot"]["rows"].as_u64().unwrap_or(0);
        if rows >= 500 {
            assert_eq!(table["state"], "snapshotting", "{stdout}");
            break table["snapshot"].clone();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no snapshot progress in status:\n{stdout}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rows = snapshot["rows"].as_u64().unwrap_or(0);
    assert!(rows < 3000, "the snapshot was over already: {snapshot}");
    assert_eq!(snapshot["estimated_rows"], 3000, "{snapshot}");
    // About 300 rows/s: the time left is a few seconds, not zero or hours.
    let rate = snapshot["rows_per_second"].as_u64().unwrap_or(0);
    assert!((50..=2000).contains(&rate), "{snapshot}");
    let eta = snapshot["eta_seconds"].as_u64().context("no eta")?;
    assert!((1..=60).contains(&eta), "{snapshot}");
    let (text, _) = p.cli("replicator", &["status"])?;
    assert!(text.contains("snapshot rows="), "{text}");
    let metrics = p.replicator_metrics().await?;
    assert_eq!(
        sluice_integration::pipeline::metric(
            &metrics,
            "sluice_snapshot_rows_estimated{table=\"public.big\"}"
        ),
        Some(3000.0),
        "{metrics}"
    );
    Ok(())
}
