//! A quiet shard's memory: its memtables flushed and its freed pages handed back to the OS.
//!
//! A burst of writes (a million tasks submitted) leaves memory behind when it ends: the
//! memtable of the newest writes, which fjall flushes only once it is full, and freed memory
//! (the memtables flushed during the burst, the calls' buffers) that jemalloc hands back only
//! as it is called. A shard that goes quiet right after would keep both until its next burst
//! (perf/RESULTS.md, "A quiet shard gives memory back"). So after a quiet second that follows
//! many writes, the shard has its memtables flushed, waits for fjall to finish, and purges
//! its allocator once. A busy shard needs none of it: its memtables fill and flush, and its
//! own allocations drive jemalloc's decay. jemalloc's background thread would purge a busy
//! shard too, at ~9% more CPU per task in 1-slot cycles (perf/RESULTS.md, "jemalloc's
//! background thread").

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::journal::Journal;

/// How often the shard looks at its writes; also how long "quiet" is.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Writes since the last release past which a quiet shard gives memory back again: a
/// memtable holds a few hundred thousand; a few thousand free too little to be worth a
/// purge, and each flush makes a table that compaction merges later.
pub const RELEASE_AFTER_WRITES: u64 = 50_000;

/// What to do at a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Seal the memtables, for fjall to flush.
    Flush,
    /// Purge the allocator: the flush is done.
    Release,
}

/// When to flush and release, from the journal's count of writes: a pure policy, checked by
/// the tests.
#[derive(Debug, Default)]
pub struct QuietPolicy {
    /// The count at the last check.
    seen: u64,
    /// The count when the memtables were last sealed.
    flushed_at: Option<u64>,
    /// The count at the last release.
    released_at: u64,
}

impl QuietPolicy {
    /// The step now, given the writes so far and whether a memtable is being flushed. Call
    /// once per [`CHECK_EVERY`].
    pub fn check(&mut self, writes: u64, flushing: bool) -> Step {
        let quiet = writes == self.seen;
        self.seen = writes;
        if !quiet || writes - self.released_at < RELEASE_AFTER_WRITES {
            return Step::Nothing;
        }
        if self.flushed_at != Some(writes) {
            self.flushed_at = Some(writes);
            return Step::Flush;
        }
        if flushing {
            return Step::Nothing;
        }
        self.released_at = writes;
        Step::Release
    }
}

/// Flushes and releases after each quiet second that follows [`RELEASE_AFTER_WRITES`]
/// writes, until `cancel`.
pub async fn run(journal: Journal, cancel: CancellationToken) {
    if !journal.keeps_records() {
        return;
    }
    let mut policy = QuietPolicy::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet_since = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let writes = journal.stats().ops.load(Ordering::Relaxed);
        match policy.check(writes, journal.flushing()) {
            Step::Nothing => {}
            Step::Flush => {
                quiet_since = Some(std::time::Instant::now());
                let sealing = journal.clone();
                // Sealing takes fjall's journal lock: off the async workers.
                match tokio::task::spawn_blocking(move || sealing.flush_memtables()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot flush the memtables"),
                    Err(e) => tracing::warn!(error = %e, "cannot flush the memtables"),
                }
            }
            Step::Release => {
                let started = std::time::Instant::now();
                // A purge of a few hundred MiB takes milliseconds of madvise.
                let Ok((before, after)) =
                    tokio::task::spawn_blocking(pm_proto::server::release_free_memory).await
                else {
                    continue;
                };
                tracing::info!(
                    rss_before_mib = before.map(|m| m.round()),
                    rss_after_mib = after.map(|m| m.round()),
                    purge_ms = started.elapsed().as_millis() as u64,
                    flushed_and_purged_ms =
                        quiet_since.take().map(|t| t.elapsed().as_millis() as u64),
                    writes,
                    "quiet after writes: memtables flushed, freed memory returned to the OS"
                );
            }
        }
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
    fn flushes_then_releases_once_per_quiet_period_after_enough_writes() {
        let mut p = QuietPolicy::default();
        // Writes keep coming: nothing.
        assert_eq!(p.check(10_000, false), Step::Nothing);
        assert_eq!(p.check(60_000, false), Step::Nothing);
        // Quiet: flush first, once.
        assert_eq!(p.check(60_000, false), Step::Flush);
        // Still flushing: wait for it.
        assert_eq!(p.check(60_000, true), Step::Nothing);
        assert_eq!(p.check(60_000, true), Step::Nothing);
        // Flushed: release, once.
        assert_eq!(p.check(60_000, false), Step::Release);
        assert_eq!(p.check(60_000, false), Step::Nothing);
        // A few writes more, then quiet: not worth it.
        assert_eq!(p.check(61_000, false), Step::Nothing);
        assert_eq!(p.check(61_000, false), Step::Nothing);
        // Many more, then quiet: again.
        assert_eq!(p.check(200_000, false), Step::Nothing);
        assert_eq!(p.check(200_000, false), Step::Flush);
        assert_eq!(p.check(200_000, false), Step::Release);
    }

    #[test]
    fn writes_between_the_flush_and_the_release_start_over() {
        let mut p = QuietPolicy::default();
        assert_eq!(p.check(60_000, false), Step::Nothing);
        assert_eq!(p.check(60_000, false), Step::Flush);
        // A burst resumes before the release: wait until it is quiet again, then flush what
        // it wrote before releasing.
        assert_eq!(p.check(90_000, true), Step::Nothing);
        assert_eq!(p.check(90_000, false), Step::Flush);
        assert_eq!(p.check(90_000, false), Step::Release);
    }

    #[test]
    fn a_shard_that_wrote_little_never_flushes_or_releases() {
        let mut p = QuietPolicy::default();
        for _ in 0..10 {
            assert_eq!(p.check(RELEASE_AFTER_WRITES - 1, false), Step::Nothing);
        }
    }
}
