//! `ring-sim`: the hash ring on paper, no etcd, no processes. For S = 1..=256 shards (named
//! as the StatefulSet names them), over K ring keys (pipelines):
//! - balance: the most loaded shard's keys over the mean (1.00 is perfect), and the
//!   coefficient of variation;
//! - keys moved when a shard joins (S-1 -> S) and when one leaves (S -> S-1), against the
//!   ideal 1/S;
//! - the cost of one lookup;
//! - how one pipeline's k partitions spread over S shards (each placed on its own).
//!
//! `cargo run --release -p pm-perf --bin ring-sim [-- KEYS]`

use std::time::Instant;

use pm_cluster::{Member, Ring, RingKey};
use pm_proto::names::PipelineName;

fn ring(n: usize) -> Ring {
    Ring::new(
        1,
        (0..n).map(|i| Member {
            id: format!("pm-shard-{i}"),
            address: String::new(),
            started_at: 0,
        }),
    )
}

fn owners(ring: &Ring, keys: &[RingKey]) -> Vec<usize> {
    keys.iter()
        .map(|k| {
            let id = &ring.owner(k).expect("a member").id;
            id.trim_start_matches("pm-shard-").parse().expect("our ids")
        })
        .collect()
}

fn main() {
    let k: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let keys: Vec<RingKey> = (0..k)
        .map(|i| {
            RingKey::whole(PipelineName {
                tenant: format!("tenant-{}", i % 97),
                application: format!("app-{}", i % 13),
                pipeline: format!("pipeline-{i}"),
            })
        })
        .collect();
    println!("ring-sim: {k} keys, rendezvous hashing (xxh3)");
    println!("| S | max/mean | CV | moved on join | moved on leave | ideal 1/S | lookup ns |");
    println!("|---|---|---|---|---|---|---|");
    let mut previous = owners(&ring(1), &keys);
    let mut worst_join: f64 = 0.0;
    let mut worst_balance: f64 = 0.0;
    for s in 1..=256usize {
        let r = ring(s);
        let now = owners(&r, &keys);
        let mut load = vec![0usize; s];
        for o in &now {
            load[*o] += 1;
        }
        let mean = k as f64 / s as f64;
        let max = *load.iter().max().unwrap() as f64;
        let var = load.iter().map(|l| (*l as f64 - mean).powi(2)).sum::<f64>() / s as f64;
        let cv = var.sqrt() / mean;
        let joined = if s == 1 {
            0.0
        } else {
            previous.iter().zip(&now).filter(|(a, b)| a != b).count() as f64 / k as f64
        };
        // Leaving: the shard in the middle of the ids goes.
        let gone = r.without(&format!("pm-shard-{}", s / 2));
        let left = if s == 1 {
            0.0
        } else {
            owners(&gone, &keys)
                .iter()
                .zip(&now)
                .filter(|(a, b)| a != b)
                .count() as f64
                / k as f64
        };
        let sample = &keys[..k.min(20_000)];
        let t = Instant::now();
        let mut sink = 0usize;
        for key in sample {
            sink += r.owner(key).map_or(0, |m| m.id.len());
        }
        let ns = t.elapsed().as_nanos() as f64 / sample.len() as f64;
        std::hint::black_box(sink);
        if s > 1 {
            worst_join = worst_join.max(joined * s as f64);
        }
        worst_balance = worst_balance.max(max / mean);
        if [1, 2, 3, 4, 8, 16, 32, 64, 128, 256].contains(&s) {
            println!(
                "| {s} | {:.3} | {:.3} | {:.2}% | {:.2}% | {:.2}% | {:.0} |",
                max / mean,
                cv,
                joined * 100.0,
                left * 100.0,
                100.0 / s as f64,
                ns
            );
        }
        previous = now;
    }
    println!(
        "over S = 2..=256: keys moved on a join at most {worst_join:.2} x 1/S; most loaded shard at most {worst_balance:.3} x the mean"
    );
    partition_spread();
}

/// One pipeline's k partitions over S shards, over 2,000 pipelines: how far the most loaded
/// shard's share is above even (k/S partitions), how often a shard owns none, and how many
/// partitions move when a shard joins (S -> S+1) or leaves (the first of S goes).
fn partition_spread() {
    const PIPELINES: usize = 2_000;
    println!();
    println!("partitions: one pipeline's k partitions over S shards, {PIPELINES} pipelines");
    println!(
        "| S | k | most loaded / even, median | worst | pipelines with a shard owning none | moved on join | moved on leave | ideal |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for s in [2usize, 3, 4, 8, 16, 32] {
        let (r, joined) = (ring(s), ring(s + 1));
        let left = r.without("pm-shard-0");
        for per_shard in [1u32, 2, 4, 8] {
            let k = s as u32 * per_shard;
            let mut ratios = Vec::with_capacity(PIPELINES);
            let (mut empty, mut moved_join, mut moved_leave) = (0, 0, 0);
            for p in 0..PIPELINES {
                let pipeline = PipelineName {
                    tenant: "t".into(),
                    application: "a".into(),
                    pipeline: format!("hot-{p}"),
                };
                let owners = r.partition_owners(&pipeline, k);
                let most = owners.values().map(|(_, ps)| ps.len()).max().unwrap_or(0);
                if owners.len() < s {
                    empty += 1;
                }
                ratios.push(most as f64 / f64::from(per_shard));
                for i in 0..k {
                    let key = RingKey::new(pipeline.clone(), i);
                    let before = &r.owner(&key).expect("a member").id;
                    moved_join += usize::from(before != &joined.owner(&key).expect("a member").id);
                    moved_leave += usize::from(before != &left.owner(&key).expect("a member").id);
                }
            }
            ratios.sort_by(f64::total_cmp);
            let all = (PIPELINES * k as usize) as f64;
            println!(
                "| {s} | {k} | {:.2} | {:.2} | {:.1}% | {:.1}% | {:.1}% | {:.1}% |",
                ratios[PIPELINES / 2],
                ratios[PIPELINES - 1],
                empty as f64 * 100.0 / PIPELINES as f64,
                moved_join as f64 * 100.0 / all,
                moved_leave as f64 * 100.0 / all,
                100.0 / (s + 1) as f64,
            );
        }
    }
}
