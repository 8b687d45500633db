//! The restart loop both binaries run around their work: one attempt, then,
//! for an error the caller classifies as retryable, a capped exponential
//! backoff (from `backon`) before the next attempt, until success, a
//! non-retryable error or shutdown.
//!
//! An attempt that ran for longer than [`Restart::reset_after`] counts as a
//! recovery: the next failure starts again from the shortest delay, so a
//! process that ran for a day does not wait 30 s after one dropped connection.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// Delays between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    /// Delay after the first failure; doubled after each further one.
    pub first_delay: Duration,
    /// Upper bound of the delay.
    pub max_delay: Duration,
    /// An attempt that ran at least this long resets the delay to `first_delay`.
    pub reset_after: Duration,
}

impl Restart {
    fn delays(&self) -> impl Iterator<Item = Duration> + use<> {
        ExponentialBuilder::new()
            .with_min_delay(self.first_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }
}

/// What to do after a failed attempt; the caller's error classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait for the backoff delay, then try again.
    Retry,
    /// Give up and return the error.
    Stop,
}

/// Runs `attempt` until it succeeds, `decide` answers [`Next::Stop`] for its
/// error, or `shutdown` is cancelled (which returns `Ok(())`). `decide` sees
/// each error and the delay before the next attempt, to log and count it.
pub async fn supervise<E, F, Fut, D>(
    shutdown: &CancellationToken,
    restart: Restart,
    mut attempt: F,
    mut decide: D,
) -> Result<(), E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    D: FnMut(&E, Duration) -> Next,
{
    let mut delays = restart.delays();
    loop {
        let started = Instant::now();
        let error = match attempt().await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if shutdown.is_cancelled() {
            return Err(error);
        }
        if started.elapsed() >= restart.reset_after {
            delays = restart.delays();
        }
        let delay = delays.next().unwrap_or(restart.max_delay);
        if decide(&error, delay) == Next::Stop {
            return Err(error);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const RESTART: Restart = Restart {
        first_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(2),
        reset_after: Duration::from_secs(60),
    };

    #[tokio::test(start_paused = true)]
    async fn retries_with_doubling_capped_delays_until_success() {
        let shutdown = CancellationToken::new();
        let mut left = 5;
        let delays = Arc::new(Mutex::new(Vec::new()));
        let seen = delays.clone();
        let result: Result<(), &str> = supervise(
            &shutdown,
            RESTART,
            || {
                left -= 1;
                let fail = left > 0;
                async move { if fail { Err("down") } else { Ok(()) } }
            },
            move |_, delay| {
                seen.lock().unwrap().push(delay);
                Next::Retry
            },
        )
        .await;
        assert_eq!(result, Ok(()));
        let ms: Vec<u128> = delays
            .lock()
            .unwrap()
            .iter()
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(ms, [250, 500, 1000, 2000]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_decision_returns_the_error_at_once() {
        let shutdown = CancellationToken::new();
        let mut attempts = 0;
        let result: Result<(), &str> = supervise(
            &shutdown,
            RESTART,
            || {
                attempts += 1;
                async { Err("bad config") }
            },
            |_, _| Next::Stop,
        )
        .await;
        assert_eq!(result, Err("bad config"));
        assert_eq!(attempts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_attempt_resets_the_delay() {
        let shutdown = CancellationToken::new();
        let mut attempt = 0;
        let delays = Arc::new(Mutex::new(Vec::new()));
        let seen = delays.clone();
        let _: Result<(), &str> = supervise(
            &shutdown,
            RESTART,
            || {
                attempt += 1;
                let n = attempt;
                async move {
                    if n == 4 {
                        // ran for two minutes before failing
                        tokio::time::sleep(Duration::from_secs(120)).await;
                    }
                    if n < 6 { Err("down") } else { Ok(()) }
                }
            },
            move |_, delay| {
                seen.lock().unwrap().push(delay.as_millis());
                Next::Retry
            },
        )
        .await;
        assert_eq!(*delays.lock().unwrap(), [250, 500, 1000, 250, 500]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_during_the_wait_ends_cleanly() {
        let shutdown = CancellationToken::new();
        let cancel = shutdown.clone();
        let result: Result<(), &str> = supervise(
            &shutdown,
            RESTART,
            || async { Err("down") },
            move |_, _| {
                cancel.cancel();
                Next::Retry
            },
        )
        .await;
        assert_eq!(result, Ok(()));
    }
}
