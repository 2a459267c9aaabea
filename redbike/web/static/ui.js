// redbike's web UI: local times, the API token, the buttons, and the live pages' refresh.
// Served from this server only (the pages' Content-Security-Policy allows no inline script).
"use strict";
(function () {
  const TOKEN = "redbike-token";

  function pad(n) { return String(n).padStart(2, "0"); }

  // Each <time datetime> shows the browser's local time; its title keeps UTC and adds the zone.
  function localize(root) {
    for (const el of root.querySelectorAll("time[datetime]:not([data-local])")) {
      const at = new Date(el.getAttribute("datetime"));
      if (isNaN(at)) continue;
      const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "local";
      const local = `${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())} ` +
        `${pad(at.getHours())}:${pad(at.getMinutes())}:${pad(at.getSeconds())}`;
      el.title = `UTC ${el.textContent}; local ${local} (${zone})`;
      el.textContent = local;
      el.dataset.local = zone;
    }
  }

  function flash(text, ok) {
    const box = document.getElementById("flash");
    box.textContent = text;
    box.className = ok ? "ok" : "failed";
  }

  function tokenState() {
    const state = document.getElementById("token-state");
    if (state) state.textContent = sessionStorage.getItem(TOKEN) ? "token kept for this tab" : "no token yet";
  }

  // The live pages and a page after a button: fetch it again and swap its <main>.
  async function reload() {
    const response = await fetch(location.href, { headers: { Accept: "text/html" }, cache: "no-store" });
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = page.querySelector("main");
    if (!fresh) return;
    document.querySelector("main").replaceWith(fresh);
    localize(fresh);
  }

  function busyTyping() {
    const active = document.activeElement;
    return active && active.closest("main") && ["INPUT", "SELECT", "TEXTAREA"].includes(active.tagName);
  }

  // One line of what the API answered (api.py's JSON: {"error"}, {"result"}, a queue's, a resource's).
  function summary(answer) {
    if (typeof answer === "string") return answer;
    if (answer.error) return answer.error;
    if (answer.result) return answer.result;
    if ("paused" in answer) {
      return `queue ${answer.queue} ${answer.paused ? "paused" : "resumed"}${answer.changed ? "" : " (it was already)"}`;
    }
    if ("capacity" in answer) {
      const capacity = answer.capacity === null ? "unlimited" : answer.capacity;
      return `capacity of ${answer.resource}: ${capacity}; ${answer.woken} waiting job(s) woken`;
    }
    return JSON.stringify(answer);
  }

  async function call(method, url, body) {
    const token = sessionStorage.getItem(TOKEN);
    if (!token) {
      flash("Type the API token into the field at the top first.", false);
      const field = document.getElementById("token");
      if (field) field.focus();
      return;
    }
    const init = { method, headers: { Authorization: `Bearer ${token}`, Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = body;
    }
    let response, answer;
    try {
      response = await fetch(url, init);
      const text = await response.text();
      try { answer = JSON.parse(text); } catch (e) { answer = text; }
    } catch (e) {
      flash(`${method} ${url} failed: ${e}`, false);
      return;
    }
    const said = summary(answer);
    if (response.ok) {
      flash(`${method} ${decodeURIComponent(url)}: ${said}`, true);
    } else {
      flash(`${method} ${decodeURIComponent(url)} refused (${response.status}): ${said}`, false);
    }
    await reload();
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button || button.disabled) return;
    if (button.id === "token-save") {
      const field = document.getElementById("token");
      if (field.value) sessionStorage.setItem(TOKEN, field.value);
      field.value = "";
      tokenState();
    } else if (button.id === "token-forget") {
      sessionStorage.removeItem(TOKEN);
      tokenState();
    } else if (button.classList.contains("action") && button.dataset.url) {
      if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
      call(button.dataset.method, button.dataset.url, button.dataset.body);
    } else if (button.classList.contains("set-capacity")) {
      const field = button.parentElement.querySelector("input.capacity");
      const capacity = field.value === "" ? null : Number(field.value);
      call("PUT", field.dataset.url, JSON.stringify({ capacity }));
    }
  });

  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && event.target.id === "token") document.getElementById("token-save").click();
  });

  document.addEventListener("DOMContentLoaded", () => {
    localize(document);
    tokenState();
    // A page refreshes while its <main> asks to (data-refresh: seconds); a job page asks while
    // the job waits or runs, so it may start or stop asking after a reload.
    const tick = () => {
      const main = document.querySelector("main[data-refresh]");
      const seconds = main ? Number(main.dataset.refresh) || 5 : 5;
      setTimeout(async () => {
        if (main && document.querySelector("main") === main && !document.hidden && !busyTyping()) {
          await reload().catch(() => {});
        }
        tick();
      }, seconds * 1000);
    };
    tick();
  });
})();
