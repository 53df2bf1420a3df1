// The sidebar: the conversation list (refreshed from the server, which
// renders it under its date headings, with the search's snippets), its live
// search, pinning, renaming and deleting a conversation, and showing or
// hiding the sidebar (collapsed on a wide screen, remembered; a
// drawer over the page on a narrow one).

import { fetchHtml, firstError, postForm } from "./http.js";
import { showError } from "./notices.js";
import { app, el, showTitle } from "./page.js";
import { state } from "./state.js";

const narrowScreen = window.matchMedia("(max-width: 800px)");
let listRequest = 0;
let searchTimer = null;

function markCurrent() {
  for (const item of el.list.querySelectorAll(".conversation-item")) {
    const current = item.dataset.conversationId === state.conversationId;
    item.classList.toggle("is-current", current);
    const link = item.querySelector(".conversation-link");
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

// ``then``: called once the new list is in the page.
export function refreshSidebar(then) {
  const query = el.searchInput.value;
  const number = ++listRequest;
  fetchHtml(app.dataset.listUrl + (query ? "?q=" + encodeURIComponent(query) : ""))
    .then((html) => {
      // An older answer arriving after a newer one is dropped.
      if (html === null || number !== listRequest) return;
      if (el.list.querySelector(".rename-form:not([hidden])")) return; // don't interrupt a rename
      el.list.innerHTML = html;
      markCurrent();
      if (then) then();
    })
    .catch(() => {});
}

export function showConversationTitle(conversationId, title) {
  const item = el.list.querySelector('[data-conversation-id="' + conversationId + '"]');
  if (!item) return;
  item.querySelector(".conversation-title").textContent = title;
  item.querySelector(".conversation-link").title = title;
}

function openRename(item) {
  item.classList.add("is-renaming");
  const form = item.querySelector(".rename-form");
  form.hidden = false;
  const input = form.elements.title;
  input.focus();
  input.select();
}

function closeRename(item) {
  item.querySelector(".rename-form").hidden = true;
  item.classList.remove("is-renaming");
  const button = item.querySelector('[data-action="rename"]');
  if (button) button.focus();
}

// Pinning moves the conversation between headings: the server renders the
// list again, and the focus goes back to the conversation's pin button.
function pin(form) {
  const id = form.closest(".conversation-item").dataset.conversationId;
  postForm(form).then((result) => {
    if (!result.ok) {
      showError(firstError(result.data) || "The conversation could not be pinned.");
      return;
    }
    refreshSidebar(() => {
      const button = el.list.querySelector('[data-conversation-id="' + id + '"] .pin-button');
      if (button) button.focus();
    });
  });
}

function rename(form) {
  const item = form.closest(".conversation-item");
  postForm(form).then((result) => {
    if (!result.ok) {
      showError(firstError(result.data) || "The conversation could not be renamed.");
      return;
    }
    const title = result.data.title;
    item.querySelector(".conversation-title").textContent = title;
    item.querySelector(".conversation-link").title = title;
    item.querySelector(".delete-form").dataset.title = title;
    closeRename(item);
    if (item.dataset.conversationId === state.conversationId) showTitle(title);
  });
}

export function narrowSidebarOpen() {
  return app.classList.contains("sidebar-open");
}

function openNarrowSidebar() {
  app.classList.add("sidebar-open");
  el.backdrop.hidden = false;
  el.sidebarToggle.setAttribute("aria-expanded", "true");
  const first = el.sidebar.querySelector("a, button, input");
  if (first) first.focus();
}

export function closeNarrowSidebar() {
  app.classList.remove("sidebar-open");
  el.backdrop.hidden = true;
  el.sidebarToggle.setAttribute("aria-expanded", "false");
  el.sidebarToggle.focus();
}

function syncSidebarToggle() {
  const expanded = narrowScreen.matches ? narrowSidebarOpen() : !app.classList.contains("sidebar-collapsed");
  el.sidebarToggle.setAttribute("aria-expanded", String(expanded));
  if (!narrowScreen.matches) el.backdrop.hidden = true;
}

export function initSidebar() {
  el.searchInput.addEventListener("input", () => {
    window.clearTimeout(searchTimer);
    searchTimer = window.setTimeout(refreshSidebar, 200);
  });
  el.searchForm.addEventListener("submit", (event) => {
    event.preventDefault();
    window.clearTimeout(searchTimer);
    refreshSidebar();
  });

  el.list.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    const item = button.closest(".conversation-item");
    if (button.dataset.action === "rename") openRename(item);
    else if (button.dataset.action === "cancel-rename") closeRename(item);
  });
  el.list.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && event.target.classList.contains("rename-input")) {
      event.preventDefault();
      closeRename(event.target.closest(".conversation-item"));
    }
  });
  el.list.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.classList.contains("delete-form")) {
      const title = form.dataset.title || "this conversation";
      if (!window.confirm("Delete “" + title + "”? This cannot be undone.")) {
        event.preventDefault();
        return;
      }
      form.elements.next.value = window.location.pathname;
      return; // the browser posts it and follows the redirect
    }
    if (form.classList.contains("pin-form")) {
      event.preventDefault();
      pin(form);
      return;
    }
    if (!form.classList.contains("rename-form")) return;
    event.preventDefault();
    rename(form);
  });

  el.sidebarToggle.addEventListener("click", () => {
    if (narrowScreen.matches) {
      if (narrowSidebarOpen()) closeNarrowSidebar();
      else openNarrowSidebar();
      return;
    }
    const collapsed = app.classList.toggle("sidebar-collapsed");
    try {
      window.localStorage.setItem("chatsite-sidebar", collapsed ? "collapsed" : "open");
    } catch (error) {
      // Not remembered.
    }
    syncSidebarToggle();
  });
  el.backdrop.addEventListener("click", closeNarrowSidebar);
  narrowScreen.addEventListener("change", () => {
    app.classList.remove("sidebar-open");
    syncSidebarToggle();
  });
  try {
    if (window.localStorage.getItem("chatsite-sidebar") === "collapsed") app.classList.add("sidebar-collapsed");
  } catch (error) {
    // Open by default.
  }
  syncSidebarToggle();
}
