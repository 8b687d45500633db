//! `sluice-loader status --json` against a running pipeline: each table the
//! loader applied shows up with its state and last applied position, the
//! consumer with its counts; a one-shot command logs only warnings.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use sluice_integration::pipeline::Pipeline;

const CONVERGE: Duration = Duration::from_secs(120);

/// The `sluice-loader` the pipeline runs: built by the harness next to the
/// test executable's profile directory (`<target>/debug`), or in
/// `<target>/sluice-bins/<profile>` for other profiles.
fn loader_binary() -> anyhow::Result<PathBuf> {
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
    Ok(dir.join("sluice-loader"))
}

/// Runs `sluice-loader <args> --config <pipeline config>` as the loader's
/// NATS user, without `RUST_LOG`; returns stdout and stderr.
fn loader_cli(p: &Pipeline, args: &[&str]) -> anyhow::Result<(String, String)> {
    let mut command = Command::new(loader_binary()?);
    command
        .args(args)
        .arg("--config")
        .arg(&p.config_path)
        .env_remove("RUST_LOG");
    if let Some(user) = &p.servers().nats_users.consumer {
        command
            .env("SLUICE_NATS__USER", &user.user)
            .env("SLUICE_NATS__PASSWORD", &user.password)
            .env("SLUICE_NATS__INBOX_PREFIX", user.inbox_prefix());
    }
    let output = command.output().context("running sluice-loader")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "sluice-loader {args:?} exited {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
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

    let (stdout, stderr) = loader_cli(&p, &["status", "--json"])?;
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
    let (text, _) = loader_cli(&p, &["status"])?;
    assert!(
        text.lines()
            .any(|l| l.contains("public.shown") && l.contains("streaming") && l.contains(position)),
        "{text}"
    );
    p.check_alive()?;
    Ok(())
}
