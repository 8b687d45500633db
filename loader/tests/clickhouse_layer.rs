//! The ClickHouse layer against a real ClickHouse server.
//!
//! The server's HTTP endpoint comes from `SLUICE_TEST_CLICKHOUSE_URL`
//! (e.g. `http://127.0.0.1:8123`); the tests fail, rather than skip, when it
//! is unset. Each test works in its own database so tests run in parallel.

use clickhouse::Client;
use sluice_loader::clickhouse::{
    CurrentRows, InsertBuilder, SchemaDrift, TargetTable, ToastRequest, current_columns,
    ensure_table, fetch_current,
};
use sluice_proto::v1::{self, value::Kind};

fn client() -> Client {
    let url = std::env::var("SLUICE_TEST_CLICKHOUSE_URL").expect(
        "SLUICE_TEST_CLICKHOUSE_URL must name a ClickHouse HTTP endpoint, e.g. http://127.0.0.1:8123",
    );
    Client::default().with_url(url)
}

fn database(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("sluice_test_{test}_{}_{nanos}", std::process::id())
}

async fn text(client: &Client, sql: &str) -> String {
    let bytes = client
        .query_raw(sql)
        .fetch_bytes("TabSeparated")
        .unwrap()
        .collect()
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

// Postgres type OIDs used below.
const INT2: u32 = 21;
const INT4: u32 = 23;
const INT8: u32 = 20;
const OID: u32 = 26;
const BOOL: u32 = 16;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const NUMERIC: u32 = 1700;
const MONEY: u32 = 790;
const TEXT: u32 = 25;
const VARCHAR: u32 = 1043;
const BYTEA: u32 = 17;
const UUID: u32 = 2950;
const JSONB: u32 = 3802;
const DATE: u32 = 1082;
const TIME: u32 = 1083;
const TIMETZ: u32 = 1266;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const INTERVAL: u32 = 1186;
const INET: u32 = 869;

fn column(name: &str, oid: u32, type_name: &str, nullable: bool) -> v1::Column {
    v1::Column {
        array_delimiter: 0,
        text_category: 0,
        name: name.into(),
        type_oid: oid,
        type_modifier: -1,
        type_name: type_name.into(),
        nullable,
        key: false,
        type_kind: v1::TypeKind::Base as i32,
        base_type_oid: oid,
        has_default: false,
        attnum: 0,
    }
}

fn key(name: &str, oid: u32, type_name: &str) -> v1::Column {
    v1::Column {
        key: true,
        ..column(name, oid, type_name, false)
    }
}

fn array(name: &str, array_oid: u32, elem_oid: u32, type_name: &str) -> v1::Column {
    v1::Column {
        type_kind: v1::TypeKind::Array as i32,
        base_type_oid: elem_oid,
        ..column(name, array_oid, type_name, true)
    }
}

fn numeric(name: &str, precision: i32, scale: i32) -> v1::Column {
    v1::Column {
        type_modifier: ((precision << 16) | scale) + 4,
        ..column(
            name,
            NUMERIC,
            &format!("numeric({precision},{scale})"),
            true,
        )
    }
}

fn v(kind: Kind) -> v1::Value {
    v1::Value { kind: Some(kind) }
}
fn null() -> v1::Value {
    v(Kind::Null(v1::Null {}))
}
fn toast() -> v1::Value {
    v(Kind::UnchangedToast(v1::UnchangedToast {}))
}
fn int(i: i64) -> v1::Value {
    v(Kind::Int(i))
}
fn txt(s: &str) -> v1::Value {
    v(Kind::Text(s.into()))
}
fn num(s: &str) -> v1::Value {
    v(Kind::Numeric(s.into()))
}
fn arr(dims: &[u32], elements: Vec<v1::Value>) -> v1::Value {
    v(Kind::Array(v1::Array {
        dims: dims.to_vec(),
        lower_bounds: dims.iter().map(|_| 1).collect(),
        elements,
    }))
}

fn row(op: v1::Op, values: Vec<v1::Value>) -> v1::Row {
    v1::Row {
        op: op as i32,
        values,
        old_key: vec![],
    }
}

fn package(relation: &v1::Relation, commit_lsn: u64, rows: Vec<v1::Row>) -> v1::Package {
    v1::Package {
        source: "app".into(),
        schema: "public".into(),
        table: "t".into(),
        kind: v1::Kind::Changes as i32,
        relation: Some(relation.clone()),
        commit_lsn,
        rows,
        ..Default::default()
    }
}

async fn insert(
    client: &Client,
    target: &TargetTable,
    package: &v1::Package,
) -> sluice_loader::clickhouse::InsertReport {
    let mut request = ToastRequest::default();
    request.add_package(target, package).unwrap();
    let current = fetch_current(client, target, None, &request).await.unwrap();
    let mut builder = InsertBuilder::new(target);
    builder.push_package(package, &current).unwrap();
    builder.send(client).await.unwrap()
}

fn all_types_relation() -> v1::Relation {
    let mood = v1::Column {
        type_kind: v1::TypeKind::Enum as i32,
        ..column("mood", 50_000, "mood", true)
    };
    v1::Relation {
        oid: 1,
        replica_identity: "d".into(),
        publication: String::new(),
        columns: vec![
            key("id", INT4, "integer"),
            column("i2", INT2, "smallint", false),
            column("i8", INT8, "bigint", true),
            column("o", OID, "oid", true),
            column("b", BOOL, "boolean", true),
            column("f4", FLOAT4, "real", true),
            column("f8", FLOAT8, "double precision", true),
            numeric("n", 10, 2),
            column("nu", NUMERIC, "numeric", true),
            column("m", MONEY, "money", true),
            column("t", TEXT, "text", true),
            column("vc", VARCHAR, "character varying(5)", false),
            column("by", BYTEA, "bytea", true),
            column("u", UUID, "uuid", true),
            column("j", JSONB, "jsonb", true),
            column("d", DATE, "date", true),
            column("tm", TIME, "time without time zone", true),
            column("ttz", TIMETZ, "time with time zone", true),
            column("ts", TIMESTAMP, "timestamp without time zone", true),
            column("tstz", TIMESTAMPTZ, "timestamp with time zone", true),
            column("iv", INTERVAL, "interval", true),
            column("ip", INET, "inet", true),
            mood,
            array("ai", 1007, INT4, "integer[]"),
            array("a2", 1007, INT4, "integer[][]"),
            array("at", 1009, TEXT, "text[]"),
        ],
    }
}

#[tokio::test]
async fn all_types_round_trip_with_update_and_delete() {
    let client = client();
    let relation = all_types_relation();
    let db = database("types");
    let target = TargetTable::from_relation(&db, "public", "t", &relation).unwrap();
    let drift = ensure_table(&client, &target).await.unwrap();
    assert!(drift.is_empty(), "{drift:?}");

    let uuid = vec![
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ];
    let full = |id: i64, t: &str| {
        vec![
            int(id),
            int(-32768),
            int(i64::MIN),
            int(4_294_967_295),
            v(Kind::Bool(true)),
            v(Kind::Float(f64::NAN)),
            v(Kind::Float(f64::NEG_INFINITY)),
            num("12.345"),
            num("-123456789012345678901234567890.123456789"),
            num("-12.34"),
            txt(t),
            txt("héllo"),
            v(Kind::Bytes(vec![0, 1, 0xfe, 0xff])),
            v(Kind::Uuid(uuid.clone())),
            v(Kind::Json(r#"{"a": [1, 2.5, null]}"#.into())),
            // 2024-02-29
            v(Kind::Date(19_782)),
            v(Kind::Time(45_296_500_000)),
            v(Kind::Timetz(v1::TimeTz {
                micros: 49_500_500_000,
                offset_seconds: 7200,
            })),
            // 2024-01-02 03:04:05.123456
            v(Kind::Timestamp(1_704_164_645_123_456)),
            // 1969-12-31 23:59:59.999999 UTC
            v(Kind::Timestamptz(-1)),
            v(Kind::Interval(v1::Interval {
                months: 14,
                days: 3,
                micros: 14_706_500_000,
            })),
            txt("192.168.0.1/24"),
            txt("happy"),
            arr(&[3], vec![int(1), null(), int(3)]),
            arr(&[2, 2], vec![int(1), int(2), int(3), null()]),
            arr(&[2], vec![txt("a'b"), null()]),
        ]
    };
    let mut nulls = vec![int(3), int(7)];
    nulls.extend((2..relation.columns.len()).map(|i| if i == 11 { txt("") } else { null() }));

    // Rows 1, 2, 3 in one transaction; later: an update of 1 and a delete of 2.
    let first = package(
        &relation,
        100,
        vec![
            row(v1::Op::Insert, full(1, "first")),
            row(v1::Op::Insert, full(2, "two")),
            row(v1::Op::Insert, nulls),
        ],
    );
    let mut delete = vec![int(2)];
    delete.extend((1..relation.columns.len()).map(|_| null()));
    let second = package(
        &relation,
        200,
        vec![
            row(v1::Op::Update, full(1, "updated")),
            row(v1::Op::Delete, delete),
        ],
    );
    // Applied out of order and twice: versions decide, replays are harmless.
    let report = insert(&client, &target, &second).await;
    assert_eq!(report.rows, 2);
    insert(&client, &target, &first).await;
    insert(&client, &target, &second).await;

    let got = text(
        &client,
        &format!(
            "SELECT id, i2, i8, o, b, f4, f8, n, nu, m, t, vc, hex(by), u, j, d, tm, ttz, ts, \
             tstz, iv, ip, mood, ai, a2, at FROM {} FINAL WHERE _sluice_deleted = 0 ORDER BY id \
             SETTINGS session_timezone = 'UTC'",
            target.qualified()
        ),
    )
    .await;
    let expected = [
        "1\t-32768\t-9223372036854775808\t4294967295\ttrue\tnan\t-inf\t12.35\t\
         -123456789012345678901234567890.123456789\t-12.34\tupdated\théllo\t0001FEFF\t\
         00112233-4455-6677-8899-aabbccddeeff\t{\"a\": [1, 2.5, null]}\t2024-02-29\t\
         12:34:56.500000\t13:45:00.5+02\t2024-01-02 03:04:05.123456\t\
         1969-12-31 23:59:59.999999\tP1Y2M3DT4H5M6.5S\t192.168.0.1/24\thappy\t[1,NULL,3]\t\
         [[1,2],[3,NULL]]\t['a\\'b',NULL]",
        "3\t7\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t\
         \\N\t\\N\t\\N\t\\N\t\\N\t[]\t[]\t[]",
    ];
    assert_eq!(got.lines().collect::<Vec<_>>(), expected);

    // The delete is a tombstone row with the highest version of key 2 (FINAL
    // itself hides it: ReplacingMergeTree's is_deleted column).
    let tomb = text(
        &client,
        &format!(
            "SELECT id, argMax(_sluice_deleted, _sluice_version), max(_sluice_version) FROM {} \
             WHERE id = 2 GROUP BY id",
            target.qualified()
        ),
    )
    .await;
    let version = sluice_proto::row_version(&second, 1);
    assert_eq!(tomb, format!("2\t1\t{version}\n"));

    let types = text(
        &client,
        &format!(
            "SELECT name, type FROM system.columns WHERE database = '{db}' AND name IN \
             ('n', 'nu', 'mood', 'a2', 'tstz', 'tm', 'id') ORDER BY position"
        ),
    )
    .await;
    assert_eq!(
        types,
        "id\tInt32\nn\tNullable(Decimal(10, 2))\nnu\tNullable(String)\ntm\tNullable(Time64(6))\n\
         tstz\tNullable(DateTime64(6, \\'UTC\\'))\nmood\tLowCardinality(Nullable(String))\n\
         a2\tArray(Array(Nullable(Int32)))\n"
    );
    client
        .query_raw(&format!("DROP DATABASE `{db}`"))
        .execute()
        .await
        .unwrap();
}

#[tokio::test]
async fn unchanged_toast_is_filled_from_the_current_row() {
    let client = client();
    let db = database("toast");
    let relation = v1::Relation {
        oid: 1,
        replica_identity: "d".into(),
        publication: String::new(),
        columns: vec![
            key("k1", TEXT, "text"),
            key("k2", INT8, "bigint"),
            column("big", TEXT, "text", true),
            column("arr", 1009, "text[]", true),
            column("small", INT4, "integer", true),
        ],
    };
    let relation = v1::Relation {
        columns: relation
            .columns
            .into_iter()
            .map(|c| {
                if c.name == "arr" {
                    array("arr", 1009, TEXT, "text[]")
                } else {
                    c
                }
            })
            .collect(),
        ..relation
    };
    let target = TargetTable::from_relation(&db, "app", "docs", &relation).unwrap();
    assert_eq!(target.table, "app__docs");
    ensure_table(&client, &target).await.unwrap();
    let big = "x".repeat(100_000);
    insert(
        &client,
        &target,
        &package(
            &relation,
            10,
            vec![row(
                v1::Op::Insert,
                vec![
                    txt("a`'b"),
                    int(1),
                    txt(&big),
                    arr(&[1], vec![txt("q")]),
                    int(1),
                ],
            )],
        ),
    )
    .await;
    // Later transaction: two updates that leave the TOASTed columns alone; the
    // second finds the first in the same INSERT.
    let update = package(
        &relation,
        20,
        vec![
            row(
                v1::Op::Update,
                vec![txt("a`'b"), int(1), toast(), toast(), int(2)],
            ),
            row(
                v1::Op::Update,
                vec![txt("a`'b"), int(1), toast(), toast(), int(3)],
            ),
        ],
    );
    insert(&client, &target, &update).await;
    let got = text(
        &client,
        &format!(
            "SELECT k1, length(big), arr, small FROM {} FINAL WHERE _sluice_deleted = 0",
            target.qualified()
        ),
    )
    .await;
    assert_eq!(got, "a`\\'b\t100000\t['q']\t3\n");

    // A TOAST value for a row ClickHouse does not have is a definite error.
    let orphan = package(
        &relation,
        30,
        vec![row(
            v1::Op::Update,
            vec![txt("zz"), int(9), toast(), null(), int(1)],
        )],
    );
    let mut builder = InsertBuilder::new(&target);
    let err = builder
        .push_package(&orphan, &CurrentRows::default())
        .unwrap_err();
    assert_eq!(
        sluice_loader::recovery::Recovery::of_insert(&err),
        sluice_loader::recovery::Recovery::ResyncTable,
        "{err}"
    );
    assert_eq!(builder.rows(), 0);
    client
        .query_raw(&format!("DROP DATABASE `{db}`"))
        .execute()
        .await
        .unwrap();
}

#[tokio::test]
async fn add_column_evolution_and_drift() {
    let client = client();
    let db = database("evolve");
    let mut relation = v1::Relation {
        oid: 1,
        replica_identity: "d".into(),
        publication: String::new(),
        columns: vec![
            key("id", INT8, "bigint"),
            column("a", INT4, "integer", true),
        ],
    };
    let target = TargetTable::from_relation(&db, "public", "t", &relation).unwrap();
    ensure_table(&client, &target).await.unwrap();
    insert(
        &client,
        &target,
        &package(
            &relation,
            1,
            vec![row(v1::Op::Insert, vec![int(1), int(10)])],
        ),
    )
    .await;

    // ALTER TABLE t ADD COLUMN b text
    relation.columns.push(column("b", TEXT, "text", true));
    let target = TargetTable::from_relation(&db, "public", "t", &relation).unwrap();
    assert_eq!(ensure_table(&client, &target).await.unwrap(), vec![]);
    insert(
        &client,
        &target,
        &package(
            &relation,
            2,
            vec![row(v1::Op::Insert, vec![int(2), int(20), txt("new")])],
        ),
    )
    .await;
    let got = text(
        &client,
        &format!(
            "SELECT id, a, b FROM {} FINAL ORDER BY id",
            target.qualified()
        ),
    )
    .await;
    assert_eq!(got, "1\t10\t\\N\n2\t20\tnew\n");

    // ALTER TABLE t DROP COLUMN a, ALTER COLUMN b TYPE int8: reported, not applied.
    relation.columns.remove(1);
    relation.columns[1] = column("b", INT8, "bigint", true);
    let target = TargetTable::from_relation(&db, "public", "t", &relation).unwrap();
    let drift = ensure_table(&client, &target).await.unwrap();
    assert_eq!(
        drift,
        vec![
            SchemaDrift::TypeChanged {
                column: "b".into(),
                expected: "Nullable(Int64)".into(),
                actual: "Nullable(String)".into(),
            },
            SchemaDrift::Dropped {
                column: "a".into(),
                ch_type: "Nullable(Int32)".into(),
            },
        ]
    );
    assert!(drift[0].needs_resync() && !drift[1].needs_resync());
    let names: Vec<String> = current_columns(&client, &db, "t")
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(
        names,
        [
            "id",
            "a",
            "_sluice_version",
            "_sluice_deleted",
            "_sluice_synced_at",
            "b"
        ]
    );
    client
        .query_raw(&format!("DROP DATABASE `{db}`"))
        .execute()
        .await
        .unwrap();
}

#[tokio::test]
async fn out_of_range_values_are_clamped_and_counted() {
    let client = client();
    let db = database("clamp");
    let relation = v1::Relation {
        oid: 1,
        replica_identity: "d".into(),
        publication: String::new(),
        columns: vec![
            key("id", INT4, "integer"),
            column("d", DATE, "date", true),
            column("ts", TIMESTAMPTZ, "timestamp with time zone", true),
            numeric("n", 4, 1),
        ],
    };
    let target = TargetTable::from_relation(&db, "public", "t", &relation).unwrap();
    ensure_table(&client, &target).await.unwrap();
    let pkg = package(
        &relation,
        1,
        vec![
            row(
                v1::Op::Insert,
                vec![
                    int(1),
                    v(Kind::DateInfinity(v1::Infinity::Positive as i32)),
                    v(Kind::TimestamptzInfinity(v1::Infinity::Negative as i32)),
                    num("NaN"),
                ],
            ),
            row(
                v1::Op::Insert,
                vec![
                    int(2),
                    // 0200-01-01
                    v(Kind::Date(-646_818)),
                    // year 3000
                    v(Kind::Timestamptz(32_503_680_000_000_000)),
                    num("-Infinity"),
                ],
            ),
            row(
                v1::Op::Insert,
                vec![
                    int(3),
                    v(Kind::Date(0)),
                    v(Kind::Timestamptz(0)),
                    num("1.25"),
                ],
            ),
        ],
    );
    let report = insert(&client, &target, &pkg).await;
    assert_eq!(report.clamped.get("d"), 2);
    assert_eq!(report.clamped.get("ts"), 2);
    assert_eq!(report.clamped.get("n"), 2);
    assert_eq!(report.clamped.get("id"), 0);
    assert_eq!(report.clamped.total(), 6);
    let got = text(
        &client,
        &format!(
            "SELECT id, d, ts, n FROM {} FINAL ORDER BY id",
            target.qualified()
        ),
    )
    .await;
    assert_eq!(
        got,
        "1\t2299-12-31\t1900-01-01 00:00:00.000000\t0\n\
         2\t1900-01-01\t2299-12-31 23:59:59.999999\t-999.9\n\
         3\t1970-01-01\t1970-01-01 00:00:00.000000\t1.3\n"
    );
    client
        .query_raw(&format!("DROP DATABASE `{db}`"))
        .execute()
        .await
        .unwrap();
}
