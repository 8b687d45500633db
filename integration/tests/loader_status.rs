//! `sluice-loader status --json` against a running pipeline: each table the
//! loader applied shows up with its state and last applied position, the
//! consumer with its counts; a one-shot command logs only warnings.

use std::time::Duration;

use anyhow::Context as _;
use sluice_integration::pipeline::{Pipeline, json_field, json_object_with};

const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test]
async fn status_json_shows_each_table_with_its_applied_position() -> anyhow::Result<()> {
    let mut p = Pipeline::start("loader_status").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE shown (id int PRIMARY KEY, v text);
         INSERT INTO shown SELECT g, 'v' || g FROM generate_series(1, 20) g;
         CREATE PUBLICATION sluice FOR TABLE shown;",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    pg.batch_execute("UPDATE shown SET v = 'changed' WHERE id <= 5")
        .await?;
    p.wait_until_equal(CONVERGE).await?;

    let (stdout, stderr) = p.cli("loader", &["status", "--json"])?;
    // (sluice-integration has no JSON parser; `--json` is pretty-printed
    // serde_json, one `"key": value` per line.)
    let object = json_object_with(&stdout, "\"table\": \"public.shown\"")
        .with_context(|| format!("public.shown missing:\n{stdout}"))?;
    assert_eq!(
        json_field(object, "state"),
        Some("\"streaming\""),
        "{stdout}"
    );
    // The snapshot's chain starts at sequence 1; the update came later.
    let position = json_field(object, "applied_position")
        .unwrap_or_default()
        .trim_matches('"');
    let (_generation, sequence) = position
        .split_once('/')
        .with_context(|| format!("applied_position {position:?}"))?;
    assert!(sequence.parse::<u64>()? >= 2, "{stdout}");
    assert!(
        json_field(object, "applied_commit_lsn").is_some_and(|lsn| lsn.contains('/')),
        "{stdout}"
    );
    // The one loader holds the table's lease, under its consumer's name.
    assert_eq!(
        json_field(object, "loader"),
        Some("\"sluice_loader\""),
        "{stdout}"
    );
    let consumer = json_object_with(&stdout, "\"name\": \"sluice_loader\"")
        .with_context(|| format!("consumer missing:\n{stdout}"))?;
    assert_eq!(json_field(consumer, "exists"), Some("true"), "{stdout}");
    for count in ["pending", "ack_pending"] {
        assert!(
            json_field(consumer, count).is_some_and(|v| v.parse::<u64>().is_ok()),
            "{count}: {stdout}"
        );
    }
    // A one-shot command logs warnings only (unless -v).
    assert!(
        !stderr.contains("INFO"),
        "status logged at info without -v:\n{stderr}"
    );

    // The text form names the table with its state and position.
    let (text, _) = p.cli("loader", &["status"])?;
    assert!(
        text.lines()
            .any(|l| l.contains("public.shown") && l.contains("streaming") && l.contains(position)),
        "{text}"
    );
    p.check_alive()?;
    Ok(())
}
