/* Herald's UI: small progressive enhancements. Every page works without this file; with it,
   numbers update live (EventSource, polling) and the builder previews templates as you type.
   No framework, no build step. */
(function () {
  "use strict";

  var csrfToken = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  var numberFormat = new Intl.NumberFormat("en-US");

  function $(selector, root) { return (root || document).querySelector(selector); }
  function $$(selector, root) { return Array.prototype.slice.call((root || document).querySelectorAll(selector)); }
  function fmt(n) { return n === null || n === undefined ? "—" : numberFormat.format(n); }
  function pct(x) { return (x * 100).toFixed(1) + "%"; }
  function setText(el, text) { if (el && el.textContent !== text) { el.textContent = text; } }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } }).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.json();
    });
  }

  function postJSON(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRFToken": csrfToken },
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().then(function (data) { return { ok: r.ok, status: r.status, data: data }; });
    });
  }

  /* ---------------------------------------------------------------- the workspace menu */
  var wsMenu = $(".ws-menu");
  if (wsMenu) {
    document.addEventListener("keydown", function (event) {
      if (event.key === "Escape" && wsMenu.open) { wsMenu.open = false; $("summary", wsMenu).focus(); }
    });
    document.addEventListener("click", function (event) {
      if (wsMenu.open && !wsMenu.contains(event.target)) { wsMenu.open = false; }
    });
  }

  /* ---------------------------------------------------------------- settings: copy the new key */
  $$("[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var input = $(button.getAttribute("data-copy"));
      input.select();
      if (navigator.clipboard) { navigator.clipboard.writeText(input.value); } else { document.execCommand("copy"); }
      button.textContent = "Copied";
    });
  });
  $$("[data-select-on-focus]").forEach(function (input) {
    input.addEventListener("focus", function () { input.select(); });
  });

  /* ---------------------------------------------------------------- CSV import progress */
  var importBox = $("[data-import-poll]");
  if (importBox && importBox.getAttribute("data-finished") !== "true") {
    var importUrl = importBox.getAttribute("data-import-poll");
    var shownErrors = -1;
    var pollImport = function () {
      getJSON(importUrl).then(function (job) {
        var finished = job.status === "done" || job.status === "failed";
        var bar = $("[data-import-progress]");
        bar.value = job.progress;
        bar.textContent = Math.floor(job.progress * 100) + "%";
        setText($("[data-import-percent]"), Math.floor(job.progress * 100) + "%");
        var badge = $("[data-import-status]");
        setText(badge, job.status);
        badge.className = "badge badge-" + job.status;
        var line = job.status === "pending" ? "Waiting for a worker…"
          : job.status === "running" ? "Importing: " + fmt(job.rows_done) + " rows read so far."
          : job.status === "done" ? "Finished." : "The import failed.";
        setText($("[data-import-line]"), line);
        var counts = { rows_done: job.rows_done, created: job.created, updated: job.updated,
                       skipped: job.skipped, errors: job.errors.length + (job.errors_truncated || 0) };
        Object.keys(counts).forEach(function (k) { setText($('[data-import-count="' + k + '"]'), fmt(counts[k])); });
        var errorBox = $("[data-import-error]");
        errorBox.hidden = !job.error;
        setText(errorBox, job.error || "");
        if (job.errors.length !== shownErrors) {
          shownErrors = job.errors.length;
          var body = $("[data-import-errors]");
          body.textContent = "";
          job.errors.forEach(function (e) {
            var tr = document.createElement("tr");
            var row = document.createElement("td");
            row.className = "num";
            row.textContent = e.row;
            var problem = document.createElement("td");
            problem.textContent = e.error;
            tr.appendChild(row);
            tr.appendChild(problem);
            body.appendChild(tr);
          });
          $("[data-import-report]").hidden = job.errors.length === 0;
        }
        var more = $("[data-import-truncated]");
        more.hidden = !job.errors_truncated;
        setText(more, job.errors_truncated ? "…and " + fmt(job.errors_truncated) + " more rows with errors." : "");
        if (finished) {
          importBox.setAttribute("data-finished", "true");
        } else {
          setTimeout(pollImport, 500);
        }
      }).catch(function () { setTimeout(pollImport, 2000); });
    };
    pollImport();
  }

  /* ---------------------------------------------------------------- queue health */
  var queueBox = $("[data-queue-poll]");
  if (queueBox) {
    var queueUrl = queueBox.getAttribute("data-queue-poll");
    var live = $("[data-live]");
    var pollQueue = function () {
      getJSON(queueUrl).then(function (q) {
        var values = { depth: q.depth, scheduled: q.scheduled, in_flight: q.in_flight, stalled: q.stalled,
                       dead_letters: q.dead_letters, failure_rate_5m: q.failure_rate_5m, attempts_5m: q.attempts_5m,
                       p50: q.duration_ms && q.duration_ms.p50, p95: q.duration_ms && q.duration_ms.p95 };
        $$("[data-q]").forEach(function (el) {
          var key = el.getAttribute("data-q");
          var v = values[key];
          var kind = el.getAttribute("data-format");
          var text = kind === "pct" ? pct(v || 0)
            : kind === "ms" ? (v === null || v === undefined ? "—" : Math.round(v) + " ms")
            : key === "depth" && v === -1 ? "?" : fmt(v);
          var target = el.querySelector("a") || el;
          setText(target, text);
          if (key === "stalled") { el.classList.toggle("warn", v > 0); }
        });
        $("[data-queue-error]").hidden = q.depth !== -1;
        setText($("[data-queue-updated]"), "updated " + new Date().toLocaleTimeString());
        if (live) { live.hidden = false; }
      }).catch(function () {
        if (live) { live.hidden = true; }
      }).then(function () { setTimeout(pollQueue, 2000); });
    };
    setTimeout(pollQueue, 1000);
  }

  /* ---------------------------------------------------------------- the campaign page, live */
  var campaignBox = $("#campaign-live");
  if (campaignBox && campaignBox.getAttribute("data-stream-url") && window.EventSource) {
    var streamUrl = campaignBox.getAttribute("data-stream-url");
    var chartUrl = campaignBox.getAttribute("data-chart-url");
    var emailSteps = parseInt(campaignBox.getAttribute("data-email-steps"), 10) || 0;
    var liveBadge = $("[data-live]", campaignBox);
    var lastSent = null;
    var chartTimer = null;
    var chartLoadedAt = 0;
    var statusText = {
      draft: "A draft: nothing is sent until you launch it.",
      running: "Running.",
      paused: "Paused: no new email starts until you resume.",
      completed: "Completed: every sequence has ended.",
      cancelled: "Cancelled."
    };

    var refreshChart = function () {
      chartTimer = null;
      chartLoadedAt = Date.now();
      fetch(chartUrl, { credentials: "same-origin" }).then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html !== null) { $("[data-chart]", campaignBox).innerHTML = html; } })
        .catch(function () {});
    };
    var scheduleChart = function (now) {
      if (now) { if (chartTimer) { clearTimeout(chartTimer); } refreshChart(); return; }
      if (chartTimer) { return; }
      var wait = Math.max(0, 2000 - (Date.now() - chartLoadedAt));
      chartTimer = setTimeout(refreshChart, wait);
    };

    var apply = function (data) {
      var s = data.stats;
      var status = data.status;
      if (status !== campaignBox.getAttribute("data-status")) {
        // "Launched: contacts are being enrolled." is stale once the campaign has moved on
        $$(".flashes .flash-success").forEach(function (el) { el.hidden = true; });
      }
      campaignBox.setAttribute("data-status", status);
      $$("[data-status-badge]", campaignBox).forEach(function (b) { setText(b, status); b.className = "badge badge-" + status; });
      setText($("[data-status-text]", campaignBox), statusText[status] || status);
      setText($("[data-status-reason]", campaignBox), data.status_reason ? "(" + data.status_reason + ")" : "");
      $$("[data-show-when]", campaignBox).forEach(function (el) {
        el.hidden = el.getAttribute("data-show-when").split(" ").indexOf(status) < 0;
      });
      // totals (the stats cards and the funnel share data-stat outside the step table)
      $$("[data-stat]", campaignBox).forEach(function (el) {
        if (el.closest("[data-step-id]")) { return; }
        var key = el.getAttribute("data-stat");
        if (key in s) { setText(el, fmt(s[key])); }
      });
      $$("[data-rate]", campaignBox).forEach(function (el) {
        if (el.closest("[data-step-id]")) { return; }
        var key = el.getAttribute("data-rate");
        if (s.rates && key in s.rates) { setText(el, pct(s.rates[key])); }
      });
      var base = s.enrolled || 1;
      $$("[data-funnel]", campaignBox).forEach(function (el) {
        var v = s[el.getAttribute("data-funnel")] || 0;
        el.style.width = (Math.min(v / base, 1) * 100).toFixed(1) + "%";
      });
      // per step
      Object.keys(data.steps || {}).forEach(function (stepId) {
        var row = $('[data-step-id="' + stepId + '"]', campaignBox);
        if (!row) { return; }
        var st = data.steps[stepId];
        $$("[data-stat]", row).forEach(function (el) {
          var key = el.getAttribute("data-stat");
          if (key in st) { setText(el, fmt(st[key])); }
        });
        $$("[data-rate]", row).forEach(function (el) {
          var key = el.getAttribute("data-rate");
          if (st.rates && key in st.rates) { setText(el, pct(st.rates[key])); }
        });
      });
      // progress: emails handled (sent, or a dead letter now) out of enrolled x email steps,
      // less what sequences ended early (a reply, an unsubscribe) will not send
      var expected = Math.max(s.enrolled * emailSteps - (s.skipped || 0), 0);
      var done = s.sent + s.dead_letters;
      var fraction = status === "completed" ? 1 : (expected ? Math.min(done / expected, 1) : 0);
      var bar = $("[data-progress]", campaignBox);
      bar.value = fraction;
      setText($("[data-progress-text]", campaignBox),
        fmt(done) + " of " + fmt(expected) + " emails handled (" + Math.floor(fraction * 100) + "%)" +
        (s.stopped ? "; " + fmt(s.stopped) + " sequence" + (s.stopped === 1 ? "" : "s") + " ended early (" +
          fmt(s.skipped) + " email" + (s.skipped === 1 ? "" : "s") + " not to send)" : ""));
      if (lastSent !== null && s.sent !== lastSent) { scheduleChart(false); }
      lastSent = s.sent;
    };

    // A completed campaign's delivery events, opens and clicks go on arriving: until this time
    // (ms), the page looks again every data-follow-every ms (15 s) after the stream's end.
    var followUntil = parseInt(campaignBox.getAttribute("data-follow-until"), 10) || 0;
    var source = null;
    // Past the server's bound on open streams (429), or while it is away (503), EventSource
    // closes for good: the page then polls the campaign's JSON every 5 s and tries the stream
    // again after 5 s, then 10, 20, 40 and every 60 s, until one stays open.
    var pollUrl = campaignBox.getAttribute("data-poll-url");
    var pollTimer = null;
    var streamDelay = 5000;
    var poll = function () {
      getJSON(pollUrl).then(function (c) {
        var steps = {};
        (c.steps || []).forEach(function (st) { if (st.stats) { steps[st.id] = st.stats; } });
        apply({ status: c.status, status_reason: c.status_reason, stats: c.stats, steps: steps });
      }).catch(function () {}).then(function () {
        if (pollTimer !== null) { pollTimer = setTimeout(poll, 5000); }
      });
    };
    var startPolling = function () {
      if (pollUrl && pollTimer === null) { pollTimer = setTimeout(poll, 0); }
    };
    var stopPolling = function () {
      if (pollTimer !== null) { clearTimeout(pollTimer); pollTimer = null; }
    };
    var connect = function () {
      source = new EventSource(streamUrl);
      source.addEventListener("open", function () { liveBadge.hidden = false; streamDelay = 5000; stopPolling(); });
      source.addEventListener("error", function () {
        liveBadge.hidden = true;
        // A dropped connection EventSource retries by itself; an answer that is not the stream
        // (a 429, a 503) closes it for good: poll, and connect again a little later.
        if (source.readyState === EventSource.CLOSED) {
          startPolling();
          setTimeout(connect, streamDelay);
          streamDelay = Math.min(streamDelay * 2, 60000);
        }
      });
      source.addEventListener("progress", function (event) {
        liveBadge.hidden = false;
        apply(JSON.parse(event.data));
      });
      source.addEventListener("end", function (event) {
        source.close();  // completed or cancelled: no more sends
        stopPolling();
        liveBadge.hidden = true;
        scheduleChart(true);
        var status = JSON.parse(event.data).status;
        if (status === "completed") {
          followUntil = followUntil || Date.now() + 3600 * 1000;  // it completed while we watched
          var every = parseInt(campaignBox.getAttribute("data-follow-every"), 10) || 15000;
          if (Date.now() < followUntil) { setTimeout(connect, every); }
        }
      });
    };
    connect();
    window.addEventListener("pagehide", function () { stopPolling(); if (source) { source.close(); } });
  }

  /* ---------------------------------------------------------------- the builder's live preview */
  var builder = $("#builder[data-preview-url]");
  if (builder) {
    var previewUrl = builder.getAttribute("data-preview-url");
    var contactSelect = $("[data-preview-contact]", builder);
    var labels = { subject: "Subject", html: "HTML", text: "Text" };

    var excerpt = function (source, message) {
      var m = /^line (\d+): /.exec(message);
      if (!m || !source) { return null; }
      var line = parseInt(m[1], 10);
      var lines = source.split("\n");
      if (line < 1 || line > lines.length) { return null; }
      var pre = document.createElement("pre");
      pre.className = "excerpt";
      for (var n = Math.max(1, line - 1); n <= Math.min(lines.length, line + 1); n++) {
        var span = document.createElement("span");
        if (n === line) { span.className = "bad"; }
        var ln = document.createElement("span");
        ln.className = "ln";
        ln.textContent = n;
        span.appendChild(ln);
        span.appendChild(document.createTextNode(lines[n - 1]));
        pre.appendChild(span);
      }
      return { pre: pre, line: line };
    };

    var goToLine = function (textarea, line) {
      var lines = textarea.value.split("\n");
      var start = 0;
      for (var i = 0; i < line - 1; i++) { start += lines[i].length + 1; }
      textarea.focus();
      textarea.setSelectionRange(start, start + (lines[line - 1] || "").length);
      var lineHeight = parseFloat(getComputedStyle(textarea).lineHeight) || 18;
      textarea.scrollTop = Math.max(0, (line - 3) * lineHeight);
    };

    var showErrors = function (editor, errors) {
      var box = $("[data-preview-errors]", editor);
      box.textContent = "";
      Object.keys(errors).forEach(function (field) {
        errors[field].forEach(function (message) {
          var div = document.createElement("div");
          div.className = "template-error";
          div.setAttribute("role", "alert");
          var p = document.createElement("p");
          p.textContent = (labels[field] || field) + ", " + message;
          div.appendChild(p);
          var input = $('[data-field="' + field + '"]', editor);
          var ex = excerpt(input ? input.value : "", message);
          if (ex) {
            div.appendChild(ex.pre);
            if (input && input.tagName === "TEXTAREA") {
              var button = document.createElement("button");
              button.type = "button";
              button.className = "small secondary";
              button.textContent = "Go to line " + ex.line;
              button.addEventListener("click", function () { goToLine(input, ex.line); });
              div.appendChild(button);
            }
          }
          box.appendChild(div);
        });
      });
    };

    var refresh = function (editor) {
      var body = {
        subject: $('[data-field="subject"]', editor).value,
        html: $('[data-field="html"]', editor).value,
        text: $('[data-field="text"]', editor).value || null
      };
      if (contactSelect && contactSelect.value) { body.contact_id = parseInt(contactSelect.value, 10); }
      var seq = (editor._previewSeq || 0) + 1;
      editor._previewSeq = seq;
      var busy = $("[data-preview-busy]", editor);
      busy.hidden = false;
      postJSON(previewUrl, body).then(function (res) {
        if (editor._previewSeq !== seq) { return; }  // an older answer arriving late
        busy.hidden = true;
        var data = res.data;
        if (!res.ok) {
          var details = (data.error && data.error.details) || {};
          var errs = {};
          Object.keys(details).forEach(function (k) { errs[k.replace(/^.*\./, "")] = details[k]; });
          if (!Object.keys(errs).length) { errs = { preview: [(data.error && data.error.message) || "preview failed"] }; }
          showErrors(editor, errs);
          $("[data-preview-body]", editor).hidden = true;
          return;
        }
        var hasErrors = data.errors && Object.keys(data.errors).length > 0;
        showErrors(editor, data.errors || {});
        $("[data-preview-body]", editor).hidden = hasErrors;
        if (!hasErrors) {
          setText($("[data-preview-subject]", editor), data.subject || "");
          $("[data-preview-html]", editor).srcdoc = data.html || "";
          setText($("[data-preview-text]", editor), data.text || "");
        }
        var chosen = contactSelect && contactSelect.selectedOptions[0];
        setText($("[data-preview-for]", editor), "for " + (data.contact && data.contact.email || (chosen ? chosen.textContent : "")));
      }).catch(function () {
        busy.hidden = true;
      });
    };

    $$("[data-step-editor]", builder).forEach(function (editor) {
      var timer = null;
      $$("[data-field]", editor).forEach(function (input) {
        input.addEventListener("input", function () {
          clearTimeout(timer);
          timer = setTimeout(function () { refresh(editor); }, 350);
        });
      });
    });
    if (contactSelect) {
      contactSelect.addEventListener("change", function () {
        $$("[data-step-editor]", builder).forEach(refresh);
      });
    }
  }
})();
