"use strict";
// Analytics page: one request for a time range, then a Chart.js chart per metric.
(function () {
  let token = sessionStorage.getItem("supportbot.token") || "";
  let name = sessionStorage.getItem("supportbot.name") || "";
  const charts = {};
  const $ = id => document.getElementById(id);
  const COLORS = { negative: "#d64545", neutral: "#9aa5b8", positive: "#2e9d4a", blue: "#2f6fed", orange: "#d9822b", grey: "#5b6476", purple: "#7a4fd1" };
  const PALETTE = [COLORS.blue, COLORS.orange, COLORS.negative, COLORS.positive, COLORS.purple, COLORS.grey, "#1b9aaa", "#c94f9b"];

  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;
  Chart.defaults.font.family = "system-ui, sans-serif";

  async function api(path) {
    const res = await fetch(path, { headers: { "Authorization": "Bearer " + token, "X-Operator-Name": name } });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(data.error || res.statusText);
    return data;
  }

  function tick(label, bucket) {
    return bucket === "hour" ? `${label.slice(5, 10)} ${label.slice(11, 13)}h` : label.slice(5, 10);
  }

  function draw(id, config) {
    if (charts[id]) charts[id].destroy();
    charts[id] = new Chart($(id), config);
  }

  const pct = v => v == null ? "–" : `${(v * 100).toFixed(1)}%`;
  const num = v => v == null ? "–" : v.toLocaleString("en");

  function kpis(d) {
    const items = [
      ["Customer messages", num(d.sentiment.total)],
      ["Negative", pct(d.sentiment.share_negative)],
      ["Escalations", `${num(d.escalations.total)} (${pct(d.escalations.rate_total)} of new conversations escalated)`],
      ["First operator reply, median", d.operators.first_response_min.p50 == null ? "–" : `${d.operators.first_response_min.p50} min`],
      ["Unanswered tickets", d.operators.unanswered ? `${num(d.operators.unanswered)} (oldest waiting ${d.operators.oldest_wait_min} min)` : "0"],
      ["Resolution, median", d.operators.resolution_min.p50 == null ? "–" : `${d.operators.resolution_min.p50} min`],
      ["Suggestion click-through", pct(d.suggestions.ctr)],
      ["Feedback score (−1…+1)", d.feedback.score == null ? "–" : d.feedback.score.toFixed(2)],
      ["Generator failures", pct(d.generator.failure_rate_total)],
    ];
    const box = $("kpis");
    box.replaceChildren();
    for (const [label, value] of items) {
      const el = document.createElement("div");
      el.className = "kpi";
      const v = document.createElement("span");
      v.className = "value";
      v.textContent = value;
      const l = document.createElement("span");
      l.className = "label";
      l.textContent = label;
      el.append(v, l);
      box.appendChild(el);
    }
  }

  function render(d) {
    const labels = d.sentiment.labels.map(l => tick(l, d.bucket));
    const counts = { beginAtZero: true, ticks: { precision: 0 } };
    const stacked = { x: { stacked: true }, y: { ...counts, stacked: true } };
    // Per bucket: escalations per 100 customer messages (conversations mostly start in
    // one bucket and escalate in another, so a per-bucket share of them says little).
    const per100 = d.escalations.count.map((n, i) => d.sentiment.volume[i] ? +(100 * n / d.sentiment.volume[i]).toFixed(1) : null);
    draw("chart-volume", { type: "bar", data: { labels, datasets: [
      { label: "customer messages", data: d.sentiment.volume, backgroundColor: COLORS.blue },
      { label: "bot replies", data: d.generator.replies, backgroundColor: COLORS.grey },
    ] }, options: { scales: { y: counts } } });
    draw("chart-sentiment", { type: "bar", data: { labels, datasets: ["negative", "neutral", "positive"].map(s => (
      { label: s, data: d.sentiment.series[s], backgroundColor: COLORS[s] })) }, options: { scales: stacked } });
    draw("chart-escalation-rate", { type: "line", data: { labels, datasets: [
      { label: "escalations per 100 customer messages", data: per100, borderColor: COLORS.negative, backgroundColor: COLORS.negative, yAxisID: "y", spanGaps: true },
      { label: "escalations", data: d.escalations.count, type: "bar", backgroundColor: "rgba(217,130,43,.45)", yAxisID: "y1" },
    ] }, options: { scales: { y: { beginAtZero: true, title: { display: true, text: "per 100 messages" } }, y1: { ...counts, position: "right", grid: { drawOnChartArea: false } } } } });
    const reasons = Object.entries(d.escalations.reasons);
    draw("chart-escalation-reasons", { type: "doughnut", data: { labels: reasons.map(([r]) => r.replace(/_/g, " ")), datasets: [
      { data: reasons.map(([, n]) => n), backgroundColor: PALETTE } ] }, options: { plugins: { legend: { position: "right" } } } });
    draw("chart-operators", { type: "line", data: { labels, datasets: [
      { label: "first operator reply", data: d.operators.first_response_min_p50, borderColor: COLORS.blue, backgroundColor: COLORS.blue, spanGaps: true },
      { label: "resolution", data: d.operators.resolution_min_p50, borderColor: COLORS.positive, backgroundColor: COLORS.positive, spanGaps: true },
    ] }, options: { scales: { y: { beginAtZero: true, title: { display: true, text: "minutes" } } } } });
    draw("chart-feedback", { type: "bar", data: { labels, datasets: [
      { label: "positive", data: d.feedback.positive, backgroundColor: COLORS.positive },
      { label: "negative", data: d.feedback.negative, backgroundColor: COLORS.negative },
      { label: "comment or other", data: d.feedback.other, backgroundColor: COLORS.neutral },
    ] }, options: { scales: stacked } });
    const arts = d.suggestions.articles;
    draw("chart-ctr", { type: "bar", data: { labels: arts.map(a => `${a.id} (${a.shown} shown)`), datasets: [
      { label: "click-through %", data: arts.map(a => a.ctr == null ? 0 : a.ctr * 100), backgroundColor: COLORS.purple } ] },
      options: { indexAxis: "y", scales: { x: { beginAtZero: true, title: { display: true, text: "%" } } } } });
    const topics = d.topics.topics;
    draw("chart-topics", { type: "bar", data: { labels: topics.map(t => t.term), datasets: [
      { label: "messages", data: topics.map(t => t.messages), backgroundColor: COLORS.blue },
      { label: "of them negative", data: topics.map(t => Math.round(t.messages * t.share_negative)), backgroundColor: COLORS.negative },
    ] }, options: { indexAxis: "y", scales: { x: counts } } });
    draw("chart-generator", { type: "line", data: { labels, datasets: [
      { label: "reply, mean ms", data: d.generator.latency_ms_mean, borderColor: COLORS.blue, backgroundColor: COLORS.blue, yAxisID: "y", spanGaps: true },
      { label: "first token, mean ms", data: d.generator.first_token_ms_mean, borderColor: COLORS.orange, backgroundColor: COLORS.orange, yAxisID: "y", spanGaps: true },
      { label: "failure rate %", data: d.generator.failure_rate.map(v => v == null ? null : v * 100), borderColor: COLORS.negative, backgroundColor: COLORS.negative, yAxisID: "y1", spanGaps: true },
    ] }, options: { scales: { y: { beginAtZero: true, title: { display: true, text: "ms" } }, y1: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false }, title: { display: true, text: "%" } } } } });
    const body = $("topics-table").querySelector("tbody");
    body.replaceChildren();
    for (const t of topics) {
      const tr = document.createElement("tr");
      for (const v of [t.term, t.messages, pct(t.share_negative), t.example]) {
        const td = document.createElement("td");
        td.textContent = String(v);
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    kpis(d);
    $("range-label").textContent = `${d.start.slice(0, 16).replace("T", " ")} – ${d.end.slice(0, 16).replace("T", " ")} UTC, by ${d.bucket}`;
  }

  function query() {
    const since = $("since").value;
    if (since !== "custom") return `since=${encodeURIComponent(since)}`;
    const iso = v => new Date(v).toISOString();
    if (!$("start").value || !$("end").value) throw new Error("choose both dates");
    return `start=${encodeURIComponent(iso($("start").value))}&end=${encodeURIComponent(iso($("end").value))}`;
  }

  // Only the latest range's answer is drawn: an older, slower one arriving later is
  // dropped, so it can neither overwrite the charts nor mark the page loaded.
  let latest = 0;

  async function load() {
    const mine = ++latest;
    $("range-error").textContent = "";
    document.body.dataset.loaded = "0";
    try {
      const data = await api(`/api/operator/analytics?${query()}`);
      if (mine !== latest) return;
      render(data);
      document.body.dataset.loaded = "1";
    } catch (e) {
      if (mine !== latest) return;
      $("range-error").textContent = e.message;
      throw e;
    }
  }

  async function start() {
    $("login").hidden = true;
    $("range-form").hidden = false;
    $("dashboard").hidden = false;
    try {
      await load();
    } catch (e) {
      if (/token/.test(e.message)) {
        $("login").hidden = false;
        $("range-form").hidden = true;
        $("dashboard").hidden = true;
        $("login-error").textContent = e.message;
      }
    }
  }

  $("since").addEventListener("change", () => {
    const custom = $("since").value === "custom";
    $("start").disabled = !custom;
    $("end").disabled = !custom;
    if (!custom) load().catch(() => {});
  });
  $("range-form").addEventListener("submit", ev => { ev.preventDefault(); load().catch(() => {}); });
  $("login").addEventListener("submit", ev => {
    ev.preventDefault();
    token = $("token").value.trim();
    name = $("name").value.trim();
    sessionStorage.setItem("supportbot.token", token);
    sessionStorage.setItem("supportbot.name", name);
    start();
  });
  window.supportbotCharts = charts;
  if (token) start(); else $("login").hidden = false;
})();
