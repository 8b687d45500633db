//! The command-line contract: `--help` tells the truth, config errors exit 2
//! naming the key and the file, runtime failures exit 1 with one clear line.

use std::io::Write;
use std::process::{Command, Output};

fn replicator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice-replicator"))
        .args(args)
        .env_remove("SLUICE_CONFIG")
        .output()
        .expect("runs sluice-replicator")
}

fn config_file(contents: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(contents.as_bytes()).expect("write config");
    file
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn help_lists_the_commands_and_their_options() {
    let help = replicator(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for command in ["run", "resync", "status"] {
        assert!(text.contains(command), "--help lacks {command}: {text}");
    }
    let resync = replicator(&["resync", "--help"]);
    let text = String::from_utf8_lossy(&resync.stdout);
    for option in ["--config", "--table", "--all", "--no-wait", "--verbose"] {
        assert!(
            text.contains(option),
            "resync --help lacks {option}: {text}"
        );
    }
    let status = replicator(&["status", "--help"]);
    let text = String::from_utf8_lossy(&status.stdout);
    for option in ["--config", "--json", "--verbose"] {
        assert!(
            text.contains(option),
            "status --help lacks {option}: {text}"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let output = replicator(&["resync", "--config", "x.toml"]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "missing --table/--all: {}",
        stderr(&output)
    );
    let output = replicator(&["frobnicate"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn a_typo_in_the_config_exits_2_naming_key_and_file() {
    let file = config_file("source = \"app\"\n[postgres]\npublicaton = \"sluice\"\n");
    let output = replicator(&["run", "--config", &file.path().display().to_string()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("publicaton"), "{message}");
    assert!(
        message.contains(&file.path().display().to_string()),
        "{message}"
    );
    assert_eq!(message.trim().lines().count(), 1, "one line: {message}");
}

#[test]
fn a_bad_url_exits_2_naming_the_key() {
    let file = config_file("[nats]\nurl = \"http://127.0.0.1:4222\"\n");
    let output = replicator(&["status", "--config", &file.path().display().to_string()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("nats.url"), "{}", stderr(&output));
}

#[test]
fn a_missing_config_file_exits_2() {
    let output = replicator(&["run", "--config", "/nonexistent/sluice.toml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("/nonexistent/sluice.toml"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn an_environment_override_is_validated_too() {
    let file = config_file("source = \"app\"\n");
    let output = Command::new(env!("CARGO_BIN_EXE_sluice-replicator"))
        .args(["status", "--config", &file.path().display().to_string()])
        .env("SLUICE_NATS__REPLICAS", "9")
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("nats.replicas"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn an_unreachable_postgres_is_a_runtime_failure_for_status() {
    // Port 1 on loopback refuses connections.
    let file = config_file("[postgres]\nurl = \"postgres://postgres@127.0.0.1:1/postgres\"\n");
    let output = replicator(&["status", "--config", &file.path().display().to_string()]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("Postgres"), "{}", stderr(&output));
}
