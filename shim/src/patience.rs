//! Deadlines that stretch with the node's load. A pod VM booting on a node
//! that is starting twenty others gets a fraction of a CPU: it is slow, not
//! broken, and a fixed deadline would fail it for the node's business. Every
//! wait on the guest (boot, the agent's connection, a stream connection, the
//! agent's calls) is given a base duration, and what is allowed is the base
//! times the node's current load factor: runnable tasks (or the one-minute
//! load average, whichever is higher) per CPU, at least 1 and at most
//! [`MAX_SCALE`]. The factor is read again while waiting, so a wait that
//! started on a quiet node is extended when the node fills up. A wait that
//! still runs out says how long it waited and under what load.

use std::{fmt, future::Future, time::Duration};

use tokio::time::Instant;

/// The most a base duration is stretched: a pod that is not ready after ten
/// times its deadline on a busy node is not merely slow.
pub const MAX_SCALE: f64 = 10.0;

/// How loaded the node is, from `/proc/loadavg`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// One-minute load average.
    pub avg1: f64,
    /// Tasks runnable now.
    pub running: u32,
    /// CPUs this process may run on.
    pub cpus: u32,
}

impl Load {
    /// The node's load now (an idle one if `/proc/loadavg` cannot be read).
    pub fn now() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| Self::parse(&s, cpus))
            .unwrap_or(Load {
                avg1: 0.0,
                running: 0,
                cpus,
            })
    }

    /// Parses `/proc/loadavg` (`0.52 0.40 0.31 3/214 9876`).
    pub fn parse(text: &str, cpus: u32) -> Option<Self> {
        let mut f = text.split_whitespace();
        let avg1 = f.next()?.parse().ok()?;
        let running = f.nth(2)?.split('/').next()?.parse().ok()?;
        Some(Load {
            avg1,
            running,
            cpus: cpus.max(1),
        })
    }

    /// The factor a base duration is stretched by: the busier of runnable
    /// tasks (less the one reading) and the load average, per CPU, in
    /// `1..=MAX_SCALE`.
    pub fn scale(&self) -> f64 {
        let busy = self.avg1.max(f64::from(self.running.saturating_sub(1)));
        (busy / f64::from(self.cpus)).clamp(1.0, MAX_SCALE)
    }
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "load average {:.1}, {} runnable, on {} CPU{}",
            self.avg1,
            self.running,
            self.cpus,
            if self.cpus == 1 { "" } else { "s" }
        )
    }
}

/// `base` stretched by the node's load now: for deadlines that cannot be
/// extended once set (an RPC's timeout).
pub fn scaled(base: Duration) -> Duration {
    base.mul_f64(Load::now().scale())
}

/// The longest a wait with deadline `base` can last: the inner deadline to
/// give a call that [`wait`] bounds.
pub fn ceiling(base: Duration) -> Duration {
    base.mul_f64(MAX_SCALE)
}

/// A wait that ran out.
#[derive(Debug, Clone, PartialEq)]
pub struct Expired {
    /// How long it waited.
    pub waited: Duration,
    /// Its deadline on an idle node.
    pub base: Duration,
    /// The node's load when it gave up.
    pub load: Load,
}

impl fmt::Display for Expired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.2}s (a {:.2}s deadline stretched ×{:.1} for the node's {})",
            self.waited.as_secs_f64(),
            self.base.as_secs_f64(),
            self.load.scale(),
            self.load
        )
    }
}

/// Runs `fut` for at most `base` stretched by the node's load, read again
/// each time the deadline comes: the wait ends when the deadline of the load
/// then has passed too.
pub async fn wait<F: Future>(base: Duration, fut: F) -> Result<F::Output, Expired> {
    wait_with(base, Load::now, fut).await
}

/// [`wait`] with the load read by `load` (tests).
pub async fn wait_with<F: Future>(
    base: Duration,
    mut load: impl FnMut() -> Load,
    fut: F,
) -> Result<F::Output, Expired> {
    let start = Instant::now();
    tokio::pin!(fut);
    loop {
        let now = load();
        let allowed = base.mul_f64(now.scale());
        let Some(left) = allowed
            .checked_sub(start.elapsed())
            .filter(|l| !l.is_zero())
        else {
            return Err(Expired {
                waited: start.elapsed(),
                base,
                load: now,
            });
        };
        // Re-read the load at least every second, so that a wait on a node
        // that fills up is extended before it ends.
        match tokio::time::timeout(left.min(Duration::from_secs(1)), &mut fut).await {
            Ok(out) => return Ok(out),
            Err(_) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(avg1: f64, running: u32, cpus: u32) -> Load {
        Load {
            avg1,
            running,
            cpus,
        }
    }

    #[test]
    fn loadavg_is_parsed_and_garbage_is_not() {
        assert_eq!(
            Load::parse("0.52 0.40 0.31 3/214 9876\n", 2),
            Some(load(0.52, 3, 2))
        );
        assert_eq!(Load::parse("", 2), None);
        assert_eq!(Load::parse("x 0.4 0.3 3/214 1", 2), None);
        assert_eq!(Load::parse("0.5 0.4 0.3", 2), None);
    }

    #[test]
    fn the_scale_is_the_busier_measure_per_cpu_within_bounds() {
        assert_eq!(load(0.1, 1, 2).scale(), 1.0, "idle node: the base");
        assert_eq!(load(6.0, 2, 2).scale(), 3.0, "load average");
        assert_eq!(
            load(0.5, 9, 2).scale(),
            4.0,
            "runnable now, less the reader"
        );
        assert_eq!(load(400.0, 0, 2).scale(), MAX_SCALE, "capped");
        assert_eq!(load(3.0, 0, 0).cpus, 0, "built as given");
        assert_eq!(
            Load::parse("3.0 0 0 1/1 1", 0).map(|l| l.scale()),
            Some(3.0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_node_gets_the_base_deadline() {
        let r = wait_with(
            Duration::from_secs(5),
            || load(0.0, 1, 2),
            tokio::time::sleep(Duration::from_secs(6)),
        )
        .await;
        let e = r.expect_err("6 s > 5 s on an idle node");
        assert!(e.waited >= Duration::from_secs(5) && e.waited < Duration::from_secs(6));
        let text = e.to_string();
        assert!(text.contains("5.00s deadline stretched ×1.0"), "{text}");
        assert!(
            text.contains("load average 0.0, 1 runnable, on 2 CPUs"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_fills_up_while_waiting_extends_the_wait() {
        let start = Instant::now();
        // Idle for the first 4 s, then 8 runnable tasks on 2 CPUs (×3.5).
        let r = wait_with(
            Duration::from_secs(5),
            || {
                if start.elapsed() < Duration::from_secs(4) {
                    load(0.0, 1, 2)
                } else {
                    load(0.0, 8, 2)
                }
            },
            async {
                tokio::time::sleep(Duration::from_secs(12)).await;
                "ready"
            },
        )
        .await;
        assert_eq!(r, Ok("ready"), "12 s fit in 5 s × 3.5");
        let r = wait_with(
            Duration::from_secs(5),
            || load(0.0, 8, 2),
            tokio::time::sleep(Duration::from_secs(20)),
        )
        .await;
        let e = r.expect_err("20 s > 17.5 s");
        assert!(e.waited >= Duration::from_millis(17_500), "{e}");
    }
}
