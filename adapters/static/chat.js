"use strict";
// Customer chat: one WebSocket per tab; text is always inserted with textContent.
(function () {
  const log = document.getElementById("log");
  const input = document.getElementById("input");
  const status = document.getElementById("status");
  let session = localStorage.getItem("supportbot.session");
  if (!session) {
    session = Array.from(crypto.getRandomValues(new Uint8Array(12)), b => b.toString(16).padStart(2, "0")).join("");
    localStorage.setItem("supportbot.session", session);
  }
  const pending = new Map();  // client id -> frame, resent after a reconnect until acked
  const bubbles = new Map();  // reply id -> element
  let ws = null;
  let backoff = 500;

  function bubble(cls, text) {
    const el = document.createElement("div");
    el.className = "msg " + cls;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    el.appendChild(body);
    log.appendChild(el);
    log.scrollTop = log.scrollHeight;
    return el;
  }

  function setText(el, text) { el.querySelector(".text").textContent = text; log.scrollTop = log.scrollHeight; }

  function addLinks(el, title, items, onClick) {
    if (!items || !items.length) return;
    const box = document.createElement("div");
    box.className = "suggestions";
    const label = document.createElement("span");
    label.textContent = title;
    box.appendChild(label);
    for (const item of items) {
      const a = document.createElement("a");
      a.textContent = item.title;
      if (/^(https?:\/\/|\/(?!\/))/i.test(item.url || "")) {
        a.href = item.url;
        a.target = "_blank";
        a.rel = "noopener noreferrer";
      }
      a.dataset.id = item.id;
      if (onClick) a.addEventListener("click", () => onClick(item));
      box.appendChild(a);
    }
    el.appendChild(box);
  }

  function send(frame) {
    pending.set(frame.id, frame);
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(frame));
  }

  function newId() { return Date.now().toString(36) + Math.random().toString(36).slice(2, 8); }

  // On every (re)connect the server's transcript is the truth: a reconnecting tab may have
  // missed replies (sent while it was away, or after a restart), so the log is redrawn from it.
  // Its lines carry ids: a customer line its client id, a reply line its reply id.
  function showTranscript(transcript) {
    log.replaceChildren();
    bubbles.clear();
    const stored = new Set();
    for (const line of transcript) {
      if (line.id) stored.add(line.id);
      // Commands and clicks are stored with empty text; they are not part of the chat.
      if (!line.text) continue;
      const el = bubble(line.direction === "in" ? "customer" : line.sender, line.text);
      if (line.reply) { el.dataset.stored = "1"; bubbles.set(line.reply, el); }
    }
    // Unacknowledged frames the server stored before their ack was lost are done; the rest
    // are drawn again (oldest first) and re-sent.
    for (const [id, p] of pending) {
      if (stored.has(id)) pending.delete(id);
      else if (p.type === "command") bubble("customer", "/" + p.name);
      else if (p.type === "message") bubble("customer", p.text);
    }
  }

  function onFrame(f) {
    // Frames the server held while the hello was prepared may be for replies the transcript
    // already showed (same reply id): those add only what the transcript lacks (links).
    const known = f.reply === undefined ? undefined : bubbles.get(f.reply);
    if (f.type === "hello") {
      showTranscript(f.transcript);
      for (const frame of pending.values()) ws.send(JSON.stringify(frame));
    } else if (f.type === "ack") {
      pending.delete(f.id);
    } else if (f.type === "typing") {
      if (!known) bubbles.set(f.reply, bubble("bot typing", "…"));
    } else if (f.type === "delta") {
      if (known && (known.dataset.stored || known.dataset.done)) return;
      const el = known || bubble("bot", "");
      bubbles.set(f.reply, el);
      setText(el, f.text);
    } else if (f.type === "reply" || f.type === "message") {
      if (known && known.dataset.done) return;
      const el = known || bubble(f.sender, "");
      el.className = "msg " + f.sender;
      setText(el, f.text);
      addLinks(el, "Sources:", f.citations, null);
      addLinks(el, "Helpful articles:", f.suggestions,
        item => send({ type: "click", id: newId(), suggestion: item.id }));
      el.dataset.done = "1";
    } else if (f.type === "abort") {
      if (known && !known.dataset.stored) known.remove();
    } else if (f.type === "error") {
      status.textContent = f.error;
    }
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(`${proto}//${location.host}/ws?session=${session}`);
    ws.onopen = () => { backoff = 500; status.textContent = ""; document.body.dataset.connected = "1"; };
    ws.onmessage = ev => onFrame(JSON.parse(ev.data));
    ws.onclose = () => {
      document.body.dataset.connected = "";
      status.textContent = "Reconnecting…";
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 10000);
    };
  }

  document.getElementById("form").addEventListener("submit", ev => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    bubble("customer", text);
    send({ type: "message", id: newId(), text });
  });
  input.addEventListener("keydown", ev => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); document.getElementById("send").click(); }
  });
  document.getElementById("human").addEventListener("click", () => {
    bubble("customer", "/human");
    send({ type: "command", id: newId(), name: "human" });
  });
  connect();
})();
