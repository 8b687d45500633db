//! NATS authentication and mutual TLS through sluice's own config loading and connect code
//! (`nats.nkey_seed`, `nats.token`, `nats.tls_cert`/`tls_key`), each against a `nats-server`
//! the test starts that accepts only that way in.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use sluice_broker::config::Config;
use sluice_broker::connect::ConnectError;

/// A `nats-server` of one test, killed on drop (the test may fail half-way).
struct Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `nats-server` with `conf` (after a `listen` line of its own) and waits until it
    /// listens.
    async fn start(conf: &str) -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        let port = sluice_integration::pipeline::free_port()?;
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, format!("listen: 127.0.0.1:{port}\n{conf}\n"))?;
        let log = std::fs::File::create(dir.path().join("nats.log"))?;
        let child =
            Command::new(std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".into()))
                .arg("-c")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting nats-server (run scripts/install-deps)")?;
        let server = Server { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "nats-server did not listen:\n{}",
                std::fs::read_to_string(server.dir.path().join("nats.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }

    /// A config whose `[nats]` section is `url = "SCHEME://127.0.0.1:PORT"` plus `nats`.
    fn config(&self, scheme: &str, name: &str, nats: &str) -> anyhow::Result<Config> {
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "source = \"auth\"\n[nats]\nurl = \"{scheme}://127.0.0.1:{}\"\n{nats}\n",
                self.port
            ),
        )?;
        Ok(Config::load(&path)?)
    }
}

/// Connects with `config` and sends a message to itself.
async fn round_trip(config: &Config) -> anyhow::Result<()> {
    let client = sluice_broker::connect::connect(&config.nats, "auth-test").await?;
    let mut sub = client.subscribe("sluice.auth.t").await?;
    client.publish("sluice.auth.t", "hello".into()).await?;
    client.flush().await?;
    let message = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await?
        .context("subscription ended")?;
    anyhow::ensure!(message.payload.as_ref() == b"hello", "wrong payload");
    Ok(())
}

#[tokio::test]
async fn nkey_user_connects_and_nobody_else_does() -> anyhow::Result<()> {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed()?;
    let server = Server::start(&format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}",
        user.public_key()
    ))
    .await?;

    // The seed from the config authenticates, and messages flow.
    round_trip(&server.config("nats", "seed", &format!("nkey_seed = \"{seed}\""))?).await?;

    // No credentials, or another key's seed: refused.
    let anonymous = server.config("nats", "anonymous", "")?;
    assert!(
        sluice_broker::connect::connect(&anonymous.nats, "auth-test")
            .await
            .is_err(),
        "connected without credentials"
    );
    let other_seed = nkeys::KeyPair::new_user().seed()?;
    let other = server.config("nats", "other", &format!("nkey_seed = \"{other_seed}\""))?;
    // A key the server does not know is refused for good: a configuration
    // error that the binaries stop on instead of retrying.
    match sluice_broker::connect::connect(&other.nats, "auth-test").await {
        Err(ConnectError::Refused { .. }) => {}
        Err(other) => anyhow::bail!("an unknown nkey failed otherwise: {other:?}"),
        Ok(_) => anyhow::bail!("connected with an unknown nkey"),
    }
    Ok(())
}

/// `nats.token`, or a token in the URL: the right one connects, a wrong one is refused for good.
#[tokio::test]
async fn token_authentication() -> anyhow::Result<()> {
    let server = Server::start("authorization { token: \"s3cret-token\" }").await?;
    round_trip(&server.config("nats", "token", "token = \"s3cret-token\"")?).await?;
    let in_url = server.dir.path().join("url.toml");
    std::fs::write(
        &in_url,
        format!(
            "source = \"auth\"\n[nats]\nurl = \"nats://s3cret-token@127.0.0.1:{}\"\n",
            server.port
        ),
    )?;
    round_trip(&Config::load(&in_url)?).await?;
    let wrong = server.config("nats", "wrong", "token = \"guess\"")?;
    match sluice_broker::connect::connect(&wrong.nats, "auth-test").await {
        Err(ConnectError::Refused { .. }) => {}
        Err(other) => anyhow::bail!("a wrong token failed otherwise: {other:?}"),
        Ok(_) => anyhow::bail!("connected with a wrong token"),
    }
    Ok(())
}

/// A server that requires a client certificate of the stack's CA (`tls { verify: true }`):
/// `nats.tls_cert` + `tls_key` connect; without them the connection is refused for good
/// ([`ConnectError::Certificate`], which both binaries stop on) and the error says so.
#[tokio::test]
async fn a_client_certificate_for_mutual_tls() -> anyhow::Result<()> {
    let tls = sluice_integration::Servers::get().tls.clone();
    let (Some(ca), Some(cert), Some(key)) = (tls.ca, tls.client_cert, tls.client_key) else {
        anyhow::bail!(
            "SLUICE_TEST_TLS_CA and SLUICE_TEST_TLS_CLIENT_CERT/KEY must be set (scripts/stack writes them)"
        );
    };
    // The stack's server certificate and key sit beside its CA.
    let tls_dir = ca.parent().context("CA path has no directory")?;
    let path = |p: &std::path::Path| format!("{:?}", p.display().to_string());
    let server = Server::start(&format!(
        "tls {{ cert_file: {}, key_file: {}, ca_file: {}, verify: true, timeout: 5 }}",
        path(&tls_dir.join("server.pem")),
        path(&tls_dir.join("server.key")),
        path(&ca),
    ))
    .await?;
    let trust = format!("tls_ca = {}", path(&ca));
    round_trip(&server.config(
        "tls",
        "mutual",
        &format!(
            "{trust}\ntls_cert = {}\ntls_key = {}",
            path(&cert),
            path(&key)
        ),
    )?)
    .await
    .context("connecting with the client certificate")?;

    let without = server.config("tls", "without", &trust)?;
    match sluice_broker::connect::connect(&without.nats, "auth-test").await {
        Err(error @ ConnectError::Certificate { .. }) => {
            let text = format!("{:#}", anyhow::Error::from(error));
            assert!(text.to_lowercase().contains("certificate"), "{text}");
        }
        Err(other) => anyhow::bail!("no client certificate failed otherwise: {other:?}"),
        Ok(_) => anyhow::bail!("connected without the client certificate the server requires"),
    }
    Ok(())
}
