//! The group-commit writer. One thread owns the writes: it takes every request queued while
//! the previous sync ran, applies them as one batch, syncs once, then answers all of them.
//! So concurrent submits share one fsync, no request is answered before its sync, and there
//! is never one fsync per task. Writes nobody waits for ([`Journal::append_unsynced`]: dispatch
//! records) take no fsync of their own: a batch of only those is handed to the OS and synced
//! by the next batch that holds a write someone waits for (fjall's journal is one file in
//! append order, and it syncs the old file when it starts a new one).
//!
//! A write that must be durable but that no caller is blocked on ([`Journal::write_soon`]:
//! an agent's result, whose slot was given back already) waits at most [`SOON`] for its
//! sync: a batch of only those, and unsynced ones, is handed to the OS at once and synced with
//! the next batch someone waits for, or when its oldest has waited [`SOON`]. With one slot
//! per agent, results come one at a time, and the fdatasync of each small batch of them was
//! the largest item in the shard's profile of that cycle (perf/RESULTS.md, "The agents'
//! loop alone, and results synced within a millisecond").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::key::TaskKey;
use crate::store::{Op, Store, StoreError, StoreOptions};
use pm_proto::v1::TaskResult;

/// The store the writer thread writes, shared with readers ([`Journal::read_result`]). Empty
/// while the writer opens it again after a failed write: fjall holds a lock on the directory
/// until every handle is dropped, so readers never keep a handle, only this lock, briefly.
type SharedStore = Arc<RwLock<Option<Store>>>;

/// Ops of one batch, past which the writer syncs before taking more (bounds batch memory).
const MAX_OPS_PER_SYNC: usize = 16 * 1024;

/// How long a [`Journal::write_soon`] waits for a sync at most (its write reaches the OS at
/// once).
pub const SOON: Duration = Duration::from_millis(1);

type Done = oneshot::Sender<Result<(), Arc<StoreError>>>;

/// When a request's ops must be synced.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SyncBy {
    /// Before the next request is taken: someone waits.
    Now,
    /// Within [`SOON`] of being queued.
    Soon,
    /// Never on its own account (a dispatch record).
    Never,
}

struct Request {
    ops: Vec<Op>,
    /// Answered once synced (or failed); `None` when nobody waits.
    done: Option<Done>,
    sync: SyncBy,
    /// When it was queued: a slow group commit says how long its oldest write waited.
    queued: Instant,
}

/// Counters for benchmarks and health.
#[derive(Debug, Default)]
pub struct Stats {
    /// Batches synced (one fdatasync each).
    pub syncs: AtomicU64,
    /// Batches handed to the OS without a sync (unsynced writes, and writes to be synced
    /// soon).
    pub unsynced: AtomicU64,
    pub ops: AtomicU64,
    /// Group commits logged as slow ([`StoreOptions::slow_commit`]).
    pub slow: AtomicU64,
}

#[derive(Clone)]
pub struct Journal {
    tx: Option<mpsc::Sender<Request>>,
    /// `None` for a journal that keeps nothing.
    store: Option<SharedStore>,
    stats: Arc<Stats>,
    /// Whether the last write succeeded: false from a failed one (a full disk) until one
    /// succeeds again. The shard's health follows it.
    writable: Arc<tokio::sync::watch::Sender<bool>>,
    /// A journal that keeps nothing fails its writes while this is set (tests of the
    /// scheduler's failure paths: [`Journal::fail_writes`]).
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl Journal {
    /// Starts the writer thread over `store`. It ends when every `Journal` clone is dropped.
    pub fn start(store: Store) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let writable = Arc::new(tokio::sync::watch::Sender::new(true));
        let (dir, options) = (store.dir().to_owned(), store.options());
        let shared: SharedStore = Arc::new(RwLock::new(Some(store)));
        let (thread_stats, thread_writable, thread_store) =
            (stats.clone(), writable.clone(), shared.clone());
        std::thread::Builder::new()
            .name("pm-journal".into())
            .spawn(move || {
                write_loop(
                    &thread_store,
                    (&dir, options),
                    rx,
                    &thread_stats,
                    &thread_writable,
                )
            })
            .expect("spawn the journal thread");
        Self {
            tx: Some(tx),
            store: Some(shared),
            stats,
            writable,
            failing: Arc::default(),
        }
    }

    /// Follows whether writes succeed (see [`Journal`]).
    pub fn writable(&self) -> tokio::sync::watch::Receiver<bool> {
        self.writable.subscribe()
    }

    /// A journal that keeps nothing: every write succeeds at once. For tests of the
    /// scheduler's logic on a paused clock, where a real sync thread would let time jump.
    pub fn discard() -> Self {
        Self {
            tx: None,
            store: None,
            stats: Arc::default(),
            writable: Arc::new(tokio::sync::watch::Sender::new(true)),
            failing: Arc::default(),
        }
    }

    /// Tests only: while `on`, every write of a journal from [`Journal::discard`] fails, as
    /// on a full disk, so the scheduler's undo paths run.
    #[cfg(test)]
    pub fn fail_writes(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }

    /// Makes `ops` durable; returns once they are synced.
    pub async fn write(&self, ops: Vec<Op>) -> Result<(), Arc<StoreError>> {
        self.wait(self.queue(ops, SyncBy::Now)).await
    }

    /// Makes `ops` durable like [`Journal::write`], but their sync may wait up to [`SOON`]
    /// for other writes to share it: for a caller nobody is blocked on.
    pub async fn write_soon(&self, ops: Vec<Op>) -> Result<(), Arc<StoreError>> {
        self.wait(self.queue(ops, SyncBy::Soon)).await
    }

    async fn wait(
        &self,
        answer: Option<oneshot::Receiver<Result<(), Arc<StoreError>>>>,
    ) -> Result<(), Arc<StoreError>> {
        let Some(answer) = answer else {
            if self.failing.load(Ordering::SeqCst) {
                return Err(Arc::new(StoreError(
                    "injected: no space left on device".into(),
                )));
            }
            return Ok(());
        };
        answer
            .await
            .map_err(|_| Arc::new(StoreError("the journal thread is gone".into())))?
    }

    /// Queues `ops` behind every write appended before them and returns at once; the
    /// receiver (`None` for a journal that keeps nothing) answers once they are synced. Writes
    /// land in the order they were appended, so a caller holding the scheduler's lock fixes
    /// their order against every later change of the same task. A failure is logged here
    /// too, for callers that do not wait.
    pub fn append(&self, ops: Vec<Op>) -> Option<oneshot::Receiver<Result<(), Arc<StoreError>>>> {
        self.queue(ops, SyncBy::Now)
    }

    fn queue(
        &self,
        ops: Vec<Op>,
        sync: SyncBy,
    ) -> Option<oneshot::Receiver<Result<(), Arc<StoreError>>>> {
        let tx = self.tx.as_ref()?;
        let (done, answer) = oneshot::channel();
        let request = Request {
            ops,
            done: Some(done),
            sync,
            queued: Instant::now(),
        };
        if let Err(mpsc::SendError(Request {
            done: Some(done), ..
        })) = tx.send(request)
        {
            let _ = done.send(Err(Arc::new(StoreError(
                "the journal thread is gone".into(),
            ))));
        }
        Some(answer)
    }

    /// Queues `ops` like [`Journal::append`], for a caller that never waits: they reach the
    /// OS in order with every other write, but cost no fsync of their own. They become
    /// durable with the next write someone waits for; until then a machine crash may lose
    /// them (a process crash does not: they are in the OS's buffers). Only for records whose
    /// loss is allowed (a dispatch: see `scheduler/dispatch.rs`). A failure is logged.
    pub fn append_unsynced(&self, ops: Vec<Op>) {
        if let Some(tx) = &self.tx {
            // A send fails only once the thread is gone, which the next awaited write reports.
            let _ = tx.send(Request {
                ops,
                done: None,
                sync: SyncBy::Never,
                queued: Instant::now(),
            });
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Whether the store is flushing a memtable (false for a journal that keeps nothing, and
    /// while the store is being opened again).
    pub fn flushing(&self) -> bool {
        let Some(shared) = &self.store else {
            return false;
        };
        shared
            .try_read()
            .is_ok_and(|store| store.as_ref().is_some_and(Store::flushing))
    }

    /// Has the store flush its memtables ([`Store::flush_memtables`]); nothing for a journal
    /// that keeps nothing. Fails at once while the store is being opened again.
    pub fn flush_memtables(&self) -> Result<(), StoreError> {
        let Some(shared) = &self.store else {
            return Ok(());
        };
        let guard = shared
            .try_read()
            .map_err(|_| StoreError("the task store is being opened again".into()))?;
        match &*guard {
            Some(store) => store.flush_memtables(),
            None => Err(StoreError("the task store cannot be opened".into())),
        }
    }

    /// Whether written records can be read back ([`Journal::read_result`]); false for a
    /// journal that keeps nothing.
    pub fn keeps_records(&self) -> bool {
        self.store.is_some()
    }

    /// The stored result of task `key` of `pipeline` (`None` if the task, or its result, is
    /// not stored). Reads what the last acknowledged write left; never waits for the writer,
    /// except while it opens the store again after a failed write, when this fails at once.
    pub fn read_result(
        &self,
        pipeline: &str,
        key: TaskKey,
    ) -> Result<Option<TaskResult>, StoreError> {
        let Some(shared) = &self.store else {
            return Ok(None);
        };
        let guard = shared
            .try_read()
            .map_err(|_| StoreError("the task store is being opened again".into()))?;
        match &*guard {
            Some(store) => store.task_result(pipeline, key),
            None => Err(StoreError("the task store cannot be opened".into())),
        }
    }
}

fn write_loop(
    shared: &SharedStore,
    (dir, options): (&std::path::Path, StoreOptions),
    rx: mpsc::Receiver<Request>,
    stats: &Stats,
    writable: &tokio::sync::watch::Sender<bool>,
) {
    // The store is `None` after opening it again failed: the next batch tries first.
    let lock = || shared.write().expect("store lock poisoned");
    let metrics = crate::metrics::JournalMetrics::new();
    // Writes to be synced soon, already handed to the OS: answered by the next sync, which
    // comes by `due` at the latest.
    let mut owed: Vec<Done> = Vec::new();
    let mut due: Option<Instant> = None;
    let mut closed = false;
    while !closed || !owed.is_empty() {
        // Nothing arriving by `due` means a batch of none: the owed sync alone.
        let first = match due {
            _ if closed => None,
            None => match rx.recv() {
                Ok(request) => Some(request),
                Err(mpsc::RecvError) => break,
            },
            Some(due) => match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(request) => Some(request),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    closed = true;
                    None
                }
            },
        };
        let started = Instant::now();
        let mut batch: Vec<Request> = first.into_iter().collect();
        let mut ops: usize = batch.iter().map(|r| r.ops.len()).sum();
        while !batch.is_empty() && ops < MAX_OPS_PER_SYNC {
            match rx.try_recv() {
                Ok(next) => {
                    ops += next.ops.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        // Only this thread changes the store, so a look under the shared lock suffices; the
        // exclusive one (which makes readers fail fast) is taken only to open it again.
        if shared.read().expect("store lock poisoned").is_none() {
            *lock() = open_again(dir, options);
        }
        let soonest = batch
            .iter()
            .filter(|r| r.sync == SyncBy::Soon)
            .map(|r| r.queued + SOON)
            .min();
        due = match (due, soonest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Synced if anyone waits for a write of it, or a write owed a sync is due (see the
        // module doc).
        let sync = batch.iter().any(|r| r.sync == SyncBy::Now)
            || due.is_some_and(|due| due <= Instant::now())
            || closed
            || owed.len() + batch.len() >= MAX_OPS_PER_SYNC;
        let applied = match &*shared.read().expect("store lock poisoned") {
            Some(open) => open.apply(batch.iter().flat_map(|r| r.ops.iter()), sync),
            None => Err(StoreError("the task store cannot be opened".into())),
        }
        .map_err(Arc::new);
        let result = applied.as_ref().map(|_| ()).map_err(Arc::clone);
        match &applied {
            Ok(applied) => {
                if sync {
                    metrics.fsync_seconds.record(applied.sync.as_secs_f64());
                }
                // Requests queue in order, so the first one waited longest, unless a write
                // owed its sync is older (`due` is the oldest of those, plus SOON).
                let oldest = [batch.first().map(|r| r.queued), due.map(|due| due - SOON)]
                    .into_iter()
                    .flatten()
                    .min();
                if let Some(oldest) = oldest.filter(|o| o.elapsed() >= options.slow_commit) {
                    stats.slow.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        waited_ms = ms(oldest.elapsed()),
                        queued_ms = ms(started.saturating_duration_since(oldest)),
                        write_ms = ms(applied.write),
                        sync_ms = ms(applied.sync),
                        synced = sync,
                        requests = batch.len(),
                        ops,
                        "slow group commit"
                    );
                }
                if writable.send_if_modified(|w| !std::mem::replace(w, true)) {
                    tracing::info!("the task store writes again");
                }
            }
            Err(e) => {
                metrics.store_errors.increment(1);
                tracing::error!(error = %e, "group commit failed; its writes are not acknowledged");
                writable.send_replace(false);
                // A handle that failed a write refuses every later one (fjall): the next
                // batch gets a fresh one, which works once the disk does. The journal it
                // replays holds whole batches only; a torn one is dropped.
                let mut store = lock();
                if let Some(failed) = store.take() {
                    // Closed first: fjall holds a lock on the directory until then.
                    drop(failed);
                    *store = open_again(dir, options);
                }
            }
        }
        if sync {
            metrics.sync_seconds.record(started.elapsed().as_secs_f64());
            metrics.batch_writes.record(ops as f64);
            stats.syncs.fetch_add(1, Ordering::Relaxed);
        } else {
            metrics.unsynced_batches.increment(1);
            stats.unsynced.fetch_add(1, Ordering::Relaxed);
        }
        stats.ops.fetch_add(ops as u64, Ordering::Relaxed);
        let answered = batch.into_iter().filter_map(|r| r.done);
        if sync || result.is_err() {
            // A failed write fails the owed ones too: their sync would have been on the
            // handle that failed.
            for done in owed.drain(..).chain(answered) {
                let _ = done.send(result.clone());
            }
            due = None;
        } else {
            owed.extend(answered);
        }
    }
}

/// Milliseconds to the microsecond, for logs.
fn ms(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// The store at `dir` opened again, after a failed write closed the last handle.
fn open_again(dir: &std::path::Path, options: StoreOptions) -> Option<Store> {
    match Store::open_with(dir, options) {
        Ok(store) => Some(store),
        Err(e) => {
            tracing::error!(error = %e, "cannot open the task store again; the next write tries");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_writes_share_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::start(Store::open(dir.path()).unwrap());
        let writes = (0..200).map(|i| {
            let journal = journal.clone();
            tokio::spawn(async move {
                journal
                    .write(vec![Op::DeleteTask {
                        pipeline: "tenants/t/applications/a/pipelines/p".into(),
                        key: crate::key::TaskKey(i as u128),
                    }])
                    .await
            })
        });
        for w in futures::future::join_all(writes).await {
            w.unwrap().unwrap();
        }
        let syncs = journal.stats().syncs.load(Ordering::Relaxed);
        assert_eq!(journal.stats().ops.load(Ordering::Relaxed), 200);
        assert!(syncs < 200, "200 concurrent writes took {syncs} syncs");
    }

    fn delete(i: u128) -> Vec<Op> {
        vec![Op::DeleteTask {
            pipeline: "tenants/t/applications/a/pipelines/p".into(),
            key: crate::key::TaskKey(i),
        }]
    }

    /// A write to be synced soon is synced with nothing else coming (its time runs out),
    /// and many of them share syncs.
    #[tokio::test]
    async fn writes_synced_soon_are_synced_alone_and_share_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::start(Store::open(dir.path()).unwrap());
        let limit = std::time::Duration::from_secs(10);
        tokio::time::timeout(limit, journal.write_soon(delete(0)))
            .await
            .expect("a lone write to be synced soon is synced by its time")
            .unwrap();
        assert_eq!(journal.stats().syncs.load(Ordering::Relaxed), 1);
        let writes = (1..=200).map(|i| {
            let journal = journal.clone();
            tokio::spawn(async move { journal.write_soon(delete(i)).await })
        });
        for w in tokio::time::timeout(limit, futures::future::join_all(writes))
            .await
            .expect("synced by their time")
        {
            w.unwrap().unwrap();
        }
        let syncs = journal.stats().syncs.load(Ordering::Relaxed) - 1;
        assert_eq!(journal.stats().ops.load(Ordering::Relaxed), 201);
        assert!(syncs < 200, "200 concurrent writes took {syncs} syncs");
    }

    /// The journal's last handle dropped while a write is owed its sync: the writer syncs it
    /// before it ends, and the write is answered as done.
    #[tokio::test]
    async fn an_owed_sync_is_made_before_the_writer_ends() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::start(Store::open(dir.path()).unwrap());
        let spec = Op::PutSpec {
            id: [7; 32],
            spec: Vec::new(),
        };
        let answer = journal.queue(vec![spec], SyncBy::Soon).unwrap();
        let shared = journal.store.clone().unwrap();
        drop(journal);
        answer.await.expect("answered").unwrap();
        let contents = shared.read().unwrap().as_ref().unwrap().load().unwrap();
        assert!(contents.specs.contains_key(&[7; 32]));
    }

    #[tokio::test]
    async fn unsynced_appends_take_no_sync_and_land_in_order_before_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::start(Store::open(dir.path()).unwrap());
        let spec = |i: u8| Op::PutSpec {
            id: [i; 32],
            spec: Vec::new(),
        };
        // Written first and last: the later write of the same key wins.
        journal.append_unsynced(vec![Op::DeleteSpec { id: [0; 32] }]);
        for i in 1..=100u8 {
            journal.append_unsynced(vec![spec(i)]);
        }
        // Applied before the awaited write is queued, so they are batches of their own.
        let stats = journal.stats();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stats.ops.load(Ordering::Relaxed) < 101 {
            assert!(
                std::time::Instant::now() < deadline,
                "unsynced appends not applied"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(stats.unsynced.load(Ordering::Relaxed) >= 1);
        journal.write(vec![spec(0)]).await.unwrap();
        assert_eq!(
            stats.syncs.load(Ordering::Relaxed),
            1,
            "only the awaited write syncs"
        );
        assert_eq!(stats.ops.load(Ordering::Relaxed), 102);
        let shared = journal.store.as_ref().unwrap().read().unwrap();
        let contents = shared.as_ref().unwrap().load().unwrap();
        let mut ids: Vec<u8> = contents.specs.keys().map(|id| id[0]).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..=100).collect::<Vec<u8>>());
    }

    #[tokio::test]
    async fn a_commit_slower_than_the_threshold_is_logged_and_counted() {
        let write = |journal: Journal, i: u128| async move {
            journal
                .write(vec![Op::DeleteTask {
                    pipeline: "tenants/t/applications/a/pipelines/p".into(),
                    key: crate::key::TaskKey(i),
                }])
                .await
                .unwrap();
        };
        let open = |slow_commit| {
            let dir = tempfile::tempdir().unwrap();
            let options = StoreOptions {
                slow_commit,
                ..StoreOptions::default()
            };
            let journal = Journal::start(Store::open_with(dir.path(), options).unwrap());
            (dir, journal)
        };
        // Every commit takes longer than nothing; none takes an hour.
        let (_dir, always) = open(std::time::Duration::ZERO);
        let (_dir2, never) = open(std::time::Duration::from_secs(3600));
        for i in 0..3 {
            write(always.clone(), i).await;
            write(never.clone(), i).await;
        }
        assert_eq!(always.stats().slow.load(Ordering::Relaxed), 3);
        assert_eq!(never.stats().slow.load(Ordering::Relaxed), 0);
    }
}
