// The console: pages addressed by resource name under /ui/, built with the DOM (no
// framework), talking to the gateway only through grpc-web (./api).
import { TaskState, type Task, type TaskEvent, type StepResult } from "./gen/pm/v1/task_pb";
import type { Pipeline } from "./gen/pm/v1/pipeline_pb";
import { describe, pipelines, setToken, tasks, tenants, token } from "./api";

type Child = Node | string | null | undefined | false;

/// An element with attributes and children; text is always set as text, never as HTML.
function h(tag: string, attrs: Record<string, string> = {}, ...children: Child[]): HTMLElement {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    el.append(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return el;
}

const main = document.getElementById("main")!;

function errorBox(e: unknown): HTMLElement {
  const { code, field, message } = describe(e);
  return h(
    "div",
    { class: "error", role: "alert" },
    h("strong", {}, code),
    field ? h("span", { class: "field" }, ` (${field})`) : null,
    `: ${message}`,
  );
}

function stateName(s: TaskState): string {
  return (TaskState[s] ?? String(s)).replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

function time(ms: bigint): string {
  return ms ? new Date(Number(ms)).toLocaleString() : "";
}

const FINAL = new Set([TaskState.DONE, TaskState.ERROR, TaskState.CANCELLED]);

function link(path: string, text: string): HTMLElement {
  return h("a", { href: `/ui/${path}` }, text);
}

/// The last segment of a resource name.
function id(name: string): string {
  return name.slice(name.lastIndexOf("/") + 1);
}

// --- The token bar ----------------------------------------------------------------------

function tokenBar(): HTMLElement {
  const input = h("input", {
    type: "password",
    placeholder: "token (when auth is on)",
    "aria-label": "token",
    id: "token",
  }) as HTMLInputElement;
  input.value = token();
  const save = h("button", { type: "submit" }, "Use token");
  const form = h("form", { class: "token" }, input, save);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    setToken(input.value.trim());
    location.reload();
  });
  return form;
}

// --- /ui/: tenants, applications, pipelines ----------------------------------------------

async function home(): Promise<void> {
  main.replaceChildren(h("h1", {}, "Pipelines"));
  const tree = h("ul", { class: "tree", id: "tree" });
  main.append(tree);
  try {
    const { tenants: ts, nextPageToken } = await tenants.listTenants({ pageSize: 100 });
    for (const t of ts) {
      const apps = h("ul");
      tree.append(h("li", {}, h("span", { class: "tenant" }, id(t.name)), apps));
      const { applications } = await pipelines.listApplications({ parent: t.name, pageSize: 100 });
      for (const a of applications) {
        const ps = h("ul");
        apps.append(h("li", {}, h("span", { class: "app" }, id(a.name)), ps));
        const { pipelines: list } = await pipelines.listPipelines({ parent: a.name, pageSize: 100 });
        for (const p of list) {
          ps.append(h("li", {}, link(p.name, id(p.name)), ` (version ${p.version})`));
        }
      }
    }
    if (nextPageToken) main.append(h("p", { class: "note" }, "Only the first 100 tenants are shown."));
  } catch (e) {
    main.append(errorBox(e));
  }
}

// --- A pipeline: spec, queue, submit form, live task list -------------------------------

async function pipelinePage(name: string): Promise<void> {
  main.replaceChildren(h("h1", {}, name));
  let pipeline: Pipeline;
  try {
    pipeline = await pipelines.getPipeline({ name });
  } catch (e) {
    main.append(errorBox(e));
    return;
  }
  const spec = pipeline.spec;
  main.append(h("p", { class: "note" }, `version ${pipeline.version}. ${spec?.description ?? ""}`));

  const stages = h("ol", { class: "stages" });
  for (const s of spec?.stages ?? []) {
    const jobs = h("ul");
    for (const j of s.jobs) {
      jobs.append(
        h("li", {}, h("strong", {}, j.name), ` on ${j.executor || "host"}: `, h("code", {}, j.commands.join(" && "))),
      );
    }
    stages.append(h("li", {}, h("span", {}, `stage ${s.name}`), jobs));
  }
  main.append(h("h2", {}, "Stages and jobs"), stages);

  const stats = h("p", { class: "stats", id: "stats" });
  main.append(h("h2", {}, "Queue"), stats);

  // Submit form: one field per declared parameter.
  const form = h("form", { class: "submit", id: "submit" });
  const params = Object.entries(spec?.params ?? {}).sort(([a], [b]) => a.localeCompare(b));
  for (const [param, p] of params) {
    const input = h("input", { name: `param:${param}`, id: `param-${param}` }) as HTMLInputElement;
    if (p.defaultValue !== undefined) input.placeholder = p.defaultValue;
    if (p.required && p.defaultValue === undefined) input.required = true;
    form.append(h("label", { for: `param-${param}` }, param, p.description ? ` (${p.description})` : ""), input);
  }
  form.append(
    h("label", { for: "priority" }, "priority (0..100, smaller first)"),
    // Checked by the server, which names the field in its answer.
    h("input", { name: "priority", id: "priority", inputmode: "numeric" }),
    h("label", { for: "idempotency" }, "idempotency key"),
    h("input", { name: "idempotency", id: "idempotency" }),
    h("button", { type: "submit" }, "Submit task"),
  );
  const formError = h("div");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    formError.replaceChildren();
    const data = new FormData(form as HTMLFormElement);
    const values: Record<string, string> = {};
    for (const [k, v] of data.entries()) {
      if (k.startsWith("param:") && v !== "") values[k.slice(6)] = String(v);
    }
    const priority = String(data.get("priority") ?? "");
    try {
      const task = await tasks.submitTask({
        parent: name,
        params: values,
        priority: priority === "" ? undefined : Number(priority),
        idempotencyKey: String(data.get("idempotency") ?? ""),
      });
      location.assign(`/ui/${task.name}`);
    } catch (e) {
      formError.append(errorBox(e));
    }
  });
  main.append(h("h2", {}, "Submit"), form, formError);

  // The task list: newest first, a state filter, pages; the first page refreshes itself.
  const filter = h("select", { id: "state", "aria-label": "state" }) as HTMLSelectElement;
  for (const s of [TaskState.TASK_STATE_UNSPECIFIED, TaskState.READY, TaskState.IN_PROGRESS, ...FINAL]) {
    filter.append(h("option", { value: String(s) }, s === TaskState.TASK_STATE_UNSPECIFIED ? "any state" : stateName(s)));
  }
  const size = h("select", { id: "page-size", "aria-label": "page size" }) as HTMLSelectElement;
  for (const n of ["100", "1000"]) size.append(h("option", { value: n }, `${n} a page`));
  const next = h("button", { type: "button", id: "next" }, "Next page") as HTMLButtonElement;
  const first = h("button", { type: "button", id: "first" }, "First page") as HTMLButtonElement;
  const body = h("tbody", { id: "tasks" });
  const listError = h("div");
  main.append(
    h("h2", {}, "Tasks"),
    h("div", { class: "controls" }, filter, size, first, next),
    listError,
    h("table", {}, h("thead", {}, h("tr", {}, ...["id", "state", "attempt", "submitted", "updated"].map((c) => h("th", {}, c)))), body),
  );

  let pageToken = "";
  let nextToken = "";
  const refresh = async () => {
    try {
      const [list, queue] = await Promise.all([
        tasks.listTasks({ parent: name, state: Number(filter.value), pageSize: Number(size.value), pageToken }),
        pipelines.getPipelineStats({ name }),
      ]);
      listError.replaceChildren();
      nextToken = list.nextPageToken;
      next.disabled = !nextToken;
      first.disabled = !pageToken;
      if (list.tasks.length === 0) {
        body.replaceChildren(h("tr", {}, h("td", { colspan: "5", class: "note" }, "No tasks.")));
      } else body.replaceChildren(
        ...list.tasks.map((t) =>
          h("tr", { "data-state": stateName(t.state) }, h("td", {}, link(t.name, id(t.name))), h("td", {}, stateName(t.state)), h("td", {}, String(t.attempt)), h("td", {}, time(t.createTimeMs)), h("td", {}, time(t.updateTimeMs))),
        ),
      );
      stats.textContent =
        `${queue.ready} ready, ${queue.inProgress} in progress; last minute: ${queue.doneLastMinute} done, ` +
        `${queue.errorLastMinute} failed, ${queue.cancelledLastMinute} cancelled; ` +
        `oldest ready ${Number(queue.oldestReadyAgeMs) / 1000} s; ${queue.agents} agents, ${queue.freeSlots} free slots`;
    } catch (e) {
      listError.replaceChildren(errorBox(e));
    }
  };
  filter.addEventListener("change", () => ((pageToken = ""), refresh()));
  size.addEventListener("change", () => ((pageToken = ""), refresh()));
  next.addEventListener("click", () => ((pageToken = nextToken), refresh()));
  first.addEventListener("click", () => ((pageToken = ""), refresh()));
  await refresh();
  // Live: the first page again every second (later pages hold still while read).
  const live = async () => {
    if (!pageToken && !document.hidden) await refresh();
    setTimeout(live, 1000);
  };
  setTimeout(live, 1000);
  // A tab brought back to the front catches up at once.
  document.addEventListener("visibilitychange", () => {
    if (!pageToken && !document.hidden) void refresh();
  });
}

// --- A task: its result, live steps while it runs, cancel --------------------------------

function renderTask(view: HTMLElement, t: Task): void {
  const rows: [string, Child][] = [
    ["state", h("span", { id: "task-state" }, stateName(t.state))],
    ["attempt", String(t.attempt)],
    ["submitted", time(t.createTimeMs)],
    ["updated", time(t.updateTimeMs)],
  ];
  for (const [k, v] of Object.entries(t.params).sort(([a], [b]) => a.localeCompare(b))) rows.push([`param ${k}`, v]);
  if (t.traceparent) rows.push(["trace", t.traceparent.split("-")[1] ?? ""]);
  const r = t.result;
  if (r?.error) rows.push(["error", h("span", { class: "failed" }, r.error)]);
  if (r) rows.push(["duration", `${r.durationMs} ms`]);
  view.replaceChildren(h("dl", {}, ...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
  for (const job of r?.jobs ?? []) {
    const status = job.succeeded ? "ok" : job.allowedFailure ? "failed (allowed)" : "failed";
    view.append(h("h3", {}, `job ${job.stage}/${job.job}: ${status}, ${job.attempts} attempt(s), ${job.durationMs} ms`));
    job.steps.forEach((s, i) => view.append(step(i, s)));
  }
}

function step(i: number, s: StepResult): HTMLElement {
  return h(
    "div",
    { class: "step" },
    h("p", {}, `step ${i}: `, h("code", {}, s.command), ` exit ${s.exitCode}${s.signal ? `, signal ${s.signal}` : ""}${s.timedOut ? ", timed out" : ""}, ${s.durationMs} ms`),
    s.stdout ? h("pre", { class: "stdout" }, s.stdout + (s.stdoutTruncated ? "\n[cut]" : "")) : null,
    s.stderr ? h("pre", { class: "stderr" }, s.stderr + (s.stderrTruncated ? "\n[cut]" : "")) : null,
  );
}

async function taskPage(name: string): Promise<void> {
  const pipeline = name.slice(0, name.indexOf("/tasks/"));
  const cancel = h("button", { type: "button", id: "cancel", disabled: "" }, "Cancel") as HTMLButtonElement;
  const view = h("div", { id: "task" });
  const progress = h("div", { id: "progress", class: "progress" });
  const problems = h("div");
  main.replaceChildren(h("h1", {}, id(name)), h("p", {}, "of ", link(pipeline, pipeline)), cancel, problems, view, progress);
  cancel.addEventListener("click", async () => {
    try {
      await tasks.cancelTask({ name });
    } catch (e) {
      problems.replaceChildren(errorBox(e));
    }
  });
  const show = (t: Task) => {
    renderTask(view, t);
    cancel.disabled = FINAL.has(t.state);
  };
  // Live output of the running attempt, by step.
  const live = new Map<string, HTMLElement>();
  const stepBox = (e: { stage: string; job: string; step: number; jobAttempt: number }) => {
    const key = `${e.stage}/${e.job}/${e.jobAttempt}/${e.step}`;
    let box = live.get(key);
    if (!box) {
      box = h("pre", { class: "live" });
      progress.append(h("h3", {}, `${e.stage}/${e.job} step ${e.step} (attempt ${e.jobAttempt})`), box);
      live.set(key, box);
    }
    return box;
  };
  try {
    for await (const ev of tasks.watchTask({ name })) {
      apply(ev, show, stepBox);
      if (ev.event.case === "finished") {
        progress.replaceChildren();
        break;
      }
    }
  } catch (e) {
    problems.replaceChildren(errorBox(e));
  }
}

function apply(
  ev: TaskEvent,
  show: (t: Task) => void,
  stepBox: (e: { stage: string; job: string; step: number; jobAttempt: number }) => HTMLElement,
): void {
  const e = ev.event;
  switch (e.case) {
    case "snapshot":
    case "finished":
      show(e.value);
      break;
    case "stateChanged": {
      const s = document.getElementById("task-state");
      if (s) s.textContent = stateName(e.value.state);
      break;
    }
    case "stepStarted":
      if (e.value.step) stepBox(e.value.step).append(`$ ${e.value.command}\n`);
      break;
    case "output":
      if (e.value.step) stepBox(e.value.step).append(e.value.data);
      break;
    case "stepFinished":
      if (e.value.step && e.value.result) stepBox(e.value.step).append(`[exit ${e.value.result.exitCode}]\n`);
      break;
  }
}

// --- Routing by path --------------------------------------------------------------------

document.getElementById("bar")!.append(tokenBar());
const path = decodeURIComponent(location.pathname.replace(/^\/ui\/?/, "").replace(/\/$/, ""));
if (/^tenants\/[^/]+\/applications\/[^/]+\/pipelines\/[^/]+\/tasks\/[^/]+$/.test(path)) {
  document.title = `${id(path)} · pipeline-manager`;
  void taskPage(path);
} else if (/^tenants\/[^/]+\/applications\/[^/]+\/pipelines\/[^/]+$/.test(path)) {
  document.title = `${id(path)} · pipeline-manager`;
  void pipelinePage(path);
} else {
  void home();
}
