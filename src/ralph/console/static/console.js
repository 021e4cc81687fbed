// Ralph console: every action is the documented API call, sent with the session cookie and
// the session's CSRF header. Keyboard-first review: j/k move, a approve, r reject, c comment,
// e edit the change (Enter approves your version), x select, o open the user.
"use strict";

const csrf = document.querySelector('meta[name="ralph-csrf"]').content;

function toast(text, bad) {
  const box = document.getElementById("toast");
  box.textContent = text;
  box.className = bad ? "bad shown" : "shown";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.className = ""; }, 4000);
}

async function api(method, url, body) {
  const response = await fetch(url, {
    method,
    headers: { "Content-Type": "application/json", "X-Ralph-CSRF": csrf },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const detail = data && data.detail ? data.detail : response.status + " " + response.statusText;
    toast(detail, true);
    throw new Error(detail);
  }
  return data;
}

function refreshQueue() { document.body.dispatchEvent(new Event("ralph:refresh")); }

// the queue is refreshed in place only while nobody is in the middle of something
window.ralphQueueIdle = function () {
  if (document.querySelector(".proposal .pick:checked")) return false;
  for (const input of document.querySelectorAll(".proposal .comment")) {
    if (input.value) return false;
  }
  const active = document.activeElement;
  return !(active && (active.tagName === "INPUT" || active.tagName === "TEXTAREA"));
};

function proposals() { return Array.from(document.querySelectorAll(".proposal")); }
function current() {
  const active = document.activeElement && document.activeElement.closest(".proposal");
  return active || null;
}
let lastFocused = null;
function focusProposal(element) {
  if (!element) return;
  element.focus();
  element.scrollIntoView({ block: "nearest" });
  lastFocused = element.dataset.id;
}
function move(step) {
  const all = proposals();
  if (!all.length) return;
  const index = all.indexOf(current());
  const next = index < 0 ? 0 : Math.min(Math.max(index + step, 0), all.length - 1);
  focusProposal(all[next]);
}

async function decide(article, verb, revised) {
  const comment = article.querySelector(".comment").value || null;
  const all = proposals();
  const next = all[all.indexOf(article) + 1] || all[all.indexOf(article) - 1];
  await api("POST", `/proposals/${article.dataset.id}/${verb}`, { comment, ...(revised || {}) });
  const how = revised ? " with your edit" : "";
  toast(`${verb === "approve" ? "Approved" : "Rejected"} ${article.dataset.user}'s proposal${how}`);
  article.remove();
  focusProposal(next);
  refreshQueue();
}

async function decideMany(verb, body) {
  const results = await api("POST", `/proposals/${verb}`, body);
  const done = results.filter((r) => r.decided).length;
  const failed = results.length - done;
  toast(`${verb === "approve" ? "Approved" : "Rejected"} ${done}` + (failed ? `; ${failed} not (see their status)` : ""), failed > 0);
  const all = document.querySelector('[data-action="select-all"]');
  if (all) all.checked = false;
  for (const box of document.querySelectorAll(".proposal .pick:checked")) box.checked = false;
  refreshQueue();
}

// the reviewer's version of the change: the textarea under the diff, of the proposal's kind
function edit(article) {
  const box = article.querySelector(".revise");
  box.hidden = false;
  const area = box.querySelector(".edit");
  area.focus();
  area.setSelectionRange(area.value.length, area.value.length);
}
function approveEdit(area) {
  const article = area.closest(".proposal");
  return decide(article, "approve", { [area.dataset.field]: area.value });
}

function selectedIds() {
  return Array.from(document.querySelectorAll(".proposal .pick:checked"))
    .map((box) => box.closest(".proposal").dataset.id);
}

document.addEventListener("click", async (event) => {
  const target = event.target.closest("[data-action]");
  if (!target || target.type === "checkbox") return;
  const action = target.dataset.action;
  const article = target.closest(".proposal");
  const row = target.closest("[data-task]");
  try {
    if (action === "approve" || action === "reject") {
      const area = article.querySelector(".revise:not([hidden]) .edit");
      await decide(article, action, action === "approve" && area ? { [area.dataset.field]: area.value } : undefined);
    } else if (action === "edit") edit(article);
    else if (action === "approve-selected" || action === "reject-selected") {
      const ids = selectedIds();
      if (ids.length) await decideMany(action.split("-")[0], { ids });
      else toast("Select proposals first (x)", true);
    } else if (action === "approve-run" || action === "reject-run") {
      await decideMany(action.split("-")[0], { run_id: target.dataset.run });
    } else if (action === "retry-run") {
      const retry = await api("POST", `/background/runs/${target.dataset.run}/retry`);
      location.href = `/console/runs/${retry.run_id}`;
    } else if (action === "revert") {
      const d = target.dataset;
      await api("POST", `/users/${encodeURIComponent(d.user)}/blocks/${d.label}/revert`, { version: Number(d.version) });
      location.reload();
    } else if (action === "run" || action === "dry-run") {
      const run = await api("POST", `/background/tasks/${row.dataset.task}/run`, { dry_run: action === "dry-run" });
      toast(`Started run ${run.run_id.slice(0, 8)}`);
    } else if (action === "logout") {
      await fetch("/console/logout", { method: "POST", headers: { "X-Ralph-CSRF": csrf } });
      location.href = "/console/login";
    }
  } catch (e) { /* shown in the toast */ }
});

document.addEventListener("change", async (event) => {
  const target = event.target;
  if (target.dataset.action === "select-all") {
    for (const box of document.querySelectorAll(".proposal .pick")) box.checked = target.checked;
  } else if (target.dataset.action === "enable") {
    const name = target.closest("[data-task]").dataset.task;
    try {
      await api("POST", `/background/tasks/${name}/${target.checked ? "enable" : "disable"}`);
      target.parentElement.lastChild.textContent = target.checked ? " on" : " off";
    } catch (e) { target.checked = !target.checked; }
  }
});

document.addEventListener("keydown", async (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const inField = event.target.tagName === "INPUT" || event.target.tagName === "TEXTAREA";
  if (inField) {
    if (event.key === "Escape") {
      if (event.target.classList.contains("edit")) event.target.closest(".revise").hidden = true;
      event.target.closest(".proposal")?.focus();
    }
    if (event.key === "Enter" && !event.shiftKey && event.target.classList.contains("edit")) {
      event.preventDefault();
      try { await approveEdit(event.target); } catch (e) { /* shown in the toast */ }
      return;
    }
    if (event.key === "Enter" && event.target.classList.contains("comment")) {
      event.preventDefault();
      event.target.closest(".proposal").focus();
    }
    return;
  }
  if (!document.querySelector(".queue")) return;
  const article = current();
  const keys = {
    j: () => move(1),
    k: () => move(-1),
    a: () => article && decide(article, "approve"),
    r: () => article && decide(article, "reject"),
    c: () => article && article.querySelector(".comment").focus(),
    e: () => article && edit(article),
    x: () => { if (article) { const box = article.querySelector(".pick"); box.checked = !box.checked; } },
    o: () => article && (location.href = "/console/users/" + encodeURIComponent(article.dataset.user)),
  };
  const handler = keys[event.key];
  if (!handler) return;
  event.preventDefault();
  try { await handler(); } catch (e) { /* shown in the toast */ }
});

// keep the reviewer's place when the queue refreshes in place
document.addEventListener("focusin", (event) => {
  const article = event.target.closest && event.target.closest(".proposal");
  if (article) lastFocused = article.dataset.id;
});
document.addEventListener("htmx:afterSwap", () => {
  if (!lastFocused) return;
  const again = document.getElementById("p-" + lastFocused);
  if (again) again.focus({ preventScroll: true });
});
