//! A watch that outlives a handoff: when the shard stops serving a task (it moved to another
//! shard, or the shard left) before it finished, the watch is opened again at the owner,
//! which starts with a snapshot. Only re-opens in a row without an event count against the
//! budget, so a long watch survives any number of moves.

use std::future::Future;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Code, Status};

use pm_proto::v1::{TaskEvent, task_event};

/// Re-opens in a row (with no event between them) before the watch gives up.
pub const WATCH_REOPENS: u64 = 5;

/// Forwards `upstream`'s events to `tx` until the task finishes or the client goes, opening
/// the watch again with `open` when a shard stops serving it. Events travel boxed: a slot of
/// the channel is then a pointer, and an idle watch holds no room for whole events.
pub async fn follow<S, O, F>(
    mut upstream: S,
    open: O,
    tx: mpsc::Sender<Result<Box<TaskEvent>, Status>>,
) where
    S: Stream<Item = Result<TaskEvent, Status>> + Unpin,
    O: Fn() -> F,
    F: Future<Output = Result<S, Status>>,
{
    let mut reopened = 0;
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
                reopened = 0;
                continue;
            }
            None => Status::unavailable("the watch ended before the task finished"),
            Some(Err(status)) => status,
        };
        loop {
            if reopened == WATCH_REOPENS {
                let _ = tx.send(Err(ended)).await;
                return;
            }
            reopened += 1;
            tokio::time::sleep(Duration::from_millis(100 * reopened)).await;
            match open().await {
                Ok(next) => {
                    upstream = next;
                    break;
                }
                // Between the old owner forgetting and the new one answering.
                Err(s) if s.code() == Code::NotFound => {}
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
        follow(first, open, tx).await;
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
        let follow = tokio::spawn(follow(stream::pending().boxed() as Upstream, open, tx));
        drop(rx);
        tokio::time::timeout(std::time::Duration::from_secs(10), follow)
            .await
            .expect("follow ends when its client goes, with no event upstream")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn re_opens_in_a_row_without_an_event_are_bounded() {
        let not_found = || Err(Status::not_found("moving"));
        let opens = (0..WATCH_REOPENS).map(|_| not_found()).collect();
        let got = watch(opens).await;
        assert_eq!(got.len(), 2, "{got:?}");
        let end = got.last().unwrap().as_ref().unwrap_err();
        assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    }
}
