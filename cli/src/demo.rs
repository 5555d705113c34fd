//! The sample OCR run: `pm dev` serves [`SAMPLE_IMAGE`] on loopback while it runs, and
//! `pm dev --demo` submits it once to `default/demo/ocr` and prints what tesseract read.

use anyhow::Context;
use bytes::Bytes;
use tokio::net::TcpListener;

use pm_proto::client::{Bearer, Credentials};
use pm_proto::v1::{SubmitTaskRequest, Task, TaskState, WatchTaskRequest, task_event};

/// A PNG of one line of text (DejaVu Sans, 36 pt), the sample pipeline's input.
pub const SAMPLE_IMAGE: &[u8] = include_bytes!("../../examples/hello.png");
/// The text in [`SAMPLE_IMAGE`].
pub const SAMPLE_TEXT: &str = "Pipelines of Unix tools";
/// Its path on the sample file server.
pub const SAMPLE_IMAGE_PATH: &str = "/hello.png";
/// The sample pipeline, as `pm dev` applies it.
pub const SAMPLE_PIPELINE_NAME: &str = "tenants/default/applications/demo/pipelines/ocr";

/// Serves [`SAMPLE_IMAGE`] at [`SAMPLE_IMAGE_PATH`] on `listener` until `shutdown`.
pub async fn serve_sample(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let respond = |method: &http::Method, path: &str| match (method, path) {
        (&http::Method::GET, SAMPLE_IMAGE_PATH) => {
            pm_proto::plain_http::ok("image/png", Bytes::from_static(SAMPLE_IMAGE))
        }
        _ => pm_proto::plain_http::text(
            http::StatusCode::NOT_FOUND,
            "not found: the sample image is at /hello.png\n",
        ),
    };
    pm_proto::plain_http::serve(listener, respond, shutdown).await;
}

/// Runs the sample pipeline on `image_url` through the gateway at `endpoint` and waits
/// (within `wait`) for its end; returns the finished task.
pub async fn run_sample(
    endpoint: &str,
    credentials: &Credentials,
    image_url: &str,
    wait: std::time::Duration,
) -> anyhow::Result<Task> {
    let channel = pm_proto::client::channel(endpoint)?;
    let token = credentials.token(&channel).await?;
    let bearer = Bearer::new(token.as_deref()).map_err(anyhow::Error::msg)?;
    let mut tasks = pm_proto::client::tasks_with(channel, bearer);
    let task = tasks
        .submit_task(SubmitTaskRequest {
            parent: SAMPLE_PIPELINE_NAME.into(),
            params: [("url".to_owned(), image_url.to_owned())].into(),
            ..SubmitTaskRequest::default()
        })
        .await
        .context("submitting the sample task")?
        .into_inner();
    let finished = tokio::time::timeout(wait, async {
        let mut events = tasks
            .watch_task(WatchTaskRequest {
                name: task.name.clone(),
            })
            .await?
            .into_inner();
        while let Some(event) = events.message().await? {
            if let Some(task_event::Event::Finished(task)) = event.event {
                return Ok(task);
            }
        }
        anyhow::bail!("the watch of {} ended before the task", task.name)
    });
    finished
        .await
        .with_context(|| format!("{} did not finish within {wait:?}", task.name))?
}

/// What the sample task printed (the `cat` of tesseract's result), or why it has nothing.
pub fn recognized(task: &Task) -> Result<String, String> {
    let result = task.result.as_ref().ok_or("the task has no result")?;
    if task.state() != TaskState::Done {
        return Err(format!(
            "the task ended {:?}: {}",
            task.state(),
            result.error
        ));
    }
    result
        .jobs
        .iter()
        .flat_map(|job| &job.steps)
        .find(|step| step.command.starts_with("cat "))
        .map(|step| step.stdout.trim().to_owned())
        .ok_or_else(|| "no step printed the text".to_owned())
}
