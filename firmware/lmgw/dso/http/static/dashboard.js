// The LMGW dashboard: reads the operator API of the node that served it (same origin, the browser shows
// the operator's certificate) every REFRESH_MS and renders with DOM calls only (textContent, never HTML
// from the API).  When a render is complete, <body data-loaded> counts the refreshes (tests wait on it).
"use strict";

const REFRESH_MS = 5000;
const MAX_ROWS = 500;
const EVENTS_SHOWN = 20;
let gateways = [];

async function api(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(`${path}: ${message}`);
  }
  return body;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined || text === "" ? "–" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function when(iso) {
  if (!iso) return "–";
  const date = typeof iso === "number" ? new Date(iso * 1000) : new Date(iso);
  return isNaN(date) ? String(iso) : date.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function tags(gateway) {
  return Object.entries(gateway.tags || {}).map(([k, v]) => `${k}=${v}`).join(" ");
}

function renderGateways() {
  const filter = document.getElementById("filter").value.trim().toLowerCase();
  const shown = gateways.filter((g) => !filter ||
    [g.gateway_id, g.node, g.firmware_version, tags(g)].join(" ").toLowerCase().includes(filter));
  const body = document.querySelector("#gateways tbody");
  body.replaceChildren();
  for (const g of shown.slice(0, MAX_ROWS)) {
    const row = document.createElement("tr");
    row.dataset.gateway = g.gateway_id;
    cell(row, g.gateway_id);
    cell(row, g.online ? "online" : "offline", g.online ? "status-online" : "status-offline");
    cell(row, g.node);
    cell(row, g.firmware_version);
    cell(row, when(g.last_seen));
    cell(row, g.certificate ? when(g.certificate.not_after) : null);
    cell(row, tags(g));
    body.appendChild(row);
  }
  const note = document.getElementById("gateways-note");
  note.hidden = shown.length <= MAX_ROWS;
  note.textContent = `${shown.length - MAX_ROWS} more not shown: narrow the filter.`;
}

function renderJobs(jobs) {
  const running = jobs.filter((j) => j.state === "running" || j.state === "cancelling");
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren();
  for (const job of running) {
    const row = document.createElement("tr");
    row.dataset.job = job.id;
    cell(row, job.id);
    cell(row, job.method);
    cell(row, job.state);
    const progress = document.createElement("progress");
    progress.max = job.total;
    progress.value = job.finished;
    const td = cell(row, "");
    td.replaceChildren(progress, document.createTextNode(` ${job.finished}/${job.total}`));
    cell(row, Object.entries(job.counts).filter(([k, n]) => n && k !== "pending" && k !== "sent")
      .map(([k, n]) => `${k} ${n}`).join(", "));
    cell(row, job.node);
    cell(row, job.created_by);
    body.appendChild(row);
  }
  document.getElementById("no-jobs").hidden = running.length > 0;
  document.getElementById("jobs-count").textContent = running.length;
}

function renderEvents(events) {
  const body = document.querySelector("#security-events tbody");
  body.replaceChildren();
  for (const record of events.slice(-EVENTS_SHOWN).reverse()) {
    const row = document.createElement("tr");
    const event = record.event || {};
    cell(row, when(record.received));
    cell(row, record.gateway_id);
    cell(row, event.kind);
    cell(row, JSON.stringify(event.details || {}));
    body.appendChild(row);
  }
  document.getElementById("no-events").hidden = events.length > 0;
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const [fleet, jobs, events] = await Promise.all([
      api("/api/v1/gateways"), api("/api/v1/jobs?state=running"),
      api(`/api/v1/events?kind=${encodeURIComponent("security.*")}&limit=${EVENTS_SHOWN}`)]);
    gateways = fleet.gateways;
    document.getElementById("online-count").textContent = fleet.online;
    document.getElementById("offline-count").textContent = fleet.offline;
    document.getElementById("total-count").textContent = fleet.count;
    renderGateways();
    renderJobs(jobs.jobs);
    renderEvents(events.events);
    document.getElementById("updated").textContent = `updated ${when(new Date().toISOString())}`;
    error.hidden = true;
    document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
  } catch (exc) {
    error.textContent = `Could not refresh: ${exc.message}`;
    error.hidden = false;
  }
}

async function start() {
  document.getElementById("filter").addEventListener("input", renderGateways);
  try {
    const [who, node] = await Promise.all([api("/api/v1/whoami"), api("/api/v1/node")]);
    document.getElementById("who").textContent = `${who.name} (${who.role})`;
    document.getElementById("node").textContent = node.cluster ? `node ${node.node}` : "single node";
  } catch (exc) {
    document.getElementById("error").textContent = `Not allowed: ${exc.message}`;
    document.getElementById("error").hidden = false;
  }
  await refresh();
  setInterval(refresh, REFRESH_MS);
}

start();
