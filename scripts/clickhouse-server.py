#!/usr/bin/env python3
"""Run a ClickHouse server (HTTP + native TCP) from chdb-core's embedded clickhouse-local engine.

Usage: clickhouse-server.py --dir DIR --http-port N --tcp-port N

Users (DIR/users.xml): `default` (no password, may manage access: the test harness's own
client) and `sluice_loader` (password `loader-dev`), the least-privilege user the loader runs as.
It holds exactly the grants README "Security" asks for, on every database whose name starts
with `sluice_` (the test harness names each pipeline's database so), and nothing else.

chdb-core (26.x) embeds the full clickhouse-local engine. Its low-level entry point
`chdb._chdb.query(sql, format, path=DATA_DIR)` loads `config.xml` from the current working
directory, so this script writes one into DIR (listen host, ports) and chdirs there.
`SYSTEM START LISTEN HTTP/TCP` then opens real listeners that serve other clients for as long
as the call runs, so the statement list ends with a query that sleeps "forever". Only one such
call works per process, which is why this is a separate process the stack script manages.
"""

import argparse
import os
import signal
import sys
import threading

CONFIG = """<clickhouse>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <path>{data}/</path>
    <users_config>{workdir}/users.xml</users_config>
    <logger>
        <level>warning</level>
        <console>1</console>
    </logger>
</clickhouse>
"""

# The grants match sql/clickhouse/setup.sql (statement for statement), here for a wildcard
# database `sluice_*` instead of one named database.
USERS = """<clickhouse>
    <profiles><default/></profiles>
    <quotas><default/></quotas>
    <users>
        <default>
            <password></password>
            <profile>default</profile>
            <quota>default</quota>
            <access_management>1</access_management>
        </default>
        <sluice_loader>
            <password>loader-dev</password>
            <profile>default</profile>
            <quota>default</quota>
            <grants>
                <query>GRANT CREATE DATABASE, CREATE TABLE, DROP TABLE, ALTER TABLE, INSERT, SELECT, TRUNCATE ON sluice_*.*</query>
                <query>GRANT TABLE ENGINE ON ReplacingMergeTree</query>
            </grants>
        </sluice_loader>
    </users>
</clickhouse>
"""

# ~31 years of sleeping: one row per second, no per-block cap, no execution time limit. The
# aggregate must read the function's value: `count()` over the same subquery never calls
# sleepEachRow and just counts a billion one-row blocks, which kept a core 60% busy.
SLEEP_FOREVER = (
    "SELECT max(sleepEachRow(1)) FROM numbers(1000000000) "
    "SETTINGS function_sleep_max_microseconds_per_block = 0, "
    "max_execution_time = 0, max_block_size = 1"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="working directory (config.xml, data/)")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--tcp-port", type=int, required=True)
    args = parser.parse_args()

    workdir = os.path.abspath(args.dir)
    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(workdir, "config.xml"), "w") as f:
        f.write(
            CONFIG.format(http_port=args.http_port, tcp_port=args.tcp_port, data=data, workdir=workdir)
        )
    with open(os.path.join(workdir, "users.xml"), "w") as f:
        f.write(USERS)
    os.chdir(workdir)

    import chdb._chdb as engine

    outcome: list[BaseException] = []

    def serve() -> None:
        try:
            engine.query(
                "SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; " + SLEEP_FOREVER,
                # Also becomes the default output format of HTTP clients that name none.
                "TabSeparated",
                path=data,
            )
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome.append(e)
        finally:
            done.set()

    # The engine runs in a worker thread so the main thread stays in the interpreter and can act
    # on SIGTERM/SIGINT (a Python signal handler never runs while the main thread is inside C++).
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    threading.Thread(target=serve, name="clickhouse", daemon=True).start()
    while not done.wait(1.0):
        pass
    print(f"clickhouse-server.py: the engine stopped: {outcome or 'query returned'}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
