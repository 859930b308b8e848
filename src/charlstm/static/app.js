// charlstm's page: plain JavaScript against the server's own API (no libraries, no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { controller: null, keyNeeded: false, limits: {} };

// ---------------------------------------------------------------- API

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem("charlstm-key");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(path, body, signal) {
  const response = await fetch(path, body === undefined ? { headers: headers(), signal }
    : { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (response.status === 401) $("key-bar").hidden = false;
  return response;
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch { return `HTTP ${response.status}`; }
}

// ---------------------------------------------------------------- tints and the tooltip

const shown = (ch) => ch === " " ? "␣" : ch === "\n" ? "↵" : ch === "\t" ? "⇥" : ch;

function probTint(p) {   // unlikely characters hot, expected ones barely tinted
  const hue = 205 * Math.pow(p, 0.7);
  const alpha = 0.05 + 0.7 * Math.pow(1 - p, 1.3);
  return `hsla(${hue.toFixed(0)}, 85%, 58%, ${alpha.toFixed(2)})`;
}

function bitsTint(bits) {
  const t = Math.min(bits / 8, 1);
  const hue = 205 - 205 * Math.min(t * 1.6, 1);
  return `hsla(${hue.toFixed(0)}, 90%, 58%, ${(0.06 + 0.8 * t).toFixed(2)})`;
}

const tip = $("tip");
const details = new WeakMap();   // span -> {title, alternatives: [[char, p]], picked}

function showTip(span, event) {
  const d = details.get(span);
  if (!d) return;
  tip.replaceChildren();
  const title = document.createElement("div");
  title.className = "title";
  title.textContent = d.title;
  tip.append(title);
  for (const [ch, p] of d.alternatives) {
    const row = document.createElement("div");
    row.className = "row" + (ch === d.picked ? " picked" : "");
    const c = document.createElement("span"); c.className = "ch"; c.textContent = shown(ch);
    const bar = document.createElement("span"); bar.className = "bar";
    const fill = document.createElement("i"); fill.style.width = (100 * p).toFixed(1) + "%"; bar.append(fill);
    const pct = document.createElement("span"); pct.className = "pct"; pct.textContent = (100 * p).toFixed(1) + "%";
    row.append(c, bar, pct);
    tip.append(row);
  }
  tip.hidden = false;
  moveTip(event);
}

function moveTip(event) {
  const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  const y = event.clientY + 18 + tip.offsetHeight > window.innerHeight ? event.clientY - tip.offsetHeight - 12
    : event.clientY + 18;
  tip.style.left = x + "px";
  tip.style.top = y + "px";
}

for (const id of ["samples-out", "heatmap"]) {
  const box = $(id);
  box.addEventListener("mouseover", (e) => { if (e.target.classList.contains("c")) showTip(e.target, e); });
  box.addEventListener("mousemove", (e) => { if (!tip.hidden) moveTip(e); });
  box.addEventListener("mouseout", (e) => { if (e.target.classList.contains("c")) tip.hidden = true; });
}

function charSpan(ch, p, alternatives, title) {
  const span = document.createElement("span");
  span.className = "c";
  span.textContent = ch;
  if (p !== null) { span.style.background = probTint(p); span.dataset.p = p.toFixed(4); }
  if (alternatives) details.set(span, { title, alternatives, picked: ch });
  return span;
}

// ---------------------------------------------------------------- generating

function sampleCards(count, seed, prompt) {
  const out = $("samples-out");
  out.replaceChildren();
  const cards = [];
  for (let i = 0; i < count; i++) {
    const card = document.createElement("div");
    card.className = "card sample";
    const head = document.createElement("div");
    head.className = "card-head";
    head.innerHTML = `<span><b>sample ${i + 1}</b> · seed <span class="seed"></span></span><span class="info">streaming…</span>`;
    head.querySelector(".seed").textContent = String(seed + i);
    const text = document.createElement("div");
    text.className = "text streaming";
    const lead = document.createElement("span");
    lead.className = "prompt";
    lead.textContent = prompt;
    text.append(lead);
    card.append(head, text);
    out.append(card);
    cards.push({ text, info: head.querySelector(".info"), chars: 0, logprob: 0 });
  }
  return cards;
}

function appendChoice(card, choice) {
  const lp = choice.logprobs;
  const fragment = document.createDocumentFragment();
  if (lp) {
    lp.tokens.forEach((ch, k) => {
      const value = lp.token_logprobs[k];
      const p = value === null ? null : Math.exp(value);
      const top = lp.top_logprobs[k];
      const alternatives = top ? Object.entries(top).map(([c, v]) => [c, Math.exp(v)]) : null;
      fragment.append(charSpan(ch, p, alternatives,
        p === null ? "" : `“${shown(ch)}” had p = ${(100 * p).toFixed(1)}% · ${(-value / Math.LN2).toFixed(2)} bits`));
      if (value !== null) { card.chars += 1; card.logprob += value; }
    });
  } else {
    fragment.append(document.createTextNode(choice.text));
  }
  card.text.append(fragment);
  if (card.chars) card.info.textContent = `${card.chars} chars · ${(-card.logprob / card.chars / Math.LN2).toFixed(2)} bits/char`;
  if (choice.finish_reason) {
    card.text.classList.remove("streaming");
    card.info.textContent += ` · ${choice.finish_reason}`;
  }
}

async function generate() {
  const error = $("gen-error");
  error.hidden = true;
  const prompt = $("prompt").value;
  const samples = Math.max(1, Math.min(4, parseInt($("samples").value, 10) || 1));
  const seedText = $("seed").value.trim();
  const seed = seedText === "" ? Math.floor(Math.random() * 2 ** 31) : parseInt(seedText, 10);
  const body = {
    model: $("model").value, prompt, stream: true, logprobs: 5, n: samples, seed,
    max_tokens: parseInt($("length").value, 10), temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top-p").value), top_k: parseInt($("top-k").value, 10) || 0,
  };
  const cards = sampleCards(samples, seed, prompt);
  const pending = onceAFrame((choices) => { for (const choice of choices) appendChoice(cards[choice.index], choice); });
  state.controller = new AbortController();
  setRunning(true);
  try {
    const response = await api("/v1/completions", body, state.controller.signal);
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (event) => { for (const choice of event.choices) pending.push(choice); });
    pending.flush();
  } catch (err) {
    pending.flush();
    if (err.name !== "AbortError") { error.textContent = err.message; error.hidden = false; }
    for (const card of cards) {
      if (card.text.classList.contains("streaming")) {
        card.text.classList.remove("streaming");
        card.info.textContent += err.name === "AbortError" ? " · stopped" : " · failed";
      }
    }
  } finally {
    setRunning(false);
    state.controller = null;
  }
}

// A fast model sends hundreds of events a second: the page takes them in once per frame, so
// the browser draws (and Stop stays clickable) however fast they come.
function onceAFrame(apply) {
  let queued = [];
  let scheduled = false;
  const flush = () => {
    scheduled = false;
    const items = queued;
    queued = [];
    if (items.length) apply(items);
  };
  return {
    push(item) {
      queued.push(item);
      if (!scheduled) { scheduled = true; requestAnimationFrame(flush); }
    },
    flush,
  };
}

async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      const parsed = JSON.parse(data);
      if (parsed.error) throw new Error(parsed.error.message);
      onEvent(parsed);
    }
  }
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
}

// ---------------------------------------------------------------- surprise

async function score() {
  const error = $("score-error");
  error.hidden = true;
  $("score").disabled = true;
  try {
    const response = await api("/v1/score", {
      model: $("model").value, text: $("score-text").value, top: 5,
      prime_unknown: $("skip-unknown").checked ? "skip" : "error",
    });
    if (!response.ok) throw new Error(await errorText(response));
    drawHeatmap(await response.json());
  } catch (err) {
    error.textContent = err.message;
    error.hidden = false;
  } finally {
    $("score").disabled = false;
  }
}

function drawHeatmap(result) {
  const box = $("heatmap");
  const fragment = document.createDocumentFragment();
  result.chars.forEach((ch, k) => {
    const bits = result.bits[k];
    const span = document.createElement("span");
    span.className = "c";
    span.textContent = ch;
    if (bits !== null) {
      span.style.background = bitsTint(bits);
      details.set(span, {
        title: `“${shown(ch)}”: p = ${(100 * result.probs[k]).toFixed(1)}% · ${bits.toFixed(2)} bits`,
        alternatives: result.top[k].map((a) => [a.char, a.prob]), picked: ch,
      });
    }
    fragment.append(span);
  });
  box.replaceChildren(fragment);
  const compressors = result.compressors.map((c) => `${c.name} ${c.bits_per_char.toFixed(2)}`).join(" · ");
  $("score-summary").innerHTML = "";
  const total = document.createElement("b");
  total.id = "bits-per-char";
  total.textContent = `${result.bits_per_char.toFixed(3)} bits/char`;
  $("score-summary").append(total, ` over ${result.scored_characters} characters · compressors on the same text: ${compressors}`);
}

// ---------------------------------------------------------------- page set-up

async function loadModels() {
  const response = await api("/v1/models");
  if (!response.ok) return;
  const select = $("model");
  const previous = select.value;
  select.replaceChildren();
  for (const m of (await response.json()).data) {
    const cfg = m.charlstm.config;
    const option = document.createElement("option");
    option.value = m.id;
    const bits = m.charlstm.val_bits_per_char;
    option.textContent = `${m.id} (${cfg.layers}×${cfg.units}${bits ? `, ${bits.toFixed(2)} bits/char` : ""})`;
    select.append(option);
  }
  if (previous) select.value = previous;
}

async function pollHealth() {
  try {
    const response = await fetch("/health");
    const health = await response.json();
    $("active-count").textContent = health.active ?? "–";
    $("waiting-count").textContent = health.waiting ?? "–";
    $("status").className = "pill" + (health.status !== "ok" ? " down" : health.active ? " busy" : "");
    if (health.limits && !state.limits.max_length) {   // once: the user's choice is kept after that
      state.limits = health.limits;
      $("length").max = Math.min(health.limits.max_length, 5000);
    }
    if (health.status === "ok" && !$("model").options.length) await loadModels();
  } catch {
    $("status").className = "pill down";
  }
}

for (const [id, digits] of [["temperature", 2], ["top-p", 2], ["length", 0]]) {
  const input = $(id);
  const show = () => { $(`${id}-out`).textContent = Number(input.value).toFixed(digits); };
  input.addEventListener("input", show);
  show();
}
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
    $("view-generate").hidden = tab.dataset.view !== "generate";
    $("view-surprise").hidden = tab.dataset.view !== "surprise";
  });
}
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("score").addEventListener("click", score);
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
$("save-key").addEventListener("click", () => {
  localStorage.setItem("charlstm-key", $("api-key").value);
  $("key-bar").hidden = true;
  loadModels();
});

pollHealth();
setInterval(pollHealth, 500);
