//! NATS nkey authentication (`nats.nkey_seed`), through sluice's own config
//! loading and connect code, against a `nats-server` this test starts with a
//! user that can only authenticate by nkey.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use sluice_broker::config::Config;

/// Kills the server on drop (the test may fail half-way).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config_with(dir: &std::path::Path, name: &str, nats: &str) -> anyhow::Result<Config> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("source = \"auth\"\n[nats]\n{nats}\n"))?;
    Ok(Config::load(&path)?)
}

#[tokio::test]
async fn nkey_user_connects_and_nobody_else_does() -> anyhow::Result<()> {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed()?;
    let dir = tempfile::tempdir()?;
    let port = sluice_integration::pipeline::free_port()?;
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\nauthorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    )?;
    let log = std::fs::File::create(dir.path().join("nats.log"))?;
    let _server = Server(
        Command::new(std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".into()))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting nats-server (run scripts/install-deps)")?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "nats-server did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("url = \"nats://127.0.0.1:{port}\"");

    // The seed from the config authenticates, and messages flow.
    let config = config_with(
        dir.path(),
        "seed",
        &format!("{url}\nnkey_seed = \"{seed}\""),
    )?;
    let client = sluice_broker::connect::connect(&config.nats, "auth-test").await?;
    let mut sub = client.subscribe("sluice.auth.t").await?;
    client.publish("sluice.auth.t", "hello".into()).await?;
    client.flush().await?;
    let message = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await?
        .context("subscription ended")?;
    assert_eq!(message.payload.as_ref(), b"hello");

    // No credentials, or another key's seed: refused.
    let anonymous = config_with(dir.path(), "anonymous", &url)?;
    assert!(
        sluice_broker::connect::connect(&anonymous.nats, "auth-test")
            .await
            .is_err(),
        "connected without credentials"
    );
    let other_seed = nkeys::KeyPair::new_user().seed()?;
    let other = config_with(
        dir.path(),
        "other",
        &format!("{url}\nnkey_seed = \"{other_seed}\""),
    )?;
    // A key the server does not know is refused for good: a configuration
    // error that the binaries stop on instead of retrying.
    match sluice_broker::connect::connect(&other.nats, "auth-test").await {
        Err(sluice_broker::connect::ConnectError::Refused { .. }) => {}
        Err(other) => anyhow::bail!("an unknown nkey failed otherwise: {other:?}"),
        Ok(_) => anyhow::bail!("connected with an unknown nkey"),
    }
    Ok(())
}
