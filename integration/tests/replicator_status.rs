//! `sluice-replicator status --json` against a running replicator: each
//! published table shows up with its state (streaming, or failed with the
//! reason for a table without replica identity), its last published chain
//! position, commit LSN and lag; secrets stay out; a one-shot command logs
//! only warnings.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sluice_integration::pipeline::Pipeline;

const READY: Duration = Duration::from_secs(120);

/// The `sluice-replicator` the pipeline runs: built by the harness next to
/// the test executable's profile directory (`<target>/debug`), or in
/// `<target>/sluice-bins/<profile>` for other profiles.
fn replicator_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable is not in <target>/<profile>/deps")?;
    let dir = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => profile_dir.to_owned(),
        Some(profile) => profile_dir
            .parent()
            .context("no target directory")?
            .join("sluice-bins")
            .join(profile),
    };
    Ok(dir.join("sluice-replicator"))
}

/// Runs `sluice-replicator <args> --config <pipeline config>` as the
/// replicator's NATS user, without `RUST_LOG`; returns stdout and stderr.
fn replicator_cli(p: &Pipeline, args: &[&str]) -> anyhow::Result<(String, String)> {
    let mut command = Command::new(replicator_binary()?);
    command
        .args(args)
        .arg("--config")
        .arg(&p.config_path)
        .env_remove("RUST_LOG");
    if let Some(user) = &p.servers().nats_users.producer {
        command
            .env("SLUICE_NATS__USER", &user.user)
            .env("SLUICE_NATS__PASSWORD", &user.password)
            .env("SLUICE_NATS__INBOX_PREFIX", user.inbox_prefix());
    }
    let output = command.output().context("running sluice-replicator")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "sluice-replicator {args:?} exited {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status.code()
    );
    Ok((stdout, stderr))
}

/// The innermost `{ ... }` of pretty-printed JSON `text` holding `needle`.
fn json_object_with<'a>(text: &'a str, needle: &str) -> Option<&'a str> {
    let at = text.find(needle)?;
    let start = text[..at].rfind('{')?;
    let end = at + text[at..].find('}')?;
    Some(&text[start..=end])
}

/// The value text of `"key": value` in a pretty-printed JSON object
/// (strings keep their quotes).
fn json_field<'a>(object: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("\"{key}\": ");
    object.lines().find_map(|line| {
        line.trim()
            .strip_prefix(&prefix)
            .map(|value| value.trim_end_matches(','))
    })
}

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
        let (stdout, stderr) = replicator_cli(&p, &["status", "--json"])?;
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
    let (text, _) = replicator_cli(&p, &["status"])?;
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
