// A benchmark, not a test: the pipeline page with 1,000 tasks on one page, live. Prints how
// long the first render of the 1,000 rows took and the main thread's long tasks (over 50 ms,
// PerformanceObserver) during the next 10 s of refreshes, once a second.
// Usage: node test/list-perf.mjs ENDPOINT PIPELINE_NAME
import puppeteer from "puppeteer-core";

const [endpoint, pipeline] = process.argv.slice(2);
const browser = await puppeteer.launch({
  executablePath: process.env.PM_CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(60_000);
  await page.evaluateOnNewDocument(() => {
    window.__long = [];
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) window.__long.push(e.duration);
    }).observe({ type: "longtask", buffered: true });
  });
  await page.goto(`${endpoint}/ui/${pipeline}`);
  await page.waitForSelector("#tasks tr");
  const t0 = Date.now();
  await page.select("#page-size", "1000");
  await page.waitForFunction(() => document.querySelectorAll("#tasks tr").length === 1000);
  const firstRender = Date.now() - t0;
  await page.evaluate(() => (window.__long = []));
  await new Promise((r) => setTimeout(r, 10_000));
  const long = await page.evaluate(() => window.__long);
  const rows = await page.$$eval("#tasks tr", (r) => r.length);
  const total = long.reduce((a, b) => a + b, 0);
  console.log(
    `1,000 rows: first render ${firstRender} ms (the call and the DOM); over the next 10 s of live refreshes ` +
      `${long.length} long tasks, ${Math.round(total)} ms in all, the longest ${Math.round(Math.max(0, ...long))} ms; ${rows} rows shown`,
  );
} finally {
  await browser.close();
}
