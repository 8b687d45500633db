//! The loader's command-line contract.

use std::io::Write;
use std::process::Command;

#[test]
fn help_names_the_commands() {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice-loader"))
        .arg("--help")
        .output()
        .expect("runs sluice-loader");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for command in ["run", "verify", "status"] {
        assert!(text.contains(command), "{command}: {text}");
    }
}

#[test]
fn status_config_error_exits_2() {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(b"[loader]\nbatch_max_messages = 0\n")
        .expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_sluice-loader"))
        .args([
            "status",
            "--json",
            "-v",
            "--config",
            &file.path().display().to_string(),
        ])
        .output()
        .expect("runs sluice-loader");
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn a_config_error_exits_2_naming_the_key() {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(b"[loader]\nbatch_max_messages = 0\n")
        .expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_sluice-loader"))
        .args(["run", "--config", &file.path().display().to_string()])
        .output()
        .expect("runs sluice-loader");
    assert_eq!(output.status.code(), Some(2));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("loader.batch_max_messages"), "{message}");
}
