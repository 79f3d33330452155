// livetalk-ray web client: one session over a WebSocket. Each binary message is one block:
// [u32 header length][header JSON][JPEGs][PCM s16le]; frames and audio are scheduled on one clock
// (the AudioContext's), so lips and voice stay in sync. See livetalk_ray/serving/protocol.py.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { ws: null, session: null, audio: null, base: null, frames: [], shown: [], gaps: [], lastBlock: null, picked: null, mic: null, blocks: 0, audioBlocks: 0, drawn: 0, sources: [], avatar: null, interruptions: 0, heard: [] };
window.livetalk = state; // tests read the counters

function log(text, cls) {
  const line = document.createElement("div");
  line.textContent = text;
  if (cls) line.className = cls;
  $("log").appendChild(line);
  $("log").scrollTop = $("log").scrollHeight;
}
function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

async function loadPortraits() {
  $("portraits").replaceChildren();
  const res = await fetch("/v1/portraits", { headers: authHeaders() });
  if (res.status === 401) { log("this server needs a token: enter it above", "err"); return; }
  if (!res.ok) { log(`portraits: ${res.status} ${(await res.json()).detail}`, "err"); return; }
  const listing = await res.json();
  $("model-note").textContent = listing.model || "";
  for (const name of listing.portraits) {
    const img = new Image();
    img.alt = name; img.title = name;
    const blob = await (await fetch(`/v1/portraits/${name}.png`, { headers: authHeaders() })).blob();
    img.src = URL.createObjectURL(blob);
    img.onclick = () => { state.picked = name; $("upload").value = ""; document.querySelectorAll("#portraits img").forEach((x) => x.classList.toggle("picked", x === img)); };
    $("portraits").appendChild(img);
    if (!state.picked) img.click();
  }
}

async function start() {
  const form = new FormData();
  const file = $("upload").files[0];
  if (file) form.append("image", file); else form.append("portrait", state.picked || "ada");
  form.append("persona", $("persona").value);
  form.append("mode", $("mode").value);
  $("start").disabled = true;
  const res = await fetch("/v1/sessions", { method: "POST", body: form, headers: authHeaders() });
  const body = await res.json();
  if (!res.ok) {
    const retry = res.headers.get("Retry-After");
    log(`could not start: ${res.status} ${body.detail}${retry ? ` (try again in ${retry} s)` : ""}`, "err");
    $("start").disabled = false;
    return;
  }
  if (res.status === 202) showQueue(body.queue);  // accepted: it streams once a slot frees up
  state.session = body;
  state.audio = new AudioContext({ sampleRate: body.sample_rate });
  state.base = null;
  const token = $("token").value.trim();
  const url = new URL(body.ws, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (token) url.searchParams.set("token", token);
  state.ws = new WebSocket(url);
  state.ws.binaryType = "arraybuffer";
  state.ws.onmessage = (ev) => (typeof ev.data === "string" ? onEvent(JSON.parse(ev.data)) : onBlock(ev.data));
  state.ws.onclose = (ev) => { log(`session closed${ev.reason ? ": " + ev.reason : ""}`); setLive(false); };
  state.ws.onopen = () => { log(`session ${body.session_id} started`); setLive(true); };
}

function showQueue(queue) {
  const wait = queue.estimated_wait_s == null ? "" : `, about ${Math.round(queue.estimated_wait_s)} s`;
  $("state").textContent = `queued: #${queue.position}`;
  $("state").className = "queued";
  log(`every real-time slot is taken: you are number ${queue.position} in the queue${wait}`);
}

function setLive(live) {
  for (const id of ["send", "say", "mic", "stop"]) $(id).disabled = !live;
  $("start").disabled = live;
}

function onEvent(ev) {
  if (ev.type === "transcript" && ev.role === "user" && ev.final === false) { $("partial").textContent = `you: ${ev.text} …`; return; }
  if (ev.type === "transcript") {
    if (ev.role === "user") { $("partial").textContent = ""; state.heard.push(ev.text); }
    if (ev.text) log(`${ev.role === "user" ? "you" : "avatar"}: ${ev.text}`, ev.role === "user" ? "you" : "avatar");
  }
  else if (ev.type === "state") { state.avatar = ev.state; $("state").textContent = ev.state; $("state").className = ev.state; }
  else if (ev.type === "interrupted") { interrupt(ev.from_block); log(`(interrupted: you heard "${ev.heard}")`); }
  else if (ev.type === "first_frame") { state.firstFrame = ev.latency_s; log(`first frame after ${ev.latency_s.toFixed(2)} s`); }
  else if (ev.type === "error") log(`error (${ev.code}): ${ev.message}${ev.incident ? " [incident " + ev.incident + "]" : ""}`, "err");
  else if (ev.type === "reprimed") log(`stream re-primed: ${ev.reason}`, "err");
  else if (ev.type === "queued") showQueue(ev);
  else if (ev.type === "admitted") { $("state").textContent = "listening"; log(`a slot is free after ${ev.waited_s} s: starting`); }
  else if (ev.type === "migrated") log(`moved to another ${ev.stage} replica (${Math.round(ev.pause_s * 1000)} ms pause)`);
  else if (ev.type === "recovering") log(`${ev.reason}`, "err");
  else if (ev.type === "recovered") log(`the ${ev.stage} stage is back`);
  else if (ev.type === "delayed") log(`stream delayed ${ev.seconds} s: waiting for ${ev.waiting_for}`, "err");
  else if (ev.type === "closed") log(`session ended (${ev.reason})`);
}

async function onBlock(buffer) {
  const view = new DataView(buffer);
  const n = view.getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, n)));
  const now = performance.now();
  if (state.lastBlock !== null) state.gaps.push(now - state.lastBlock);
  state.lastBlock = now;
  let offset = 4 + n;
  const bitmaps = [];
  for (const size of header.jpeg_sizes) {
    bitmaps.push(createImageBitmap(new Blob([new Uint8Array(buffer, offset, size)], { type: "image/jpeg" })));
    offset += size;
  }
  const pcm = new Int16Array(buffer.slice(offset, offset + 2 * header.pcm_samples));
  const ctx = state.audio;
  // The clock: block time first_frame/fps plays at base + that; a late block pushes the base back (a stall, never drift).
  const at = header.first_frame / header.fps;
  if (state.base === null || state.base + at < ctx.currentTime + 0.05) state.base = ctx.currentTime + 0.25 - at;
  if (pcm.length) {
    const audio = ctx.createBuffer(1, pcm.length, header.sample_rate);
    const channel = audio.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 32767;
    const source = ctx.createBufferSource();
    source.buffer = audio;
    source.connect(ctx.destination);
    source.start(state.base + at);
    state.sources.push({ index: header.index, source });
    state.sources = state.sources.filter((s) => s.index > header.index - 16);
    state.audioBlocks += 1;
  }
  state.blocks += 1;
  const images = await Promise.all(bitmaps);
  images.forEach((image, i) => state.frames.push({ time: state.base + at + i / header.fps, image }));
}

// The user talked over the avatar: the sound of blocks from `fromBlock` on is void. Their frames stay (hiding them
// would freeze the picture until the next block). Blocks come in order, so every block with void sound arrived
// before the event; the server sends the ones after it without the cut speech.
function interrupt(fromBlock) {
  for (const s of state.sources) if (s.index >= fromBlock) s.source.stop();
  state.sources = state.sources.filter((s) => s.index < fromBlock);
  state.interruptions += 1;
}

function draw() {
  const ctx = state.audio;
  if (ctx) {
    let latest = null;
    while (state.frames.length && state.frames[0].time <= ctx.currentTime) latest = state.frames.shift();
    if (latest) {
      const canvas = $("screen");
      canvas.getContext("2d").drawImage(latest.image, 0, 0, canvas.width, canvas.height);
      state.shown.push(performance.now());
      state.drawn += 1;
    }
  }
  const now = performance.now();
  state.shown = state.shown.filter((t) => now - t < 1000);
  const gaps = state.gaps.slice(-20);
  const gap = gaps.length ? (gaps.reduce((a, b) => a + b, 0) / gaps.length).toFixed(0) + " ms" : "–";
  const ff = state.firstFrame !== undefined ? state.firstFrame.toFixed(2) + " s" : "–";
  $("stats").textContent = `FPS ${state.shown.length} · first frame ${ff} · block gap ${gap} · buffered ${state.frames.length} frames`;
  requestAnimationFrame(draw);
}

function send(type) {
  const text = $("text").value.trim();
  if (!text || !state.ws) return;
  state.ws.send(JSON.stringify({ type, text }));
  if (type === "say") log(`you (read aloud): ${text}`, "you");
  $("text").value = "";
}

async function toggleMic() {
  if (state.mic) { state.mic.stop(); state.mic = null; $("mic").textContent = "Talk (microphone)"; return; }
  // Echo cancellation: in conversation mode the avatar's own voice from the speakers must not interrupt it.
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
  const ctx = new AudioContext({ sampleRate: state.session.sample_rate });
  const source = ctx.createMediaStreamSource(stream);
  const node = ctx.createScriptProcessor(4096, 1, 1);
  state.ws.send(JSON.stringify({ type: "audio_format", encoding: "pcm_s16le", sample_rate: ctx.sampleRate, channels: 1 }));
  node.onaudioprocess = (e) => {
    const input = e.inputBuffer.getChannelData(0);
    const out = new Int16Array(input.length);
    for (let i = 0; i < input.length; i++) out[i] = Math.max(-1, Math.min(1, input[i])) * 32767;
    if (state.ws && state.ws.readyState === 1) state.ws.send(out.buffer);
  };
  source.connect(node); node.connect(ctx.destination);
  state.mic = { stop: () => { node.disconnect(); stream.getTracks().forEach((t) => t.stop()); ctx.close(); } };
  $("mic").textContent = "Stop microphone";
}

async function stop() {
  if (!state.session) return;
  await fetch(`/v1/sessions/${state.session.session_id}`, { method: "DELETE", headers: authHeaders() });
  if (state.ws) state.ws.close();
}

$("start").onclick = start;
$("stop").onclick = stop;
$("send").onclick = () => send("chat");
$("say").onclick = () => send("say");
$("mic").onclick = toggleMic;
$("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send("chat"); } });
$("upload").onchange = () => { state.picked = null; document.querySelectorAll("#portraits img").forEach((x) => x.classList.remove("picked")); };
$("token").value = new URLSearchParams(location.search).get("token") || "";
$("token").onchange = loadPortraits;
loadPortraits();
requestAnimationFrame(draw);
