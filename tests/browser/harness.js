// Shared helpers for the browser tests: the Plaza server, Chromium and Firefox participants,
// bounded waits.
//
// Environment:
//   PLAZA_URL      use an already running server (e.g. http://127.0.0.1:7880); otherwise one is
//                  started from PLAZA_BIN (default: target/release/plaza) on PLAZA_PORT/PLAZA_UDP_PORT
//   CHROMIUM       browser binary (default /usr/bin/chromium)
//   FIREFOX        Firefox binary (default /usr/bin/firefox-esr), driven over WebDriver BiDi
//   ARTIFACTS      where screenshots and logs go (default target/browser)
//   TURNSERVER     coturn's turnserver binary (default /usr/bin/turnserver), for the TURN tests
//   REDIS_SERVER   redis-server binary (default: redis-server on PATH), for the cluster tests
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, createWriteStream, existsSync, readFileSync, rmSync, writeFileSync, chmodSync } from 'node:fs';
import { connect as netConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import puppeteer from 'puppeteer-core';

const here = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(here, '..', '..');
export const ARTIFACTS = resolve(process.env.ARTIFACTS ?? join(REPO, 'target', 'browser'));
export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
export const FIREFOX = process.env.FIREFOX ?? '/usr/bin/firefox-esr';
export const TURNSERVER = process.env.TURNSERVER ?? '/usr/bin/turnserver';
export const REDIS_SERVER = process.env.REDIS_SERVER ?? 'redis-server';
mkdirSync(ARTIFACTS, { recursive: true });

export const CHROMIUM_ARGS = [
  '--headless=new',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-renderer-backgrounding',
  '--disable-background-timer-throttling',
  '--disable-backgrounding-occluded-windows',
  '--allow-loopback-in-peer-connection',
  '--use-fake-device-for-media-stream',
  '--use-fake-ui-for-media-stream',
  '--autoplay-policy=no-user-gesture-required',
  // A page without camera permission hides its host candidates behind mDNS names; the
  // namespace has no multicast to register them, so it would gather nothing at all.
  '--disable-features=WebRtcHideLocalIpsWithMdns',
];

/**
 * Firefox prefs of a test participant (on top of puppeteer's own test-profile prefs).
 * Firefox gathers host candidates only for an interface with a route: in the loopback-only
 * namespace scripts/browser-tests.sh adds `ip route add default dev lo src 127.0.0.1`.
 */
export const FIREFOX_PREFS = {
  // media: the fake camera (a 30 fps colour cycle) and a tone, no permission prompt
  'media.navigator.streams.fake': true,
  'media.navigator.permission.disabled': true,
  'media.autoplay.default': 0, // allow audible autoplay without a gesture
  'media.autoplay.blocking_policy': 0,
  // WebRTC on loopback with plain host candidates (no mDNS .local names, no multicast here)
  'media.peerconnection.ice.loopback': true,
  'media.peerconnection.ice.obfuscate_host_addresses': false,
  'media.peerconnection.ice.no_host': false,
  'media.peerconnection.ice.default_address_only': false,
  'media.peerconnection.ice.proxy_only': false,
  // quiet offline: no updates, telemetry, captive portal, remote settings, safe browsing,
  // connectivity checks or speculative connections
  'app.update.enabled': false,
  'app.update.auto': false,
  'app.update.checkInstallTime': false,
  'app.normandy.enabled': false,
  'browser.shell.checkDefaultBrowser': false,
  'browser.aboutwelcome.enabled': false,
  'browser.startup.homepage_override.mstone': 'ignore',
  'browser.newtabpage.enabled': false,
  'browser.ping-centre.telemetry': false,
  'browser.safebrowsing.malware.enabled': false,
  'browser.safebrowsing.phishing.enabled': false,
  'browser.safebrowsing.downloads.enabled': false,
  'browser.safebrowsing.blockedURIs.enabled': false,
  'browser.safebrowsing.update.enabled': false,
  'browser.search.update': false,
  'datareporting.healthreport.uploadEnabled': false,
  'datareporting.policy.dataSubmissionEnabled': false,
  'toolkit.telemetry.enabled': false,
  'toolkit.telemetry.unified': false,
  'toolkit.telemetry.server': '',
  'toolkit.telemetry.archive.enabled': false,
  'network.captive-portal-service.enabled': false,
  'network.connectivity-service.enabled': false,
  'network.dns.disablePrefetch': true,
  'network.http.speculative-parallel-limit': 0,
  'network.prefetch-next': false,
  'services.settings.server': 'data:,', // remote settings: nowhere to fetch from
  'services.settings.poll_interval': 86400 * 365,
  'extensions.update.enabled': false,
  'extensions.getAddons.cache.enabled': false,
  'extensions.blocklist.enabled': false,
  'media.gmp-manager.updateEnabled': false,
  'media.gmp-gmpopenh264.enabled': false,
  'privacy.trackingprotection.enabled': false,
  'dom.ipc.processPrelaunch.enabled': false,
};

/** Poll `fn` until it returns a truthy value; throw with `what` (and the last value) on timeout. */
export async function waitFor(fn, { timeout = 20_000, interval = 100, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  let lastErr;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      lastErr = e;
    }
    if (Date.now() > deadline) {
      const detail = lastErr ? `; last error: ${lastErr.message}` : `; last value: ${JSON.stringify(last)}`;
      throw new Error(`timed out after ${timeout} ms waiting for ${what}${detail}`);
    }
    await new Promise((r) => setTimeout(r, interval));
  }
}

/**
 * Start the server (unless PLAZA_URL is set and no `args`/`env` are asked for), its log in
 * ARTIFACTS/`logName`. `args` are appended to the command line, `env` added to the
 * environment; `port`/`udpPort` default to PLAZA_PORT/PLAZA_UDP_PORT (7880/7882); `host` (default
 * 127.0.0.1) is where it serves HTTP and media (`--bind`, `--udp-bind`: another address of
 * 127.0.0.0/8 is another host on `lo`).
 * Returns {url, logPath, port, udpPort, stop(), kill()} (`kill`: SIGKILL, resolves once it exited).
 */
export async function startServer({ logName = 'plaza.log', args = [], env = {}, port = null, udpPort = null, host = null } = {}) {
  const custom = args.length > 0 || Object.keys(env).length > 0;
  if (process.env.PLAZA_URL && !custom) return { url: process.env.PLAZA_URL.replace(/\/$/, ''), stop: async () => {}, log: null };
  const bin = process.env.PLAZA_BIN ?? join(REPO, 'target', 'release', 'plaza');
  if (!existsSync(bin)) throw new Error(`server binary ${bin} is missing: run cargo build --release --bin plaza`);
  port ??= Number(process.env.PLAZA_PORT ?? 7880);
  udpPort ??= Number(process.env.PLAZA_UDP_PORT ?? 7882);
  const logPath = join(ARTIFACTS, logName);
  const log = createWriteStream(logPath);
  const bind = host ? ['--bind', host, '--udp-bind', host] : [];
  const argv = ['--port', String(port), '--udp-port', String(udpPort), '--log-level', process.env.PLAZA_LOG_LEVEL ?? 'info', ...bind, ...args];
  const child = spawn(bin, argv, {
    cwd: REPO,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  child.stdout.pipe(log);
  child.stderr.pipe(log);
  let exited = null;
  child.on('exit', (code, signal) => (exited = { code, signal }));
  const url = `http://${host ?? '127.0.0.1'}:${port}`;
  await waitFor(
    async () => {
      if (exited) throw new Error(`plaza exited early (${JSON.stringify(exited)}); see ${logPath}`);
      const r = await fetch(`${url}/healthz`);
      return r.ok;
    },
    { timeout: 15_000, what: `plaza to answer ${url}/healthz` },
  ).catch((e) => {
    child.kill('SIGKILL');
    throw e;
  });
  return {
    url,
    logPath,
    port,
    udpPort,
    async stop() {
      if (exited) return;
      child.kill('SIGTERM');
      await waitFor(() => exited, { timeout: 8_000, what: 'plaza to exit' }).catch(() => child.kill('SIGKILL'));
    },
    async kill() {
      if (exited) return;
      child.kill('SIGKILL');
      await waitFor(() => exited, { timeout: 5_000, interval: 10, what: 'plaza to die' });
    },
  };
}

/**
 * Watch a helper process started by a test (redis-server, turnserver): `exited()` is how it
 * ended (null while it runs; {error} when it could not start), `stop()` ends it (SIGTERM, then
 * SIGKILL after 5 s) and removes its scratch directory `dir`.
 */
function supervise(child, what, dir) {
  let exited = null;
  child.on('exit', (code, signal) => (exited = { code, signal }));
  child.on('error', (e) => (exited = { error: e.message }));
  const stop = async () => {
    if (!exited) {
      child.kill('SIGTERM');
      await waitFor(() => exited, { timeout: 5_000, what: `${what} to exit` }).catch(() => child.kill('SIGKILL'));
    }
    rmSync(dir, { recursive: true, force: true });
  };
  return { exited: () => exited, stop };
}

/**
 * Start a `redis-server` on 127.0.0.1:`port` without persistence (`--save '' --appendonly no`),
 * its log in ARTIFACTS/`logName`, and wait until it answers PING. Throws when redis-server is
 * missing (scripts/test.sh installs Debian's redis-server). Returns {url, port, logPath, stop()}.
 */
export async function startRedis({ port, logName = 'redis.log' } = {}) {
  if (!port) throw new Error('startRedis: a port is needed');
  const found = REDIS_SERVER.includes('/')
    ? existsSync(REDIS_SERVER)
    : (process.env.PATH ?? '').split(':').some((d) => d && existsSync(join(d, REDIS_SERVER)));
  if (!found) throw new Error(`${REDIS_SERVER} is missing (apt-get install redis-server; scripts/test.sh does)`);
  const logPath = join(ARTIFACTS, logName);
  const log = createWriteStream(logPath);
  const dir = mkdtempSync(join(tmpdir(), 'plaza-redis-'));
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir];
  const child = spawn(REDIS_SERVER, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.pipe(log);
  child.stderr.pipe(log);
  const { exited, stop } = supervise(child, 'redis-server', dir);
  const ping = () =>
    new Promise((resolve) => {
      const s = netConnect({ host: '127.0.0.1', port }, () => s.write('PING\r\n'));
      s.setTimeout(500, () => s.destroy());
      s.on('data', (d) => {
        s.destroy();
        resolve(d.toString().startsWith('+PONG'));
      });
      s.on('error', () => resolve(false));
      s.on('close', () => resolve(false));
    });
  await waitFor(
    async () => {
      if (exited()) {
        const why = exited().error ? `${REDIS_SERVER}: ${exited().error} (apt-get install redis-server; scripts/test.sh does)` : JSON.stringify(exited());
        throw new Error(`redis-server exited early (${why}); see ${logPath}`);
      }
      return ping();
    },
    { timeout: 10_000, interval: 50, what: `redis-server to answer PING on 127.0.0.1:${port}` },
  ).catch(async (e) => {
    await stop();
    throw e;
  });
  /** One command (its arguments as strings); resolves to the first line of the reply. */
  const command = (...argv) =>
    new Promise((resolve, reject) => {
      const req = `*${argv.length}\r\n` + argv.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('');
      const s = netConnect({ host: '127.0.0.1', port }, () => s.write(req));
      s.setTimeout(2000, () => s.destroy(new Error('redis-server did not answer in 2 s')));
      s.on('data', (d) => {
        s.destroy();
        resolve(d.toString().split('\r\n')[0]);
      });
      s.on('error', reject);
    });
  return { url: `redis://127.0.0.1:${port}/`, port, logPath, stop, command };
}

/**
 * Start coturn's `turnserver` as a TURN server with the REST API credentials Plaza hands out
 * (`use-auth-secret`, `static-auth-secret`), listening on `ip`:`port` UDP and TCP, relaying
 * from `ip` ports `minPort`…`maxPort`, without TLS/DTLS, loopback peers allowed (everything
 * here is on loopback). Verbose log in ARTIFACTS/`logName`. Throws when turnserver is missing
 * (scripts/browser-tests.sh installs Debian's coturn). Returns {urls, secret, logPath,
 * log(), allocations(user), stop()}.
 */
export async function startTurnServer({
  secret,
  ip = '127.0.0.2',
  port = 3478,
  minPort = 49160,
  maxPort = 49260,
  realm = 'plaza.test',
  logName = 'coturn.log',
} = {}) {
  if (!secret) throw new Error('startTurnServer: a secret is needed');
  if (!existsSync(TURNSERVER)) throw new Error(`${TURNSERVER} is missing (apt-get install coturn; scripts/browser-tests.sh does)`);
  const logPath = join(ARTIFACTS, logName);
  const log = createWriteStream(logPath);
  const dir = mkdtempSync(join(tmpdir(), 'plaza-coturn-'));
  const args = [
    '-n', // no config file: everything is on the command line
    `--listening-ip=${ip}`,
    `--relay-ip=${ip}`,
    `--listening-port=${port}`,
    `--min-port=${minPort}`,
    `--max-port=${maxPort}`,
    '--use-auth-secret',
    `--static-auth-secret=${secret}`,
    `--realm=${realm}`,
    '--fingerprint',
    '--no-tls',
    '--no-dtls',
    '--allow-loopback-peers',
    '--no-cli',
    '--no-software-attribute',
    '--verbose',
    '--log-file=stdout',
    '--simple-log',
    `--userdb=${join(dir, 'turndb')}`,
    `--pidfile=${join(dir, 'turnserver.pid')}`,
  ];
  const child = spawn(TURNSERVER, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let text = '';
  const onData = (d) => {
    text += d.toString();
    log.write(d);
  };
  child.stdout.on('data', onData);
  child.stderr.on('data', onData);
  const { exited, stop } = supervise(child, 'turnserver', dir);
  await waitFor(
    () => {
      if (exited()) throw new Error(`turnserver exited early (${JSON.stringify(exited())}); see ${logPath}`);
      return /UDP listener opened on\s*:?\s*\S*:\d+/.test(text) && /TCP listener opened on/.test(text) && /Total General servers/.test(text);
    },
    { timeout: 15_000, what: `turnserver to listen on ${ip}:${port}` },
  ).catch(async (e) => {
    await stop();
    throw e;
  });
  return {
    urls: [`turn:${ip}:${port}?transport=udp`, `turn:${ip}:${port}?transport=tcp`],
    secret,
    logPath,
    log: () => text,
    /** Successful TURN allocations whose REST API username ends in `:<user>` (coturn's verbose log). */
    allocations(user) {
      return text
        .split('\n')
        .filter((l) => /ALLOCATE processed, success/.test(l) && l.includes(`:${user}>`));
    },
    stop,
  };
}

/** Whether this process runs in a network namespace with only loopback (as the tests should). */
export function loopbackOnly() {
  try {
    const ifaces = readFileSync('/proc/net/dev', 'utf8')
      .split('\n')
      .slice(2)
      .map((l) => l.split(':')[0].trim())
      .filter(Boolean);
    return ifaces.every((i) => i === 'lo');
  } catch {
    return false;
  }
}

/**
 * One participant: its own Chromium process (fresh profile) and one page.
 * `extraArgs` are appended to CHROMIUM_ARGS; `dropFakeUi` leaves out the flag that accepts
 * the camera prompt (so `--deny-permission-prompts` can refuse it).
 */
export async function launchParticipant(label, { extraArgs = [], dropFakeUi = false, viewport = { width: 1280, height: 800 }, executablePath = CHROMIUM } = {}) {
  const base = dropFakeUi ? CHROMIUM_ARGS.filter((a) => a !== '--use-fake-ui-for-media-stream') : CHROMIUM_ARGS;
  const browser = await chromium.launch({ executablePath, headless: true, args: [...base, ...extraArgs] });
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(`[${label}] ${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`[${label}] pageerror: ${e.message}`));
  return {
    label,
    browser,
    page,
    logs,
    async close() {
      await browser.close().catch(() => {});
    },
  };
}

/**
 * Puppeteer's page with the few Playwright page methods the tests use (fill, press,
 * selectOption, textContent, isVisible, addInitScript), so the helpers below work with either browser.
 */
function playwrightLike(page) {
  const extra = {
    fill: (sel, value) => page.locator(sel).fill(value),
    press: async (sel, key) => {
      const el = await page.waitForSelector(sel, { timeout: 10_000 });
      await el.press(key);
    },
    selectOption: (sel, value) => page.select(sel, value),
    textContent: (sel) => page.$eval(sel, (e) => e.textContent),
    isVisible: async (sel) => (await page.$(sel))?.isVisible() ?? false,
    addInitScript: (fn) => page.evaluateOnNewDocument(fn),
  };
  return new Proxy(page, {
    get(target, key) {
      if (Object.hasOwn(extra, key)) return extra[key];
      const v = Reflect.get(target, key);
      return typeof v === 'function' ? v.bind(target) : v;
    },
  });
}

/**
 * One Firefox participant: its own Firefox process (fresh profile, FIREFOX_PREFS plus `prefs`)
 * driven over WebDriver BiDi, and one page. Same shape as launchParticipant's.
 */
export async function launchFirefoxParticipant(label, { prefs = {}, viewport = { width: 1280, height: 800 } } = {}) {
  if (!existsSync(FIREFOX)) throw new Error(`${FIREFOX} is missing (apt-get install firefox-esr)`);
  const browser = await puppeteer.launch({
    browser: 'firefox',
    executablePath: FIREFOX,
    headless: true,
    defaultViewport: viewport,
    extraPrefsFirefox: { ...FIREFOX_PREFS, ...prefs },
    timeout: 30_000,
    protocolTimeout: 60_000,
  });
  try {
    const raw = (await browser.pages())[0] ?? (await browser.newPage());
    const logs = [];
    raw.on('console', (m) => logs.push(`[${label}] ${m.type()}: ${m.text()}`));
    raw.on('pageerror', (e) => logs.push(`[${label}] pageerror: ${e.message}`));
    return {
      label,
      browser,
      page: playwrightLike(raw),
      logs,
      firefox: true,
      async close() {
        await browser.close().catch(() => browser.process()?.kill('SIGKILL'));
      },
    };
  } catch (e) {
    await browser.close().catch(() => browser.process()?.kill('SIGKILL'));
    throw e;
  }
}

/** Open the demo and join through the form (type room and name, click Join). */
export async function joinViaForm(p, base, room, name) {
  await p.page.goto(`${base}/`);
  await p.page.fill('#room', room);
  await p.page.fill('#name', name);
  await p.page.click('#join');
  await p.page.waitForSelector('#call:not([hidden])', { timeout: 15_000 });
}

/** Open `/?room=..&name=..&extra` (joins at once) and wait until joined. */
export async function joinViaUrl(p, base, room, name, extra = '') {
  await p.page.goto(`${base}/?room=${encodeURIComponent(room)}&name=${encodeURIComponent(name)}${extra}`);
  await p.page.waitForSelector('#call:not([hidden])', { timeout: 15_000 });
}

/** Stats of every remote track of the page's client, with the publisher's name. */
export function remoteStats(p) {
  return p.page.evaluate(async () => {
    const c = window.plaza.client;
    if (!c) return [];
    const out = [];
    for (const [id, rt] of c.remoteTracks) {
      const s = await c.getTrackStats(id);
      out.push({ id, participantId: rt.participantId, name: c.participants.get(rt.participantId)?.name ?? null, kind: rt.kind, ...(s ?? {}) });
    }
    return out;
  });
}

/** Names shown in the page's grid (remote tiles only). */
export function gridNames(p) {
  return p.page.$$eval('#grid .tile:not(.local) .name', (els) => els.map((e) => e.textContent));
}

/**
 * Wait until `p` decodes video and receives audio from the participant called `name`, with
 * frames and samples still growing. Returns the last video stats.
 */
export async function waitForMediaFrom(p, name, { timeout = 25_000 } = {}) {
  const pick = async () => {
    const all = await remoteStats(p);
    return { v: all.find((s) => s.name === name && s.kind === 'video'), a: all.find((s) => s.name === name && s.kind === 'audio') };
  };
  const first = await waitFor(
    async () => {
      const { v, a } = await pick();
      return v?.framesDecoded > 0 && v.frameWidth > 0 && a?.packetsReceived > 0 ? { v, a } : null;
    },
    { timeout, what: `${p.label} to decode video and receive audio from ${name}` },
  );
  // growing: more frames and more audio than at the first sighting
  return waitFor(
    async () => {
      const { v, a } = await pick();
      const ok =
        v.framesDecoded >= first.v.framesDecoded + 10 &&
        v.frameWidth > 0 &&
        a.packetsReceived >= first.a.packetsReceived + 25 &&
        a.totalSamplesReceived > first.a.totalSamplesReceived;
      return ok ? { v, a } : null;
    },
    { timeout: 10_000, what: `${p.label}'s video and audio from ${name} to keep flowing` },
  );
}

/** Width of the video `p` decodes from `name` right now (0 if none). */
export async function decodedWidth(p, name) {
  const all = await remoteStats(p);
  return all.find((s) => s.name === name && s.kind === 'video')?.frameWidth ?? 0;
}

/** Lines of the demo page's chat log in `p`. */
export const chatLines = (p) => p.page.$$eval('#chat-log li', (els) => els.map((e) => e.textContent));

/** Send `text` from the demo page's chat box in `p`. */
export async function sendChat(p, text) {
  await p.page.waitForSelector('#chat-input:not([disabled])', { timeout: 10_000 });
  await p.page.fill('#chat-input', text);
  await p.page.press('#chat-input', 'Enter');
}

/** Wait until `p`'s chat log shows `text`, on a line that starts with the sender `from`. */
export async function waitForChat(p, from, text) {
  const line = await waitFor(async () => (await chatLines(p)).find((l) => l.includes(text)), {
    timeout: 10_000,
    what: `${p.label} to show the chat message "${text}"`,
  });
  if (!line.startsWith(from)) throw new Error(`${p.label}: the chat line ${JSON.stringify(line)} does not start with ${from}`);
}

export function percentile(values, q) {
  const s = [...values].sort((a, b) => a - b);
  if (!s.length) return NaN;
  const i = Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1));
  return s[i];
}

/**
 * Page init script: every RTCPeerConnection the page creates records in `window.__ice` when
 * it was created and when its ICE connection state first became 'checking' and 'connected'
 * (performance.now() ms), and whether it sends media ('publisher') or not ('subscriber').
 */
export function recordIceTimes() {
  const Real = window.RTCPeerConnection;
  window.__ice = [];
  window.RTCPeerConnection = class extends Real {
    constructor(...args) {
      super(...args);
      const rec = { created: performance.now(), checking: null, connected: null, role: null };
      window.__ice.push(rec);
      this.addEventListener('iceconnectionstatechange', () => {
        const s = this.iceConnectionState === 'completed' ? 'connected' : this.iceConnectionState;
        if ((s === 'checking' || s === 'connected') && rec[s] === null) rec[s] = performance.now();
        if (s === 'connected' && rec.role === null) rec.role = this.getSenders().some((x) => x.track) ? 'publisher' : 'subscriber';
      });
    }
  };
}

let nextQueue = 7100;

/**
 * A lossy, slow link for one local UDP port (a browser's ICE candidate): every packet to it
 * (`downlink`) and, unless `uplink: false`, every packet from it is dropped with probability
 * `loss` and the others are delayed by `delayMs` — what `tc qdisc … netem loss 10% delay 100ms`
 * would do on that flow. Done in user space (tests/browser/impair.py behind iptables NFQUEUE
 * rules on OUTPUT), so it needs only iptables and nfnetlink_queue, not the netem qdisc, which
 * not every kernel has. Run inside the loopback-only namespace: the rules match every local
 * flow on that port. Throws when the impairer or a rule cannot be set up (never skips).
 * Returns {stats() → {downlink, uplink} counters ({seen, dropped, accepted}), lift() → final
 * counters: removes the rules, then releases what the impairer still holds}.
 */
export async function impairUdp(port, { loss = 0.1, delayMs = 100, uplink = true, seed = null } = {}) {
  const queues = { downlink: nextQueue++, ...(uplink ? { uplink: nextQueue++ } : {}) };
  const rules = [['OUTPUT', '-p', 'udp', '--dport', String(port), '-j', 'NFQUEUE', '--queue-num', String(queues.downlink)]];
  if (uplink) rules.push(['OUTPUT', '-p', 'udp', '--sport', String(port), '-j', 'NFQUEUE', '--queue-num', String(queues.uplink)]);
  const args = [join(here, 'impair.py'), '--loss', String(loss), '--delay-ms', String(delayMs), ...Object.values(queues).flatMap((q) => ['--queue', String(q)])];
  if (seed !== null) args.push('--seed', String(seed));
  const child = spawn('python3', args, { stdio: ['pipe', 'pipe', 'pipe'] });
  const counters = {};
  let out = '';
  let err = '';
  let ready = false;
  let exited = null;
  child.stdout.on('data', (d) => {
    out += d.toString();
    let nl;
    while ((nl = out.indexOf('\n')) >= 0) {
      const line = out.slice(0, nl).trim();
      out = out.slice(nl + 1);
      if (line === 'ready') ready = true;
      else if (line.startsWith('{')) {
        const s = JSON.parse(line);
        if (s.queue !== undefined) counters[s.queue] = s;
      }
    }
  });
  child.stderr.on('data', (d) => (err += d.toString()));
  child.on('close', (code, signal) => (exited = { code, signal })); // after stdout's last line
  child.on('error', (e) => (exited = { error: e.message }));
  const byDirection = () => Object.fromEntries(Object.entries(queues).map(([dir, q]) => [dir, counters[q] ?? { seen: 0, dropped: 0, accepted: 0 }]));
  let installed = null;
  const stop = async () => {
    installed?.remove();
    installed = null;
    if (!exited) {
      child.stdin.end();
      await waitFor(() => exited, { timeout: 5_000, what: 'impair.py to exit' }).catch(() => child.kill('SIGKILL'));
    }
  };
  try {
    await waitFor(
      () => {
        if (exited) throw new Error(`impair.py exited (${JSON.stringify(exited)}): ${err.trim()}`);
        return ready;
      },
      { timeout: 10_000, what: 'impair.py to bind its NFQUEUE queues' },
    );
    installed = iptablesRules(rules);
  } catch (e) {
    await stop();
    throw e;
  }
  return {
    queues,
    stats: byDirection,
    async lift() {
      await stop();
      if (exited?.code !== 0 && exited?.signal !== 'SIGTERM') throw new Error(`impair.py failed (${JSON.stringify(exited)}): ${err.trim()}`);
      return byDirection();
    },
  };
}

/**
 * Insert iptables rules (each `[chain, …match, '-j', target]`) at the top of their chains.
 * Throws (the test fails) when iptables is missing or refuses one: never skipped. Returns
 * {remove()}, which deletes them again (warning, not throwing, if one is already gone).
 */
export function iptablesRules(rules) {
  const added = [];
  const remove = () => {
    for (const rule of added.splice(0).reverse()) {
      try {
        execFileSync('iptables', ['-D', ...rule], { timeout: 10_000 });
      } catch (e) {
        console.warn(`warning: could not remove iptables rule ${rule.join(' ')}: ${e.message}`);
      }
    }
  };
  try {
    for (const rule of rules) {
      execFileSync('iptables', ['-I', ...rule], { encoding: 'utf8', timeout: 10_000 });
      added.push(rule);
    }
  } catch (e) {
    remove();
    throw e;
  }
  return { rules, remove };
}

/**
 * Drop UDP to and from Plaza's media ports `udpPort`…`udpPort + 255` (every shard's), as a
 * firewall that blocks UDP would: only ICE-TCP (or a relay) still connects. Returns {remove()}.
 */
export function blockUdpToPlaza(udpPort) {
  const range = `${udpPort}:${udpPort + 255}`;
  return iptablesRules([
    ['OUTPUT', '-p', 'udp', '--dport', range, '-j', 'DROP'],
    ['OUTPUT', '-p', 'udp', '--sport', range, '-j', 'DROP'],
  ]);
}

/**
 * Open the server's page in `p` and join `room` as `name` with the module client (not the
 * demo UI; no reconnect), optionally relay only and publishing camera + microphone. The
 * client is window.__client. Returns {t0 (page ms just before connect()), participantId,
 * iceServers}.
 */
export async function joinWithClient(p, base, { room, name, forceRelay = false, publish = false, options = {} }) {
  await p.page.goto(`${base}/`);
  return p.page.evaluate(
    async ({ room, name, forceRelay, publish, options }) => {
      const { PlazaClient } = await import('/plaza-client.js');
      const t0 = performance.now();
      const c = new PlazaClient({ room, name, forceRelay, reconnect: false, ...options });
      window.__client = c;
      const joined = await c.connect();
      if (publish) await c.publish({ video: true, audio: true });
      return { t0, participantId: c.participantId, iceServers: joined.ice_servers ?? null };
    },
    { room, name, forceRelay, publish, options },
  );
}

/**
 * Page time (ms) when window.__client first decoded a remote video frame; polls getStats
 * every 20 ms, up to `timeout` ms; null when none was decoded by then.
 */
export function firstDecodedFrameAt(p, { timeout = 20_000 } = {}) {
  return p.page.evaluate(async (timeout) => {
    const c = window.__client;
    const deadline = performance.now() + timeout;
    while (performance.now() < deadline) {
      for (const [id, rt] of c.remoteTracks) {
        if (rt.kind !== 'video') continue;
        const s = await c.getTrackStats(id);
        if (s?.framesDecoded > 0) return performance.now();
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    return null;
  }, timeout);
}

/**
 * A network namespace of its own for one Chromium ("the mover"), joined to the test namespace
 * by a veth pair: the test side is `hostIp`/24, the mover gets `first`/24 and a default route
 * to `hostIp`. `moveTo(ip)` swaps its address (a network change under a running browser: its
 * sockets lose their address, its WebSocket dies silently). `executablePath` runs Chromium
 * inside it (Playwright talks to it over a pipe). Needs root and `ip` (iproute2); throws when
 * something cannot be set up. `remove()` deletes the link, the namespace and the wrapper.
 */
export function moverNamespace({ hostIp = '10.20.0.1', first = '10.20.0.2', tag = String(process.pid) } = {}) {
  const ns = `plaza-move-${tag}`;
  const hostIf = `pzh${Number(tag) % 10000}`;
  const moverIf = `pzm${Number(tag) % 10000}`;
  const sh = (...args) => execFileSync('ip', args, { encoding: 'utf8', timeout: 10_000 });
  const inNs = (...args) => sh('netns', 'exec', ns, 'ip', ...args);
  let current = null;
  const moveTo = (ip) => {
    if (current) inNs('addr', 'del', `${current}/24`, 'dev', moverIf);
    inNs('addr', 'add', `${ip}/24`, 'dev', moverIf);
    inNs('route', 'replace', 'default', 'via', hostIp);
    current = ip;
  };
  const dir = mkdtempSync(join(tmpdir(), 'plaza-mover-'));
  const remove = () => {
    for (const args of [['link', 'del', hostIf], ['netns', 'del', ns]]) {
      try {
        sh(...args);
      } catch {}
    }
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    sh('netns', 'add', ns);
    sh('link', 'add', hostIf, 'type', 'veth', 'peer', 'name', moverIf);
    sh('link', 'set', moverIf, 'netns', ns);
    sh('addr', 'add', `${hostIp}/24`, 'dev', hostIf);
    sh('link', 'set', hostIf, 'up');
    inNs('link', 'set', 'lo', 'up');
    inNs('link', 'set', moverIf, 'up');
    moveTo(first);
  } catch (e) {
    remove();
    throw e;
  }
  const executablePath = join(dir, 'chromium-in-netns');
  writeFileSync(executablePath, `#!/bin/sh\nexec ip netns exec ${ns} ${CHROMIUM} "$@"\n`);
  chmodSync(executablePath, 0o755);
  return { hostIp, executablePath, moveTo, address: () => current, remove };
}


/**
 * Open the WHEP player `/watch?…` in `p` (`query`: its URL parameters, e.g. {room}); resolves
 * once the page's `window.watch` exists.
 */
export async function openWatch(p, base, query) {
  await p.page.goto(`${base}/watch?${new URLSearchParams(query)}`);
  await waitFor(() => p.page.evaluate(() => !!window.watch), { timeout: 10_000, what: `${p.label}'s player page to start` });
}

/** The WHEP player's state in `p`: `window.watch` (without its peer connection) and the video's data attributes. */
export function watchState(p) {
  return p.page.evaluate(() => {
    const w = window.watch;
    const { pc, restartIce, stop, ...rest } = w;
    return {
      ...JSON.parse(JSON.stringify(rest)),
      remoteUfrag: pc?.currentRemoteDescription?.sdp.match(/a=ice-ufrag:(\S+)/)?.[1] ?? null,
      statusShown: document.querySelector('#status').textContent,
      layerShown: document.querySelector('#layer').textContent,
      data: { ...document.querySelector('#video').dataset },
    };
  });
}

/**
 * Wait until the player in `p` plays video (state `playing`, frames decoded, width > 0), then
 * until `grow` more frames are decoded. Returns the last state; a timeout says what the page shows.
 */
export async function waitForWatchPlaying(p, { timeout = 25_000, grow = 10 } = {}) {
  let last = null;
  const explain = (e) => {
    throw new Error(`${e.message}; the player shows ${JSON.stringify(last)}`);
  };
  const first = await waitFor(
    async () => {
      last = await watchState(p);
      return last.state === 'playing' && last.framesDecoded > 0 && last.frameWidth > 0 ? last : null;
    },
    { timeout, what: `${p.label}'s player to play video` },
  ).catch(explain);
  return waitFor(
    async () => {
      last = await watchState(p);
      return last.framesDecoded >= first.framesDecoded + grow && last.frameWidth > 0 ? last : null;
    },
    { timeout: 10_000, what: `${p.label}'s player to keep decoding` },
  ).catch(explain);
}

/** Throws unless this process runs in a loopback-only network namespace (for tests that change iptables rules). */
export function requireLoopbackOnly() {
  if (!loopbackOnly()) throw new Error('run in a loopback-only network namespace (scripts/browser-tests.sh): this test changes iptables rules');
}

/**
 * The participants of one test file: launch(label, opts) launches one (launchParticipant),
 * launchFirefox(label, opts) a Firefox one; closeAll() closes them all (printing their browser logs with SHOW_BROWSER_LOGS).
 */
export function participants() {
  const open = new Set();
  const kept = async (launching) => {
    const p = await launching;
    open.add(p);
    return p;
  };
  return {
    launch: (label, opts) => kept(launchParticipant(label, opts)),
    /** A Firefox participant (launchFirefoxParticipant). */
    launchFirefox: (label, opts) => kept(launchFirefoxParticipant(label, opts)),
    async closeAll() {
      for (const p of open) {
        if (process.env.SHOW_BROWSER_LOGS) console.log(p.logs.join('\n'));
        await p.close();
      }
      open.clear();
    },
  };
}

/** The selected candidate pairs of the page's client (window.__client, or the demo UI's window.plaza.client). */
export function selectedCandidatePairs(p) {
  return p.page.evaluate(() => (window.__client ?? window.plaza.client).getSelectedCandidatePairs());
}

/** The page's clock (performance.now(), ms). */
export function pageNow(p) {
  return p.page.evaluate(() => performance.now());
}

/** The samples a page collected in window.__samples ({t (page ms), …}) at or after page time `t`. */
export function samplesSince(p, t) {
  return p.page.evaluate((t) => window.__samples.filter((s) => s.t >= t), t);
}

/**
 * Impairs the UDP flows of `ports` (impairUdp with `opts`) while `during()` runs, then lifts
 * them all (also when it throws). Returns {result (of during), counters (each port's final
 * counters, in order)}.
 */
export async function whileImpaired(ports, opts, during) {
  const links = [];
  const counters = [];
  let result;
  try {
    for (const port of ports) links.push(await impairUdp(port, opts));
    result = await during();
  } finally {
    for (const l of links) counters.push(await l.lift());
  }
  return { result, counters };
}

/** A development token for `room` and `name` from the server at `base` (`GET /dev/token`). */
export async function devToken(base, room, name) {
  const r = await fetch(`${base}/dev/token?room=${room}&name=${name}`);
  if (!r.ok) throw new Error(`GET /dev/token on ${base}: ${r.status}`);
  return (await r.json()).token;
}

/**
 * Frames a plaza-client in `p`'s page decoded from `name`'s video so far (0 when it receives
 * none). The client is `window.__clients[key]`, or `window.__client` without a key.
 */
export function clientFramesFrom(p, name, key = null) {
  return p.page.evaluate(
    async ({ key, name }) => {
      const c = key == null ? window.__client : window.__clients[key];
      for (const [id, rt] of c.remoteTracks) {
        if (rt.kind !== 'video' || c.participants.get(rt.participantId)?.name !== name) continue;
        const s = await c.getTrackStats(id);
        return s?.framesDecoded ?? 0;
      }
      return 0;
    },
    { key, name },
  );
}

/** Wait until that client decodes `name`'s video, and `more` frames after that. */
export async function waitForClientVideo(p, name, { key = null, timeout = 25_000, more = 10, moreTimeout = 10_000 } = {}) {
  const who = key == null ? p.label : `${p.label}/${key}`;
  const first = await waitFor(async () => (await clientFramesFrom(p, name, key)) || null, { timeout, what: `${who} to decode ${name}'s video` });
  await waitFor(async () => (await clientFramesFrom(p, name, key)) >= first + more, { timeout: moreTimeout, what: `${who}: ${name}'s video to keep flowing` });
}
