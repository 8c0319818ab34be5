"use strict";

// NOTE: the panes run one after the other, never concurrently. On a shared CPU replica two concurrent requests
// share the same engine steps (and cores), so each pane would time the pair and the speedup would mean nothing.
const PANES = [{id: "pane-spec", speculative: true}, {id: "pane-plain", speculative: false}];

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("request").addEventListener("submit", onSubmit);
  const adaptive = document.getElementById("adaptive");
  const syncK = () => { document.getElementById("k").disabled = adaptive.checked; };
  adaptive.addEventListener("change", syncK);
  syncK();
});

async function onSubmit(event) {
  event.preventDefault();
  const button = document.getElementById("run");
  const formError = document.getElementById("form-error");
  formError.hidden = true;
  let body;
  try {
    body = requestBody();
  } catch (error) {  // a mistake the server cannot see (the schema box is not JSON): shown, nothing sent
    formError.textContent = error.message;
    formError.hidden = false;
    return;
  }
  button.disabled = true;
  document.getElementById("speedup").textContent = "";
  const views = PANES.map(pane => resetPane(pane.id));
  const finals = [];
  for (const [i, pane] of PANES.entries()) {
    finals.push(await runPane(views[i], {...body, speculative: pane.speculative}));
  }
  showSpeedup(finals);
  button.disabled = false;
}

/** The /generate/stream body from the form; values go as typed so the server does all the validation. */
function requestBody() {
  const field = id => document.getElementById(id).value.trim();
  const number = id => (field(id) === "" ? null : Number(field(id)));
  return {
    prompt: document.getElementById("prompt").value,
    chat: document.getElementById("chat").checked,
    max_tokens: number("max_tokens"),
    temperature: number("temperature"),
    top_p: number("top_p"),
    top_k: number("top_k"),
    seed: number("seed"),
    num_speculative_tokens: document.getElementById("adaptive").checked ? null : number("k"),
    ...responseFormat(),
  };
}

/** The JSON-schema box as `response_format` ({} when empty); throws when the box is not JSON. */
function responseFormat() {
  const text = document.getElementById("schema").value.trim();
  if (text === "") return {};
  let schema;
  try {
    schema = JSON.parse(text);
  } catch (error) {
    throw new Error(`JSON schema: not valid JSON (${error.message})`);
  }
  return {response_format: {type: "json_schema", json_schema: {name: "playground", schema}}};
}

function resetPane(id) {
  const root = document.getElementById(id);
  const counters = {};
  for (const el of root.querySelectorAll("[data-counter]")) {
    counters[el.dataset.counter] = el;
    el.textContent = "–";
  }
  const view = {root, counters, output: root.querySelector(".output"), error: root.querySelector(".error")};
  view.output.replaceChildren();
  view.error.textContent = "";
  view.error.hidden = true;
  root.dataset.state = "idle";
  return view;
}

/** Streams one request into a pane; returns the `final` stats, or null after showing the error. */
async function runPane(view, body) {
  view.root.dataset.state = "streaming";
  const live = {started: performance.now(), ttft: null, tokens: 0, drafted: 0, accepted: 0, k: null};
  try {
    const response = await fetch("/generate/stream", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    let final = null;
    for await (const event of sseEvents(response)) {
      if (event.name === "chunk") onChunk(view, live, JSON.parse(event.data));
      else if (event.name === "final") final = JSON.parse(event.data);
      else if (event.name === "error") throw new Error(`stream failed: ${JSON.parse(event.data).error}`);
    }
    if (!final) throw new Error("the stream ended without a final event");
    showCounters(view, {tps: final.tokens_per_second, ttft: final.time_to_first_token,
                        acceptance: final.acceptance_rate, k: live.k});
    view.root.dataset.state = "done";
    return final;
  } catch (error) {
    view.error.textContent = error.message;
    view.error.hidden = false;
    view.root.dataset.state = "error";
    return null;
  }
}

/** "HTTP 422: <detail>" from an error response (the native routes answer {"detail": "..."}). */
async function errorMessage(response) {
  const text = await response.text();
  let detail = text;
  try {
    detail = JSON.parse(text).detail ?? text;
  } catch {
    // not JSON (a proxy's error page, say): show the body as it is
  }
  return `HTTP ${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`;
}

/** Server-Sent Events from a fetch() body: {name, data} per event (EventSource cannot POST). */
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", name = "message", data = [];
  try {
    for (let read = await reader.read(); !read.done; read = await reader.read()) {
      // Lines end in \r\n (sse-starlette) or \n; a trailing "\r" waits in the buffer for its "\n".
      const lines = (buffer + read.value).split(/\r?\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "" && data.length) {
          yield {name, data: data.join("\n")};
          name = "message";
          data = [];
        } else if (line.startsWith("event:")) {
          name = line.slice(6).trim();
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        }
      }
    }
  } finally {
    reader.cancel();  // also when the caller stops early (an error event): closes the connection
  }
}

function onChunk(view, live, chunk) {
  const seconds = (performance.now() - live.started) / 1000;
  live.ttft ??= seconds;
  live.tokens += chunk.token_ids.length;
  live.drafted += chunk.num_drafted;
  live.accepted += chunk.num_accepted;
  live.k = chunk.num_drafted;
  view.output.append(chunkSpan(chunk));
  showCounters(view, {tps: live.tokens / seconds, ttft: live.ttft,
                      acceptance: live.drafted ? live.accepted / live.drafted : null, k: live.k});
}

function chunkSpan(chunk) {
  const span = document.createElement("span");
  span.className = ["tok", ...chunkClasses(chunk)].join(" ");
  span.textContent = chunk.text;
  span.title = `${chunk.num_accepted} of ${chunk.num_drafted} drafts accepted; ${chunk.token_ids.length} tokens`;
  return span;
}

/**
 * A chunk is num_accepted accepted drafts plus one target token (fewer tokens if the sequence stopped inside it).
 * Its text comes whole, not per token, so a chunk with accepted drafts is coloured 'accepted' and its trailing
 * edge takes the final token's colour; a chunk with no accepted drafts is all final token.
 */
function chunkClasses(chunk) {
  const last = finalTokenKind(chunk);
  if (chunk.num_accepted === 0) return [last];
  const hasFinalToken = chunk.token_ids.length > chunk.num_accepted;
  return hasFinalToken ? ["accepted", `ends-${last}`] : ["accepted"];
}

function finalTokenKind(chunk) {
  if (chunk.num_drafted === 0) return "target";
  return chunk.num_accepted === chunk.num_drafted ? "bonus" : "corrected";
}

function showCounters(view, {tps, ttft, acceptance, k}) {
  view.counters.tps.textContent = tps.toFixed(1);
  view.counters.ttft.textContent = ttft == null ? "–" : `${(ttft * 1000).toFixed(0)} ms`;
  view.counters.acceptance.textContent = acceptance == null ? "n/a" : `${(acceptance * 100).toFixed(0)} %`;
  view.counters.k.textContent = k ?? "–";
}

function showSpeedup([spec, plain]) {
  const line = document.getElementById("speedup");
  if (!spec || !plain || !(plain.tokens_per_second > 0)) {
    line.textContent = "Speedup: n/a (a pane did not finish)";
    return;
  }
  const ratio = spec.tokens_per_second / plain.tokens_per_second;
  line.textContent = `Speedup: ×${ratio.toFixed(2)} (speculative ${spec.tokens_per_second.toFixed(1)} tokens/s ` +
    `vs plain ${plain.tokens_per_second.toFixed(1)} tokens/s)`;
}
