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
