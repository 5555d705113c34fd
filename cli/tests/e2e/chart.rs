//! `pmctl pipeline deploy` prints values that `charts/pipeline` renders into a pipeline pod
//! with one executor container per executor the spec names, with the images given. helm is
//! the one `scripts/check-k8s.sh` installs (the test command runs it first).

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn pmctl_deploy_prints_values_the_chart_renders() {
    let repo = repo();
    // `pmctl pipeline deploy` of the OCR spec with these `--image`s.
    let deploy = |images: &[&str]| {
        let mut pmctl = Command::new(env!("CARGO_BIN_EXE_pmctl"));
        pmctl.current_dir(&repo).args([
            "pipeline",
            "deploy",
            "default/demo/ocr",
            "-f",
            "examples/ocr.yaml",
        ]);
        for image in images {
            pmctl.args(["--image", image]);
        }
        pmctl.output().unwrap()
    };
    let out = deploy(&[
        "wget=docker.io/library/debian:bookworm-slim",
        "tesseract=ghcr.io/pipeline-manager/pm-exec-tesseract:0.1.0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let values = String::from_utf8(out.stdout).unwrap();
    assert!(
        values.contains("helm install ocr charts/pipeline -n pipeline-manager -f VALUES --set-file pipeline.spec=examples/ocr.yaml"),
        "{values}"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &values).unwrap();

    let helm = repo.join(".tools/bin/helm");
    assert!(
        helm.exists(),
        "no {}: scripts/check-k8s.sh installs it (the test command runs it first)",
        helm.display()
    );
    let rendered = Command::new(&helm)
        .current_dir(&repo)
        .args([
            "template",
            "ocr",
            "charts/pipeline",
            "-n",
            "pipeline-manager",
            "-f",
        ])
        .arg(file.path())
        .args(["--set-file", "pipeline.spec=examples/ocr.yaml"])
        .output()
        .unwrap();
    let yaml = String::from_utf8_lossy(&rendered.stdout);
    assert!(
        rendered.status.success(),
        "{}\n{values}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    // Both executors, as native sidecars of the agent, each on its own socket.
    for (name, image) in [
        ("wget", "docker.io/library/debian:bookworm-slim"),
        (
            "tesseract",
            "ghcr.io/pipeline-manager/pm-exec-tesseract:0.1.0",
        ),
    ] {
        assert!(
            yaml.contains(&format!(
                "- name: {name}\n          image: {image}\n          restartPolicy: Always"
            )),
            "{yaml}"
        );
        assert!(
            yaml.contains(&format!("--sidecar={name}=/mnt/pipe/.sockets/{name}.sock")),
            "{yaml}"
        );
    }
    assert!(
        yaml.contains("--pipeline=tenants/default/applications/demo/pipelines/ocr"),
        "{yaml}"
    );
    assert!(
        yaml.contains("kind: Job"),
        "the spec is applied by the hook: {yaml}"
    );

    // An executor left without an image is named.
    let out = deploy(&["wget=debian"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("executor tesseract (job recognize/ocr) has no image"),
        "{stderr}"
    );
}
