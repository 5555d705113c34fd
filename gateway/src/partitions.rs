//! A partitioned pipeline's calls that span its partitions: a list or its stats asks each
//! partition owner once, in parallel, for the partitions it owns, and merges the answers.
//! (Submits pick one partition, [`crate::pipelines::PipelineVersion::place`]; a task's own
//! calls route by the partition in its name; agents are [`crate::agents`]' fan-in.)
//!
//! Lists merge by id, newest first. Ids are time-ordered whatever their partition, so the
//! page token, the last id shown, is one position valid on every shard, however the
//! partitions move between pages.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;

use prost::Message;
use tonic::Status;
use tonic::transport::Channel;

use pm_cluster::RingKey;
use pm_proto::internal::v1::shard_service_client::ShardServiceClient;
use pm_proto::names::PipelineName;
use pm_proto::v1::{ListTasksResponse, PipelineStats, Task};
use pm_spec::limits::MAX_PARTITIONS;

use crate::error::Error;
use crate::routing::Routes;

/// Bytes of one merged page, at most (the shards' own bound on a page): a page ends early,
/// with a token, rather than pass it.
pub const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

/// The partitions a call covers: those it names (each checked), or all `covered`.
pub fn wanted(field: &str, named: &[u32], covered: u32) -> Result<Vec<u32>, Error> {
    if named.is_empty() {
        return Ok((0..covered.max(1)).collect());
    }
    if named.len() > MAX_PARTITIONS as usize {
        return Err(Error::invalid(
            field,
            format!("{} named; at most {MAX_PARTITIONS}", named.len()),
        ));
    }
    if let Some(p) = named.iter().find(|&&p| p >= MAX_PARTITIONS) {
        return Err(Error::invalid(
            field,
            format!("{p} is past the last partition a pipeline may have"),
        ));
    }
    let mut named = named.to_vec();
    named.sort_unstable();
    named.dedup();
    Ok(named)
}

/// Calls `f` once per owner of `partitions` of `pipeline`, in parallel, with the partitions
/// it owns, following "not the owner" answers; the answers in no particular order, or the
/// first failure.
pub async fn per_owner<T, F, Fut>(
    routes: &Routes,
    pipeline: &PipelineName,
    partitions: &[u32],
    f: F,
) -> Result<Vec<T>, Status>
where
    F: Fn(ShardServiceClient<Channel>, Vec<u32>) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let ring = routes.membership().ring();
    let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for &p in partitions {
        let owner = ring
            .owner(&RingKey::new(pipeline.clone(), p))
            .ok_or_else(|| routes.no_shard())?;
        groups.entry(owner.id.clone()).or_default().push(p);
    }
    let f = &f;
    let calls = groups.into_values().map(|group| async move {
        // Routed by its first partition: after a ring change the shard refuses unless it
        // owns the whole group, and the call fails as the ring changing (UNAVAILABLE).
        let key = RingKey::new(pipeline.clone(), group[0]);
        routes.call(&key, |shard| f(shard, group.clone())).await
    });
    futures::future::join_all(calls).await.into_iter().collect()
}

/// The owners' pages as one, newest first, at most `size` tasks and [`MAX_PAGE_BYTES`].
/// A shard whose page ended early (it has a token) vouches only down to its last task, so
/// the merged page stops there: a task below it from another shard would otherwise come
/// before tasks that shard has not shown yet, and the next page would skip them.
pub fn merge_pages(pages: Vec<ListTasksResponse>, size: usize) -> ListTasksResponse {
    let frontier = pages
        .iter()
        .filter(|p| !p.next_page_token.is_empty())
        .filter_map(|p| p.tasks.last().map(|t| t.id.clone()))
        .max();
    let mut tasks: Vec<Task> = pages.into_iter().flat_map(|p| p.tasks).collect();
    // Ids are 32 hex digits: their text order is their time order.
    tasks.sort_unstable_by(|a, b| b.id.cmp(&a.id));
    // A task being handed off may be on two shards for a moment.
    let mut seen = HashSet::new();
    tasks.retain(|t| seen.insert(t.id.clone()));
    // Some shard has more to show (and its own last task stays on this page).
    let mut more = frontier.is_some();
    if let Some(frontier) = &frontier {
        tasks.retain(|t| &t.id >= frontier);
    }
    if tasks.len() > size {
        tasks.truncate(size);
        more = true;
    }
    let mut bytes = 0;
    if let Some(cut) = tasks.iter().position(|t| {
        bytes += t.encoded_len();
        bytes > MAX_PAGE_BYTES
    }) {
        tasks.truncate(cut.max(1));
        more = true;
    }
    page(tasks, more)
}

/// A page of `tasks`, with a token (its last id) when there are `more`.
fn page(tasks: Vec<Task>, more: bool) -> ListTasksResponse {
    let next_page_token = match (more, tasks.last()) {
        (true, Some(last)) => last.id.clone(),
        _ => String::new(),
    };
    ListTasksResponse {
        tasks,
        next_page_token,
    }
}

/// The owners' stats of one pipeline as one: counts and free slots add up (each owner holds
/// its own tasks, and its share of each agent's slots); waits are the longest; agents are
/// the most any owner sees (an agent's stream reaches each owner it has slots for).
pub fn sum_stats(name: String, stats: Vec<PipelineStats>) -> PipelineStats {
    let mut sum = PipelineStats {
        name,
        ..PipelineStats::default()
    };
    for s in stats {
        sum.ready += s.ready;
        sum.in_progress += s.in_progress;
        sum.done_last_minute += s.done_last_minute;
        sum.error_last_minute += s.error_last_minute;
        sum.cancelled_last_minute += s.cancelled_last_minute;
        sum.head_wait_ms = sum.head_wait_ms.max(s.head_wait_ms);
        sum.oldest_ready_age_ms = sum.oldest_ready_age_ms.max(s.oldest_ready_age_ms);
        sum.agents = sum.agents.max(s.agents);
        sum.free_slots += s.free_slots;
        sum.time_ms = sum.time_ms.max(s.time_ms);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: u32) -> Task {
        Task {
            id: format!("{id:032x}"),
            ..Task::default()
        }
    }

    fn page_of(ids: &[u32], more: bool) -> ListTasksResponse {
        page(ids.iter().map(|&i| task(i)).collect(), more)
    }

    fn ids(page: &ListTasksResponse) -> Vec<String> {
        page.tasks.iter().map(|t| t.id.clone()).collect()
    }

    #[test]
    fn pages_merge_newest_first_without_skipping_or_repeating() {
        // Shard a has 9, 7, 5 | 3, 1 (a page of 3 and more); shard b has 8, 2 (all of it).
        let merged = merge_pages(vec![page_of(&[9, 7, 5], true), page_of(&[8, 2], false)], 3);
        assert_eq!(ids(&merged), ids(&page_of(&[9, 8, 7], false)));
        assert_eq!(merged.next_page_token, task(7).id);
        // The frontier: a's page ended at 5, so b's 2 waits for the next page.
        let merged = merge_pages(vec![page_of(&[9, 7, 5], true), page_of(&[8, 2], false)], 10);
        assert_eq!(ids(&merged), ids(&page_of(&[9, 8, 7, 5], false)));
        assert_eq!(merged.next_page_token, task(5).id);
        // Both complete: all of it, no token; a task on two shards shows once.
        let merged = merge_pages(
            vec![page_of(&[9, 4], false), page_of(&[8, 4, 2], false)],
            10,
        );
        assert_eq!(ids(&merged), ids(&page_of(&[9, 8, 4, 2], false)));
        assert!(merged.next_page_token.is_empty());
        assert!(merge_pages(vec![], 10).tasks.is_empty());
    }

    #[test]
    fn named_partitions_are_checked_and_none_named_is_all() {
        assert_eq!(wanted("partitions", &[], 3).unwrap(), vec![0, 1, 2]);
        assert_eq!(wanted("partitions", &[], 0).unwrap(), vec![0]);
        assert_eq!(wanted("partitions", &[2, 0, 2], 3).unwrap(), vec![0, 2]);
        let e = wanted("partitions", &[MAX_PARTITIONS], 3).unwrap_err();
        assert!(e.to_string().contains("partitions"), "{e}");
    }

    #[test]
    fn stats_add_up() {
        let a = PipelineStats {
            ready: 3,
            free_slots: 2,
            agents: 2,
            head_wait_ms: 5,
            ..PipelineStats::default()
        };
        let b = PipelineStats {
            ready: 4,
            free_slots: 1,
            agents: 1,
            head_wait_ms: 9,
            ..PipelineStats::default()
        };
        let sum = sum_stats("p".into(), vec![a, b]);
        assert_eq!(
            (sum.ready, sum.free_slots, sum.agents, sum.head_wait_ms),
            (7, 3, 2, 9)
        );
    }
}
