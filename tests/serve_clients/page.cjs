// Drives the rustrag page in headless Chromium (playwright-core, Debian's chromium): ask the
// default question, wait for the streamed answer, check the shading and the sources, screenshot.
// Usage: node page.cjs http://127.0.0.1:PORT out.png   (NODE_PATH: where playwright-core is)
"use strict";
const { chromium } = require("playwright-core");

(async () => {
  const [url, shot] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    // The page must not reach outside the server (no CDN).
    const foreign = [];
    page.on("request", (r) => { if (!r.url().startsWith(url)) foreign.push(r.url()); });
    await page.goto(url + "/");
    await page.click("#go");
    // Tokens appear while the answer streams, before it is done.
    await page.waitForSelector("#answer span.tok", { timeout: 60000 });
    await page.waitForSelector("body[data-done='1']", { timeout: 120000 });
    const r = await page.evaluate(() => {
      const toks = [...document.querySelectorAll("#answer span.tok")];
      return {
        answer: document.getElementById("answer").textContent,
        tokens: toks.length,
        shaded: toks.filter((t) => t.style.background.startsWith("rgba")).length,
        sources: document.querySelectorAll("#sources li").length,
        priors: [...document.querySelectorAll("#sources .prior")].map((b) => Number(b.textContent)),
        status: document.getElementById("status").textContent,
      };
    });
    await page.screenshot({ path: shot, fullPage: true });
    if (errors.length) throw new Error("page errors: " + errors.join("; "));
    if (foreign.length) throw new Error("requests outside the server: " + foreign.join(", "));
    const sum = r.priors.reduce((a, b) => a + b, 0);
    if (Math.abs(sum - 1) > 0.01) throw new Error(`priors shown sum to ${sum}`);
    console.log(JSON.stringify(r));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
