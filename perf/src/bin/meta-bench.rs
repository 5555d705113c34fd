//! `meta-bench`: the embedded metadata store (`pm dev`'s and a single tenant-service's) under
//! big applies: 80 versions of an 880 KB spec written one after another while a reader gets
//! a small key in a loop. Prints each write's time, the reads' latency meanwhile, and the
//! bytes on disk. A benchmark, not a test.

use std::time::{Duration, Instant};

use pm_cluster::{EmbeddedStore, Expect, MetadataStore};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn disk_bytes(path: &std::path::Path) -> u64 {
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| disk_bytes(&e.path())).sum())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("metadata");
    let store = std::sync::Arc::new(EmbeddedStore::open(&path)?);
    store
        .put("/small", b"a pipeline".to_vec(), Expect::Any)
        .await?;
    let spec = vec![b'x'; 880 * 1024];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut reads = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                store.get("/small").await.expect("get");
                reads.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            reads
        })
    };
    let mut writes = Vec::new();
    for i in 0..80 {
        let t = Instant::now();
        store
            .put(&format!("/p/versions/{i:04}"), spec.clone(), Expect::Absent)
            .await?;
        writes.push(t.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut reads = reader.await?;
    reads.sort();
    let last = *writes.last().expect("80 writes");
    writes.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "writes of 880 KB: p50 {:.1} ms, max {:.1} ms, the 80th {:.1} ms; reads meanwhile ({}): p50 {:.3} ms, p99 {:.1} ms, max {:.1} ms; on disk {:.1} MB",
        ms(percentile(&writes, 0.5)),
        ms(percentile(&writes, 1.0)),
        ms(last),
        reads.len(),
        ms(percentile(&reads, 0.5)),
        ms(percentile(&reads, 0.99)),
        ms(percentile(&reads, 1.0)),
        disk_bytes(&path) as f64 / 1e6
    );
    Ok(())
}
