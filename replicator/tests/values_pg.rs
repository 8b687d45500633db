//! Type catalog and text value decoding against a real Postgres.
//!
//! Every case asks Postgres for a value's text output (what pgoutput sends)
//! and, independently, for the typed value (epoch arithmetic, binary protocol,
//! `array_lower`/`array_length`/`unnest`), then checks [`decode_text`] agrees.
//!
//! Uses `SLUICE_TEST_PG_URL` (a superuser URL; each test creates its own
//! database) or else starts a throwaway Postgres 15 with initdb.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use sluice_broker::TableName;
use sluice_proto::v1;
use sluice_proto::v1::value::Kind;
use sluice_proto::values::{decode_scalar, decode_text};
use sluice_replicator::catalog::{self, CatalogError, TypeCatalog, TypeCategory, TypeInfo};
use sluice_replicator::recovery::{self, Recovery};
use tokio_postgres::{Client, NoTls};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A throwaway Postgres cluster, stopped on drop.
struct TempCluster {
    dir: tempfile::TempDir,
    port: u16,
    /// initdb refuses to run as root: then tools run as the postgres user.
    as_root: bool,
}

impl TempCluster {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-values-pg")
            .tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let as_root = Command::new("id")
            .arg("-u")
            .output()?
            .stdout
            .starts_with(b"0\n");
        let cluster = TempCluster { dir, port, as_root };
        if as_root {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(cluster.dir.path()))?;
        }
        let pg = |tool| cluster.tool(tool);
        run(pg("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale",
                "C",
                "-D",
            ])
            .arg(cluster.data()))?;
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            cluster.port,
            cluster.dir.path().display()
        );
        run(pg("pg_ctl")
            .arg("-D")
            .arg(cluster.data())
            .args(["-w", "-l"])
            .arg(cluster.dir.path().join("log"))
            .args(["-o", &opts, "start"]))?;
        Ok(cluster)
    }

    fn tool(&self, tool: &str) -> Command {
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(Path::new(PG_BIN).join(tool));
            c
        } else {
            Command::new(Path::new(PG_BIN).join(tool))
        };
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let mut cmd = self.tool("pg_ctl");
        let _ = cmd
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A connection to a fresh database of its own.
struct TestDb {
    client: Client,
    connection: tokio::task::JoinHandle<()>,
    _cluster: Option<TempCluster>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

async fn connect(url: &str) -> Result<(Client, tokio::task::JoinHandle<()>)> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    let handle = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, handle))
}

async fn test_db(name: &str) -> Result<TestDb> {
    let (cluster, url) = match std::env::var("SLUICE_TEST_PG_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let cluster = tokio::task::spawn_blocking(TempCluster::start).await??;
            let url = cluster.url();
            (Some(cluster), url)
        }
    };
    let db = format!("sluice_values_{name}_{}", std::process::id());
    {
        let (admin, handle) = connect(&url).await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
            .await?;
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {db} TEMPLATE template0 ENCODING 'UTF8'"
            ))
            .await?;
        handle.abort();
    }
    let mut config: tokio_postgres::Config = url.parse()?;
    config.dbname(&db);
    // The session settings the replication connection must use too.
    config.options(
        "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 \
         -c bytea_output=hex -c lc_monetary=C",
    );
    let (client, connection) = config.connect(NoTls).await?;
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(TestDb {
        client,
        connection,
        _cluster: cluster,
    })
}

async fn type_info(client: &Client, types: &mut TypeCatalog, sql_type: &str) -> Result<TypeInfo> {
    let oid: u32 = client
        .query_one(&format!("SELECT '{sql_type}'::regtype::oid"), &[])
        .await?
        .get(0);
    Ok(types.resolve(client, oid).await?.clone())
}

/// The text Postgres prints for `literal::sql_type`.
async fn text_of(client: &Client, sql_type: &str, literal: &str) -> Result<String> {
    Ok(client
        .query_one(&format!("SELECT ({literal})::{sql_type}::text"), &[])
        .await
        .with_context(|| format!("{literal}::{sql_type}"))?
        .get(0))
}

fn decoded(ty: &TypeInfo, text: &str) -> Result<Kind> {
    decode_text(ty, text)
        .with_context(|| format!("decoding {text:?}"))?
        .kind
        .context("no kind")
}

fn parse_i64(numeric_text: &str) -> Option<i64> {
    numeric_text.parse().ok()
}

#[tokio::test]
async fn values_agree_with_postgres() -> Result<()> {
    let db = test_db("values").await?;
    let c = &db.client;
    let mut types = TypeCatalog::new();
    c.batch_execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy 😀')")
        .await?;

    // Integers, compared with the binary protocol's value.
    for (ty, lit) in [
        ("int2", "-32768"),
        ("int2", "32767"),
        ("int4", "-2147483648"),
        ("int4", "2147483647"),
        ("int8", "-9223372036854775808"),
        ("int8", "9223372036854775807"),
        ("oid", "4294967295"),
        ("oid", "0"),
    ] {
        let info = type_info(c, &mut types, ty).await?;
        let text = text_of(c, ty, &format!("'{lit}'")).await?;
        let expected: i64 = c
            .query_one(&format!("SELECT '{lit}'::{ty}::int8"), &[])
            .await?
            .get(0);
        assert_eq!(decoded(&info, &text)?, Kind::Int(expected), "{ty} {lit}");
    }

    // float8 through the binary protocol; float4 as its shortest text.
    let float8 = type_info(c, &mut types, "float8").await?;
    for lit in [
        "0",
        "-0",
        "1.1",
        "0.1",
        "1e-320",
        "1.7976931348623157e308",
        "-2.2250738585072014e-308",
        "NaN",
        "Infinity",
        "-Infinity",
        "3.141592653589793",
    ] {
        let row = c
            .query_one(
                &format!("SELECT '{lit}'::float8::text, '{lit}'::float8"),
                &[],
            )
            .await?;
        let (text, expected): (String, f64) = (row.get(0), row.get(1));
        match decoded(&float8, &text)? {
            Kind::Float(f) if expected.is_nan() => assert!(f.is_nan()),
            Kind::Float(f) => assert_eq!(f.to_bits(), expected.to_bits(), "float8 {lit}"),
            other => panic!("{other:?}"),
        }
    }
    let float4 = type_info(c, &mut types, "float4").await?;
    for lit in ["1.1", "3.4028235e38", "1e-45", "-Infinity"] {
        let row = c
            .query_one(
                &format!("SELECT '{lit}'::float4::text, '{lit}'::float4"),
                &[],
            )
            .await?;
        let (text, expected): (String, f32) = (row.get(0), row.get(1));
        match decoded(&float4, &text)? {
            Kind::Float(f) => assert_eq!(f as f32, expected, "float4 {lit}"),
            other => panic!("{other:?}"),
        }
    }

    // bool, bytea, uuid via the binary protocol.
    let boolean = type_info(c, &mut types, "bool").await?;
    for lit in ["true", "false"] {
        let row = c
            .query_one(&format!("SELECT {lit}::text, {lit}"), &[])
            .await?;
        assert_eq!(decoded(&boolean, row.get(0))?, Kind::Bool(row.get(1)));
    }
    let bytea = type_info(c, &mut types, "bytea").await?;
    let uuid = type_info(c, &mut types, "uuid").await?;
    for lit in [
        "''",
        "'\\x00ff'",
        "'abc\\\\'::bytea || '\\x00'::bytea",
        "decode(repeat('ab', 1000), 'hex')",
    ] {
        let row = c
            .query_one(&format!("SELECT ({lit})::bytea::text, ({lit})::bytea"), &[])
            .await?;
        assert_eq!(
            decoded(&bytea, row.get(0))?,
            Kind::Bytes(row.get(1)),
            "bytea {lit}"
        );
    }
    for lit in [
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "{00000000-0000-0000-0000-000000000000}",
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF",
    ] {
        let row = c
            .query_one(
                &format!("SELECT '{lit}'::uuid::text, uuid_send('{lit}'::uuid)"),
                &[],
            )
            .await?;
        assert_eq!(
            decoded(&uuid, row.get(0))?,
            Kind::Uuid(row.get(1)),
            "uuid {lit}"
        );
    }

    // numeric and money as exact decimal text (numeric ±Infinity exists from
    // Postgres 14 on).
    let numeric = type_info(c, &mut types, "numeric").await?;
    let mut numerics = vec![
        "0",
        "-12.340",
        "NaN",
        "1e-20",
        "123456789012345678901234567890.5",
        "0.000",
    ];
    let version = sluice_postgres::version::server_version_num(c).await?;
    if sluice_postgres::version::has_numeric_infinity(version) {
        numerics.extend(["Infinity", "-Infinity"]);
    }
    for lit in numerics {
        let text = text_of(c, "numeric", &format!("'{lit}'")).await?;
        assert_eq!(decoded(&numeric, &text)?, Kind::Numeric(text.clone()));
    }
    let money = type_info(c, &mut types, "money").await?;
    for lit in [
        "0",
        "1234.56",
        "-1",
        "92233720368547758.07",
        "-92233720368547758.08",
        "0.01",
    ] {
        let row = c
            .query_one(
                &format!("SELECT '{lit}'::money::text, '{lit}'::money::numeric::text"),
                &[],
            )
            .await?;
        assert_eq!(
            decoded(&money, row.get(0))?,
            Kind::Numeric(row.get(1)),
            "money {lit}"
        );
    }

    // Text-like types and enums carry their text.
    for (ty, lit) in [
        ("text", "'héllo 🦀 \"\\'"),
        ("varchar(3)", "'abc'"),
        ("char(5)", "'ab'"),
        ("name", "'pg_class'"),
        ("\"char\"", "'x'"),
        ("mood", "'happy 😀'"),
        ("inet", "'192.168.0.1/24'"),
        ("int4range", "'[1,5)'"),
        ("point", "'(1,2)'"),
        ("bit(4)", "B'1010'"),
    ] {
        let info = type_info(c, &mut types, ty).await?;
        let text = text_of(c, ty, lit).await?;
        assert_eq!(decoded(&info, &text)?, Kind::Text(text.clone()), "{ty}");
    }
    let jsonb = type_info(c, &mut types, "jsonb").await?;
    let text = text_of(c, "jsonb", "'{\"b\": [1, null, \"é\"], \"a\": 1.50}'").await?;
    assert_eq!(decoded(&jsonb, &text)?, Kind::Json(text.clone()));

    // Dates: days since 1970 by date subtraction.
    let date = type_info(c, &mut types, "date").await?;
    for lit in [
        "1970-01-01",
        "2000-02-29",
        "0001-01-01",
        "0001-12-31 BC",
        "0044-03-15 BC",
        "4714-11-24 BC",
        "5874897-12-31",
        "1969-12-31",
    ] {
        let row = c
            .query_one(
                &format!("SELECT '{lit}'::date::text, '{lit}'::date - date '1970-01-01'"),
                &[],
            )
            .await?;
        assert_eq!(
            decoded(&date, row.get(0))?,
            Kind::Date(row.get(1)),
            "date {lit}"
        );
    }
    for (lit, inf) in [
        ("infinity", v1::Infinity::Positive),
        ("-infinity", v1::Infinity::Negative),
    ] {
        let text = text_of(c, "date", &format!("'{lit}'")).await?;
        assert_eq!(decoded(&date, &text)?, Kind::DateInfinity(inf as i32));
    }

    // Timestamps: micros from extract(epoch), in several session time zones
    // (offsets with minutes and LMT seconds for old dates).
    let timestamp = type_info(c, &mut types, "timestamp").await?;
    let timestamptz = type_info(c, &mut types, "timestamptz").await?;
    let stamps = [
        "1970-01-01 00:00:00",
        "2024-01-02 03:04:05.123456",
        "1969-12-31 23:59:59.999999",
        "0001-01-01 00:00:00",
        "0044-03-15 12:00:00 BC",
        "4713-01-01 00:00:00 BC",
        "1850-06-01 12:00:00",
        "2024-03-31 02:30:00",
        "294247-01-10 04:00:54.775807",
        "294276-12-31 23:59:59.999999",
    ];
    for zone in [
        "UTC",
        "Asia/Kolkata",
        "America/St_Johns",
        "Europe/Amsterdam",
        "Pacific/Kiritimati",
    ] {
        c.batch_execute(&format!("SET TimeZone = '{zone}'")).await?;
        for lit in stamps {
            for (ty, info) in [("timestamp", &timestamp), ("timestamptz", &timestamptz)] {
                // Exact: days by date subtraction plus micros of the time of day
                // (extract(epoch) of a timestamp goes through float8; of a time it is
                // numeric from Postgres 14 on, float8 before: its 11 digits survive).
                let utc = if ty == "timestamp" {
                    format!("'{lit}'::timestamp")
                } else {
                    format!("('{lit}'::timestamptz AT TIME ZONE 'UTC')")
                };
                let row = match c
                    .query_one(
                        &format!(
                            "SELECT '{lit}'::{ty}::text, (({utc}::date - date '1970-01-01')::numeric * 86400000000 \
                             + extract(epoch FROM {utc}::time)::numeric * 1000000)::text"
                        ),
                        &[],
                    )
                    .await
                {
                    Ok(row) => row,
                    // Postgres's own upper limit, east of UTC.
                    Err(_) if lit.starts_with("294276") && ty == "timestamptz" => continue,
                    Err(e) => return Err(e).context(format!("{ty} {lit} in {zone}")),
                };
                let (text, micros): (String, String) = (row.get(0), row.get(1));
                let micros = micros.split('.').next().unwrap_or_default().to_owned();
                match parse_i64(&micros) {
                    Some(m) => {
                        let want = if ty == "timestamp" {
                            Kind::Timestamp(m)
                        } else {
                            Kind::Timestamptz(m)
                        };
                        assert_eq!(
                            decoded(info, &text)?,
                            want,
                            "{ty} {lit} in {zone} printed as {text}"
                        );
                    }
                    // Beyond sint64 micros since 1970: a clear error.
                    None => assert!(decode_text(info, &text).is_err(), "{ty} {lit}"),
                }
            }
        }
        let text = text_of(c, "timestamptz", "'-infinity'").await?;
        assert_eq!(
            decoded(&timestamptz, &text)?,
            Kind::TimestamptzInfinity(v1::Infinity::Negative as i32)
        );
    }
    c.batch_execute("SET TimeZone = 'UTC'").await?;

    // time and timetz.
    let time = type_info(c, &mut types, "time").await?;
    let timetz = type_info(c, &mut types, "timetz").await?;
    for lit in ["00:00:00", "23:59:59.999999", "24:00:00", "12:34:56.789"] {
        let row = c
            .query_one(&format!("SELECT '{lit}'::time::text, (extract(epoch FROM '{lit}'::time) * 1000000)::int8"), &[])
            .await?;
        assert_eq!(
            decoded(&time, row.get(0))?,
            Kind::Time(row.get(1)),
            "time {lit}"
        );
    }
    for lit in [
        "12:34:56.789+05:30",
        "00:00:00-15:59",
        "23:59:59.999999+15:59",
        "01:02:03-00:00:30",
        "24:00:00+00",
    ] {
        let row = c
            .query_one(
                &format!(
                    "SELECT '{lit}'::timetz::text, (extract(epoch FROM '{lit}'::timetz::time) * 1000000)::int8, \
                     extract(timezone FROM '{lit}'::timetz)::int4"
                ),
                &[],
            )
            .await?;
        let want = Kind::Timetz(v1::TimeTz {
            micros: row.get(1),
            offset_seconds: row.get(2),
        });
        assert_eq!(decoded(&timetz, row.get(0))?, want, "timetz {lit}");
    }

    // Intervals: fields by extract.
    let interval = type_info(c, &mut types, "interval").await?;
    let mut intervals = vec![
        "0",
        "1 year 2 mons 3 days 04:05:06.789",
        "-1 days +02:00:00",
        "-1 year -2 mons +3 days -04:05:06",
        "1 day -00:00:00.000001",
        "100 hours",
    ];
    // The extremes: the input of Postgres 13 and 14 refuses more than 2^31
    // hours (their output prints them all the same), so they are checked from
    // 15 on. From 17 on the former extremes are ±infinity, and the finite ones
    // end a microsecond earlier.
    if sluice_postgres::version::has_interval_infinity(version) {
        intervals.extend([
            "178956970 years 7 mons 2147483647 days 2562047788:00:54.775806",
            "-178956970 years -8 mons -2147483648 days -2562047788:00:54.775807",
        ]);
    } else if version >= 150000 {
        intervals.extend([
            "178956970 years 7 mons 2147483647 days 2562047788:00:54.775807",
            // Postgres's input cannot parse its own minimum; build it.
            "('-178956970 years -8 mons -2147483648 days -2562047788:00:54.775807'::interval - '1 microsecond')",
        ]);
    }
    for lit in intervals {
        let expr = if lit.starts_with('(') {
            lit.to_owned()
        } else {
            format!("'{lit}'")
        };
        let row = c
            .query_one(
                &format!(
                    "WITH i(v) AS (SELECT ({expr})::interval) SELECT v::text, \
                     (extract(year FROM v) * 12 + extract(month FROM v))::int4, extract(day FROM v)::int4, \
                     (extract(hour FROM v) * 3600000000 + extract(minute FROM v) * 60000000 \
                      + extract(microseconds FROM v))::int8 FROM i"
                ),
                &[],
            )
            .await?;
        let want = Kind::Interval(v1::Interval {
            months: row.get(1),
            days: row.get(2),
            micros: row.get(3),
        });
        assert_eq!(decoded(&interval, row.get(0))?, want, "interval {lit}");
    }
    // Postgres 17+: infinite intervals travel as their text.
    if sluice_postgres::version::has_interval_infinity(version) {
        for lit in ["infinity", "-infinity"] {
            let text = text_of(c, "interval", &format!("'{lit}'")).await?;
            assert_eq!(text, lit);
            assert_eq!(decoded(&interval, &text)?, Kind::Text(text.clone()));
        }
    }

    // Arrays: shape from array_lower/array_length, elements from unnest.
    for (ty, lit) in [
        ("int4[]", "'{1,2,NULL}'"),
        ("int4[]", "'{}'"),
        ("int8[]", "'[0:1]={1,2}'"),
        ("int4[]", "'[-3:-2][5:7]={{1,2,3},{4,NULL,6}}'"),
        ("int4[]", "'{{{1},{2}},{{3},{4}}}'"),
        (
            "text[]",
            r#"'{"a b","c\"d",NULL,"NULL","","\\",é,"{x}","a,b"," lead"}'"#,
        ),
        ("varchar[]", "ARRAY['null', NULL, 'x y']"),
        ("date[]", "'{1970-01-02,infinity,0044-03-15 BC}'"),
        (
            "timestamptz[]",
            "ARRAY['2024-01-02 03:04:05.5+01'::timestamptz, NULL]",
        ),
        ("interval[]", "ARRAY['1 day -01:00:00'::interval]"),
        (
            "numeric[]",
            if sluice_postgres::version::has_numeric_infinity(version) {
                "'{1.50,NaN,-Infinity}'"
            } else {
                "'{1.50,NaN,-0.001}'"
            },
        ),
        ("bytea[]", r"ARRAY['\x00ff'::bytea, ''::bytea]"),
        (
            "uuid[]",
            "ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid]",
        ),
        ("jsonb[]", r#"ARRAY['{"a": "b,c"}'::jsonb]"#),
        ("bool[]", "'{t,f,NULL}'"),
        ("mood[]", "'{sad,\"happy 😀\"}'"),
        ("box[]", "ARRAY['((1,1),(0,0))'::box, '((3,3),(2,2))'::box]"),
        ("int4range[]", "ARRAY['[1,5)'::int4range, 'empty']"),
        ("money[]", "ARRAY['$1,000.50'::money]"),
        ("float8[]", "'{NaN,-0,1.5}'"),
    ] {
        let info = type_info(c, &mut types, ty).await?;
        ensure!(info.is_array(), "{ty} should resolve to an array type");
        let text = text_of(c, ty, lit).await?;
        let Kind::Array(got) = decoded(&info, &text)? else {
            bail!("{ty}: not an array");
        };
        let shape = c
            .query_one(
                &format!(
                    "WITH a(v) AS (SELECT ({lit})::{ty}) SELECT \
                     coalesce((SELECT array_agg(array_length(v, d)::int8 ORDER BY d) FROM generate_series(1, coalesce(array_ndims(v), 0)) d), '{{}}'), \
                     coalesce((SELECT array_agg(array_lower(v, d) ORDER BY d) FROM generate_series(1, coalesce(array_ndims(v), 0)) d), '{{}}'), \
                     coalesce((SELECT array_agg(e::text ORDER BY n) FROM unnest(v) WITH ORDINALITY u(e, n)), '{{}}') FROM a"
                ),
                &[],
            )
            .await
            .with_context(|| format!("shape of {ty} {lit}"))?;
        let dims: Vec<i64> = shape.get(0);
        let lower: Vec<i32> = shape.get(1);
        let elems: Vec<Option<String>> = shape.get(2);
        assert_eq!(
            got.dims,
            dims.iter().map(|&d| d as u32).collect::<Vec<_>>(),
            "{ty} {lit}"
        );
        assert_eq!(got.lower_bounds, lower, "{ty} {lit}");
        let want: Vec<v1::Value> = elems
            .iter()
            .map(|e| match e {
                None => Ok(sluice_proto::values::null()),
                Some(s) => decode_scalar(info.category, s)
                    .map(|k| v1::Value { kind: Some(k) })
                    .map_err(|r| anyhow::anyhow!("{ty} element {s:?}: {r}")),
            })
            .collect::<Result<_>>()?;
        // NaN != NaN: compare the debug form.
        assert_eq!(
            format!("{:?}", got.elements),
            format!("{want:?}"),
            "{ty} {lit}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn catalog_describes_tables_and_types() -> Result<()> {
    let db = test_db("catalog").await?;
    let c = &db.client;
    c.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
         CREATE DOMAIN posint2 AS posint;
         CREATE DOMAIN posints AS posint[];
         CREATE SCHEMA \"My Schema\";
         CREATE TABLE \"My Schema\".t_pk (
             gone int, id int8, d posint2 NOT NULL, m mood, a text[], da posints, n numeric(10,2),
             b box[], v int2vector, c int4range, PRIMARY KEY (id));
         ALTER TABLE \"My Schema\".t_pk DROP COLUMN gone;
         CREATE TABLE t_full_pk (a int, b int PRIMARY KEY);
         ALTER TABLE t_full_pk REPLICA IDENTITY FULL;
         CREATE TABLE t_full (a int, b text);
         ALTER TABLE t_full REPLICA IDENTITY FULL;
         CREATE TABLE t_idx (a int NOT NULL, b int NOT NULL, c text, PRIMARY KEY (c));
         CREATE UNIQUE INDEX t_idx_ba ON t_idx (b, a);
         ALTER TABLE t_idx REPLICA IDENTITY USING INDEX t_idx_ba;
         CREATE TABLE t_nothing (id int PRIMARY KEY);
         ALTER TABLE t_nothing REPLICA IDENTITY NOTHING;
         CREATE TABLE t_nokey (a int);
         CREATE PUBLICATION pub FOR TABLE \"My Schema\".t_pk, t_full, t_idx;
         CREATE PUBLICATION empty_pub;",
    )
    .await?;

    let t = catalog::table_columns(c, &TableName::new("My Schema", "t_pk")).await?;
    assert_eq!(t.replica_identity, 'd');
    let names: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "d", "m", "a", "da", "n", "b", "v", "c"]);
    let keys: Vec<bool> = t.columns.iter().map(|c| c.key).collect();
    assert_eq!(
        keys,
        [true, false, false, false, false, false, false, false, false]
    );
    assert!(!t.columns[0].nullable && !t.columns[1].nullable && t.columns[2].nullable);
    assert_eq!(t.columns[5].type_name, "numeric(10,2)");
    assert_eq!(t.columns[5].type_modifier, (10 << 16 | 2) + 4);
    assert_eq!(t.columns[3].type_name, "text[]");
    assert_eq!(t.columns[1].type_name, "posint2");

    let mut types = TypeCatalog::new();
    assert!(matches!(
        catalog::to_relation(&t, &types),
        Err(CatalogError::TypeNotResolved { .. })
    ));
    types.resolve_table(c, &t).await?;
    let rel = catalog::to_relation(&t, &types)?;
    assert_eq!(rel.oid, t.oid);
    assert_eq!(rel.replica_identity, "d");
    let kind = |i: usize| v1::TypeKind::try_from(rel.columns[i].type_kind).unwrap();
    let base = |i: usize| rel.columns[i].base_type_oid;
    let oid_of = |name: &'static str| async move {
        let oid: u32 = c
            .query_one(&format!("SELECT '{name}'::regtype::oid"), &[])
            .await?
            .get(0);
        anyhow::Ok(oid)
    };
    assert_eq!((kind(0), base(0)), (v1::TypeKind::Base, 20));
    assert_eq!((kind(1), base(1)), (v1::TypeKind::Domain, 23)); // domain over domain over int4
    assert_eq!(kind(2), v1::TypeKind::Enum);
    assert_eq!(base(2), rel.columns[2].type_oid);
    assert_eq!((kind(3), base(3)), (v1::TypeKind::Array, 25));
    assert_eq!(
        (kind(4), base(4)),
        (v1::TypeKind::Domain, oid_of("posint[]").await?)
    );
    assert_eq!(
        (kind(6), base(6)),
        (v1::TypeKind::Array, oid_of("box").await?)
    );
    assert_eq!(kind(7), v1::TypeKind::Base); // int2vector prints "1 2", not an array
    assert_eq!(kind(8), v1::TypeKind::Other); // range

    let get = |i: usize| types.get(t.columns[i].type_oid).unwrap();
    assert_eq!(
        (get(1).category, get(1).array_delimiter),
        (TypeCategory::Int, None)
    );
    assert_eq!(
        (get(2).category, get(2).array_delimiter),
        (TypeCategory::Text, None)
    );
    assert_eq!(
        (get(4).category, get(4).array_delimiter),
        (TypeCategory::Int, Some(b','))
    );
    assert_eq!(
        (get(6).category, get(6).array_delimiter),
        (TypeCategory::Text, Some(b';'))
    );
    assert_eq!(
        (get(7).category, get(7).array_delimiter),
        (TypeCategory::Text, None)
    );

    // Values of those columns decode by their base types.
    c.batch_execute(
        "INSERT INTO \"My Schema\".t_pk VALUES \
         (1, 5, 'happy', '{x}', '{{1,2},{3,NULL}}', 1.5, ARRAY['((1,1),(0,0))'::box], '1 2', '[1,2)')",
    )
    .await?;
    let row = c
        .query_one(
            "SELECT d::text, da::text, v::text, b::text FROM \"My Schema\".t_pk",
            &[],
        )
        .await?;
    assert_eq!(decode_text(get(1), row.get(0))?.kind, Some(Kind::Int(5)));
    let Some(Kind::Array(da)) = decode_text(get(4), row.get(1))?.kind else {
        bail!("posints should decode as an array");
    };
    assert_eq!(da.dims, [2, 2]);
    assert_eq!(
        decode_text(get(7), row.get(2))?.kind,
        Some(Kind::Text("1 2".into()))
    );
    let Some(Kind::Array(b)) = decode_text(get(6), row.get(3))?.kind else {
        bail!("box[] should decode as an array");
    };
    assert_eq!(b.elements.len(), 1);

    // Replica identities.
    let full_pk = catalog::table_columns(c, &TableName::new("public", "t_full_pk")).await?;
    assert_eq!(full_pk.replica_identity, 'f');
    assert_eq!(
        full_pk.columns.iter().map(|c| c.key).collect::<Vec<_>>(),
        [false, true]
    );
    let full = catalog::table_columns(c, &TableName::new("public", "t_full")).await?;
    assert_eq!(
        full.columns.iter().map(|c| c.key).collect::<Vec<_>>(),
        [true, true]
    );
    let idx = catalog::table_columns(c, &TableName::new("public", "t_idx")).await?;
    assert_eq!(idx.replica_identity, 'i');
    assert_eq!(
        idx.columns.iter().map(|c| c.key).collect::<Vec<_>>(),
        [true, true, false]
    );
    for table in ["t_nothing", "t_nokey"] {
        match catalog::table_columns(c, &TableName::new("public", table)).await {
            Err(e @ CatalogError::NoReplicaIdentity { .. }) => {
                assert!(e.to_string().contains(&format!("public.{table}")), "{e}");
                assert_eq!(recovery::of_catalog(&e), Recovery::FailTable);
            }
            other => panic!("{table}: {other:?}"),
        }
    }
    assert!(matches!(
        catalog::table_columns(c, &TableName::new("public", "missing")).await,
        Err(CatalogError::TableNotFound { .. })
    ));

    // Publications.
    assert_eq!(
        catalog::published_tables(c, "pub").await?,
        [
            TableName::new("My Schema", "t_pk"),
            TableName::new("public", "t_full"),
            TableName::new("public", "t_idx"),
        ]
    );
    assert!(catalog::published_tables(c, "empty_pub").await?.is_empty());
    assert!(matches!(
        catalog::published_tables(c, "nope").await,
        Err(CatalogError::PublicationNotFound { .. })
    ));
    assert!(matches!(
        types.resolve(c, 4_000_000_000).await,
        Err(CatalogError::TypeNotFound { oid: 4_000_000_000 })
    ));
    Ok(())
}
