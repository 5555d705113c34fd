//! Freed memory back to the OS once the shard goes quiet.
//!
//! A burst of writes (a million tasks submitted) frees much memory as it ends: fjall's
//! memtables, once flushed, and the buffers of the calls. jemalloc hands freed pages back only
//! as it is called, so a shard that goes quiet right after keeps them resident until its next
//! burst (~50 MiB after a million READY tasks: perf/RESULTS.md, "Freed memory back to the OS
//! when the shard goes quiet"). A busy shard needs nothing: its own allocations drive
//! jemalloc's decay. So this purges only after a quiet second that follows many writes, and
//! never while a memtable is still being flushed, whose memory is freed only when it is done.
//! jemalloc's background thread would purge a busy shard too, and cost ~9% more CPU per task
//! in 1-slot cycles (perf/RESULTS.md, "jemalloc's background thread").

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::journal::Journal;

/// How often the shard looks at its writes; also how long "quiet" is.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Writes since the last release past which a quiet shard releases again: one memtable holds
/// a few hundred thousand; a few thousand writes free too little to be worth a purge.
pub const RELEASE_AFTER_WRITES: u64 = 50_000;

/// When to release, from the journal's count of writes: a pure policy, checked by the tests.
#[derive(Debug, Default)]
pub struct IdleRelease {
    /// The count at the last check.
    seen: u64,
    /// The count at the last release.
    released_at: u64,
}

impl IdleRelease {
    /// Whether to release now, given the writes so far and whether a memtable is being
    /// flushed. Call once per [`CHECK_EVERY`].
    pub fn check(&mut self, writes: u64, flushing: bool) -> bool {
        let quiet = writes == self.seen;
        self.seen = writes;
        if !quiet || flushing || writes - self.released_at < RELEASE_AFTER_WRITES {
            return false;
        }
        self.released_at = writes;
        true
    }
}

/// Releases freed memory after each quiet second that follows [`RELEASE_AFTER_WRITES`]
/// writes, until `cancel`.
pub async fn run(journal: Journal, cancel: CancellationToken) {
    if !journal.keeps_records() {
        return;
    }
    let mut policy = IdleRelease::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let writes = journal.stats().ops.load(Ordering::Relaxed);
        if !policy.check(writes, journal.flushing()) {
            continue;
        }
        let started = std::time::Instant::now();
        // A purge of a few hundred MiB takes milliseconds of madvise: off the async workers.
        let Ok((before, after)) =
            tokio::task::spawn_blocking(pm_proto::server::release_free_memory).await
        else {
            continue;
        };
        tracing::info!(
            rss_before_mib = before.map(|m| m.round()),
            rss_after_mib = after.map(|m| m.round()),
            took_ms = started.elapsed().as_millis() as u64,
            writes,
            "quiet after writes: freed memory returned to the OS"
        );
    }
}

/// The policy's owner in a running shard: spawned by [`crate::serve`], stopped by its cancel.
pub fn spawn(journal: &Journal, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(journal.clone(), cancel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_once_per_quiet_period_after_enough_writes() {
        let mut p = IdleRelease::default();
        // Writes keep coming: never.
        assert!(!p.check(10_000, false));
        assert!(!p.check(60_000, false));
        // Quiet, but a memtable is being flushed: wait for it.
        assert!(!p.check(60_000, true));
        // Quiet and flushed: once.
        assert!(p.check(60_000, false));
        assert!(!p.check(60_000, false));
        // A few writes more, then quiet: not worth it.
        assert!(!p.check(61_000, false));
        assert!(!p.check(61_000, false));
        // Many more, then quiet: again.
        assert!(!p.check(200_000, false));
        assert!(p.check(200_000, false));
    }

    #[test]
    fn a_shard_that_wrote_little_never_releases() {
        let mut p = IdleRelease::default();
        for _ in 0..10 {
            assert!(!p.check(RELEASE_AFTER_WRITES - 1, false));
        }
    }
}
