// A citizen and an operator in Debian's Chromium, driven by playwright-core.
// Run by tests/browser.rs, which starts the demo portal and varco in front
// of it (max_active = 1) and passes their addresses in the environment:
//   VARCO_URL, ADMIN_URL, ADMIN_TOKEN, ARTIFACTS (screenshot folder),
//   CHROMIUM (the browser binary).
// Other people in line are plain HTTP clients with their own cookie jars.
// Any failed check throws: the process exits non-zero with the reason.

import { chromium } from "playwright-core";
import { readFileSync, mkdirSync } from "node:fs";
import { createRequire } from "node:module";

const VARCO = process.env.VARCO_URL;
const ADMIN = process.env.ADMIN_URL;
const TOKEN = process.env.ADMIN_TOKEN;
const ARTIFACTS = process.env.ARTIFACTS;
mkdirSync(ARTIFACTS, { recursive: true });
const require = createRequire(import.meta.url);
const AXE = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
  console.log("ok: " + what);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Polls `f` until it returns a truthy value: the readiness signal of a
// change in varco (a tick, a claim), never a fixed sleep.
async function until(what, f, ms = 20000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    // A page in the middle of a navigation throws: not yet.
    const v = await f().catch(() => false);
    if (v) return v;
    await sleep(100);
  }
  throw new Error("never: " + what);
}

/** A person with a cookie jar, outside the browser. */
class Person {
  constructor(name) {
    this.name = name;
    this.jar = new Map();
  }
  async req(method, path, form) {
    const headers = {};
    if (this.jar.size) headers.cookie = [...this.jar].map(([k, v]) => `${k}=${v}`).join("; ");
    if (form) headers["content-type"] = "application/x-www-form-urlencoded";
    const r = await fetch(VARCO + path, { method, headers, body: form, redirect: "manual" });
    for (const c of r.headers.getSetCookie()) {
      const [kv, ...attrs] = c.split(";");
      const i = kv.indexOf("=");
      if (attrs.some((a) => a.trim() === "Max-Age=0")) this.jar.delete(kv.slice(0, i));
      else this.jar.set(kv.slice(0, i), kv.slice(i + 1));
    }
    return { status: r.status, text: await r.text() };
  }
  async status() {
    const headers = { accept: "application/json" };
    if (this.jar.size) headers.cookie = [...this.jar].map(([k, v]) => `${k}=${v}`).join("; ");
    return (await fetch(VARCO + "/.varco/status?room=portal", { headers })).json();
  }
  /** Logs in and submits an application: the portal then releases the slot. */
  async applyAndLeave() {
    const login = await this.req("POST", "/login", "citizen=" + this.name);
    check(login.status === 303, `${this.name} logged in (${login.status})`);
    const apply = await this.req("POST", "/apply", "iban=IT60X0542811101000000123456");
    check(apply.status === 200 && apply.text.includes("received"), `${this.name} applied and left`);
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-dev-shm-usage"],
});

try {
  // 1. The portal is at capacity: one person holds the only slot, one more waits.
  const holder = new Person("HOLDER1");
  const first = await holder.req("GET", "/");
  check(first.text.includes("Portale Bonus"), "the first person is admitted straight to the portal");
  const second = new Person("SECOND2");
  const waiting = await second.req("GET", "/");
  check(waiting.text.includes('id="position"'), "the second person gets the waiting page");

  // 2. A phone opens the login page through varco: the waiting page, third in line.
  const phone = await browser.newContext({
    viewport: { width: 360, height: 740 },
    deviceScaleFactor: 2,
    isMobile: true,
    hasTouch: true,
    locale: "it-IT",
    // Times on the page are the phone's own, not UTC.
    timezoneId: "Europe/Rome",
  });
  // What the page's Content-Security-Policy refuses, as the page sees it.
  await phone.addInitScript(() => {
    window.__refused = [];
    document.addEventListener("securitypolicyviolation", (e) =>
      window.__refused.push(e.effectiveDirective + " " + (e.blockedURI || "inline"))
    );
  });
  const tab = await phone.newPage();
  await tab.clock.install();
  // With a query, as a link from a text message carries one: admission
  // must land on it whole (its `&` survives the page's HTML, its escapes
  // are not decoded on the way).
  const ASKED = "/login?from=sms%20link&lang=it";
  await tab.goto(VARCO + ASKED);
  const pos = async (p) => (await p.textContent("#position")).trim();
  const ticketOf = async (p) => (await p.textContent("#ticket")).trim();
  check((await pos(tab)) === "2", "the waiting page shows place 2 in line (one waits ahead)");
  const ticket = await ticketOf(tab);
  check(/^\d+$/.test(ticket), `the page shows the ticket number (${ticket})`);
  await tab.screenshot({ path: `${ARTIFACTS}/waiting-360.png`, fullPage: true });

  // 3. The page's own script and style run under its policy; a script
  // put into it from outside does not.
  const styled = await tab.evaluate(() => getComputedStyle(document.querySelector("main")).maxWidth);
  check(styled !== "none", `the page's own style applies under its policy (max-width ${styled})`);
  check((await tab.evaluate(() => window.__refused)).length === 0, "nothing of the page's own is refused");
  await tab.addScriptTag({ content: "window.__injected = 1" }).catch(() => {});
  check(
    (await tab.evaluate(() => window.__injected)) === undefined &&
      (await tab.evaluate(() => window.__refused)).some((r) => r.startsWith("script-src")),
    "an injected inline script is refused by the page's policy"
  );

  // A poll whose figures are as shown changes nothing in the live
  // region: a screen reader does not read the same place out again.
  const same = { state: "waiting", position: 2, ahead: 1, eta_seconds: null, eta_low_seconds: null, eta_high_seconds: null, queue_length: 2 };
  let sameAnswers = 0;
  await tab.route("**/.varco/status*", async (route) => {
    sameAnswers++;
    await route.fulfill({ headers: { "retry-after": "5" }, json: same });
  });
  await until("a poll answered", async () => {
    await tab.clock.runFor(1000);
    return sameAnswers >= 1;
  });
  await tab.evaluate(() => {
    window.__said = 0;
    new MutationObserver((m) => (window.__said += m.length)).observe(document.querySelector(".card"), {
      subtree: true,
      childList: true,
      characterData: true,
    });
  });
  await until("another poll answered", async () => {
    await tab.clock.runFor(1000);
    return sameAnswers >= 2;
  });
  check((await tab.evaluate(() => window.__said)) === 0, "a poll with the same figures changes nothing a screen reader reads");
  await tab.unroute("**/.varco/status*");

  // Accessibility: axe-core, evaluated from outside the page's policy,
  // finds nothing serious or critical.
  await tab.evaluate(AXE);
  const axe = await tab.evaluate(async () => {
    const r = await window.axe.run(document, { resultTypes: ["violations"] });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, nodes: v.nodes.length }));
  });
  const grave = axe.filter((v) => v.impact === "serious" || v.impact === "critical");
  console.log("axe violations: " + JSON.stringify(axe));
  check(grave.length === 0, "axe-core: no serious or critical violation on the waiting page");

  // 4. A reload keeps the place; a second tab of the same browser shares it.
  await tab.reload();
  check((await ticketOf(tab)) === ticket && (await pos(tab)) === "2", "reload keeps the ticket and the place");
  const tab2 = await phone.newPage();
  await tab2.goto(VARCO + "/login");
  check((await ticketOf(tab2)) === ticket, "a second tab shows the same ticket, not a new one");
  const line = (await second.status()).queue_length;
  check(line === 2, `still two in line after reload and a second tab (${line})`);
  await tab2.close();

  // 4b. Every poll waits as long as the status answer's Retry-After says
  // (the server caps it by the claim window), not a delay of the script's
  // own: here an unknown estimate, which the script alone would wait 20 s
  // on, with Retry-After 5.
  let polls = 0;
  await tab.route("**/.varco/status*", async (route) => {
    const r = await route.fetch();
    const s = await r.json();
    s.eta_seconds = s.eta_low_seconds = s.eta_high_seconds = null;
    polls++;
    await route.fulfill({ response: r, headers: { ...r.headers(), "retry-after": "5" }, json: s });
  });
  await tab.evaluate(() => {
    const set = window.setTimeout;
    window.__delays = [];
    window.setTimeout = (f, ms) => (window.__delays.push(ms), set(f, ms));
  });
  await until("the page polls", async () => {
    await tab.clock.runFor(1000);
    return polls >= 1;
  });
  // The first delay planned is the one in case this poll never ends;
  // the second, the one its answer asks for.
  const delay = await until("the page plans its next poll", () => tab.evaluate(() => window.__delays[1]));
  check(delay >= 3500 && delay <= 6500, `the next poll follows Retry-After: 5 s +-30% (${delay} ms)`);
  await tab.unroute("**/.varco/status*");

  // 4c. A poll answered with an error (429 from the per-address limit,
  // Retry-After 1) keeps the figures and their time, and the page waits
  // as long as the last status said (5 s here), not less: pages behind
  // one carrier's address must not all poll every second once throttled,
  // nor wait so long that a turn's claim window runs out.
  const before = { eta: await tab.textContent("#eta"), updated: await tab.textContent("#updated") };
  let throttled = 0;
  let refusal = { status: 429, headers: { "retry-after": "1" }, json: { error: "too many requests" } };
  await tab.route("**/.varco/status*", async (route) => {
    throttled++;
    await route.fulfill(refusal);
  });
  // With the longest jitter, the wait planned in case this poll never
  // ends (a hung connection) still brings the next one within two
  // polls of Retry-After 5 (inside a 15 s claim window), not 5 + 10 s.
  await tab.evaluate(() => {
    window.__delays = [];
    window.__random = Math.random;
    Math.random = () => 0.999;
  });
  await until("the page polls into a 429", async () => {
    await tab.clock.runFor(1000);
    return throttled >= 1;
  });
  const after429 = await until("the page plans its next poll", () => tab.evaluate(() => window.__delays[1]));
  const hung = await tab.evaluate(() => ((Math.random = window.__random), window.__delays[0]));
  check(hung <= 13000, `the wait for a poll that never ends is at most twice Retry-After 5, +30% (${hung} ms)`);
  check(after429 >= 3500 && after429 <= 6500, `after a 429 the page waits as the last status said: 5 s +-30% (${after429} ms)`);
  check(
    (await tab.textContent("#eta")) === before.eta && (await tab.textContent("#updated")) === before.updated,
    "a 429 leaves the figures and their time as they were"
  );
  // Back in view within a 429's Retry-After, the page does not ask at
  // once: a phone switched between apps asked on every return, past the
  // limit that had just answered it. Once the wait is over it does. The
  // clock holds still (past the last 429's wait) but for the test, and
  // the page's timers wait their longest: none fires in between.
  await tab.clock.pauseAt((await tab.evaluate(() => Date.now())) + 1100);
  refusal = { status: 429, headers: { "retry-after": "3" }, json: { error: "too many requests" } };
  await tab.evaluate(() => {
    window.__random = Math.random;
    Math.random = () => 0.999;
    window.__delays = [];
    document.dispatchEvent(new Event("visibilitychange"));
  });
  await until("the page is told to wait 3 s", () => tab.evaluate(() => window.__delays.length >= 2));
  const refused = throttled;
  for (let i = 0; i < 5; i++) {
    await tab.evaluate(() => document.dispatchEvent(new Event("visibilitychange")));
  }
  await tab.clock.runFor(3000);
  await tab.evaluate(() => document.dispatchEvent(new Event("visibilitychange")));
  await until("the page asks once the wait is over", async () => throttled > refused);
  check(throttled === refused + 1, `back in view within Retry-After, no poll at once (${throttled - refused} polls, not 1)`);
  await tab.evaluate(() => (Math.random = window.__random));
  await tab.clock.resume();
  // A balancer's maintenance answer in front of varco (503, Retry-After
  // an hour) does not silence the page past the wait varco itself may ask
  // for (30 s at most): every turn called meanwhile would be missed.
  refusal = { status: 503, headers: { "retry-after": "3600" }, body: "maintenance" };
  await tab.evaluate(() => (window.__delays = []));
  const refusedAgain = throttled;
  await until("the page polls into a 503", async () => {
    await tab.clock.runFor(1000);
    return throttled > refusedAgain;
  });
  const after503 = await until("the page plans its next poll", () => tab.evaluate(() => window.__delays[1]));
  check(after503 <= 39000, `after a foreign 503 asking for an hour the page still asks within 30 s +30% (${after503} ms)`);
  await tab.unroute("**/.varco/status*");
  // A page that asks seldom (a pre-queue place taken long before the
  // opening: up to every 5 minutes, half the time left) and is refused
  // keeps asking seldom while no turn can come, and closes in as the
  // opening nears; told by then to ask every 5 s, refused, it waits no
  // longer than a page in line may: it slept through its turn's claim
  // window. Its timers wait their shortest (0.7 times the delay).
  const early = await phone.newPage();
  await early.addInitScript(() => {
    Math.random = () => 0;
    const set = window.setTimeout;
    window.__delays = [];
    window.setTimeout = (f, ms) => (window.__delays.push(ms), set(f, ms));
  });
  await early.route("**/login*", async (route) => {
    const r = await route.fetch();
    const html = (await r.text()).replace(/data-poll="\d+"/, 'data-poll="300"');
    await route.fulfill({ response: r, body: html });
  });
  let earlyPolls = 0;
  await early.route("**/.varco/status*", async (route) => {
    earlyPolls++;
    if (earlyPolls === 2) {
      const r = await route.fetch();
      return route.fulfill({ response: r, headers: { ...r.headers(), "retry-after": "5" }, json: await r.json() });
    }
    await route.fulfill(refusal);
  });
  await early.goto(VARCO + "/login");
  const cap = +(await early.getAttribute("#varco", "data-poll-cap"));
  check(cap >= 5 && cap <= 30, `the page knows the longest a page in line waits (${cap} s)`);
  const planned = (n) =>
    until(`the seldom page plans its poll after answer ${n}`, () =>
      early.evaluate((n) => window.__delays.length >= 1 + 2 * n && window.__delays[2 * n], n)
    );
  await early.clock.runFor(211000);
  const farOff = await planned(1);
  check(
    farOff >= 100000 && farOff <= 300000 * 0.7,
    `refused 210 s into a 300 s poll (the opening 600 s off or more), it asks again in half what is left (${farOff} ms)`
  );
  await early.clock.runFor(farOff + 500);
  await planned(2);
  await early.clock.runFor(4000);
  const near = await planned(3);
  check(near <= cap * 1300, `told to ask every 5 s, then refused, it asks again within ${cap} s +30%, not 300 (${near} ms)`);
  await early.close();

  // 4d. The script words the estimate as the server's page does
  // (page::waiting's the_wait_reads_naturally has the same cases): in
  // hours once the wait may pass two hours and is surely over one, the
  // low end rounded down. One handler for every case (one unrouted
  // while its poll is under way would see the poll handled twice).
  let estimate = null;
  await tab.route("**/.varco/status*", async (route) => {
    const r = await route.fetch();
    const s = await r.json();
    [s.eta_low_seconds, s.eta_seconds, s.eta_high_seconds] = [estimate[0], estimate[1], estimate[1]];
    await route.fulfill({ response: r, json: s });
  });
  for (const [lo, hi, words] of [
    [9600, 14400, "tra 2 e 4 ore"],
    [10800, 10800, "circa 3 ore"],
    [1800, 12000, "tra 30 e 200 minuti"],
    [240, 450, "tra 4 e 8 minuti"],
    [61, 100, "tra 1 e 2 minuti"],
  ]) {
    estimate = [lo, hi];
    await until(`the page says "${words}"`, async () => {
      await tab.clock.runFor(5000);
      return (await tab.textContent("#eta")).trim() === words;
    });
    check(true, `an estimate of ${lo}..${hi} s reads "${words}"`);
    // Said to a screen reader once, in a sentence with its labels; the
    // figures themselves are no live region.
    const said = await tab.textContent("#said");
    check(said.includes("posto in coda") && said.endsWith(words), `a screen reader is told "${said}"`);
  }
  check((await tab.getAttribute(".card", "aria-live")) === null, "the figures, changing at every poll, are not read out each time");
  // A place moved on with the same wording: nothing more is said.
  const saidBefore = await tab.textContent("#said");
  let moved = 0;
  await tab.unrouteAll({ behavior: "wait" });
  await tab.route("**/.varco/status*", async (route) => {
    const r = await route.fetch();
    const s = await r.json();
    [s.position, s.ahead, s.eta_low_seconds, s.eta_seconds, s.eta_high_seconds] = [90 - moved, 89 - moved, 61, 100, 100];
    moved++;
    await route.fulfill({ response: r, json: s });
  });
  await until("the place moves on twice", async () => {
    await tab.clock.runFor(5000);
    return moved >= 3 && (await tab.textContent("#position")).trim() !== "90";
  });
  check((await tab.textContent("#said")) === saidBefore, "a place moved on, the wait worded the same: nothing said");
  await tab.unrouteAll({ behavior: "wait" });

  // 4e. A poll that never ends (a phone's connection dead after a move
  // from Wi-Fi to mobile data, with no error) does not stop the polling:
  // the next one goes all the same. Its figures are written as Italian
  // writes them, by the script as by the server, and its time is the
  // phone's own, in the page's language.
  let held = 0;
  let answered = 0;
  const big = {
    state: "waiting",
    position: 12345,
    ahead: 1234,
    eta_seconds: 900,
    eta_low_seconds: 720,
    eta_high_seconds: 1350,
    queue_length: 20000,
    updated: "2026-12-01T08:00:00Z",
  };
  await tab.route("**/.varco/status*", async (route) => {
    if (held === 0) {
      held++;
      return; // never answered
    }
    answered++;
    await route.fulfill({ headers: { "retry-after": "5" }, json: big });
  });
  await until("a poll after one that never ended", async () => {
    await tab.clock.runFor(5000);
    return answered >= 1;
  });
  check(held === 1, "a poll that never ended did not stop the polling");
  await until("the page shows the answer", async () => (await pos(tab)) === "12.345");
  check(
    (await tab.textContent("#ahead")).trim() === "1234",
    "figures grouped as Italian writes them (12.345, and 1234 whole), by the script as by the server"
  );
  const localTime = await tab.evaluate(() => new Date("2026-12-01T08:00:00Z").toLocaleTimeString("it"));
  const updated = (await tab.textContent("#updated")).trim();
  check(updated === localTime, `the time of the figures is the phone's own, in Italian (${updated})`);
  check(
    !(await tab.textContent("#arrived")).includes("UTC"),
    "the time of arrival too: " + (await tab.textContent("#arrived"))
  );
  await tab.unrouteAll({ behavior: "ignoreErrors" });

  // The same page at desktop width, for the record.
  const desk = await browser.newContext({ viewport: { width: 1280, height: 800 }, locale: "en-GB" });
  const deskTab = await desk.newPage();
  // A look only: the ticket would join the line, so the page is shown from
  // the phone's cookies.
  await desk.addCookies(await phone.cookies());
  await deskTab.goto(VARCO + "/login");
  check((await ticketOf(deskTab)) === ticket, "the 1280 px view is the same ticket");
  await deskTab.screenshot({ path: `${ARTIFACTS}/waiting-1280.png`, fullPage: true });
  await desk.close();

  // 5. Someone leaves: the one ahead is called, comes in, and the page
  // (polling on its own) shows place 1.
  await holder.applyAndLeave();
  await until("the second person is called", async () => (await second.status()).state === "admitted");
  const in2 = await second.req("GET", "/");
  check(in2.text.includes("Portale Bonus"), "the second person comes in on their own ticket");
  await until("the page shows place 1", async () => {
    await tab.clock.runFor(31000);
    return (await pos(tab)) === "1";
  });
  check(true, "the place improved from 2 to 1 without touching the page");

  // 6. The one ahead leaves while the phone's tab lies in the background,
  // its timers held back (the clock paused, as a phone's browser pauses
  // them): its turn comes, and the page asks at once when it is back in
  // view, rather than at its next poll; it lets the phone in, by itself,
  // onto the page first asked for.
  await tab.clock.pauseAt((await tab.evaluate(() => Date.now())) + 1000);
  await second.applyAndLeave();
  const phoneStatus = async () => {
    const cookie = (await phone.cookies()).map((c) => `${c.name}=${c.value}`).join("; ");
    const r = await fetch(VARCO + "/.varco/status?room=portal", { headers: { accept: "application/json", cookie } });
    return (await r.json()).state;
  };
  await until("the phone's turn comes", async () => (await phoneStatus()) === "admitted");
  check((await tab.content()).includes('id="position"'), "with its timers held back, the page has not moved on by itself");
  await tab.evaluate(() => document.dispatchEvent(new Event("visibilitychange")));
  await until("the phone is admitted onto /login", async () =>
    new URL(tab.url()).pathname === "/login" && (await tab.content()).includes("Portale Bonus")
  );
  check((await tab.textContent("h2")).includes("Log in"), "back in view, admitted at once, on the login page first asked for");
  const landed = new URL(tab.url());
  check(landed.pathname + landed.search === ASKED, `admitted onto the address asked for, query and all (${landed.pathname + landed.search})`);
  await tab.clock.resume();
  await tab.screenshot({ path: `${ARTIFACTS}/admitted-360.png`, fullPage: true });

  // 7. Without JavaScript it still gets through (the page refreshes itself).
  const nojs = await browser.newContext({ javaScriptEnabled: false, viewport: { width: 360, height: 740 } });
  const plain = await nojs.newPage();
  await plain.goto(VARCO + "/login?lang=en&from=mail");
  check((await plain.content()).includes('id="position"'), "without JavaScript: the waiting page");
  // The phone fills in the form and submits: the portal releases its slot.
  await tab.fill('input[name="citizen"]', "PHONE3");
  await tab.click("button");
  await tab.waitForURL(/\/apply$/);
  await tab.fill('input[name="iban"]', "IT60X0542811101000000123456");
  await tab.click("button");
  await tab.waitForSelector("text=received");
  check(true, "the phone applied through varco; its slot is given back");
  await until("the no-JavaScript page reaches the portal", async () => (await plain.content()).includes("Portale Bonus"), 60000);
  // Where the refresh went, once there: the page first asked for, its
  // query whole (the page was at that address already, so only now can
  // a refresh to another one, or one with `&amp;` left in, show).
  check(
    plain.url().endsWith("/login?lang=en&from=mail") && (await plain.content()).includes('name="citizen"'),
    `without JavaScript: admitted by the page's own refresh, onto the page asked for (${plain.url()})`
  );
  await nojs.close();

  await phone.close();

  // 8. The operator page: behind the token, live, with the last hour.
  // (A browser would now ask for a password; headless, it just fails.)
  const denied = await fetch(ADMIN + "/status");
  check(
    denied.status === 401 && (denied.headers.get("www-authenticate") || "").startsWith("Basic"),
    "without the token: 401, and the browser is asked for it"
  );
  const wrong = await fetch(ADMIN + "/status", {
    headers: { authorization: "Basic " + Buffer.from("anna:not-the-token").toString("base64") },
  });
  check(wrong.status === 401, "a wrong password: 401");
  // As a browser does once the operator typed the token as the password.
  const ops = await browser.newContext({
    viewport: { width: 1280, height: 800 },
    httpCredentials: { username: "operator", password: TOKEN },
  });
  const op = await ops.newPage();
  const external = [];
  op.on("request", (r) => {
    if (!r.url().startsWith(ADMIN)) external.push(r.url());
  });
  await op.clock.install();
  await op.goto(ADMIN + "/status");
  const card = 'section[data-room="portal"]';
  await op.waitForSelector(card);
  const field = async (f) => (await op.textContent(`${card} [data-field="${f}"]`)).trim();
  check((await field("mode")) === "queue", "the operator sees the room's mode");
  const active = await field("active_sessions");
  check(/^\d+ \/ 1$/.test(active), `active sessions against max_active (${active})`);
  check(/^\d+$/.test(await field("queue_length")), "the queue length");
  check((await field("admission_per_minute")) === "600", "the admission rate");
  check((await field("estimated_wait")).length > 0, "the estimated wait");
  check(
    (await op.textContent(`${card} li[data-upstream]`)).includes("healthy"),
    "the upstream's health"
  );
  check(
    (await op.textContent(`${card} li[data-upstream]`)).includes("(weight 2)"),
    "the upstream's weight"
  );
  const lane = await op.textContent(`${card} table[data-field="lanes"] tr[data-lane="partners"]`);
  check(lane !== null && lane.includes("0.2"), `each lane with its weight (${lane})`);
  const points = await op.getAttribute(`${card} figure[data-chart="people"] polyline[data-series="queue_length"]`, "points");
  check(points !== null && points.trim().split(" ").length >= 1, "a chart of the last hour");
  // A room without a rate (unlimited) draws no rate line at 0.
  const noRate = 'section[data-room="plain"]';
  const unlimited = await op.getAttribute(`${noRate} figure[data-chart="rate"] polyline[data-series="rate_per_minute"]`, "points");
  check(unlimited !== null && unlimited.trim() === "", `no rate line for a room without a rate (${unlimited})`);
  const legend = await op.textContent(`${noRate} figure[data-chart="rate"] .legend`);
  check(legend.includes("rate /min: unlimited"), `the legend says the rate is unlimited (${legend})`);
  // A screen reader hears when varco is reached or lost, not every
  // refresh: the rooms are no live region, and the status line changes
  // only when the connection does.
  check((await op.getAttribute("#rooms", "aria-live")) === null, "the rooms redrawn each refresh are not read out");
  await op.evaluate(() => {
    window.__said = 0;
    window.__refreshes = 0;
    const watch = (id, count) =>
      new MutationObserver(count).observe(document.getElementById(id), {
        subtree: true,
        childList: true,
        characterData: true,
        attributes: true,
      });
    watch("state", (m) => (window.__said += m.length));
    watch("updated", () => window.__refreshes++);
  });
  await until("two more refreshes", async () => {
    await op.clock.runFor(2100);
    return (await op.evaluate(() => window.__refreshes)) >= 2;
  });
  check((await op.evaluate(() => window.__said)) === 0, "refreshes while connected say nothing new");
  // Live: the room is paused through the API, and the page shows it.
  const paused = await fetch(ADMIN + "/api/rooms/portal/pause", {
    method: "POST",
    headers: { authorization: "Bearer " + TOKEN },
  });
  check(paused.status === 200, "paused through the admin API");
  await until("the page shows the pause", async () => {
    await op.clock.runFor(2500);
    return (await field("mode")) === "paused";
  });
  check(true, "the operator page updates live");
  // An upstream taken out by hand (a deploy) shows as such, not failing.
  const bearer = { authorization: "Bearer " + TOKEN };
  const state = await (await fetch(ADMIN + "/api/rooms/portal", { headers: bearer })).json();
  const upstream = state.upstreams[0].upstream;
  const taken = await fetch(`${ADMIN}/api/rooms/portal/upstreams/${upstream}/out?force=true`, {
    method: "POST",
    headers: bearer,
  });
  check(taken.status === 200, "an upstream taken out through the admin API");
  await until("the page shows it taken out", async () => {
    await op.clock.runFor(2500);
    return (await op.textContent(`${card} li[data-upstream]`)).includes("taken out");
  });
  check(true, "the operator page shows an upstream taken out by hand");
  const back = await fetch(`${ADMIN}/api/rooms/portal/upstreams/${upstream}/in`, {
    method: "POST",
    headers: bearer,
  });
  check(back.status === 200, "and put back");
  // Put back, it takes its turns gradually (health_check.slow_start).
  await until("the page shows it warming up", async () => {
    await op.clock.runFor(2500);
    return (await op.textContent(`${card} li[data-upstream]`)).includes("warming up");
  });
  check(true, "the operator page shows an upstream put back warming up");
  await op.screenshot({ path: `${ARTIFACTS}/operator-1280.png`, fullPage: true });
  check(external.length === 0, "the operator page loads nothing from elsewhere: " + external.join(", "));
  await op.addScriptTag({ content: AXE });
  const opAxe = await op.evaluate(async () =>
    (await window.axe.run(document, { resultTypes: ["violations"] })).violations
      .filter((v) => v.impact === "serious" || v.impact === "critical")
      .map((v) => v.id)
  );
  check(opAxe.length === 0, "axe-core: no serious or critical violation on the operator page " + opAxe.join(", "));
  await ops.close();

  // A browser whose pages may keep nothing in sessionStorage (an app's
  // WebView with DOM storage off): what the page remembers across a
  // reload must be kept elsewhere.
  // "named": and the portal keeps its own tab id in window.name (as
  // Vaadin does), which the page must leave alone.
  const walledOff = async (context, walled) =>
    context.addInitScript((named) => {
      Object.defineProperty(window, "sessionStorage", {
        get() {
          throw new DOMException("The operation is insecure.", "SecurityError");
        },
      });
      if (named && !window.name) window.name = "portal-tab-42";
    }, walled === "named");
  const walledHow = (walled) =>
    walled === "named" ? " (no sessionStorage, window.name the portal's)" : walled ? " (no sessionStorage)" : "";

  // 9. A page left open follows the room: the message of a pause goes
  // when admission resumes; a page from a closed room (no ticket) takes
  // its place when the room opens; a page still waiting when the gate is
  // lifted (passthrough) moves on to the portal.
  const later = await browser.newContext({ viewport: { width: 360, height: 740 }, locale: "en-GB" });
  // The portal's own key in the tab's sessionStorage, named as a method
  // the page calls on its fallback store: it must not keep the page from
  // moving on when the turn comes.
  await later.addInitScript(() => sessionStorage.setItem("done", "1"));
  const page = await later.newPage();
  await page.clock.install();
  await page.goto(VARCO + "/login");
  const message = async () => (await page.textContent("#message")).trim();
  check((await message()).includes("paused"), `a page in a paused room says so (${await message()})`);
  const api = (what) => fetch(`${ADMIN}/api/rooms/portal/${what}`, { method: "POST", headers: bearer });
  check((await api("resume")).status === 200, "admission resumed");
  await until("the page drops the pause", async () => {
    await page.clock.runFor(31000);
    return !(await message()).includes("paused") && (await page.textContent("#position")).trim() === "1";
  });
  check(true, "resumed, the open page's message is no longer the pause's");
  check((await api("close")).status === 200, "the room closed");
  // Also where the page can remember nothing across a load (it loads
  // afresh once all the same).
  const strangers = [];
  for (const walled of [false, "named"]) {
    const stranger = await browser.newContext({ viewport: { width: 360, height: 740 }, locale: "en-GB" });
    if (walled) await walledOff(stranger, walled);
    const shut = await stranger.newPage();
    await shut.clock.install();
    const closedAnswer = await shut.goto(VARCO + "/apply");
    check(closedAnswer.status() === 503, "a newcomer to a closed room gets the closed page" + walledHow(walled));
    strangers.push([stranger, shut, walledHow(walled)]);
  }
  check((await api("open")).status === 200, "the room opened");
  for (const [stranger, shut, how] of strangers) {
    await until("the closed page takes a place" + how, async () => {
      await shut.clock.runFor(31000);
      return /^\d+$/.test((await shut.textContent("#ticket")).trim());
    });
    check(true, "opened, the page left open from the closed room holds a ticket" + how);
    await stranger.close();
  }
  check((await api("passthrough")).status === 200, "the gate lifted");
  await until("the waiting page moves on to the portal", async () => {
    await page.clock.runFor(31000);
    return (await page.content()).includes("Portale Bonus");
  });
  check(true, "the gate lifted, a page still waiting moves on by itself");
  await later.close();

  // 10. A browser whose JavaScript has no fetch (Safari before 10.1, IE 11)
  // ignores the noscript refresh: its script reloads the page at each
  // poll instead, rather than stop at the first one.
  check((await api("queue_all")).status === 200, "everyone queued again");
  const old = await browser.newContext({ viewport: { width: 360, height: 740 } });
  await old.addInitScript(() => {
    window.fetch = undefined;
  });
  const oldTab = await old.newPage();
  await oldTab.clock.install();
  await oldTab.goto(VARCO + "/login");
  check((await oldTab.content()).includes('id="position"'), "without fetch: the waiting page");
  // Its error, if any, is reported here: the timers' (below) first.
  const reloaded = oldTab
    .waitForRequest((r) => r.isNavigationRequest() && new URL(r.url()).pathname === "/login")
    .catch((e) => e);
  await oldTab.clock.runFor(60000);
  const request = await reloaded;
  check(!(request instanceof Error), "without fetch: the page reloads itself at its poll, as without JavaScript");
  await old.close();

  // 11. A ticket whose cookie is gone (it ran out, or was cleared): the
  // page loads afresh once, and holds a new ticket; with sessionStorage
  // or without.
  for (const walled of [false, true]) {
    const cleared = await browser.newContext({ viewport: { width: 360, height: 740 }, locale: "en-GB" });
    if (walled) await walledOff(cleared, walled);
    // The portal's own key in sessionStorage, named as the page's flag
    // for a store of its own memory: not taken for it.
    else await cleared.addInitScript(() => sessionStorage.setItem("mem", "1"));
    const how = walledHow(walled);
    const lapsed = await cleared.newPage();
    await lapsed.clock.install();
    await lapsed.goto(VARCO + "/login");
    const firstTicket = (await lapsed.textContent("#ticket")).trim();
    check(/^\d+$/.test(firstTicket), "a ticket on the page" + how);
    await cleared.clearCookies();
    await until("the page takes a new ticket" + how, async () => {
      await lapsed.clock.runFor(5000);
      const now = (await lapsed.textContent("#ticket").catch(() => "")).trim();
      return /^\d+$/.test(now) && now !== firstTicket;
    });
    check(
      !(await lapsed.textContent("#message")).includes("cookie"),
      "a cookie gone once: a new place, not a warning" + how
    );
    await cleared.close();
  }

  // 12. A browser that keeps no cookies at all (here: every Set-Cookie is
  // taken off on the way) is told so after one fresh load, and the page
  // stops there: reloading would only take one new place after another.
  // With sessionStorage or without.
  for (const walled of [false, true, "named"]) {
    const how = walledHow(walled);
    const crumbless = await browser.newContext({ viewport: { width: 360, height: 740 }, locale: "en-GB" });
    if (walled) await walledOff(crumbless, walled);
    await crumbless.route("**/login", async (route) => {
      const asked = route.request();
      const r = await fetch(asked.url(), { headers: await asked.allHeaders(), redirect: "manual" });
      const headers = Object.fromEntries([...r.headers].filter(([k]) => k !== "set-cookie"));
      await route.fulfill({ status: r.status, headers, body: Buffer.from(await r.arrayBuffer()) });
    });
    const bare = await crumbless.newPage();
    await bare.clock.install();
    await bare.goto(VARCO + "/login");
    check(/^\d+$/.test((await bare.textContent("#ticket")).trim()), "a ticket on the page, its cookie not kept");
    let navigations = 0;
    bare.on("framenavigated", () => navigations++);
    // Polls answered, not only sent: the page decides on each answer, which
    // comes in real time, after the fake clock has run on.
    let polled = 0;
    bare.on("requestfinished", (r) => {
      if (r.url().includes("/.varco/status")) polled++;
    });
    await until("the page says the browser kept no cookie", async () => {
      await bare.clock.runFor(5000);
      return ((await bare.textContent("#message").catch(() => "")) || "").includes("cookie");
    });
    const kept = (await bare.textContent("#ticket")).trim();
    // Past the minute within which a page loads afresh at most once, and
    // two polls answered there: a page that loaded afresh again took one
    // more place, and another, a minute apart, for as long as it was open.
    await bare.clock.runFor(65000);
    for (let i = 0; i < 2; i++) {
      const before = polled;
      await until("a poll answered", async () => {
        await bare.clock.runFor(5000);
        return polled > before;
      });
    }
    // With nowhere to remember a fresh load, the page says so at once,
    // and leaves the portal's window.name as it was.
    if (walled === "named") {
      check((await bare.evaluate(() => window.name)) === "portal-tab-42", "the portal's window.name left alone");
    }
    check(
      navigations === (walled === "named" ? 0 : 1) &&
        (await bare.textContent("#ticket")).trim() === kept &&
        (await bare.textContent("#position")).trim() === "\u2013",
      `kept no cookie: the page says so after one fresh load and takes no more places (${navigations} loads)${how}`
    );
    await crumbless.close();
  }
} finally {
  await browser.close();
}
console.log("all browser checks passed");
