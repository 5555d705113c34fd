// The console in a real browser: Debian's headless Chromium driven by puppeteer-core, against
// a live `pm dev` whose endpoint is the first argument. Run by the Rust test
// `the_console_works_in_a_real_browser` (cli/tests/e2e.rs), which applies the pipelines used
// here: `greet` (`echo hello {{who}}`, `who` required) and `slow` (prints a tick a second).
// Every wait is bounded; on a failure a screenshot of each open page goes to the directory
// given as the second argument.
import puppeteer from "puppeteer-core";

// With `--token TOKEN` (a `pm dev --auth`), it checks the token bar instead: refused without
// the token, the pipelines listed with it.
const [endpoint, artifacts, flag, authToken] = process.argv.slice(2);
const APP = "tenants/default/applications/demo/pipelines";
const WAIT = 30_000;

const browser = await puppeteer.launch({
  executablePath: process.env.PM_CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  // Root in CI: Chromium's sandbox needs an unprivileged user.
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const pages = [];
async function open(path) {
  const page = await browser.newPage();
  page.setDefaultTimeout(WAIT);
  page.on("pageerror", (e) => console.error(`page error on ${path}: ${e.message}`));
  pages.push(page);
  await page.goto(`${endpoint}${path}`, { waitUntil: "domcontentloaded" });
  return page;
}
const text = (page, selector) => page.$eval(selector, (el) => el.textContent ?? "");
// A pipeline page whose form can be used: the form is there and the queue line above it has
// filled in. A click is aimed where the button was when it was looked up; if the line fills in
// meanwhile it moves the form down and the click lands on the field above the button.
async function pipelinePage(path) {
  const page = await open(path);
  await page.waitForSelector("#submit button[type=submit]");
  await page.waitForFunction(() => (document.getElementById("stats")?.textContent ?? "") !== "");
  return page;
}
const step = (what) => console.log(`ok: ${what}`);
const bounded = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function withToken() {
  const page = await open("/ui/");
  await page.waitForSelector(".error");
  const refused = await text(page, ".error");
  if (!refused.startsWith("UNAUTHENTICATED")) throw new Error(`without a token: ${refused}`);
  step(`without a token: ${JSON.stringify(refused)}`);
  await page.type("#token", authToken);
  await Promise.all([page.waitForNavigation(), page.click("form.token button")]);
  await page.waitForSelector(`a[href="/ui/${APP}/ocr"]`);
  step("with the token entered, the pipelines are listed");
}

async function everything() {
  // / goes to the list of tenants, applications and pipelines; the sample is there.
  const home = await open("/");
  await home.waitForSelector(`a[href="/ui/${APP}/ocr"]`);
  if (!home.url().endsWith("/ui/")) throw new Error(`/ went to ${home.url()}`);
  step("the pipeline list shows the sample pipeline");

  // A task submitted through the form runs to DONE, its output shown.
  const greet = await pipelinePage(`/ui/${APP}/greet`);
  await greet.type("#param-who", "browser");
  await Promise.all([greet.waitForNavigation(), greet.click("#submit button[type=submit]")]);
  if (!/\/tasks\/[0-9a-f]{32}$/.test(greet.url())) throw new Error(`not on a task page: ${greet.url()}`);
  const taskUrl = greet.url();
  await greet.waitForFunction(() => document.getElementById("task-state")?.textContent === "DONE");
  const out = await text(greet, "pre.stdout");
  if (out !== "hello browser\n") throw new Error(`stdout ${JSON.stringify(out)}`);
  step("a task submitted through the form ran to DONE with its output");

  // A bad parameter: the server's INVALID_ARGUMENT, naming the field.
  const bad = await pipelinePage(`/ui/${APP}/greet`);
  await bad.type("#param-who", "x");
  await bad.type("#priority", "101");
  await bad.click("#submit button[type=submit]");
  await bad.waitForSelector(".error");
  const error = await text(bad, ".error");
  if (!error.includes("INVALID_ARGUMENT") || !error.includes("(priority)")) throw new Error(`error shown: ${error}`);
  step(`a bad parameter shows ${JSON.stringify(error)}`);

  // The pipeline page's list is live: a task submitted elsewhere appears without a reload.
  const list = await open(`/ui/${APP}/greet`);
  await list.waitForSelector("#tasks tr");
  const before = await list.$$eval("#tasks tr", (rows) => rows.length);
  const other = await pipelinePage(`/ui/${APP}/greet`);
  await other.type("#param-who", "again");
  await Promise.all([other.waitForNavigation(), other.click("#submit button[type=submit]")]);
  // A hidden tab does not refresh (the console saves the work): look at it again.
  await list.bringToFront();
  await list.waitForFunction((n) => document.querySelectorAll("#tasks tr").length > n, {}, before);
  step("the task list updated live");

  // A long task: live progress through WatchTask, then cancelled from the page.
  const slow = await pipelinePage(`/ui/${APP}/slow`);
  await Promise.all([slow.waitForNavigation(), slow.click("#submit button[type=submit]")]);
  await slow.waitForFunction(() => document.getElementById("progress")?.textContent?.includes("tick 1"));
  step("a running task streams its output");
  await slow.waitForFunction(() => !document.getElementById("cancel")?.disabled);
  await slow.click("#cancel");
  await slow.waitForFunction(() => document.getElementById("task-state")?.textContent === "CANCELLED");
  step("the task was cancelled from the page");

  // Deep links load directly.
  const deep = await open(new URL(taskUrl).pathname);
  await deep.waitForFunction(() => document.getElementById("task-state")?.textContent === "DONE");
  const pipeline = await open(`/ui/${APP}/greet`);
  await pipeline.waitForSelector(`#tasks a[href="${new URL(taskUrl).pathname}"]`);
  step("deep links to a task and a pipeline load directly");
}

try {
  await (flag === "--token" ? withToken() : everything());
  console.log("the console passed");
} catch (e) {
  console.error(`FAILED: ${e.stack ?? e}`);
  if (artifacts) {
    for (const [i, page] of pages.entries()) {
      await page.bringToFront().catch(() => {});
      const shot = page.screenshot({ path: `${artifacts}/page-${i}.png`, fullPage: true });
      await Promise.race([shot.catch(() => {}), bounded(10_000)]);
    }
    console.error(`screenshots in ${artifacts}`);
  }
  process.exitCode = 1;
} finally {
  // Bounded: a browser that does not close in time is killed with this process.
  await Promise.race([browser.close(), bounded(10_000)]);
  browser.process()?.kill("SIGKILL");
  process.exit(process.exitCode ?? 0);
}
