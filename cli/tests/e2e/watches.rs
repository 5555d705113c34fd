//! What an idle watch costs: a thousand of them, through the gateway of `pm dev`, on tasks
//! that wait in the queue. The client, the gateway and the shard are all this process, so
//! its resident memory counts every side of a watch.

use pm_proto::v1::*;

use super::{WAIT, follow_to_end, pipeline_name, start_with_slots};

/// Watches opened: four on each of a quarter as many tasks (a watched task holds its own
/// event buffer, shared by its watchers).
const WATCHES: usize = 1000;
/// Most resident bytes one idle watch may add, on all three sides of it together (measured:
/// ~30 KiB, most of it tonic's stream buffers, one per side of each hop). It was ~120 KiB
/// when a watched task buffered 1,024 whole events and each hop queued whole events.
const BYTES_PER_WATCH: usize = 40 * 1024;

/// This process's resident memory, in bytes.
fn resident() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test]
async fn a_thousand_idle_watches_stay_within_a_memory_bound() {
    let mut h = start_with_slots(1).await;
    h.apply("name: slow\nstages:\n  - name: s\n    jobs:\n      - { name: j, commands: ['sleep 600'] }\n").await;
    let request = SubmitTaskRequest {
        parent: pipeline_name("slow"),
        ..SubmitTaskRequest::default()
    };
    let names: Vec<String> = h
        .tasks
        .submit_tasks(SubmitTasksRequest {
            requests: vec![request; WATCHES / 4],
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .map(|r| match r.outcome {
            Some(submit_task_result::Outcome::Task(t)) => t.name,
            other => panic!("refused: {other:?}"),
        })
        .collect();

    let before = resident();
    let mut watches = Vec::with_capacity(WATCHES);
    for name in names.iter().cycle().take(WATCHES) {
        let mut stream = h
            .tasks
            .watch_task(WatchTaskRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        // Open on every side: the shard has sent its snapshot through the gateway.
        let first = tokio::time::timeout(WAIT, stream.message()).await;
        let first = first.expect("a snapshot in time").unwrap().unwrap();
        assert!(
            matches!(first.event, Some(task_event::Event::Snapshot(_))),
            "{first:?}"
        );
        watches.push(stream);
    }
    let per_watch = resident().saturating_sub(before) / WATCHES;
    println!("{WATCHES} idle watches: {per_watch} resident bytes each");
    assert!(
        per_watch <= BYTES_PER_WATCH,
        "an idle watch costs {per_watch} bytes (at most {BYTES_PER_WATCH})"
    );

    // Every watch is live: cancelling the tasks ends each with its final state.
    for name in &names {
        h.tasks
            .cancel_task(CancelTaskRequest { name: name.clone() })
            .await
            .unwrap();
    }
    for (stream, name) in watches.into_iter().zip(names.iter().cycle()) {
        let (last, _) = follow_to_end(stream, name).await;
        assert_eq!(last.state, TaskState::Cancelled as i32);
    }
    h.dev.stop().await;
}
