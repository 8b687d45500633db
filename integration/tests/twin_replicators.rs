//! Two replicators of one source started at the same moment (a deployment that starts its
//! standby with the active one): one takes the slot and streams, the other waits as a standby,
//! and takes over when the active one is killed.
//! Both used to race past the "is the slot free" check and the loser stopped on Postgres'
//! "replication slot already exists" (42710) or "slot is active" (55006).

use std::time::{Duration, Instant};

use sluice_integration::pipeline::Pipeline;

const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test]
async fn replicators_started_together_stream_once_and_the_other_waits() -> anyhow::Result<()> {
    // Several fresh sources, so that the race (two CREATE_REPLICATION_SLOT or two
    // START_REPLICATION at once) is hit at least once.
    for round in 0..3 {
        let mut p = Pipeline::start(&format!("twins_{round}")).await?;
        let pg = p.pg().await?;
        pg.batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, note text);
             INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g;
             CREATE PUBLICATION sluice FOR TABLE items;",
        )
        .await?;
        p.spawn_replicator()?;
        let mut twin = p.spawn_second_replicator()?;
        p.spawn_loader()?;
        pg.batch_execute("UPDATE items SET note = 'changed' WHERE id % 7 = 0")
            .await?;
        // `wait_until_equal` fails if the first replicator (or the loader) exited.
        let converged = p.wait_until_equal(CONVERGE).await;
        let twin_exit = twin.try_wait()?;
        if converged.is_err() || twin_exit.is_some() {
            let _ = twin.kill();
            let _ = twin.wait();
        }
        converged?;
        anyhow::ensure!(
            twin_exit.is_none(),
            "round {round}: the replicator started second exited ({twin_exit:?}):\n{}",
            p.log_tail("replicator-cli", 20)
        );
        // Exactly one of them holds the slot; the other is alive and waiting.
        let deadline = Instant::now() + CONVERGE;
        let active: Option<i32> = loop {
            let row = pg
                .query_one(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                    &[&p.name],
                )
                .await?;
            if let Some(pid) = row.get::<_, Option<i32>>(0) {
                break Some(pid);
            }
            anyhow::ensure!(Instant::now() < deadline, "nobody holds the slot");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        anyhow::ensure!(active.is_some());
        p.check_alive()?;
        anyhow::ensure!(twin.try_wait()?.is_none(), "round {round}: the twin exited");
        if round < 2 {
            let _ = twin.kill();
            let _ = twin.wait();
            continue;
        }

        // Takeover: with the first killed, the twin is the one streaming. A new standby starts,
        // the twin is killed, and the standby takes the slot over and streams what follows.
        p.kill_9_replicator()?;
        pg.batch_execute("UPDATE items SET note = 'after the first kill' WHERE id % 5 = 0")
            .await?;
        p.wait_until_equal(CONVERGE).await?;
        anyhow::ensure!(twin.try_wait()?.is_none(), "the twin exited");
        p.spawn_replicator()?;
        twin.kill()?;
        twin.wait()?;
        pg.batch_execute("UPDATE items SET note = 'after the takeover' WHERE id % 3 = 0")
            .await?;
        p.wait_until_equal(CONVERGE).await?;
    }
    Ok(())
}
