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

/// A JWT of the NATS decentralised-auth model (`alg: ed25519-nkey`): `claims` (without `iss`,
/// `sub`, `iat`, `jti`) for `subject`, signed by `issuer`.
fn nats_jwt(
    issuer: &nkeys::KeyPair,
    subject: &str,
    name: &str,
    claims: serde_json::Value,
) -> anyhow::Result<String> {
    use data_encoding::BASE64URL_NOPAD as B64;
    let header = B64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let body = serde_json::json!({
        "jti": sluice_integration::unique_name("jti").to_uppercase(),
        "iat": iat,
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": claims,
    });
    let payload = B64.encode(serde_json::to_vec(&body)?.as_slice());
    let signed = format!("{header}.{payload}");
    let signature = issuer.sign(signed.as_bytes())?;
    Ok(format!("{signed}.{}", B64.encode(&signature)))
}

/// A `.creds` file (user JWT + seed) as `nsc` writes it.
fn creds_file(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// `nats.creds_file` against a server in operator mode (decentralised JWT authentication): a
/// user of the operator's account connects; a user signed by an account the operator does not
/// know is refused for good; an unreadable file is a configuration error naming it.
#[tokio::test]
async fn a_creds_file_in_operator_mode() -> anyhow::Result<()> {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let system = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1
    });
    let account_claims = serde_json::json!({
        "limits": unlimited, "default_permissions": {"pub": {}, "sub": {}},
        "type": "account", "version": 2
    });
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "sluice-test",
        serde_json::json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
    )?;
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "app",
        account_claims.clone(),
    )?;
    let system_jwt = nats_jwt(&operator, &system.public_key(), "SYS", account_claims)?;
    let user_claims = serde_json::json!({
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2
    });
    let user_jwt = nats_jwt(&account, &user.public_key(), "loader", user_claims.clone())?;
    let server = Server::start(&format!(
        "operator: {operator_jwt}\nsystem_account: {}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {}: {account_jwt}\n  {}: {system_jwt}\n}}",
        system.public_key(),
        account.public_key(),
        system.public_key(),
    ))
    .await?;
    let write = |name: &str, text: String| -> anyhow::Result<String> {
        let path = server.dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(format!("{:?}", path.display().to_string()))
    };

    let good = write("loader.creds", creds_file(&user_jwt, &user.seed()?))?;
    round_trip(&server.config("nats", "creds", &format!("creds_file = {good}"))?)
        .await
        .context("connecting with the .creds file")?;

    // Signed by an account the operator never issued.
    let stranger = nkeys::KeyPair::new_account();
    let other = nkeys::KeyPair::new_user();
    let other_jwt = nats_jwt(&stranger, &other.public_key(), "other", user_claims)?;
    let bad = write("other.creds", creds_file(&other_jwt, &other.seed()?))?;
    match sluice_broker::connect::connect(
        &server
            .config("nats", "stranger", &format!("creds_file = {bad}"))?
            .nats,
        "auth-test",
    )
    .await
    {
        Err(ConnectError::Refused { .. }) => {}
        Err(other) => anyhow::bail!("a foreign user's .creds failed otherwise: {other:?}"),
        Ok(_) => anyhow::bail!("connected with a user of an unknown account"),
    }

    let missing = server.config("nats", "missing", "creds_file = \"/nonexistent/x.creds\"")?;
    match sluice_broker::connect::connect(&missing.nats, "auth-test").await {
        Err(ConnectError::Credentials { path, .. }) => {
            assert_eq!(path, std::path::Path::new("/nonexistent/x.creds"));
        }
        Err(other) => anyhow::bail!("a missing .creds file failed otherwise: {other:?}"),
        Ok(_) => anyhow::bail!("connected without the .creds file"),
    }
    Ok(())
}
