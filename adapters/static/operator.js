"use strict";
// Operator console: REST for actions, a WebSocket for live queue updates.
(function () {
  let token = sessionStorage.getItem("supportbot.token") || "";
  let name = sessionStorage.getItem("supportbot.name") || "";
  let current = null;
  const $ = id => document.getElementById(id);

  async function api(path, body) {
    const res = await fetch(path, {
      method: body === undefined ? "GET" : "POST",
      headers: { "Authorization": "Bearer " + token, "X-Operator-Name": name, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(data.error || res.statusText);
    return data;
  }

  function reasonText(r) { return r.replace(/_/g, " "); }

  async function refreshQueue() {
    const data = await api("/api/operator/tickets");
    const list = $("tickets");
    list.replaceChildren();
    $("empty").hidden = data.tickets.length > 0;
    for (const t of data.tickets) {
      const li = document.createElement("li");
      li.className = "ticket " + t.state;
      li.dataset.id = t.id;
      const title = document.createElement("strong");
      title.textContent = `#${t.id} ${t.customer} (${t.platform})`;
      const meta = document.createElement("span");
      meta.textContent = ` ${reasonText(t.reason)} · ${t.state}${t.claimed_by ? " by " + t.claimed_by : ""} · waiting ${Math.round(t.waiting_s)} s`;
      const last = document.createElement("div");
      last.className = "last";
      last.textContent = t.last_customer_text;
      li.append(title, meta, last);
      li.addEventListener("click", () => open(t.id));
      list.appendChild(li);
    }
  }

  async function open(id) {
    const data = await api(`/api/operator/tickets/${id}`);
    current = data.ticket;
    $("detail").hidden = false;
    $("ticket-title").textContent = `Ticket #${current.id}: ${current.customer}`;
    $("ticket-meta").textContent = `Reason: ${reasonText(current.reason)} · state: ${current.state} · negative trend: ${current.sentiment_trend.map(p => p.toFixed(2)).join(" → ")}`;
    const box = $("transcript");
    box.replaceChildren();
    for (const line of data.transcript) {
      if (!line.text) continue;  // a command or a click: shown by the ticket's reason
      const row = document.createElement("div");
      row.className = "line " + (line.direction === "in" ? "customer" : line.sender);
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = line.direction === "in" ? "Customer" : line.sender;
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = line.text;
      row.append(who, text);
      if (line.sentiment) {
        const s = document.createElement("span");
        s.className = "sentiment " + line.sentiment;
        s.textContent = `${line.sentiment} ${(line.p_negative ?? 0).toFixed(2)}`;
        row.appendChild(s);
      }
      box.appendChild(row);
    }
    box.scrollTop = box.scrollHeight;
  }

  async function act(action, body) {
    $("action-error").textContent = "";
    try {
      await api(`/api/operator/tickets/${current.id}/${action}`, body || {});
      await open(current.id);
      await refreshQueue();
    } catch (e) { $("action-error").textContent = e.message; }
  }

  function live() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${proto}//${location.host}/api/operator/ws`);
    ws.onopen = () => ws.send(JSON.stringify({ token }));
    ws.onmessage = ev => {
      const f = JSON.parse(ev.data);
      if (f.type === "ticket_opened" || f.type === "ticket_updated") {
        refreshQueue();
        if (current && f.ticket.id === current.id) open(current.id);
      }
    };
    ws.onclose = () => setTimeout(live, 2000);
  }

  async function start() {
    try {
      await refreshQueue();
    } catch (e) {
      $("login-error").textContent = e.message;
      return;
    }
    $("login").hidden = true;
    $("console").hidden = false;
    $("who").textContent = name;
    live();
    setInterval(() => refreshQueue().catch(() => {}), 10000);
  }

  $("login").addEventListener("submit", ev => {
    ev.preventDefault();
    token = $("token").value.trim();
    name = $("name").value.trim();
    sessionStorage.setItem("supportbot.token", token);
    sessionStorage.setItem("supportbot.name", name);
    start();
  });
  $("reply-form").addEventListener("submit", ev => {
    ev.preventDefault();
    const text = $("reply").value.trim();
    if (!text) return;
    $("reply").value = "";
    act("reply", { text });
  });
  $("claim").addEventListener("click", () => act("claim"));
  $("handback").addEventListener("click", () => act("handback"));
  $("resolve").addEventListener("click", () => act("resolve", { note: "" }));
  if (token && name) start();
})();
