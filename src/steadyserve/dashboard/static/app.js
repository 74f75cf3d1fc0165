// The steadyserve dashboard: polls /v1/dashboard every 2 s, draws rates and latency
// percentiles from the difference of two snapshots (uPlot), and tables of replicas (actual
// against target, requests outstanding, why each last exited or is ejected), batch sizes,
// rollouts, scaling decisions, asynchronous jobs, alerts and automatic actions. It opens on
// the gateway's own history (3 h, 1 d or 3 d: throughput, 5xx and latency, restored after a
// gateway restart). Its buttons (silence an alert,
// restart a deployment's replicas, cancel a rollout) call the admin API with the key the page
// holds; without an admin key they ask for one and do nothing else.
"use strict";

const POLL_MS = 2000;
const HISTORY_MIN = 180;  // the window the page opens on; the range buttons change it
const SILENCE_S = 3600;
const DATA_KEY_NEEDED = "This gateway needs an API key to show its data:";
const ADMIN_KEY_NEEDED = "an admin key is needed for this action";
const state = { key: sessionStorage.getItem("steadyserve-key") || "", prev: null, polls: 0,
                points: 0, charts: {}, series: {}, html: new WeakMap(), range: HISTORY_MIN };
window.__steadyserve = state;  // for tests and the curious

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;",
                                               '"': "&quot;", "'": "&#39;" })[c]);
}

// rows are rebuilt only when they change: a button under the pointer stays the same element
function setHTML(el, html) {
  if (state.html.get(el) === html) return;
  state.html.set(el, html);
  el.innerHTML = html;
}

function askKey(message) {
  document.getElementById("keymsg").textContent = message;
  document.getElementById("keyform").hidden = false;
  document.getElementById("key").focus();
}

function say(text, failed) {
  const line = document.getElementById("action-status");
  line.textContent = text;
  line.className = failed ? "down" : "";
}

async function fetchData(history) {
  const headers = state.key ? { authorization: "Bearer " + state.key } : {};
  const r = await fetch("/v1/dashboard" + (history ? "?history=" + state.range : ""),
                        { headers });
  if (r.status === 401 || r.status === 403) {
    askKey(DATA_KEY_NEEDED);
    throw new Error("an API key is needed");
  }
  if (!r.ok) throw new Error("HTTP " + r.status);
  return r.json();
}

function quantile(deltas, q) {
  const bounds = Object.keys(deltas).map(le => [le === "+Inf" ? Infinity : Number(le), deltas[le]])
    .sort((a, b) => a[0] - b[0]);
  if (!bounds.length) return null;
  const total = bounds[bounds.length - 1][1];
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0, below = 0;
  for (const [le, count] of bounds) {
    if (count >= rank) {
      if (le === Infinity) return lower;
      const inside = count - below;
      return lower + (le - lower) * (inside ? (rank - below) / inside : 0);
    }
    lower = le; below = count;
  }
  return lower;
}

function sum(obj) { return Object.values(obj || {}).reduce((a, b) => a + b, 0); }

function seriesFor(name) {
  if (!state.series[name]) state.series[name] = { t: [], rps: [], err: [], p50: [], p95: [], p99: [] };
  return state.series[name];
}

function push(name, t, rps, err, p50, p95, p99) {
  const s = seriesFor(name);
  s.t.push(t); s.rps.push(rps); s.err.push(err); s.p50.push(p50); s.p95.push(p95); s.p99.push(p99);
  while (s.t.length && s.t[0] < t - state.range * 60) for (const k in s) s[k].shift();
  state.points += 1;
}

function chart(el, title, labels, colors, unit) {
  const series = [{}].concat(labels.map((label, i) => ({ label, stroke: colors[i], width: 1.5,
    value: (u, v) => v == null ? "-" : v.toFixed(unit === "ms" ? 1 : 2) + " " + unit })));
  return new uPlot({ title, width: 520, height: 220, series,
                     axes: [{}, { label: unit }], scales: { x: { time: true, auto: false } } },
                   [[]].concat(labels.map(() => [])), el);
}

function ensureDeployment(d) {
  let box = document.getElementById("d-" + d.name);
  if (box) return box;
  box = document.createElement("section");
  box.className = "deployment";
  box.id = "d-" + d.name;
  box.innerHTML = `<h2>${esc(d.name)}</h2><div class="facts"></div>
    <div class="controls"><span class="rollout"></span>
    <button type="button" class="restart" data-action="restart">Restart replicas</button>
    <button type="button" class="cancel" data-action="cancel" hidden>Cancel rollout</button></div>
    <div class="canary" hidden><h3>Canary</h3><p class="canary-line"></p>
    <button type="button" class="abort" data-action="abort-canary" hidden>Abort canary</button>
    <table class="canary-checks"><thead><tr><th>metric</th><th>verdict</th><th>evidence</th>
    </tr></thead><tbody></tbody></table><ul class="canary-history"></ul></div>
    <div class="charts"></div>
    <h3>Replicas <small class="counts"></small></h3><table class="replicas"><thead><tr>
    <th>replica</th><th>state</th><th>revision</th><th>pid</th><th>outstanding</th>
    <th>restarts</th><th>last exit</th><th>ready for</th><th>ejected</th></tr></thead>
    <tbody></tbody></table>
    <div class="batch-section" hidden><h3>Batch sizes <small>(since the replicas started)</small></h3>
    <table class="batches"><thead></thead><tbody></tbody></table></div>
    <h3>Scaling decisions</h3><table class="scaling"><thead><tr><th>at</th>
    <th>from → to</th><th>reason</th></tr></thead><tbody></tbody></table>`;
  for (const b of box.querySelectorAll("button")) b.dataset.deployment = d.name;
  document.getElementById("deployments").appendChild(box);
  const charts = box.querySelector(".charts");
  const a = document.createElement("div"), b = document.createElement("div");
  charts.appendChild(a); charts.appendChild(b);
  state.charts[d.name] = {
    traffic: chart(a, "requests / s", ["requests", "5xx"], ["#2563eb", "#dc2626"], "req/s"),
    latency: chart(b, "latency", ["p50", "p95", "p99"], ["#16a34a", "#ca8a04", "#dc2626"], "ms"),
  };
  return box;
}

function redraw(name) {
  const s = seriesFor(name), c = state.charts[name];
  if (!c) return;
  // the x range is set here: at least the last 5 minutes (one point alone would span years)
  const max = s.t.length ? s.t[s.t.length - 1] : Date.now() / 1000;
  const min = Math.min(s.t.length ? s.t[0] : max, max - 300);
  for (const [u, data] of [[c.traffic, [s.t, s.rps, s.err]], [c.latency, [s.t, s.p50, s.p95, s.p99]]]) {
    u.setData(data, false);
    u.setScale("x", { min, max });
  }
}

function time(t) { return new Date(t * 1000).toLocaleTimeString(); }

function render(data) {
  const prev = state.prev;
  for (const d of data.deployments) {
    const box = ensureDeployment(d);
    const m = d.metrics || {};
    if (prev) {
      const p = (prev.deployments.find(x => x.name === d.name) || {}).metrics || {};
      const dt = data.t - prev.t;
      if (dt > 0) {
        const deltas = {};
        for (const le in (m.buckets || {})) deltas[le] = m.buckets[le] - ((p.buckets || {})[le] || 0);
        const ms = q => { const v = quantile(deltas, q); return v == null ? null : v * 1000; };
        push(d.name, data.t, Math.max(0, sum(m.requests) - sum(p.requests)) / dt,
             Math.max(0, ((m.requests || {})["5xx"] || 0) - ((p.requests || {})["5xx"] || 0)) / dt,
             ms(0.5), ms(0.95), ms(0.99));
        redraw(d.name);
      }
    }
    const scale = d.autoscale ? `, autoscale ${d.autoscale.min_replicas}..${d.autoscale.max_replicas}` +
      ` (demand ${Number(d.autoscale.demand).toFixed(1)}${d.autoscale.panicking ? ", panicking" : ""})` : "";
    box.querySelector(".facts").textContent =
      `${d.ready}/${d.desired} ready, version ${d.version || "-"}, balancer ${d.balancer}${scale}; ` +
      `admission limit ${m.limit == null ? "-" : Number(Number(m.limit).toFixed(1))}, in flight ${m.inflight ?? "-"}, queued ${m.queued ?? "-"}, ` +
      `shed ${m.shed ?? 0}; cache hits ${m.cache ? m.cache.hit : 0} / misses ${m.cache ? m.cache.miss : 0}`;
    setHTML(box.querySelector(".replicas tbody"), d.replicas.map(r =>
      `<tr><td>${esc(r.id)}</td><td>${esc(r.state)}${r.retiring ? " (draining)" : ""}</td>` +
      `<td>${esc(r.revision ?? "")}</td><td>${esc(r.pid ?? "-")}</td>` +
      `<td class="outstanding">${esc(r.outstanding ?? 0)}</td><td>${esc(r.restarts ?? 0)}</td>` +
      `<td class="exit">${r.last_exit_reason ? esc(r.last_exit_reason) +
        (r.last_exit_at ? " at " + time(r.last_exit_at) : "") : ""}</td>` +
      `<td>${esc(r.ready_for_s ?? 0)}s</td>` +
      `<td>${r.ejected ? "yes: " + esc(r.ejection_reason || "") : ""}</td></tr>`).join(""));
    const n = d.replica_counts || {};
    box.querySelector(".counts").textContent = `actual ${n.actual ?? "-"} / target ` +
      `${n.target ?? d.desired}: ${n.ready ?? 0} ready, ${n.starting ?? 0} starting, ` +
      `${n.unhealthy ?? 0} unhealthy or in backoff, ${n.draining ?? 0} draining`;
    renderRollout(box, d.rollout, !!d.autoscale);
    renderCanary(box, d.canary);
    renderBatches(box, d.batches || {});
    setHTML(box.querySelector(".scaling tbody"), (d.scaling || []).map(e =>
      `<tr><td>${time(e.at)}</td><td>${esc(e.from)} → ${esc(e.to)}</td><td>${esc(e.reason)}</td></tr>`).join(""));
  }
  setHTML(document.querySelector("#alerts tbody"), (data.alerts || []).map(a =>
    `<tr class="${esc(a.state)}"><td>${esc(a.state)}</td><td>${esc(a.rule)}</td>` +
    `<td>${esc(a.severity || (a.labels || {}).severity || "")}</td>` +
    `<td>${esc(Object.entries(a.labels || {}).map(([k, v]) => k + "=" + v).join(" "))}</td>` +
    `<td>${esc(typeof a.value === "number" ? Number(a.value.toPrecision(4)) : a.value ?? "")}</td>` +
    `<td>${a.active_since ? time(a.active_since) : ""}</td>` +
    `<td>${(a.silenced_by || []).length ? "silenced" : `<button type="button" ` +
      `data-action="silence" data-key="${esc(a.key)}">Silence 1 h</button>`}</td></tr>`).join("")
    || `<tr><td colspan="7">none</td></tr>`);
  setHTML(document.querySelector("#actions tbody"), (data.actions || []).map(a =>
    `<tr><td>${a.at ? time(a.at) : ""}</td><td>${esc(a.action)}</td><td>${esc(a.target || a.deployment || "")}</td>` +
    `<td>${esc(a.outcome)}</td><td>${esc(a.rule || "")}</td></tr>`).join("")
    || `<tr><td colspan="5">none</td></tr>`);
  const c = data.cluster || {};
  document.getElementById("cluster").textContent = c.enabled ?
    (c.leading ? "this gateway leads the cluster" : "cluster led by " + c.leader) : "";
  renderCache(data.cache);
  renderKeys(data.keys);
  renderJobs(data.jobs, data.t);
  state.prev = data;
}

function checkEvidence(c) {
  if (c.verdict === "no data") return c.reason || "";
  if (c.metric === "latency")
    return `p95 ${c.candidate_p95_ms} ms vs ${c.baseline_p95_ms} ms (Mann-Whitney ` +
      `p_slower ${Number(c.p_slower).toPrecision(2)}, p_within ${Number(c.p_within).toPrecision(2)})`;
  if (c.metric === "errors")
    return `${(100 * c.candidate).toFixed(2)} % vs ${(100 * c.baseline).toFixed(2)} % ` +
      `(Fisher p ${Number(c.p_worse).toPrecision(2)}, margin ${c.margin})`;
  return `accuracy ${(100 * c.candidate_accuracy).toFixed(1)} % vs ` +
    `${(100 * c.baseline_accuracy).toFixed(1)} % (Fisher p ${Number(c.p_worse).toPrecision(2)})`;
}

function renderCanary(box, c) {
  const section = box.querySelector(".canary");
  section.hidden = !c;
  if (!c) return;
  const running = c.state === "running";
  box.querySelector(".abort").hidden = !(running || c.state === "promoted");
  const cand = c.candidate_arm || {}, base = c.baseline || {};
  box.querySelector(".canary-line").textContent =  // server strings: text, never markup
    `→ ${c.candidate}: ${c.state}, step ${c.step + 1}/${c.steps.length} at ${c.percent} %; ` +
    `this step baseline ${base.requests ?? 0} / candidate ${cand.requests ?? 0} requests` +
    (running && c.verdict ? ` — ${c.verdict}` : c.reason ? ` — ${c.reason}` : "");
  setHTML(box.querySelector(".canary-checks tbody"), (c.checks || []).map(k =>
    `<tr><td>${esc(k.metric)}</td><td>${esc(k.verdict)}</td><td>${esc(checkEvidence(k))}</td></tr>`
  ).join("") || `<tr><td colspan="3">no look yet</td></tr>`);
  setHTML(box.querySelector(".canary-history"), (c.history || []).map(h =>
    `<li>${time(h.at)} step ${h.step + 1} (${esc(h.percent)} %) ${esc(h.action)}: ` +
    `${esc(h.reason)}</li>`).join(""));
}

function renderRollout(box, r, autoscaled) {
  const line = box.querySelector(".rollout"), rolling = !!r && r.state === "rolling";
  box.querySelector(".cancel").hidden = !rolling;
  box.querySelector(".restart").disabled = rolling || !r;
  if (!r) { line.textContent = ""; return; }
  const p = r.progress || {};
  let text = `Rollout: revision ${r.revision} ${r.state}`;
  if (r.revision === 0 && r.state === "done") text = "Rollout: none yet (serving the configuration file)";
  else {
    text += `, target revision ${r.target} (${r.service}` +
      `${autoscaled ? "" : `, ${r.replicas} replicas`}` +
      `${(r.env || []).length ? ", env " + r.env.join(" ") : ""}), last good ${r.good_revision}`;
    if (r.reason) text += ` — ${r.reason}`;
    if (r.started_at) text += `; started ${time(r.started_at)}`;
    if (r.finished_at) text += `, finished ${time(r.finished_at)}`;
  }
  text += `; ${p.ready ?? 0}/${p.desired ?? 0} ready on the target, ${p.updated ?? 0} updated, ` +
    `${p.old ?? 0} old, ${p.draining ?? 0} draining${p.converged ? ", converged" : ""}`;
  line.textContent = text;  // server strings: text, never markup
}

// a histogram bucket (prev, le] of whole batch sizes, as people read it
function bucketLabel(prev, le) {
  if (le === "+Inf") return `> ${prev}`;
  const lo = Math.floor(prev) + 1, hi = Number(le);
  return lo >= hi ? String(hi) : `${lo}–${hi}`;
}

function renderBatches(box, batches) {
  const names = Object.keys(batches).sort();
  box.querySelector(".batch-section").hidden = !names.length;
  if (!names.length) return;
  // the buckets up to the largest max_batch_size (a batch is never larger)
  const top = Math.max(...names.map(n => batches[n].max_batch_size || 0));
  const les = [];
  for (const n of names) for (const le of Object.keys(batches[n].buckets || {})) {
    if (!les.includes(le)) les.push(le);
  }
  les.sort((a, b) => (a === "+Inf" ? Infinity : Number(a)) - (b === "+Inf" ? Infinity : Number(b)));
  const shown = [];
  for (const le of les) { shown.push(le); if (le === "+Inf" || Number(le) >= top) break; }
  const labels = shown.map((le, i) => bucketLabel(i ? Number(shown[i - 1]) : 0, le));
  setHTML(box.querySelector(".batches thead"), `<tr><th>handler</th><th>batches</th>` +
    `<th>mean size</th><th>max size</th>${labels.map(l => `<th>${esc(l)}</th>`).join("")}</tr>`);
  setHTML(box.querySelector(".batches tbody"), names.map(n => {
    const b = batches[n], cum = b.buckets || {};
    const cells = shown.map((le, i) => {
      const count = (cum[le] || 0) - (i ? (cum[shown[i - 1]] || 0) : 0);
      const share = b.batches ? ` (${Math.round(100 * count / b.batches)}%)` : "";
      return `<td>${esc(count)}${count ? esc(share) : ""}</td>`;
    }).join("");
    return `<tr><td>${esc(n)}</td><td>${esc(b.batches)}</td>` +
      `<td class="mean">${b.mean == null ? "-" : esc(Number(b.mean).toFixed(2))}</td>` +
      `<td>${esc(b.max_batch_size ?? "")}</td>${cells}</tr>`;
  }).join(""));
}

function renderKeys(keys) {  // per-key usage today, once API keys exist
  if (!keys) return;
  document.getElementById("keys-section").hidden = false;
  setHTML(document.querySelector("#keys tbody"), keys.map(k =>
    `<tr><td>ss_${esc(k.key_id)}_…</td><td>${esc(k.name ?? "-")}</td><td>${esc(k.deployment)}</td>` +
    `<td>${esc(k.requests)}</td><td>${esc(k.errors)}</td><td>${esc(k.rejected)}</td>` +
    `<td>${k.last_seen ? time(k.last_seen) : ""}</td></tr>`).join("")
    || `<tr><td colspan="7">no requests with a key today</td></tr>`);
}

function age(s) {
  return s < 120 ? `${Math.round(s)} s` : s < 7200 ? `${(s / 60).toFixed(1)} min` :
    `${(s / 3600).toFixed(1)} h`;
}

function renderJobs(jobs, now) {  // the queue's counts, read by the gateway every 5 s
  if (!jobs || !jobs.states) return;
  document.getElementById("jobs-section").hidden = false;
  setHTML(document.querySelector("#jobs thead"), `<tr><th>deployment</th>` +
    jobs.states.map(s => `<th>${esc(s)}</th>`).join("") + `<th>oldest queued</th></tr>`);
  setHTML(document.querySelector("#jobs tbody"), jobs.deployments.map(r =>
    `<tr data-deployment="${esc(r.deployment)}"><td>${esc(r.deployment)}</td>` +
    jobs.states.map(s => `<td class="${esc(s)}">${esc(r.counts[s] ?? 0)}</td>`).join("") +
    `<td class="oldest">${r.oldest_queued_at == null ? "-" :
      esc(age(Math.max(0, now - r.oldest_queued_at)))}</td></tr>`).join("")
    || `<tr><td colspan="${jobs.states.length + 2}">no jobs</td></tr>`);
  setHTML(document.querySelector("#job-failures tbody"), jobs.failures.map(j =>
    `<tr><td>${j.finished_at ? time(j.finished_at) : ""}</td><td>${esc(j.id)}</td>` +
    `<td>${esc(j.deployment)}.${esc(j.handler)}</td><td>${esc(j.state)}</td>` +
    `<td>${esc(j.attempt)}</td><td class="error">${esc(j.error.code)}: ` +
    `${esc(j.error.message)}</td></tr>`).join("")
    || `<tr><td colspan="6">none</td></tr>`);
  setHTML(document.querySelector("#job-retrying tbody"), (jobs.retrying || []).map(j =>
    `<tr><td>${j.available_at <= now ? "due" : "in " + esc(age(j.available_at - now))}</td>` +
    `<td>${esc(j.id)}</td><td>${esc(j.deployment)}.${esc(j.handler)}</td>` +
    `<td>${esc(j.failures)}</td><td class="error">${esc(j.error.code)}: ` +
    `${esc(j.error.message)}</td></tr>`).join("")
    || `<tr><td colspan="5">none</td></tr>`);
}

function renderCache(cache) {
  if (!cache) return;
  document.getElementById("cache-section").hidden = false;
  const l1 = cache.l1 || {}, l2 = cache.l2 || {};
  const mib = b => (b / 1048576).toFixed(1);
  document.getElementById("cache-facts").textContent =
    `L1 (${l1.policy || "-"}): ${mib(l1.bytes || 0)} of ${mib(l1.capacity_bytes || 0)} MiB, ` +
    `${l1.entries ?? 0} entries, hit ratio ${l1.hit_ratio == null ? "-" : (100 * l1.hit_ratio).toFixed(1) + " %"}; ` +
    `L2: ${esc(l2.state || (cache.l2 ? "on" : "off"))}; lookups since start by level: ` +
    (Object.entries(cache.levels || {}).map(([level, c]) => `${level.toUpperCase()} ` +
      `${c.hit_ratio == null ? "-" : (100 * c.hit_ratio).toFixed(1) + " %"} of ` +
      `${c.hit + c.stale + c.miss}`).join(", ") || "none");
  const points = ((cache.hit_ratio_curve || {}).points || []);
  const data = [points.map(p => p.capacity_bytes / 1048576), points.map(p => p.hit_ratio)];
  if (!state.curve) {
    state.curve = new uPlot({
      title: "estimated hit ratio by L1 capacity", width: 520, height: 220,
      scales: { x: { time: false, distr: 3 }, y: { range: [0, 1] } },
      axes: [{ label: "capacity (MiB)" }, { label: "hit ratio" }],
      series: [{ label: "MiB" }, { label: "hit ratio", stroke: "#7c3aed", width: 1.5 }],
    }, data, document.getElementById("cache-curve"));
  } else {
    state.curve.setData(data);
  }
}

function seed(history) {
  for (const name in history || {}) {
    for (const [t, rps, err, p50, p95, p99] of history[name]) push(name, t, rps, err, p50, p95, p99);
  }
}

// another history window: the gateway's history of it, then the live points drawn since
// its last finished step
async function setRange(minutes) {
  state.range = minutes;
  for (const b of document.querySelectorAll("#range button"))
    b.setAttribute("aria-pressed", String(Number(b.dataset.range) === minutes));
  let data;
  try {
    data = await fetchData(true);
  } catch (err) {
    say(`cannot read the history: ${err.message}`, true);
    return;
  }
  const live = state.series;
  state.series = {};
  seed(data.history);
  for (const name in live) {
    const s = seriesFor(name), old = live[name];
    const last = s.t.length ? s.t[s.t.length - 1] : -Infinity;
    old.t.forEach((t, i) => {
      if (t > last) push(name, t, old.rps[i], old.err[i], old.p50[i], old.p95[i], old.p99[i]);
    });
  }
  for (const name in state.charts) redraw(name);
  state.ranges = (state.ranges || 0) + 1;  // windows loaded (for tests)
}

async function poll(first) {
  const status = document.getElementById("status");
  try {
    const data = await fetchData(first);
    if (first && !state.polls) { for (const d of data.deployments) ensureDeployment(d); seed(data.history); }
    render(data);
    for (const name in state.series) redraw(name);
    state.polls += 1;
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "";
    return true;
  } catch (err) {
    status.textContent = "cannot read the gateway: " + err.message;
    status.className = "down";
    return false;
  }
}

// an admin call; a 401/403 asks for an admin key and does nothing else
async function act(what, method, path, body, done) {
  const headers = body === undefined ? {} : { "content-type": "application/json" };
  if (state.key) headers.authorization = "Bearer " + state.key;
  say(what + "…", false);
  let r, reply = null;
  try {
    r = await fetch(path, { method, headers,
                            body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    say(`${what} failed: ${err.message}`, true);
    return;
  }
  if (r.status === 401 || r.status === 403) {
    say("", false);
    askKey(ADMIN_KEY_NEEDED);
    return;
  }
  try { reply = await r.json(); } catch (_) { reply = null; }
  if (!r.ok) {
    say(`${what} failed: ${(reply && reply.error && reply.error.message) || "HTTP " + r.status}`, true);
    return;
  }
  say(done(reply || {}), false);
  if (timer) poll(false);  // show the effect now, not in 2 s
}

function rolloutPath(name) {
  return `/v1/admin/deployments/${encodeURIComponent(name)}/rollout`;
}

document.getElementById("range").addEventListener("click", ev => {
  const button = ev.target.closest("button[data-range]");
  if (button) setRange(Number(button.dataset.range));
});

document.addEventListener("click", ev => {
  const button = ev.target.closest("button[data-action]");
  if (!button) return;
  const name = button.dataset.deployment;
  if (button.dataset.action === "silence") {
    const alert = ((state.prev || {}).alerts || []).find(a => a.key === button.dataset.key);
    if (!alert) return;
    act(`silencing ${alert.rule}`, "POST", "/v1/silences",
        { matchers: alert.labels, duration_s: SILENCE_S, created_by: "dashboard",
          comment: "silenced from the dashboard" },
        s => `silenced ${alert.key} for 1 h (silence ${s.id}, until ${time(s.ends_at)})`);
  } else if (button.dataset.action === "restart") {
    if (!window.confirm(`Restart every replica of ${name}? They are replaced one at a time ` +
                        "(a rollout with no changes).")) return;
    act(`restarting ${name}`, "POST", rolloutPath(name), {},
        r => `restarting ${name}: revision ${r.revision} ${r.state}`);
  } else if (button.dataset.action === "cancel") {
    act(`cancelling the rollout of ${name}`, "DELETE", rolloutPath(name), undefined,
        r => `rollout of ${name} ${r.state}: back to revision ${(r.target || {}).revision}`);
  } else if (button.dataset.action === "abort-canary") {
    if (!window.confirm(`Abort the canary of ${name}? The baseline serves everything again.`)) return;
    act(`aborting the canary of ${name}`, "DELETE",
        `/v1/admin/deployments/${encodeURIComponent(name)}/canary`, undefined,
        r => `canary of ${name} ${r.state}: ${r.reason}`);
  }
});

document.getElementById("keyform").addEventListener("submit", ev => {
  ev.preventDefault();
  state.key = document.getElementById("key").value.trim();
  sessionStorage.setItem("steadyserve-key", state.key);
  document.getElementById("keyform").hidden = true;
  if (timer) poll(false); else start();
});

let timer = null;
async function start() {
  if (await poll(true) && !timer) timer = setInterval(() => poll(false), POLL_MS);
}
start();
