"use strict";
// Operator console: REST for actions, a WebSocket for live queue updates and reports.
// The token travels only in the Authorization header (never a cookie), so another site
// cannot make the browser act for an operator.
(function () {
  let token = sessionStorage.getItem("supportbot.token") || "";
  let name = sessionStorage.getItem("supportbot.name") || "";
  let current = null;
  let reportUrl = null;
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

  function waited(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  // A small bar per recent customer message: taller and redder is more negative.
  function spark(box, values) {
    box.replaceChildren();
    box.title = values.length ? "negative: " + values.map(p => p.toFixed(2)).join(" → ") : "no scored messages";
    for (const p of values) {
      const bar = document.createElement("span");
      bar.className = "bar" + (p >= 0.75 ? " hot" : p >= 0.4 ? " warm" : "");
      bar.style.height = `${Math.max(8, Math.round(p * 100))}%`;
      box.appendChild(bar);
    }
  }

  function tick() {
    for (const el of document.querySelectorAll("#tickets .waiting")) {
      el.textContent = "waiting " + waited((Date.now() - Number(el.dataset.since)) / 1000);
    }
  }

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
      meta.className = "meta";
      const matched = t.scores && typeof t.scores.matched === "string" ? ` "${t.scores.matched}"` : "";
      meta.textContent = ` ${reasonText(t.reason)}${matched} · ${t.state}${t.claimed_by ? " by " + t.claimed_by : ""} · `;
      const wait = document.createElement("span");
      wait.className = "waiting";
      wait.dataset.since = String(Date.now() - t.waiting_s * 1000);
      wait.textContent = "waiting " + waited(t.waiting_s);
      meta.appendChild(wait);
      const trend = document.createElement("span");
      trend.className = "spark";
      spark(trend, t.sentiment_trend);
      const last = document.createElement("div");
      last.className = "last";
      last.textContent = t.last_customer_text;
      li.append(title, meta, trend, last);
      li.addEventListener("click", () => open(t.id));
      if (current && current.id === t.id) li.classList.add("selected");
      list.appendChild(li);
    }
  }

  let opening = 0;

  async function open(id) {
    const mine = ++opening;
    const data = await api(`/api/operator/tickets/${id}`);
    if (mine !== opening) return;  // a later open() owns the detail pane
    const switched = !current || current.id !== id;
    current = data.ticket;
    $("detail").hidden = false;
    $("ticket-title").textContent = `Ticket #${current.id}: ${current.customer}`;
    $("ticket-meta").textContent = `Reason: ${reasonText(current.reason)} · state: ${current.state} · negative trend: ${current.sentiment_trend.map(p => p.toFixed(2)).join(" → ")}`;
    spark($("trend"), current.sentiment_trend);
    if (switched) $("reply").value = "";
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
      for (const w of line.withheld || []) {  // the check kept these from the customer
        const del = document.createElement("del");
        del.className = "withheld";
        del.title = "Not shown to the customer: the help centre does not support it";
        del.textContent = w;
        row.appendChild(del);
      }
      if (line.sentiment) {
        const s = document.createElement("span");
        s.className = "sentiment " + line.sentiment;
        s.textContent = `${line.sentiment} ${(line.p_negative ?? 0).toFixed(2)}`;
        row.appendChild(s);
      }
      box.appendChild(row);
    }
    box.scrollTop = box.scrollHeight;
    history(id).catch(() => {});
  }

  // Answers that arrive after the operator opened another ticket belong to the old one:
  // they are dropped, never shown (or drafted) under the new customer.
  const still = id => current !== null && current.id === id;

  function badge(platform) {
    const b = document.createElement("span");
    b.className = "badge platform-" + platform.replace(/[^a-z]/g, "");
    b.textContent = platform;
    return b;
  }

  function accountText(a) {
    return a.display_name ? `${a.display_name} (${a.platform_user_id})` : a.platform_user_id;
  }

  function drawHistory(data) {
    const list = $("history");
    list.replaceChildren();
    for (const c of data.conversations) {
      const li = document.createElement("li");
      li.className = "conversation" + (c.current ? " current" : "");
      li.dataset.platform = c.platform;
      const neg = c.mean_negative == null ? "–" : c.mean_negative.toFixed(2);
      const text = document.createElement("span");
      text.textContent = ` ${c.created_at.slice(0, 16).replace("T", " ")} · ${c.messages} messages · mean negative ${neg} · ${c.tickets} ticket(s)${c.reasons ? " (" + reasonText(c.reasons) + ")" : ""}${c.current ? " · this conversation" : ""}`;
      li.append(badge(c.platform), text);
      if (c.last_text) {
        const last = document.createElement("div");
        last.className = "last";
        last.textContent = c.last_text;
        li.appendChild(last);
      }
      list.appendChild(li);
    }
    const accounts = $("accounts");
    accounts.replaceChildren();
    for (const a of data.accounts) {
      const li = document.createElement("li");
      li.className = "account";
      li.dataset.userId = a.id;
      const label = document.createElement("span");
      label.textContent = " " + accountText(a) + (a.id === data.user_id ? " · this ticket" : "");
      li.append(badge(a.platform), label);
      if (a.id !== data.user_id) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "unlink";
        button.textContent = "Unlink";
        button.addEventListener("click", () => linkAction("unlink", { user_id: a.id }));
        li.appendChild(button);
      }
      accounts.appendChild(li);
    }
    const candidates = $("candidates");
    candidates.replaceChildren();
    for (const a of data.candidates) {
      const li = document.createElement("li");
      li.className = "candidate";
      const label = document.createElement("span");
      label.textContent = " same name: " + accountText(a);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link";
      button.textContent = "Link";
      button.addEventListener("click", () => linkAction("link", { user_id: a.id }));
      li.append(badge(a.platform), label, button);
      candidates.appendChild(li);
    }
  }

  async function history(id) {
    const data = await api(`/api/operator/tickets/${id}/history`);
    if (still(id)) drawHistory(data);
  }

  // Link or unlink an account; the answer is the customer's new history.
  async function linkAction(action, body) {
    $("link-error").textContent = "";
    const id = current.id;
    try {
      const data = await api(`/api/operator/tickets/${id}/${action}`, body);
      if (!still(id)) return false;
      drawHistory(data);
      return true;
    } catch (e) {
      if (still(id)) $("link-error").textContent = e.message;
      return false;
    }
  }

  // True when the action succeeded (the caller may then clear what it sent).
  async function act(action, body) {
    $("action-error").textContent = "";
    const id = current.id;
    try {
      await api(`/api/operator/tickets/${id}/${action}`, body || {});
    } catch (e) {
      if (still(id)) $("action-error").textContent = e.message;
      return false;
    }
    try {
      if (still(id)) await open(id);
      await refreshQueue();
    } catch (e) { $("action-error").textContent = e.message; }
    return true;
  }

  async function draft() {
    $("action-error").textContent = "";
    const id = current.id;
    const button = $("draft");
    button.disabled = true;
    button.textContent = "Drafting…";
    try {
      const data = await api(`/api/operator/tickets/${id}/draft`);
      if (still(id)) {
        $("reply").value = data.draft;
        $("reply").focus();
      }
    } catch (e) { if (still(id)) $("action-error").textContent = e.message; }
    button.disabled = false;
    button.textContent = "Draft with the bot";
  }

  async function showReport(report) {
    if (!report) return;
    $("report").hidden = false;
    $("report-at").textContent = report.posted_at.replace("T", " ");
    $("report-summary").textContent = report.summary;
    const res = await fetch(report.chart, { headers: { "Authorization": "Bearer " + token } });
    if (!res.ok) return;
    if (reportUrl) URL.revokeObjectURL(reportUrl);
    reportUrl = URL.createObjectURL(await res.blob());
    let img = $("report-chart");
    if (!img) {  // made only when there is a report: the page has no images otherwise
      img = document.createElement("img");
      img.id = "report-chart";
      img.alt = "Sentiment report chart";
      $("report-chart-box").appendChild(img);
    }
    img.src = reportUrl;
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
      } else if (f.type === "ready") {
        // Subscribed: catch up on what changed since the last load (first connect or a
        // reconnect), which no push will repeat.
        refreshQueue().catch(() => {});
        if (current) open(current.id);
      } else if (f.type === "report") {
        showReport(f.report);
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
    api("/api/operator/report/latest").then(d => showReport(d.report)).catch(() => {});
    setInterval(() => refreshQueue().catch(() => {}), 10000);
    setInterval(tick, 1000);
  }

  $("login").addEventListener("submit", ev => {
    ev.preventDefault();
    token = $("token").value.trim();
    name = $("name").value.trim();
    sessionStorage.setItem("supportbot.token", token);
    sessionStorage.setItem("supportbot.name", name);
    start();
  });
  $("reply-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const text = $("reply").value.trim();
    if (!text) return;
    const id = current.id;
    // Cleared only once delivered: a refused or failed reply keeps the operator's text.
    if (await act("reply", { text }) && still(id) && $("reply").value.trim() === text) {
      $("reply").value = "";
    }
  });
  $("link-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const user = $("link-user").value.trim();
    if (!user || !current) return;
    if (await linkAction("link", { platform: $("link-platform").value, platform_user_id: user })) {
      $("link-user").value = "";
    }
  });
  $("draft").addEventListener("click", draft);
  $("claim").addEventListener("click", () => act("claim"));
  $("handback").addEventListener("click", () => act("handback"));
  $("resolve").addEventListener("click", () => act("resolve", { note: "" }));
  if (token && name) start();
})();
