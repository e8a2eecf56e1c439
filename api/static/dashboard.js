// The dashboard page: one fetch to learn whether the handle exists, then the live stream
// (EventSource on /v1/users/{handle}/dashboard/stream). Every piece of data is written with
// textContent: nothing from the API is ever parsed as HTML.
"use strict";

const handle = decodeURIComponent(location.pathname.replace(/\/+$/, "").split("/").pop() || "");
const api = "/v1/users/" + encodeURIComponent(handle) + "/dashboard";
const $ = (id) => document.getElementById(id);
let source = null;
let lastTop = null;

function text(id, value) {
  $(id).textContent = value === null || value === undefined || value === "" ? "\u2014" : String(value);
}

function time(iso) {
  return iso ? iso.replace("T", " ").replace(/(\.\d{3})\d*/, "$1").replace("+00:00", "") : null;
}

function showMessage(message) {
  $("message").textContent = message;
  $("message").hidden = false;
}

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "\u2014" : String(value);
  if (cls) td.className = cls;
  row.appendChild(td);
}

function render(d) {
  $("message").hidden = true;
  $("dashboard").hidden = false;
  $("title").textContent = d.display_name ? d.display_name + " (@" + d.handle + ")" : "@" + d.handle;
  $("subtitle").textContent = d.agent_count + (d.agent_count === 1 ? " agent" : " agents");
  document.title = "@" + d.handle + " \u2014 audit-chain dashboard";
  const m = d.chain_meta;
  const p = d.projection;
  text("owner-height", m.owner_chain_height);
  text("global-height", m.global_chain_height);
  text("latest-event", time(m.latest_event_at));
  text("freshness", "position " + p.position + " \u00b7 applied " + time(p.applied_at));
  const body = document.createElement("tbody");
  body.id = "events";
  for (const e of d.recent_events) {
    const row = document.createElement("tr");
    row.dataset.seq = String(e.seq);
    if (lastTop !== null && e.seq > lastTop) row.className = "fresh";
    cell(row, e.seq, "seq");
    cell(row, time(e.created_at));
    cell(row, e.agent_name);
    cell(row, e.event_type);
    cell(row, [e.model, e.provider].filter((x) => x).join(" / ") || null);
    body.appendChild(row);
  }
  $("events").replaceWith(body);
  $("no-events").hidden = d.recent_events.length > 0;
  lastTop = d.recent_events.length ? d.recent_events[0].seq : 0;
}

function retryLater(message) {
  if (source) { source.close(); source = null; }
  text("live", "reconnecting");
  if (message) showMessage(message);
  setTimeout(start, 2000);
}

async function start() {
  let answer;
  try {
    answer = await fetch(api, { headers: { Accept: "application/json" }, cache: "no-store" });
  } catch (err) {
    retryLater("The dashboard API cannot be reached; retrying\u2026");
    return;
  }
  if (answer.status === 404 || answer.status === 422) {
    $("dashboard").hidden = true;
    $("title").textContent = "Audit-chain dashboard";
    showMessage("No user has the handle \u201c" + handle + "\u201d.");
    document.body.dataset.state = "not-found";
    return;
  }
  if (answer.status !== 200) {
    retryLater("The dashboard is not available yet (HTTP " + answer.status + "); retrying\u2026");
    return;
  }
  render(await answer.json());
  document.body.dataset.state = "live";
  source = new EventSource(api + "/stream");
  source.addEventListener("open", () => text("live", "live"));
  source.addEventListener("dashboard", (ev) => render(JSON.parse(ev.data)));
  source.addEventListener("gone", () => {
    source.close();
    source = null;
    start();
  });
  source.addEventListener("error", () => {
    // EventSource reconnects by itself after a dropped connection; it gives up (CLOSED) only
    // on an answer that is not a stream (404, 503): ask again to learn why.
    if (source && source.readyState === EventSource.CLOSED) retryLater(null);
    else text("live", "reconnecting");
  });
}

start();
