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
  function showTranscript(transcript) {
    log.replaceChildren();
    bubbles.clear();
    const stored = [];
    // Commands and clicks are stored with empty text; they are not part of the chat.
    for (const line of transcript) {
      if (!line.text) continue;
      bubble(line.direction === "in" ? "customer" : line.sender, line.text);
      if (line.direction === "in") stored.push(line.text);
    }
    // Unacknowledged messages, oldest first: those stored before their ack was lost end the
    // transcript already; the rest (and commands, never in it) are drawn again and re-sent.
    const texts = [...pending.values()].filter(p => p.type === "message").map(p => p.text);
    let shown = 0;
    for (let k = Math.min(texts.length, stored.length); k > 0 && !shown; k--) {
      const tail = stored.slice(stored.length - k);
      if (texts.slice(0, k).every((t, i) => t === tail[i])) shown = k;
    }
    for (const p of pending.values()) {
      if (p.type === "command") bubble("customer", "/" + p.name);
      else if (p.type === "message" && shown-- <= 0) bubble("customer", p.text);
    }
  }

  function onFrame(f) {
    if (f.type === "hello") {
      showTranscript(f.transcript);
      for (const frame of pending.values()) ws.send(JSON.stringify(frame));
    } else if (f.type === "ack") {
      pending.delete(f.id);
    } else if (f.type === "typing") {
      const el = bubble("bot typing", "…");
      bubbles.set(f.reply, el);
    } else if (f.type === "delta") {
      const el = bubbles.get(f.reply) || bubble("bot", "");
      bubbles.set(f.reply, el);
      setText(el, f.text);
    } else if (f.type === "reply" || f.type === "message") {
      let el = bubbles.get(f.reply);
      if (!el) el = bubble(f.sender, "");
      el.className = "msg " + f.sender;
      setText(el, f.text);
      addLinks(el, "Sources:", f.citations, null);
      addLinks(el, "Helpful articles:", f.suggestions,
        item => send({ type: "click", id: newId(), suggestion: item.id }));
      el.dataset.done = "1";
    } else if (f.type === "abort") {
      const el = bubbles.get(f.reply);
      if (el) el.remove();
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
