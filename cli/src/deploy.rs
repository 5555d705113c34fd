//! `pmctl pipeline deploy`: the values of `charts/pipeline` that deploy a pipeline's pods,
//! made from its spec. Every executor a job names needs an image (`--image NAME=IMAGE`), and
//! every image given must be one of them, so the values always render.

use std::collections::BTreeMap;

use pm_proto::names::PipelineName;

/// Executor names the chart accepts (its `executors[].name`: a container name, and part of
/// a socket's file name).
fn chart_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 31
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The values file for `pipeline` whose spec is `document` (read from `spec_path`), with
/// `images` as `NAME=IMAGE`. The first lines say how to install it.
pub fn values(
    pipeline: &PipelineName,
    spec_path: &str,
    document: &str,
    images: &[String],
) -> anyhow::Result<String> {
    let spec = pm_spec::load_document(document, "spec")
        .map_err(|v| anyhow::anyhow!("{spec_path}: {v}"))?;
    // Executor -> the first job that names it (for the error that asks for its image).
    let mut used: BTreeMap<&str, String> = BTreeMap::new();
    for stage in &spec.stages {
        for job in &stage.jobs {
            if !job.executor.is_empty() {
                used.entry(job.executor.as_str())
                    .or_insert_with(|| format!("{}/{}", stage.name, job.name));
            }
        }
    }
    let mut given: BTreeMap<&str, &str> = BTreeMap::new();
    for image in images {
        let Some((name, image)) = image
            .split_once('=')
            .filter(|(n, i)| !n.is_empty() && !i.is_empty())
        else {
            anyhow::bail!("--image {image:?}: expected NAME=IMAGE");
        };
        if !used.contains_key(name) {
            let names: Vec<&str> = used.keys().copied().collect();
            anyhow::bail!(
                "--image {name}: no job of the spec runs on {name} (its executors: {names:?})"
            );
        }
        if given.insert(name, image).is_some() {
            anyhow::bail!("--image {name}: given twice");
        }
    }
    let mut executors = String::new();
    for (name, job) in &used {
        if !chart_name(name) {
            anyhow::bail!(
                "executor {name:?} (job {job}): the chart names containers after executors, so it must be lowercase letters, digits and dashes, at most 31, starting with a letter"
            );
        }
        let Some(image) = given.get(name) else {
            anyhow::bail!("executor {name} (job {job}) has no image: add --image {name}=IMAGE");
        };
        executors += &format!("  - name: {name}\n    image: {image}\n");
    }
    if executors.is_empty() {
        anyhow::bail!(
            "{spec_path}: no job names an executor; the chart deploys executor containers (a spec whose jobs run on the agent's host runs with pm dev or a plain pm-agent)"
        );
    }
    let release = &pipeline.pipeline;
    Ok(format!(
        "# Values of charts/pipeline for {pipeline}, from {spec_path}. Install:\n\
         #   helm install {release} charts/pipeline -n pipeline-manager -f VALUES --set-file pipeline.spec={spec_path}\n\
         # The Secret {release}-agent-credentials holds the agent's client (client-id, client-secret):\n\
         #   pmctl client create {tenant} --role agent --pipeline {tenant}/{app}/{release}\n\
         pipeline:\n  tenant: {tenant}\n  application: {app}\n  name: {release}\n\
         agentCredentials: {release}-agent-credentials\n\
         executors:\n{executors}",
        tenant = pipeline.tenant,
        app = pipeline.application,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OCR: &str = include_str!("../../examples/ocr.yaml");

    fn ocr() -> PipelineName {
        PipelineName::parse_short("default/demo/ocr").unwrap()
    }

    #[test]
    fn the_values_name_every_executor_with_its_image() {
        let images = [
            "wget=debian:bookworm-slim".into(),
            "tesseract=pm-exec-tesseract:0.1.0".into(),
        ];
        let values = values(&ocr(), "examples/ocr.yaml", OCR, &images).unwrap();
        assert!(
            values.contains("  tenant: default\n  application: demo\n  name: ocr\n"),
            "{values}"
        );
        assert!(
            values.ends_with(
                "executors:\n  - name: tesseract\n    image: pm-exec-tesseract:0.1.0\n  - name: wget\n    image: debian:bookworm-slim\n"
            ),
            "{values}"
        );
        assert!(
            values.contains("helm install ocr charts/pipeline"),
            "{values}"
        );
    }

    #[test]
    fn a_missing_unknown_or_malformed_image_is_refused_by_name() {
        let err = |images: &[&str]| {
            let images: Vec<String> = images.iter().map(|s| s.to_string()).collect();
            values(&ocr(), "examples/ocr.yaml", OCR, &images)
                .unwrap_err()
                .to_string()
        };
        let missing = err(&["wget=debian"]);
        assert!(
            missing.contains("executor tesseract (job recognize/ocr) has no image"),
            "{missing}"
        );
        let unknown = err(&["wget=debian", "tesseract=t", "curl=c"]);
        assert!(
            unknown.contains("--image curl: no job of the spec runs on curl"),
            "{unknown}"
        );
        assert!(err(&["wget"]).contains("expected NAME=IMAGE"));
        assert!(err(&["wget=a", "wget=b"]).contains("given twice"));
        let bad = values(&ocr(), "x.yaml", "stages: [", &[])
            .unwrap_err()
            .to_string();
        assert!(bad.starts_with("x.yaml: "), "{bad}");
    }
}
