// The dashboard in headless Debian Chromium, driven by playwright-core, while flux-load runs
// the slow-consumer scenario against the gateway that run.sh started:
//   1. the live numbers move: messages out/s read twice, the second read is higher, and the
//      heap allocation rate is counted (above zero);
//   2. a slow consumer's cell in the connections grid turns red, and hovering it shows it;
//   3. that consumer's eviction appears in the evictions log within 15 s;
//   4. the apps table shows the app's connections and a delivery rate above zero.
// Saves $SCREENSHOT at the end (and artefacts in $ARTIFACTS). Every wait is bounded; the load is
// stopped on the way out, whatever happened.
import { spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";
// The e2e suite's polling helper (it needs no npm package).
import { eventually } from "../e2e/flux.mjs";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} must be set (run tests/browser/run.sh)`);
  return value;
};
const DASHBOARD = env("FLUX_DASHBOARD_URL");
const PORT = env("FLUX_PORT");
const LOAD_BIN = env("FLUX_LOAD_BIN");
const ARTIFACTS = env("ARTIFACTS");
const SCREENSHOT = env("SCREENSHOT");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

/** The load: 200 fast subscribers and 3 slow consumers on one channel, 1,000 events/s for 20 s. */
const LOAD_ARGS = ["slow-consumer", "--port", PORT, "--connections", "200", "--slow", "3", "--quiet"];

const step = (message) => console.log(`browser test: ${message}`);

function startLoad() {
  const log = [];
  const child = spawn(LOAD_BIN, LOAD_ARGS, { stdio: ["ignore", "pipe", "pipe"] });
  child.stdout.on("data", (chunk) => log.push(chunk));
  child.stderr.on("data", (chunk) => log.push(chunk));
  const exited = new Promise((resolve) => {
    child.on("exit", (code, signal) => resolve({ code, signal }));
    child.on("error", (error) => resolve({ error: String(error) }));
  });
  return {
    exited,
    /** Waits up to `ms` for the load to finish by itself, then stops it; saves its output. */
    async stop(ms) {
      const timer = setTimeout(() => child.kill("SIGTERM"), ms);
      const outcome = await exited;
      clearTimeout(timer);
      writeFileSync(path.join(ARTIFACTS, "load.log"), Buffer.concat(log));
      return outcome;
    },
  };
}

async function main() {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
    timeout: 30_000,
  });
  const pageLog = [];
  let load = null;
  try {
    const page = await browser.newPage({ viewport: { width: 1440, height: 1400 } });
    page.setDefaultTimeout(15_000);
    page.on("console", (message) => pageLog.push(`${message.type()}: ${message.text()}`));
    page.on("pageerror", (error) => pageLog.push(`pageerror: ${error.message}`));
    page.on("requestfailed", (request) => pageLog.push(`requestfailed: ${request.url()}`));

    await page.goto(DASHBOARD);
    await page.waitForFunction(() => document.getElementById("status").dataset.state === "live" && window.__fluxGrid);
    step("the dashboard is live");

    const messagesOut = () => page.$eval('[data-metric="messages_out"]', (el) => Number(el.dataset.value));
    const messagesOutTotal = () => page.$eval('[data-metric="messages_out_total"]', (el) => Number(el.dataset.value));
    const first = await messagesOut();
    const firstTotal = await messagesOutTotal();
    load = startLoad();
    const second = await eventually(
      async () => {
        const now = await messagesOut();
        return now > first && now;
      },
      20_000,
      "messages out/s to increase",
    );
    const secondTotal = await messagesOutTotal();
    if (!(secondTotal > firstTotal)) throw new Error(`messages out total did not move: ${firstTotal} -> ${secondTotal}`);
    step(`live numbers move: messages out ${first}/s -> ${second}/s, total ${firstTotal} -> ${secondTotal}`);
    // The gateway counts its heap allocations: under load the rate is live and above zero.
    const heap = await page.$eval('[data-metric="heap_allocations"]', (el) => Number(el.dataset.value));
    if (!(heap > 0)) throw new Error(`heap allocations/s under load: ${heap}`);
    step(`heap allocations counted live: ${heap}/s`);

    // Slow consumers stop reading: once their kernel buffers are full they are backpressured.
    const redSeen = new Set();
    const firstRed = await eventually(
      async () => {
        const ids = await page.evaluate(() => window.__fluxGrid.redSocketIds);
        ids.forEach((id) => redSeen.add(id));
        return ids[0];
      },
      25_000,
      "a red (backpressured) cell in the grid",
    );
    const drawnRed = await page.$eval("#grid", (canvas) => Number(canvas.dataset.red));
    if (!(drawnRed > 0)) throw new Error(`the grid reports ${drawnRed} red cells`);
    step(`slow consumer ${firstRed} turned red (${drawnRed} red cells)`);

    const cell = await page.evaluate((id) => window.__fluxGrid.locate(id), firstRed);
    if (cell) {
      const box = await page.locator("#grid").boundingBox();
      await page.mouse.move(box.x + cell.x, box.y + cell.y);
      const tip = await page.locator("#grid-tip").innerText();
      if (!tip.includes(firstRed) || !/backpressured [\d,]+ ms/.test(tip)) throw new Error(`hovering a red cell shows: ${tip}`);
      await page.screenshot({ path: path.join(ARTIFACTS, "red-cell.png"), fullPage: true });
      step(`hovering its cell shows: ${tip.replaceAll("\n", " | ")}`);
    }

    const evicted = await eventually(
      async () => {
        const state = await page.evaluate(() => ({
          red: window.__fluxGrid.redSocketIds,
          logged: [...document.querySelectorAll("#evictions tbody tr[data-socket-id]")].map((tr) => tr.dataset.socketId),
        }));
        state.red.forEach((id) => redSeen.add(id));
        return state.logged.find((id) => redSeen.has(id));
      },
      15_000,
      "a red consumer's eviction in the log",
    );
    const row = await page.locator(`#evictions tbody tr[data-socket-id="${evicted}"]`).first().innerText();
    step(`its eviction is in the log: ${row.replaceAll("\t", " | ")}`);

    const appRow = await eventually(
      async () => {
        const cells = await page.$$eval('#apps tbody tr[data-app="app-id"] td', (tds) => tds.map((td) => td.textContent));
        const number = (text) => Number((text ?? "").replace(/[^\d.]/g, "") || 0);
        return cells.length > 0 && number(cells[2]) > 0 && number(cells[5]) > 0 ? cells : undefined;
      },
      5_000,
      "the app's connections and deliveries/s in the apps table",
    );
    step(`the apps table: ${appRow.join(" | ")}`);

    await page.mouse.move(0, 0);
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    step(`screenshot saved to ${SCREENSHOT}`);
  } finally {
    if (load) {
      const outcome = await load.stop(30_000);
      step(`flux-load ended: ${JSON.stringify(outcome)}`);
    }
    writeFileSync(path.join(ARTIFACTS, "page-console.log"), pageLog.join("\n") + "\n");
    await browser.close();
  }
  const errors = pageLog.filter((line) => line.startsWith("pageerror") || line.startsWith("requestfailed"));
  if (errors.length) throw new Error(`the page had errors:\n${errors.join("\n")}`);
}

main().then(
  () => {
    console.log("1 passed, 0 failed");
  },
  (error) => {
    console.error(`browser test: FAILED: ${error.stack ?? error}`);
    console.log("0 passed, 1 failed");
    process.exit(1);
  },
);
