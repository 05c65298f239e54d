// salt-release web console: one page served by salt-api (rest_cherrypy `app` + `static`).
// It acts with the logged-in user's salt-api session only; salt's eauth ACL decides what runs.
// Everything that comes from git, pillar or the store is put on the page as text (textContent),
// never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { session: null, user: null, perms: [], projects: {}, refs: {}, run: null, stream: null, timer: null };
const RELEASE_TAG = /^release\/([^/]+)\/([^/]+)\/(.+)$/;

// ---------------------------------------------------------------- DOM helpers (text only)

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell === null || cell === undefined ? "-" : String(cell);
    tr.appendChild(td);
  }
  return tr;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function badge(text, kind) {
  return el("span", text, "badge " + (kind || ""));
}

// ---------------------------------------------------------------- salt-api

async function api(low) {
  // POST / with the session header: the lowstate runs as the logged-in user (salt-api sessions).
  const response = await fetch("/", {
    method: "POST",
    headers: { "Accept": "application/json", "Content-Type": "application/json", "X-Auth-Token": state.session },
    body: JSON.stringify([low]),
  });
  if (response.status === 401) throw new Error("refused by salt-api (401): not logged in, or not allowed");
  if (!response.ok) throw new Error("salt-api answered " + response.status);
  const answer = (await response.json()).return[0];
  if (answer && answer.error && answer.error.message) throw new Error(answer.error.message);
  return answer;
}

function runner(fun, kwarg) {
  return api({ client: "runner", fun: fun, kwarg: kwarg || {} });
}

function runnerAsync(fun, kwarg) {
  return api({ client: "runner_async", fun: fun, kwarg: kwarg });
}

async function login(event) {
  event.preventDefault();
  $("login-error").textContent = "";
  const body = { username: $("username").value, password: $("password").value, eauth: $("eauth").value };
  try {
    const response = await fetch("/login", {
      method: "POST",
      headers: { "Accept": "application/json", "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error("login refused (" + response.status + ")");
    const answer = (await response.json()).return[0];
    sessionStorage.setItem("login", JSON.stringify({ token: answer.token, user: answer.user, perms: answer.perms }));
    await start();
  } catch (err) {
    $("login-error").textContent = err.message;
  }
}

async function logout() {
  try { await fetch("/logout", { method: "POST", headers: { "Accept": "application/json", "X-Auth-Token": state.session } }); } catch (err) { /* gone anyway */ }
  sessionStorage.removeItem("login");
  location.reload();
}

// ---------------------------------------------------------------- rights, as salt's ckminions.spec_check reads the ACL

function matches(regex, text) {
  // Python's re.match: anchored at the start only.
  try { return new RegExp(regex, "y").test(String(text)); } catch (err) { return false; }
}

function argsAllowed(cond, kwarg) {
  for (const c of Array.isArray(cond) ? cond : [cond]) {
    if (!c || typeof c !== "object") continue;
    if ((c.args || []).length) continue; // the console passes keyword arguments only
    const wanted = c.kwargs || {};
    if (Object.keys(wanted).every((k) => k in kwarg && (wanted[k] === null || matches(wanted[k], kwarg[k])))) return true;
  }
  return false;
}

function funAllowed(valid, fun, kwarg) {
  for (const cond of Array.isArray(valid) ? valid : [valid]) {
    if (typeof cond === "string" && matches(cond, fun)) return true;
    if (cond && typeof cond === "object" && Object.keys(cond).length === 1) {
      const name = Object.keys(cond)[0];
      if (matches(name, fun) && argsAllowed(cond[name], kwarg)) return true;
    }
  }
  return false;
}

function can(fun, kwarg) {
  const [mod, name] = fun.split(".");
  for (const entry of state.perms || []) {
    if (typeof entry === "string") {
      if (entry === "@" + mod || entry === "@runner" || entry === "@runners") return true;
    } else if (entry && typeof entry === "object" && Object.keys(entry).length === 1) {
      const key = Object.keys(entry)[0];
      if (key === "@" + mod && funAllowed(entry[key], name, kwarg)) return true;
      if ((key === "@runner" || key === "@runners") && funAllowed(entry[key], fun, kwarg)) return true;
    }
  }
  return false;
}

function target() {
  return { project: $("project").value, env: $("env").value };
}

function updateControls() {
  const t = target();
  const busy = Boolean(state.run && !state.run.done);
  const rights = {
    plan: can("release.deploy", Object.assign({ ref: $("ref").value, test: true }, t)),
    diff: can("release.deploy", Object.assign({ ref: $("ref").value, diff: true }, t)),
    rollback: can("release.rollback", t),
    emergency: can("release.rollback", Object.assign({ emergency: true }, t)),
    unlock: can("release.unlock", t),
  };
  for (const [id, allowed] of Object.entries(rights)) {
    $(id).disabled = busy || !allowed || !t.project || !t.env || (id !== "unlock" && id !== "rollback" && id !== "emergency" && !$("ref").value);
    $(id).title = allowed ? "" : "your salt-api user may not run this";
  }
}

// ---------------------------------------------------------------- what the page shows

async function start() {
  const saved = JSON.parse(sessionStorage.getItem("login") || "null");
  if (!saved) return;
  Object.assign(state, { session: saved.token, user: saved.user, perms: saved.perms });
  $("login-view").hidden = true;
  $("main-view").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = saved.user;
  try {
    state.projects = (await runner("release.refs", { fetch: false })).projects || {};
  } catch (err) {
    $("action-error").textContent = err.message;
    return;
  }
  $("project").replaceChildren(...Object.keys(state.projects).map((p) => new Option(p, p)));
  await chooseProject();
  openStream();
}

async function chooseProject() {
  const envs = state.projects[$("project").value] || {};
  $("env").replaceChildren(...Object.keys(envs).map((e) => new Option(e, e)));
  await loadRefs();
  await refresh();
}

async function loadRefs() {
  const project = $("project").value;
  if (!project) return;
  try {
    const found = await runner("release.refs", { project: project });
    state.projects[project] = found.projects[project];
    const options = [];
    for (const [kind, list] of [["tag", found.tags], ["branch", found.branches]]) {
      for (const ref of list || []) {
        const option = new Option(kind + ": " + ref.name, ref.name);
        option.dataset.detail = ref.commit.slice(0, 10) + " " + ref.author + ": " + ref.subject;
        options.push(option);
      }
    }
    $("ref").replaceChildren(...options);
    showRefDetail();
  } catch (err) {
    $("action-error").textContent = "branches and tags: " + err.message;
  }
}

function showRefDetail() {
  const chosen = $("ref").selectedOptions[0];
  $("ref-detail").textContent = chosen ? chosen.dataset.detail : "";
  updateControls();
}

async function refresh() {
  const t = target();
  if (!t.project || !t.env) return;
  const env = (state.projects[t.project] || {})[t.env] || {};
  $("production-badge").hidden = !env.production;
  showLock(env.lock);
  updateControls();
  const asked = state.asked = (state.asked || 0) + 1;
  const [status, history, stats, projects] = await Promise.allSettled([
    runner("release.status", t),
    runner("release.history", Object.assign({ limit: 15, phases: true }, t)),
    runner("release.stats", t),
    runner("release.refs", { project: t.project, fetch: false }),
  ]);
  if (asked !== state.asked) return; // a newer refresh (another environment) answers instead
  if (projects.status === "fulfilled" && projects.value.projects) {
    state.projects[t.project] = projects.value.projects[t.project];
    showLock(state.projects[t.project][t.env].lock);
  }
  const failed = [status, history, stats].filter((p) => p.status === "rejected").map((p) => p.reason.message);
  $("action-error").textContent = failed.join("; ");
  const runs = history.status === "fulfilled" ? history.value.runs || [] : [];
  showNodes(status.status === "fulfilled" ? status.value : { error: status.reason.message }, runs);
  showHistory(runs);
  showStats(stats.status === "fulfilled" ? stats.value : {}, runs);
}

function showLock(lock) {
  $("lock").textContent = lock ? "locked by " + lock.user + " since " + lock.since + " (" + (lock.reason || "") + ")" : "not locked";
}

function lbState(runs, minion) {
  // The load balancer's state as the newest run with phases left it: drained until put back.
  const last = runs.find((r) => (r.phases || []).some((p) => p.minion === minion));
  if (!last) return "-";
  const phases = last.phases.filter((p) => p.minion === minion && (p.phase === "drain" || p.phase === "undrain"));
  if (!phases.length) return "not managed";
  return phases[phases.length - 1].phase === "drain" ? "drained" : "in service";
}

function showNodes(status, runs) {
  const tbody = $("nodes").tBodies[0];
  if (status.error && !status.nodes) {
    fill(tbody, [row([el("span", status.error, "error"), "", "", "", ""])]);
    return;
  }
  fill(tbody, Object.entries(status.nodes || {}).map(([minion, node]) => {
    const flags = el("span");
    if (node.out_of_step) flags.appendChild(badge("out of step", "warn"));
    if (node.error) flags.appendChild(el("span", " " + node.error, "error"));
    for (const bad of node.bad || []) flags.appendChild(badge("bad: " + bad, "bad"));
    const tr = row([minion, node.current, node.previous, flags, lbState(runs, minion)]);
    tr.dataset.minion = minion;
    return tr;
  }));
}

function outcome(run) {
  if (run.result === null || run.result === undefined) return badge(run.finished_at ? "unknown" : "running", "warn");
  const shown = el("span");
  shown.appendChild(badge(run.result ? "ok" : "failed", run.result ? "ok" : "bad"));
  if (run.error) shown.appendChild(el("span", " " + run.error, "error"));
  return shown;
}

function showHistory(runs) {
  fill($("history").tBodies[0], runs.map((r) => row([r.id, r.kind + " (" + r.trigger + ")", r.ref, r.release, r.who,
    r.started_at, r.duration_s, outcome(r)])));
}

function showStats(stats, runs) {
  const figures = [["deploys", stats.deploys], ["failures", stats.failures], ["rollbacks", stats.rollbacks],
    ["success rate", stats.success_rate === null || stats.success_rate === undefined ? "-" : Math.round(stats.success_rate * 100) + "%"],
    ["median s", stats.duration_median_s], ["p95 s", stats.duration_p95_s], ["MTTR s", stats.mttr_s]];
  const box = el("div", null, "stats");
  for (const [label, value] of figures) {
    const stat = el("span", label, "stat");
    stat.prepend(el("b", value === null || value === undefined ? "-" : value));
    box.appendChild(stat);
  }
  $("stats").replaceChildren(box);
  const timed = runs.filter((r) => r.duration_s).reverse();
  const longest = Math.max(1, ...timed.map((r) => r.duration_s));
  $("chart").replaceChildren(...timed.map((r) => {
    const bar = el("span", null, "bar" + (r.result ? "" : " failed"));
    bar.style.height = Math.max(4, Math.round((r.duration_s / longest) * 80)) + "px";
    bar.title = r.kind + " " + r.ref + ": " + r.duration_s + " s";
    return bar;
  }));
}

// ---------------------------------------------------------------- actions

function ask(title, body, action) {
  const t = target();
  const production = Boolean(((state.projects[t.project] || {})[t.env] || {}).production);
  $("confirm-title").textContent = title;
  $("confirm-body").replaceChildren(body);
  $("typed").value = "";
  $("typed-label").hidden = !production;
  state.confirmable = true;
  $("go").disabled = production;
  $("go").onclick = () => {
    if (production && $("typed").value !== t.env) return;
    $("confirm").hidden = true;
    action();
  };
  $("confirm").hidden = false;
}

function planView(plan) {
  const box = el("div");
  if (!plan.result) {
    box.appendChild(el("p", plan.error || "the plan failed", "error"));
    return box;
  }
  box.appendChild(el("p", "release " + plan.release + " (commit " + plan.commit + ")"));
  for (const wave of plan.waves || []) {
    box.appendChild(el("p", "wave " + wave.name + ": " + wave.batches.map((b) => "[" + b.join(", ") + "]").join(" then ")));
  }
  const table = el("table");
  table.appendChild(row(["node", "now", "after"]));
  for (const [minion, node] of Object.entries(plan.nodes || {})) table.appendChild(row([minion, node.current, node.new]));
  box.appendChild(table);
  if (plan.load_balancer) box.appendChild(el("p", plan.load_balancer));
  return box;
}

async function plan() {
  const t = target();
  const ref = $("ref").value;
  $("action-error").textContent = "";
  $("plan").disabled = true;
  try {
    const found = await runner("release.deploy", Object.assign({ ref: ref, test: true }, t));
    ask("Deploy " + ref + " to " + t.project + "/" + t.env + "?", planView(found), () => launch("release.deploy", Object.assign({ ref: ref }, t)));
    state.confirmable = Boolean(found.result);
    $("go").disabled = $("go").disabled || !found.result;
  } catch (err) {
    $("action-error").textContent = err.message;
  }
  updateControls();
}

async function diff() {
  const t = target();
  $("action-error").textContent = "";
  try {
    const found = await runner("release.deploy", Object.assign({ ref: $("ref").value, diff: true }, t));
    const box = el("div");
    for (const [minion, node] of Object.entries(found.nodes || {})) {
      box.appendChild(el("h4", minion));
      box.appendChild(el("pre", JSON.stringify(node.diff || node, null, 2)));
    }
    if (found.error) box.appendChild(el("p", found.error, "error"));
    $("outcome").replaceChildren(box);
    $("live").hidden = false;
    $("live-title").textContent = "config diff of " + $("ref").value;
  } catch (err) {
    $("action-error").textContent = err.message;
  }
}

function rollback(emergency) {
  const t = target();
  const kwarg = emergency ? Object.assign({ emergency: true }, t) : t;
  const what = emergency ? "Emergency rollback (every node at once, no drain)" : "Roll back";
  ask(what + " of " + t.project + "/" + t.env + "?", el("p", "Every node goes back to its previous good release."),
    () => launch("release.rollback", kwarg));
}

async function unlock() {
  const t = target();
  try {
    const done = await runner("release.unlock", t);
    $("action-error").textContent = done.result ? "" : done.error;
  } catch (err) {
    $("action-error").textContent = err.message;
  }
  refresh();
}

async function launch(fun, kwarg) {
  $("action-error").textContent = "";
  try {
    const started = await runnerAsync(fun, Object.assign({ author: state.user, trigger: "console" }, kwarg));
    state.run = { jid: started.jid, project: kwarg.project, env: kwarg.env, fun: fun, done: false, nodes: {} };
    $("live").hidden = false;
    $("live-title").textContent = fun.replace("release.", "") + " " + (kwarg.ref || "") + " (job " + started.jid + ")";
    setLiveState("running", "warn");
    fill($("phases").tBodies[0], []);
    $("outcome").replaceChildren();
    updateControls();
  } catch (err) {
    $("action-error").textContent = err.message;
  }
}

function setLiveState(text, kind) {
  $("live-state").textContent = text;
  $("live-state").className = "badge " + kind;
}

// ---------------------------------------------------------------- live progress (salt-api /events)

function openStream() {
  // The session cookie /login set authenticates the stream (salt-api refuses tokens in the URL).
  if (state.stream) state.stream.close();
  const stream = new EventSource("/events");
  stream.onmessage = (message) => onEvent(JSON.parse(message.data));
  // Once listening again, the history says whether the run ended while no event could arrive
  // (salt-api opens the stream as soon as it listens on the event bus: nothing is missed after).
  stream.onopen = () => { if (state.run && !state.run.done) catchUp(); };
  stream.onerror = () => {
    // Dropped: start again shortly, and ask the history how the run ended meanwhile.
    stream.close();
    setTimeout(openStream, 2000);
  };
  state.stream = stream;
}

function onEvent(event) {
  const run = state.run;
  if (!run || run.done) return;
  if (event.tag === "salt/run/" + run.jid + "/ret") {
    finish(event.data.return);
    return;
  }
  const parts = RELEASE_TAG.exec(event.tag || "");
  if (!parts || parts[1] !== run.project || parts[2] !== run.env) return;
  const rest = parts[3].split("/");
  // A minion's event.send arrives wrapped ({id, data}); the master's own events are the data.
  const data = event.data && event.data.data && typeof event.data.data === "object" ? event.data.data : event.data;
  if (rest.length === 2 && rest[0] !== "lock") showPhase(rest[0], rest[1], data);
}

function showPhase(minion, phase, data) {
  const tbody = $("phases").tBodies[0];
  let tr = Array.from(tbody.rows).find((r) => r.dataset.minion === minion);
  if (!tr) {
    tr = row([minion, ""]);
    tr.dataset.minion = minion;
    tbody.appendChild(tr);
  }
  const ok = data.result !== false;
  // A node reports "configure" twice per deploy: its dry run in the config check, then the real render at install.
  const label = phase === "configure" && data.dry_run ? "config check" : phase;
  const chip = el("span", label + (data.duration_s !== undefined ? " " + data.duration_s + "s" : ""), "phase" + (ok ? "" : " failed"));
  chip.dataset.phase = phase;
  if (!ok && data.error) chip.title = String(data.error);
  tr.cells[1].appendChild(chip);
}

async function catchUp() {
  // After a dropped stream: the run's row in the history says whether it ended, and how.
  const run = state.run;
  try {
    const found = await runner("release.history", { project: run.project, env: run.env, limit: 10, phases: true });
    const mine = (found.runs || []).find((r) => r.jid === run.jid);
    if (!mine) return;
    fill($("phases").tBodies[0], []);
    for (const p of mine.phases || []) showPhase(p.minion, p.phase, p);
    if (mine.finished_at) finish({ result: mine.result, error: mine.error, release: mine.release,
      duration_s: mine.duration_s, nodes: (mine.details || {}).nodes || {} });
  } catch (err) {
    $("action-error").textContent = err.message;
  }
}

function finish(ret) {
  const run = state.run;
  if (!run || run.done) return;
  run.done = true;
  ret = ret || {};
  setLiveState(ret.result ? "succeeded" : "failed", ret.result ? "ok" : "bad");
  const box = el("div");
  if (ret.error) box.appendChild(el("p", ret.error, "error"));
  const table = el("table");
  table.id = "final";
  table.appendChild(row(["node", "result", "release", "previous", "seconds", "error"]));
  for (const [minion, node] of Object.entries(ret.nodes || {})) {
    table.appendChild(row([minion, node.result ? "ok" : "FAILED", node.release, node.previous, node.duration_s, node.error]));
  }
  box.appendChild(table);
  $("outcome").replaceChildren(box);
  updateControls();
  refresh();
}

// ---------------------------------------------------------------- wiring

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("project").addEventListener("change", chooseProject);
  $("env").addEventListener("change", refresh);
  $("ref").addEventListener("change", showRefDetail);
  $("refresh").addEventListener("click", () => { loadRefs(); refresh(); });
  $("plan").addEventListener("click", plan);
  $("diff").addEventListener("click", diff);
  $("rollback").addEventListener("click", () => rollback(false));
  $("emergency").addEventListener("click", () => rollback(true));
  $("unlock").addEventListener("click", unlock);
  $("cancel").addEventListener("click", () => { $("confirm").hidden = true; });
  $("typed").addEventListener("input", () => { $("go").disabled = !state.confirmable || $("typed").value !== $("env").value; });
  start();
});
