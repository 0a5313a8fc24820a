// Renders `stampede press --html` reports in headless Chromium, offline.
//
//   npm install playwright-core        (once, in this directory)
//   CHROMIUM=/usr/bin/chromium node check-report.js report.html [more.html ...]
//
// Every non-file: request is aborted, so a report that needs the network fails. For
// each file it waits for body[data-rendered=true] (set by the page's script when every
// chart is drawn), counts the uPlot charts, saves a full-page screenshot beside the
// file (<name>.png) and prints a JSON summary. Exit code 1 if any file did not render,
// logged an error, drew fewer than five charts or shows NaN/undefined.
const { chromium } = require('playwright-core');
const path = require('path');
const { pathToFileURL } = require('url');

const files = process.argv.slice(2);
if (!files.length) {
  console.error('usage: node check-report.js report.html [more.html ...]');
  process.exit(2);
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox'],
  });
  let failed = false;
  try {
    for (const f of files) {
      const abs = path.resolve(f);
      const name = path.basename(abs).replace(/\.html?$/i, '');
      const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
      const consoleErrors = [];
      const pageErrors = [];
      const blockedRequests = [];
      page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
      page.on('pageerror', (e) => pageErrors.push(String(e && e.stack || e)));
      await page.route('**/*', (r) => {
        const url = r.request().url();
        if (url.startsWith('file:')) return r.continue();
        blockedRequests.push(url);
        return r.abort();
      });
      let rendered = false;
      let waitError = null;
      try {
        await page.goto(pathToFileURL(abs).href, { waitUntil: 'load' });
        await page.waitForSelector('body[data-rendered=true]', { timeout: 10000, state: 'attached' });
        rendered = true;
      } catch (e) {
        waitError = String(e.message || e).split('\n')[0];
      }
      // let any pending animation frames / resize observers settle
      await page.waitForTimeout(300);
      const counts = await page.evaluate(() => {
        const ids = ['chart-throughput', 'chart-latency', 'chart-errors', 'chart-server', 'chart-writer'];
        const perChart = {};
        for (const id of ids) {
          const el = document.getElementById(id);
          perChart[id] = el ? { uplot: el.querySelectorAll('.uplot').length, canvas: el.querySelectorAll('canvas').length } : null;
        }
        return {
          uplotCount: document.querySelectorAll('.uplot').length,
          canvasCount: document.querySelectorAll('canvas').length,
          perChart,
          nanText: /\bNaN\b|undefined/.test(document.body.innerText),
        };
      });
      const shot = path.join(path.dirname(abs), `${name}.png`);
      await page.screenshot({ path: shot, fullPage: true });
      const summary = {
        file: abs,
        rendered,
        uplotCount: counts.uplotCount,
        canvasCount: counts.canvasCount,
        consoleErrors,
        pageErrors,
        blockedRequests,
        perChart: counts.perChart,
        textHasNaNOrUndefined: counts.nanText,
        screenshot: shot,
      };
      if (waitError) summary.waitError = waitError;
      if (!rendered || consoleErrors.length || pageErrors.length || counts.uplotCount < 5 || counts.nanText) failed = true;
      console.log(JSON.stringify(summary));
      await page.close();
    }
  } finally {
    await browser.close();
  }
  process.exit(failed ? 1 : 0);
})().catch((e) => { console.error(e); process.exit(2); });
