// The meshplane dashboard: plain JavaScript, no build step, nothing from another origin.
//
// It reads the lists once (/v1/members, /v1/networks, /v1/services, /v1/tasks), then
// follows GET /v1/events. The stream is read with fetch() rather than EventSource,
// because EventSource cannot send the `Authorization: Bearer` header a token-protected
// API wants; the token the operator types is kept in a variable of this script only
// (never in storage, a cookie or the URL), so reloading the page forgets it.
// Members (node status) are polled, as gossip's view changes without a state change;
// rates come from /metrics when the agent serves it, else from /v1/http's counters.
// Every value is put in the page as text (textContent), never as HTML.
"use strict";

const FEATURES = new Set(
  (document.querySelector('meta[name="mesh-features"]')?.content || "").split(/\s+/).filter(Boolean),
);
const MEMBERS_EVERY_MS = 2000;
const RATES_EVERY_MS = 3000;
const HTTP_LABEL = "com.docker.ucp.mesh.http";
const HOSTS_LABELS = ["mesh.http.hosts", "com.docker.lb.hosts"];
const HOST = /^[A-Za-z0-9_*][A-Za-z0-9_.-]*$/; // a label's host that could be routed (else: a problem)

let token = null; // the API token: in memory only
let lastEventId = null;
let streaming = false;
const state = {
  node: "",
  members: new Map(), // name -> member
  networks: new Map(), // name -> network (or a tombstone {deleted, version})
  services: new Map(), // name -> service
  tasks: new Map(), // id -> task
  routes: [], // /v1/http routes: {service, host, path_prefix, requests}
  serviceRates: new Map(), // service -> requests per second
};
const $ = (id) => document.getElementById(id);

class AuthError extends Error {}

function headers() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path) {
  const response = await fetch(path, { headers: headers(), cache: "no-store" });
  if (response.status === 401) throw new AuthError("the token was refused");
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response;
}

const json = async (path) => (await api(path)).json();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- state -------------------------------------------------------------------

const KINDS = { network: ["networks", "name"], service: ["services", "name"], task: ["tasks", "id"] };

// Keep the newer of what is held and what arrived: a list read while events flow may be
// older than an event already applied (a deletion stays as a tombstone for that reason).
function merge(kind, object, deleted) {
  const [collection, key] = KINDS[kind] || [];
  if (!collection || !object) return;
  const held = state[collection].get(object[key]);
  if (held && held.version > object.version) return;
  state[collection].set(object[key], deleted ? { deleted: true, version: object.version } : object);
}

function live(collection) {
  return [...state[collection].values()].filter((object) => !object.deleted);
}

async function readLists() {
  const [agent, members, networks, services, tasks] = await Promise.all(
    ["/v1/agent", "/v1/members", "/v1/networks", "/v1/services", "/v1/tasks"].map(json),
  );
  state.node = agent.node;
  state.members = new Map(members.map((member) => [member.name, member]));
  for (const network of networks) merge("network", network, false);
  for (const service of services) merge("service", service, false);
  for (const task of tasks) merge("task", task, false);
  // What a list no longer holds was removed while no event said so (a gap): drop it.
  forgetMissing("networks", networks, "name");
  forgetMissing("services", services, "name");
  forgetMissing("tasks", tasks, "id");
  render();
}

function forgetMissing(collection, listed, key) {
  const present = new Set(listed.map((object) => object[key]));
  for (const [name, object] of state[collection]) {
    if (!present.has(name) && !object.deleted) state[collection].delete(name);
  }
}

// -- the event stream ---------------------------------------------------------

// One SSE block (RFC: fields `id`, `event`, `data`; lines starting with ':' are comments).
function parseBlock(block) {
  const message = { event: "message", data: [] };
  for (const line of block.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") message.data.push(value);
    else if (field === "id") message.id = value;
    else if (field === "event") message.event = value;
  }
  return message.data.length || message.id ? message : null;
}

async function onMessage(message) {
  if (message.id) lastEventId = message.id;
  if (message.event === "gap") {
    await readLists(); // changes were missed: the lists are the truth
    return;
  }
  const data = JSON.parse(message.data.join("\n"));
  if (data.kind === "task" && data.op === "delete" && data.object?.node_status !== "alive") {
    // The feed shows the tasks of a node that went down as removed (they leave DNS and
    // the load balancers), while /v1/tasks still lists them with their node's status:
    // ask the list, which tells a down node's task from a removed one.
    rereadTasks();
    return;
  }
  merge(data.kind, data.object, data.op === "delete");
  render();
}

let tasksReread = null;
function rereadTasks() {
  tasksReread ??= (async () => {
    try {
      const tasks = await json("/v1/tasks");
      for (const task of tasks) merge("task", task, false);
      forgetMissing("tasks", tasks, "id");
      render();
    } catch {
      // the stream's reconnect re-reads every list
    } finally {
      tasksReread = null;
    }
  })();
}

async function follow() {
  let backoff = 500;
  for (;;) {
    let response = null;
    try {
      const extra = lastEventId ? { "Last-Event-ID": lastEventId } : {};
      response = await fetch("/v1/events", {
        headers: { ...headers(), ...extra },
        cache: "no-store",
      });
      if (response.status === 401) throw new AuthError("the token was refused");
      if (!response.ok || !response.body) throw new Error(`events: ${response.status}`);
      // Subscribed first, then the lists: nothing that changes in between is missed.
      // Read again on every reconnect: an agent that restarted numbers its events anew,
      // so Last-Event-ID alone could not tell what this page missed.
      await readLists();
      setConnection("live", "live");
      backoff = 500;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
          const message = parseBlock(block);
          if (message) await onMessage(message);
        }
      }
    } catch (error) {
      response?.body?.cancel().catch(() => {}); // let go of a stream half read
      if (error instanceof AuthError) return askForToken("The agent refused the token.");
    }
    setConnection("down", "reconnecting…");
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 10000);
  }
}

// -- polling: members and rates ----------------------------------------------

async function pollMembers() {
  for (;;) {
    await sleep(MEMBERS_EVERY_MS);
    try {
      const members = await json("/v1/members");
      state.members = new Map(members.map((member) => [member.name, member]));
      render();
    } catch (error) {
      if (error instanceof AuthError) return;
    }
  }
}

// Prometheus text -> Map of "family" -> the sum of its samples, and of
// "family{label=value}" -> the sum of those with that value, for the labels we group by.
const GROUPED_BY = ["service", "event"];
function parseMetrics(text) {
  const totals = new Map();
  const add = (key, value) => totals.set(key, (totals.get(key) || 0) + value);
  const sample = /^([A-Za-z_:][A-Za-z0-9_:]*)(\{(?:[^}"]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)/;
  const label = /([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = sample.exec(line);
    if (!match) continue;
    const value = Number(match[3]);
    if (!Number.isFinite(value)) continue;
    add(match[1], value);
    for (const [, name, labelValue] of (match[2] || "").matchAll(label)) {
      if (GROUPED_BY.includes(name)) add(`${match[1]}{${name}=${labelValue}}`, value);
    }
  }
  return totals;
}

// The first family present, by name: the metrics' names are in docs/metrics.md.
function first(totals, ...families) {
  for (const family of families) if (totals.has(family)) return totals.get(family);
  return null;
}

// DNS queries: every way the responder ends a query (docs/metrics.md, dns events).
const DNS_OUTCOMES = ["answered", "nxdomain", "forwarded", "formerr", "notimp", "dropped", "badvers"];

// The counters as {requests, queries, perService: Map}: from /metrics, or /v1/http.
async function readCounters() {
  if (FEATURES.has("metrics")) {
    const totals = parseMetrics(await (await api("/metrics")).text());
    const perService = new Map();
    const prefix = "meshplane_http_requests_total{service=";
    for (const [key, value] of totals) {
      if (key.startsWith(prefix)) perService.set(key.slice(prefix.length, -1), value);
    }
    let queries = first(totals, "meshplane_dns_queries_total");
    if (queries == null && totals.has("meshplane_dns_events_total")) {
      queries = DNS_OUTCOMES.reduce(
        (sum, outcome) => sum + (totals.get(`meshplane_dns_events_total{event=responder_${outcome}}`) || 0),
        0,
      );
    }
    return {
      requests: first(totals, "meshplane_http_requests_received_total", "meshplane_http_requests_total"),
      queries,
      perService,
    };
  }
  if (FEATURES.has("http")) {
    const http = await json("/v1/http");
    state.routes = http.routes || [];
    const perService = new Map();
    for (const route of state.routes) {
      const count = Object.values(route.requests || {}).reduce((a, b) => a + b, 0);
      perService.set(route.service, (perService.get(route.service) || 0) + count);
    }
    // a counter still at 0 is left out of the answer (docs/api.md: optional fields)
    return { requests: http.requests ?? 0, queries: null, perService };
  }
  return { requests: null, queries: null, perService: new Map() };
}

function rate(now, before, seconds) {
  if (now == null || before == null || now < before) return null; // a restart reset it
  return (now - before) / seconds;
}

async function pollRates() {
  let before = null;
  for (;;) {
    try {
      const at = performance.now();
      const counters = await readCounters();
      if (FEATURES.has("metrics") && FEATURES.has("http")) {
        state.routes = (await json("/v1/http")).routes || [];
      }
      if (before) {
        const seconds = (at - before.at) / 1000;
        showRate("rate-requests", rate(counters.requests, before.requests, seconds));
        showRate("rate-queries", rate(counters.queries, before.queries, seconds));
        state.serviceRates = new Map();
        for (const [service, count] of counters.perService) {
          const perSecond = rate(count, before.perService.get(service), seconds);
          if (perSecond != null) state.serviceRates.set(service, perSecond);
        }
        render();
      }
      before = { at, ...counters };
    } catch (error) {
      if (error instanceof AuthError) return;
    }
    await sleep(RATES_EVERY_MS);
  }
}

function formatRate(perSecond) {
  return perSecond == null ? "–" : `${perSecond < 10 ? perSecond.toFixed(1) : Math.round(perSecond)}/s`;
}

function showRate(id, perSecond) {
  $(id).textContent = formatRate(perSecond);
}

// -- rendering ---------------------------------------------------------------

function h(tag, attributes, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value != null) element.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child == null) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

// A row of cells, each labelled with its column (the phone layout shows the label).
function row(attributes, labels, cells) {
  return h("tr", attributes, cells.map((cell, i) => h("td", { "data-label": labels[i] }, cell)));
}

function badge(text, tone) {
  return h("span", { class: `badge ${tone}` }, text);
}

const STATUS_TONE = { alive: "ok", healthy: "ok", running: "ok", suspect: "warn", starting: "warn", draining: "warn" };
const tone = (status) => STATUS_TONE[status] || "bad";

function replace(id, rows, empty, columns) {
  const body = $(id);
  body.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: columns, class: "empty" }, empty))]));
}

const byName = (a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);

function nodeStatus(node, fallback) {
  return state.members.get(node)?.status || fallback || "unknown";
}

function problemText(problem) {
  if (typeof problem === "string") return problem;
  const where = problem.label ? `${problem.label}: ` : "";
  return where + (problem.reason || problem.message || JSON.stringify(problem));
}

function hostsOf(service) {
  const hosts = new Set();
  for (const route of state.routes) {
    if (route.service === service.name) hosts.add(`${route.host || "*"}${route.path_prefix && route.path_prefix !== "/" ? route.path_prefix : ""}`);
  }
  // Before the routing mesh's counters are read (or without it): what the labels name.
  for (const [label, value] of Object.entries(service.labels || {})) {
    if (HOSTS_LABELS.includes(label)) {
      for (const host of value.split(",")) if (HOST.test(host.trim())) hosts.add(host.trim().toLowerCase());
    } else if (label === HTTP_LABEL || label.startsWith(`${HTTP_LABEL}.`)) {
      for (const match of value.matchAll(/(?:https?|sni):\/\/([^/,:\s]+)/g)) hosts.add(match[1].toLowerCase());
    }
  }
  return [...hosts].sort();
}

let renderQueued = false;
function render() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    draw();
  });
}

function draw() {
  $("node-name").textContent = state.node ? `on ${state.node}` : "";
  const tasks = live("tasks").sort((a, b) => (a.service + a.name < b.service + b.name ? -1 : 1));
  const services = live("services").sort(byName);
  const networks = live("networks").sort(byName);

  const nodes = new Map([...state.members.values()].map((member) => [member.name, member]));
  for (const task of tasks) if (!nodes.has(task.node)) nodes.set(task.node, { name: task.node });
  const nodeLabels = ["Node", "Status", "Address", "Incarnation", "Tasks"];
  replace("nodes", [...nodes.values()].sort(byName).map((node) => {
    const status = nodeStatus(node.name, tasks.find((task) => task.node === node.name)?.node_status);
    return row({ "data-node": node.name, "data-status": status }, nodeLabels, [
      node.name,
      badge(status, tone(status)),
      node.address ? `${node.address}:${node.port}` : "–",
      node.incarnation ?? "–",
      tasks.filter((task) => task.node === node.name).length,
    ]);
  }), "No member known yet.", 5);

  const problems = [];
  const serviceLabels = ["Service", "VIPs", "Published ports", "HTTP hosts", "Tasks healthy", "Requests", "Problems"];
  replace("services", services.map((service) => {
    const own = tasks.filter((task) => task.service === service.name);
    const healthy = own.filter((task) => task.health === "healthy").length;
    const serviceProblems = (service.problems || []).map(problemText);
    for (const text of serviceProblems) problems.push({ service: service.name, text });
    return row({ "data-service": service.name }, serviceLabels, [
      h("strong", {}, service.name),
      h("ul", {}, (service.vips || []).map((vip) => h("li", {}, h("code", {}, vip.address), ` ${vip.network}`))),
      h("ul", {}, (service.ports || []).map((port) =>
        h("li", {}, `${port.published_port || "–"} → ${port.target_port}/${port.protocol}`, h("span", { class: "muted" }, ` ${port.publish_mode}`)))),
      h("ul", {}, hostsOf(service).map((host) => h("li", {}, h("code", {}, host)))),
      h("span", { class: own.length && healthy === own.length ? "ok" : own.length ? "warn" : "muted" }, `${healthy}/${own.length}`),
      formatRate(state.serviceRates.get(service.name)),
      serviceProblems.length ? h("ul", { class: "bad", "data-problems": serviceProblems.length }, serviceProblems.map((text) => h("li", {}, text))) : "–",
    ]);
  }), "No service yet.", 7);

  $("problems").replaceChildren(...(problems.length
    ? problems.map((problem) => h("li", { "data-service": problem.service }, h("strong", {}, problem.service), `: ${problem.text}`))
    : [h("li", { class: "none" }, "No route problems.")]));

  // Tasks grouped by node: one <tbody> per node, headed by the node and its status.
  const body = $("tasks");
  const groups = [...new Set(tasks.map((task) => task.node))].sort();
  const taskLabels = ["Task", "Service", "Health", "State", "Address", "Ports", "Last check"];
  const parts = groups.map((node) => {
    const status = nodeStatus(node, tasks.find((task) => task.node === node)?.node_status);
    return [
      h("tr", { "data-node-group": node, "data-status": status }, h("th", { scope: "rowgroup", colspan: 7 }, `${node} `, badge(status, tone(status)))),
      ...tasks.filter((task) => task.node === node).map((task) =>
        row({ "data-task": task.id, "data-health": task.health, "data-service": task.service }, taskLabels, [
          h("code", {}, task.name || task.id),
          task.service,
          badge(task.health, tone(task.health)),
          badge(task.state, tone(task.state)),
          h("code", {}, task.address || Object.values(task.addresses || {}).join(", ") || "–"),
          Object.entries(task.ports || {}).map(([target, actual]) => `${target}→${actual}`).join(", ") || "–",
          task.health_output || "",
        ])),
    ];
  }).flat();
  if (parts.length) body.replaceChildren(...parts);
  else replace("tasks", [], "No task yet.", 7);

  const networkLabels = ["Network", "Driver", "Subnet", "Scope", "Services"];
  replace("networks", networks.map((network) => row({ "data-network": network.name }, networkLabels, [
    h("strong", {}, network.name),
    network.driver,
    h("code", {}, network.subnet),
    network.scope,
    services.filter((service) => (service.networks || []).includes(network.name)).length,
  ])), "No network yet.", 5);

  $("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
}

function setConnection(className, text) {
  const element = $("connection");
  element.className = className;
  element.textContent = text;
}

// -- start -------------------------------------------------------------------

function start() {
  $("login").hidden = true;
  $("main").hidden = false;
  if (streaming) return;
  streaming = true;
  follow().finally(() => {
    streaming = false;
  });
  pollMembers();
  pollRates();
}

function askForToken(message) {
  token = null;
  lastEventId = null;
  setConnection("down", "not connected");
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  token = $("token").value;
  $("token").value = "";
  try {
    await json("/v1/agent"); // is it the right token?
    start();
  } catch (error) {
    askForToken(error instanceof AuthError ? "The agent refused the token." : `The agent did not answer: ${error.message}`);
  }
});

if (FEATURES.has("auth")) askForToken("");
else start();
