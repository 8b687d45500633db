//! The servers the harness provides are the real thing: Postgres with logical decoding, a
//! replicated JetStream cluster that deduplicates by `Nats-Msg-Id`, and a ClickHouse recent
//! enough for `ReplacingMergeTree(version, is_deleted)`, `EXCHANGE TABLES` and the `clickhouse`
//! crate's RowBinary inserts.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use clickhouse::Row;
use serde::{Deserialize, Serialize};
use sluice_integration::{Servers, clickhouse_sql, fresh_stream_name};

#[tokio::test]
async fn postgres_creates_pgoutput_slots() -> anyhow::Result<()> {
    let servers = Servers::get();
    let (url, _name) = servers.fresh_pg_database("servers_pg").await?;
    let pg = Servers::pg_connect(&url).await?;

    let wal_level: String = pg.query_one("SHOW wal_level", &[]).await?.get(0);
    assert_eq!(wal_level, "logical");

    let slot = sluice_integration::unique_name("s_x");
    pg.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await?;
    let row = pg
        .query_one(
            "SELECT plugin, slot_type, database FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "pgoutput");
    assert_eq!(row.get::<_, String>(1), "logical");
    pg.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    let left: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .get(0);
    assert_eq!(left, 0);
    Ok(())
}

#[tokio::test]
async fn nats_cluster_replicates_and_deduplicates() -> anyhow::Result<()> {
    let servers = Servers::get();
    let Some(client) = servers.nats_cluster().await? else {
        eprintln!("skipped: no NATS cluster (set SLUICE_TEST_NATS_CLUSTER_URLS)");
        return Ok(());
    };
    let js = jetstream::new(client);
    let name = fresh_stream_name("servers_nats");
    let subject = format!("sluice.{name}.public.t");
    let mut stream = js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("sluice.{name}.>")],
            num_replicas: 3,
            duplicate_window: Duration::from_secs(120),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating an R3 stream")?;

    let publish = || async {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "slot/0/16B3748/t/0");
        js.publish_with_headers(subject.clone(), headers, "package".into())
            .await?
            .await
            .context("waiting for the publish ack")
    };
    let first = publish().await?;
    let second = publish().await?;
    assert!(!first.duplicate);
    assert!(second.duplicate, "second publish with the same Nats-Msg-Id");
    assert_eq!(second.sequence, first.sequence);

    let info = stream.info().await?;
    assert_eq!(info.state.messages, 1);
    assert_eq!(info.config.num_replicas, 3);
    let cluster = info
        .cluster
        .as_ref()
        .context("stream has no cluster info")?;
    assert_eq!(cluster.replicas.len(), 2, "a leader and two replicas");

    js.delete_stream(&name).await?;
    Ok(())
}

#[tokio::test]
async fn nats_single_node_has_jetstream() -> anyhow::Result<()> {
    let js = jetstream::new(Servers::get().nats().await?);
    let name = fresh_stream_name("servers_nats1");
    js.create_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("sluice.{name}.>")],
        ..Default::default()
    })
    .await?;
    let ack = js
        .publish(format!("sluice.{name}.public.t"), "x".into())
        .await?
        .await?;
    assert_eq!(ack.sequence, 1);
    js.delete_stream(&name).await?;
    Ok(())
}

/// `broker/nats/accounts.conf`: the producer publishes only its data subjects, the consumer only
/// consumes, neither reads the other's inbox.
#[tokio::test]
async fn nats_users_have_least_privilege() -> anyhow::Result<()> {
    let servers = Servers::get();
    let connect = |user: Option<&sluice_integration::Login>| {
        let user = user
            .cloned()
            .context("SLUICE_TEST_NATS_PRODUCER/CONSUMER must name the least-privilege users");
        async move {
            let user = user?;
            anyhow::Ok(
                async_nats::ConnectOptions::with_user_and_password(
                    user.user.clone(),
                    user.password.clone(),
                )
                .custom_inbox_prefix(user.inbox_prefix())
                .connect(servers.nats_url.as_str())
                .await?,
            )
        }
    };
    let producer = connect(servers.nats_users.producer.as_ref()).await?;
    let consumer = connect(servers.nats_users.consumer.as_ref()).await?;
    // Neither may listen on the other's inbox (where the loader's messages are delivered).
    let mut snoop = producer.subscribe("_INBOX_consumer.>").await?;
    producer.flush().await?;
    let admin_client = servers.nats().await?;
    admin_client
        .publish("_INBOX_consumer.x", "secret".into())
        .await?;
    admin_client.flush().await?;
    assert!(
        tokio::time::timeout(
            Duration::from_millis(500),
            futures::StreamExt::next(&mut snoop)
        )
        .await
        .map_or(true, |m| m.is_none()),
        "the producer read the consumer's inbox"
    );
    let context = |client| {
        jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(client)
    };
    let (producer, consumer) = (context(producer), context(consumer));
    let name = fresh_stream_name("servers_perm");
    let subject = format!("sluice.{name}.public.t");

    producer
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("sluice.{name}.>")],
            ..Default::default()
        })
        .await
        .context("producer creates the stream")?;
    producer
        .publish(subject.clone(), "row".into())
        .await?
        .await?;
    // A stream outside `sluice.>` exists, so only permissions stop the producer's publish.
    let admin = jetstream::new(servers.nats().await?);
    let other = format!("{name}_other");
    admin
        .create_stream(jetstream::stream::Config {
            name: other.clone(),
            subjects: vec![format!("other.{name}")],
            ..Default::default()
        })
        .await?;
    assert!(
        producer
            .publish(format!("other.{name}"), "row".into())
            .await?
            .await
            .is_err(),
        "producer may publish only on sluice.>"
    );

    let stream = consumer.get_stream(&name).await?;
    let pull: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("loader".into()),
            ..Default::default()
        })
        .await
        .context("consumer creates a durable pull consumer")?;
    let mut batch = pull.fetch().max_messages(10).messages().await?;
    let message = futures::StreamExt::next(&mut batch)
        .await
        .context("no message")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(message.payload.as_ref(), b"row");
    message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(
        consumer
            .publish(subject, "forged".into())
            .await?
            .await
            .is_err(),
        "consumer may not publish data"
    );
    assert!(
        consumer.delete_stream(&name).await.is_err(),
        "consumer may not delete streams"
    );

    admin.delete_stream(&name).await?;
    admin.delete_stream(&other).await?;
    Ok(())
}

/// No `no_auth_user`: a client without credentials is refused at connect, so it can neither read
/// nor delete a stream.
#[tokio::test]
async fn nats_refuses_clients_without_credentials() -> anyhow::Result<()> {
    let servers = Servers::get();
    anyhow::ensure!(
        servers.nats_users.admin.is_some(),
        "SLUICE_TEST_NATS_ADMIN must be set: the stack's NATS requires authentication"
    );
    let admin = jetstream::new(servers.nats().await?);
    let name = fresh_stream_name("servers_anon");
    admin
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("sluice.{name}.>")],
            ..Default::default()
        })
        .await?;
    let anonymous = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(2));
    let anonymous = tokio::time::timeout(
        Duration::from_secs(10),
        anonymous.connect(servers.nats_url.as_str()),
    )
    .await;
    assert!(
        !matches!(anonymous, Ok(Ok(_))),
        "an anonymous client connected to NATS"
    );
    // The stream is still there.
    admin.get_stream(&name).await?;
    admin.delete_stream(&name).await?;
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
struct Versioned {
    k: u64,
    v: u64,
    is_deleted: u8,
}

#[tokio::test]
async fn clickhouse_replaces_and_deletes_by_version() -> anyhow::Result<()> {
    let servers = Servers::get();
    let version = servers.clickhouse_sql("SELECT version()").await?;
    assert!(version.starts_with("26."), "clickhouse version {version:?}");

    let (ch, _db) = servers.fresh_clickhouse_database("servers_ch").await?;
    for table in ["t", "t_shadow"] {
        clickhouse_sql(
            &ch,
            &format!(
                "CREATE TABLE {table} (k UInt64, v UInt64, is_deleted UInt8) \
                 ENGINE = ReplacingMergeTree(v, is_deleted) ORDER BY k"
            ),
        )
        .await?;
    }

    // Through the `clickhouse` crate (RowBinary over HTTP), as the loader inserts.
    let mut insert = ch.insert::<Versioned>("t").await?;
    for row in [
        Versioned {
            k: 1,
            v: 1,
            is_deleted: 0,
        },
        Versioned {
            k: 1,
            v: 2,
            is_deleted: 1,
        },
        Versioned {
            k: 2,
            v: 1,
            is_deleted: 0,
        },
        Versioned {
            k: 2,
            v: 3,
            is_deleted: 0,
        },
    ] {
        insert.write(&row).await?;
    }
    insert.end().await?;
    // And as plain SQL over HTTP.
    clickhouse_sql(&ch, "INSERT INTO t VALUES (3, 1, 0)").await?;

    let live: Vec<Versioned> = ch
        .query("SELECT ?fields FROM t FINAL ORDER BY k")
        .fetch_all()
        .await?;
    assert_eq!(
        live,
        [
            Versioned {
                k: 2,
                v: 3,
                is_deleted: 0
            },
            Versioned {
                k: 3,
                v: 1,
                is_deleted: 0
            },
        ]
    );
    assert_eq!(
        clickhouse_sql(&ch, "SELECT count() FROM t FINAL").await?,
        "2\n"
    );

    // The resync swap.
    clickhouse_sql(&ch, "EXCHANGE TABLES t AND t_shadow").await?;
    assert_eq!(clickhouse_sql(&ch, "SELECT count() FROM t").await?, "0\n");
    assert_eq!(
        clickhouse_sql(&ch, "SELECT count() FROM t_shadow FINAL").await?,
        "2\n"
    );
    Ok(())
}
