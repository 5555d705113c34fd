//! `pm-agent run -f spec --param k=v`: a direct run through the agent's RunnerService, with
//! the real binary.

use std::process::Command;

fn pm_agent_run(dir: &std::path::Path, spec: &str, params: &[&str]) -> std::process::Output {
    let file = dir.join("spec.yaml");
    std::fs::write(&file, spec).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_pm-agent"));
    command
        .arg("--work-root")
        .arg(dir.join("work"))
        .arg("run")
        .arg("-f")
        .arg(&file);
    for p in params {
        command.args(["--param", p]);
    }
    command.output().unwrap()
}

#[test]
fn a_direct_run_prints_output_and_exits_by_result() {
    let dir = tempfile::tempdir().unwrap();
    let spec = "name: hello\nparams:\n  who: { required: true }\nstages:\n  - name: s\n    jobs:\n      - { name: greet, commands: ['echo hello {{who}}'] }\n";
    let ok = pm_agent_run(dir.path(), spec, &["who=wide world; $(id)"]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert!(stdout.contains("| hello wide world; $(id)"), "{stdout}");
    assert!(stdout.trim_end().ends_with("DONE"), "{stdout}");

    let failing =
        "stages:\n  - name: s\n    jobs:\n      - { name: j, commands: ['echo no >&2; exit 5'] }\n";
    let failed = pm_agent_run(dir.path(), failing, &[]);
    assert_eq!(failed.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&failed.stdout);
    assert!(
        stdout.contains("exit 5") && stdout.trim_end().ends_with("ERROR"),
        "{stdout}"
    );

    let missing = pm_agent_run(dir.path(), spec, &[]);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("params.who"),
        "{stderr}"
    );
}
