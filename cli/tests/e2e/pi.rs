//! A Raspberry Pi class agent: `pm-agent` built for aarch64 (`scripts/test.sh` builds it
//! with Debian's cross linker) runs under `qemu-user` against a native `pm dev` that has no
//! agent of its own, and runs the workload-scheduler document's OCR pipeline to DONE.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use pm_proto::v1::*;

use super::{SEED_OCR, WAIT, follow_to_end, start_with_slots};

/// The cross-built agent, beside this test's own binaries in the shared target dir.
fn aarch64_agent() -> PathBuf {
    let pm = PathBuf::from(env!("CARGO_BIN_EXE_pm"));
    let target = pm.parent().and_then(|d| d.parent()).expect("target dir");
    let agent = target.join("aarch64-unknown-linux-gnu/debug/pm-agent");
    assert!(
        agent.exists(),
        "no {}: `cargo build --target aarch64-unknown-linux-gnu -p pm-agent` (scripts/test.sh does)",
        agent.display()
    );
    agent
}

/// Killed when dropped.
struct Emulated(Child);

impl Drop for Emulated {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn an_aarch64_agent_under_qemu_runs_the_seed_ocr_pipeline() {
    let agent = aarch64_agent();
    let elf = std::fs::read(&agent).unwrap();
    // e_machine 183: AArch64.
    assert_eq!(
        u16::from_le_bytes([elf[18], elf[19]]),
        183,
        "not an aarch64 binary"
    );
    // No embedded agent: only the emulated one can run the task.
    let mut h = start_with_slots(0).await;
    let pi = Emulated(
        Command::new("qemu-aarch64")
            .args(["-L", "/usr/aarch64-linux-gnu"])
            .arg(&agent)
            .args([
                "--endpoint",
                &h.dev.endpoint(),
                "--agent-id",
                "pi",
                "--slots",
                "1",
            ])
            .arg("--work-root")
            .arg(h.dir.path().join("pi-work"))
            .args(["--work-dir-at", "/mnt/pipe"])
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-aarch64 runs (scripts/setup.sh --test installs qemu-user)"),
    );
    h.apply_as("pi-ocr", SEED_OCR).await;
    let image = h.dev.sample_image_url.clone().unwrap();
    let task = h.submit("pi-ocr", &[("url", &image)]).await.unwrap();
    // The emulated agent starts slowly; the wait is bounded by WAIT.
    let stream = h
        .tasks
        .watch_task(WatchTaskRequest {
            name: task.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let (finished, _) = tokio::time::timeout(WAIT * 2, follow_to_end(stream, &task.name))
        .await
        .expect("the emulated agent finished the task");
    assert_eq!(
        pm_cli::demo::recognized(&finished),
        Ok(pm_cli::demo::SAMPLE_TEXT.to_owned()),
        "{finished:#?}"
    );
    // A stop does not wait on a peer: the agent's stream is still open, and is cut after
    // the grace period.
    let grace = pm_proto::server::STOP_GRACE;
    tokio::time::timeout(grace * 4, h.dev.stop())
        .await
        .expect("pm dev stops with an agent still connected");
    drop(pi);
}
