//! Watches at the edge: how many one client may hold ([`PerClient`]), and a watch that
//! outlives a handoff or a shard's restart ([`follow`]).
//!
//! A watch that outlives a handoff or a shard's restart: when the shard stops serving a task
//! (it moved to another shard, the shard left, or it died) before it finished, the watch is
//! opened again at the owner, which starts with a snapshot. While no shard serves the task
//! (between an old owner forgetting it and the new one answering, or while a crashed owner,
//! which has the task on its disk, restarts) re-opens go on with backoff for
//! [`WATCH_REOPEN_FOR`]. Only time without an event counts, so a long watch survives any
//! number of moves.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Code, Status};

use pm_proto::v1::{TaskEvent, task_event};

/// How long re-opens go on without an event before the watch ends with UNAVAILABLE (the
/// client may watch again): a crashed shard's membership expires (10 s by default) and it
/// restarts within this.
pub const WATCH_REOPEN_FOR: Duration = Duration::from_secs(60);
/// The longest pause between two re-opens.
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Watches one client may hold open through one gateway by default
/// (`--max-watches-per-client`). Each shard bounds all of its watches too (`--max-watches`,
/// 10,000); this keeps one client from taking them all.
pub const DEFAULT_MAX_WATCHES_PER_CLIENT: usize = 1000;

/// Open watches by client (its token's subject). With authentication off there are no
/// clients to tell apart, so only the shards' own limit applies.
#[derive(Debug, Clone)]
pub struct PerClient {
    max: usize,
    open: Arc<Mutex<HashMap<Arc<str>, usize>>>,
}

/// One open watch of a client, given back when dropped.
#[derive(Debug)]
pub struct WatchPermit {
    client: Arc<str>,
    open: Arc<Mutex<HashMap<Arc<str>, usize>>>,
}

impl PerClient {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// A permit for one more watch of `client` ("" with authentication off: always given),
    /// or RESOURCE_EXHAUSTED past the limit.
    pub fn acquire(&self, client: &str) -> Result<Option<WatchPermit>, Status> {
        if client.is_empty() {
            return Ok(None);
        }
        let mut open = self.open.lock().expect("watch counts lock");
        let held = open.get(client).copied().unwrap_or(0);
        if held >= self.max {
            return Err(Status::resource_exhausted(format!(
                "this client holds {held} watches, the most one client may hold through this gateway (--max-watches-per-client); close one, or watch fewer tasks at once (ListTasks shows many)"
            )));
        }
        let client: Arc<str> = match open.get_key_value(client) {
            Some((key, _)) => key.clone(),
            None => client.into(),
        };
        open.insert(client.clone(), held + 1);
        Ok(Some(WatchPermit {
            client,
            open: self.open.clone(),
        }))
    }

    /// Watches `client` holds now.
    pub fn held(&self, client: &str) -> usize {
        let open = self.open.lock().expect("watch counts lock");
        open.get(client).copied().unwrap_or(0)
    }
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("watch counts lock");
        if let Some(held) = open.get_mut(&self.client) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// Answers that say no shard serves the task right now, which a re-open may change: the new
/// owner does not have it yet (NOT_FOUND), or the owner is down or changing (UNAVAILABLE).
fn transient(code: Code) -> bool {
    matches!(code, Code::NotFound | Code::Unavailable)
}

/// Forwards `upstream`'s events to `tx` until the task finishes or the client goes, opening
/// the watch again with `open` when a shard stops serving it. Events travel boxed: a slot of
/// the channel is then a pointer, and an idle watch holds no room for whole events.
pub async fn follow<S, O, F>(
    mut upstream: S,
    open: O,
    tx: mpsc::Sender<Result<Box<TaskEvent>, Status>>,
    _permit: Option<WatchPermit>,
) where
    S: Stream<Item = Result<TaskEvent, Status>> + Unpin,
    O: Fn() -> F,
    F: Future<Output = Result<S, Status>>,
{
    // When the current run of re-opens started (none while events flow).
    let mut reopening: Option<Instant> = None;
    loop {
        let next = tokio::select! {
            next = upstream.next() => next,
            // The client went: the shard's watch (one of its `--max-watches`) closes now, not
            // at the task's next event.
            () = tx.closed() => return,
        };
        let ended = match next {
            Some(Ok(event)) => {
                let last = matches!(event.event, Some(task_event::Event::Finished(_)));
                if tx.send(Ok(Box::new(event))).await.is_err() || last {
                    return;
                }
                // The watch is live again: a later move gets the whole budget.
                reopening = None;
                continue;
            }
            None => Status::unavailable("the watch ended before the task finished"),
            Some(Err(status)) => status,
        };
        let started = *reopening.get_or_insert_with(Instant::now);
        let mut backoff = Duration::from_millis(100);
        let mut last = ended;
        loop {
            if started.elapsed() >= WATCH_REOPEN_FOR {
                let _ = tx
                    .send(Err(Status::unavailable(format!(
                        "no shard served the task for {WATCH_REOPEN_FOR:?} ({}); watch it again",
                        last.message()
                    ))))
                    .await;
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = tx.closed() => return,
            }
            backoff = (backoff * 2).min(REOPEN_BACKOFF_MAX);
            match open().await {
                Ok(next) => {
                    upstream = next;
                    break;
                }
                Err(s) if transient(s.code()) => last = s,
                Err(s) => {
                    let _ = tx.send(Err(s)).await;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use futures::stream::{self, BoxStream};

    use super::*;
    use pm_proto::v1::Task;

    type Upstream = BoxStream<'static, Result<TaskEvent, Status>>;

    #[test]
    fn watches_are_counted_per_client_and_given_back() {
        let quota = PerClient::new(2);
        let a1 = quota.acquire("a").unwrap();
        let a2 = quota.acquire("a").unwrap();
        let refused = quota.acquire("a").unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(
            refused.message().contains("--max-watches-per-client"),
            "{refused:?}"
        );
        // Another client has its own.
        let b = quota.acquire("b").unwrap();
        assert_eq!((quota.held("a"), quota.held("b")), (2, 1));
        drop(a1);
        let a3 = quota.acquire("a").unwrap();
        drop((a2, a3, b));
        assert_eq!((quota.held("a"), quota.held("b")), (0, 0));
        assert!(
            quota.open.lock().unwrap().is_empty(),
            "no entry left behind"
        );
        // With authentication off there is no client to count.
        assert!((0..5).all(|_| quota.acquire("").unwrap().is_none()));
    }

    fn progress(n: i64) -> Result<TaskEvent, Status> {
        Ok(TaskEvent {
            time_ms: n,
            event: None,
        })
    }

    fn finished() -> Result<TaskEvent, Status> {
        Ok(TaskEvent {
            time_ms: 0,
            event: Some(task_event::Event::Finished(Task::default())),
        })
    }

    /// Runs `follow` over an upstream that ends after one event, with `opens` answering each
    /// re-open in turn; returns what the client received.
    async fn watch(
        opens: Vec<Result<Vec<Result<TaskEvent, Status>>, Status>>,
    ) -> Vec<Result<Box<TaskEvent>, Status>> {
        let opens = Mutex::new(VecDeque::from(opens));
        let open = || {
            let next = opens
                .lock()
                .unwrap()
                .pop_front()
                .expect("no more opens planned");
            async move { next.map(|events| stream::iter(events).boxed() as Upstream) }
        };
        let (tx, mut rx) = mpsc::channel(64);
        let first: Upstream = stream::iter(vec![progress(0)]).boxed();
        follow(first, open, tx, None).await;
        let mut got = Vec::new();
        while let Some(e) = rx.recv().await {
            got.push(e);
        }
        got
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_survives_more_moves_than_the_budget_over_its_life() {
        // Eight moves, each answered by a shard that sends a snapshot and then stops serving.
        let mut opens: Vec<_> = (1..=8).map(|n| Ok(vec![progress(n)])).collect();
        opens.push(Ok(vec![finished()]));
        let got = watch(opens).await;
        assert_eq!(got.len(), 10, "{got:?}");
        assert!(got.iter().all(Result::is_ok));
        assert!(matches!(
            got.last().unwrap().as_ref().unwrap().event,
            Some(task_event::Event::Finished(_))
        ));
    }

    #[tokio::test]
    async fn a_client_that_goes_closes_the_upstream_watch_at_once() {
        let (tx, rx) = mpsc::channel(1);
        let open = || async { Err::<Upstream, _>(Status::internal("never re-opened")) };
        let follow = tokio::spawn(follow(
            stream::pending().boxed() as Upstream,
            open,
            tx,
            None,
        ));
        drop(rx);
        tokio::time::timeout(std::time::Duration::from_secs(10), follow)
            .await
            .expect("follow ends when its client goes, with no event upstream")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn re_opens_without_an_event_are_bounded_in_time() {
        let started = Instant::now();
        let not_found = || Err(Status::not_found("moving"));
        // More than the backoff allows within the budget: the watch ends before using them.
        let opens = (0..WATCH_REOPEN_FOR.as_secs())
            .map(|_| not_found())
            .collect();
        let got = watch(opens).await;
        assert_eq!(got.len(), 2, "{got:?}");
        let end = got.last().unwrap().as_ref().unwrap_err();
        assert_eq!(end.code(), Code::Unavailable, "{end:?}");
        let waited = started.elapsed();
        assert!(
            waited >= WATCH_REOPEN_FOR && waited < WATCH_REOPEN_FOR + REOPEN_BACKOFF_MAX * 2,
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_waits_out_a_shard_that_is_down_and_restarts() {
        // The owner died (the gateway cannot connect), the ring gave the pipeline to a shard
        // that does not have the task, and then the owner came back with it.
        let opens = vec![
            Err(Status::unavailable("tcp connect error")),
            Err(Status::unavailable("tcp connect error")),
            Err(Status::not_found("not here")),
            Err(Status::not_found("not here")),
            Ok(vec![progress(1), finished()]),
        ];
        let got = watch(opens).await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got.iter().all(Result::is_ok), "{got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lasting_refusal_ends_the_watch_at_once() {
        let got = watch(vec![Err(Status::permission_denied("no"))]).await;
        assert_eq!(got.len(), 2, "{got:?}");
        let end = got.last().unwrap().as_ref().unwrap_err();
        assert_eq!(end.code(), Code::PermissionDenied, "{end:?}");
    }
}
