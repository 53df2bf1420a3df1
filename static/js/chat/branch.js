// The branch: the messages the conversation shows, as the server rendered
// them (templates/chat/_branch.html), replaced whole by every "branch" frame
// and after a reconnect; keeping the reader's place while it changes; the
// marker of the messages the model did not see.

import { addCodeCopyButtons } from "./copy.js";
import { fetchHtml } from "./http.js";
import { showNotice } from "./notices.js";
import { el } from "./page.js";

// What to focus once the next branch frame has replaced the messages:
// {index, top, selector} of the message the person acted on, or null.
let refocus = null;

export function articleOf(messageId) {
  return document.getElementById("m-" + messageId);
}

// A message's Markdown, as the server sent it with the page.
export function sourceOf(article) {
  const template = article.querySelector("template.message-source");
  if (template) return template.content.textContent;
  const body = article.querySelector(".message-body");
  return body ? body.innerText : "";
}

export function setSource(article, text) {
  const template = article.querySelector("template.message-source");
  if (template) template.content.textContent = text;
}

function isAtBottom() {
  const scroller = el.messages;
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 48;
}

export function scrollToBottom() {
  el.messages.scrollTop = el.messages.scrollHeight;
}

// Keep the view pinned to the end only when the reader was already there:
// someone reading earlier messages is not pulled down by the stream.
export function keepingBottom(change) {
  const atBottom = isAtBottom();
  change();
  if (atBottom) scrollToBottom();
}

function setBranch(html) {
  el.branch.innerHTML = html;
  el.emptyState.hidden = el.branch.querySelector(".message") !== null;
  addCodeCopyButtons(el.branch);
  for (const article of el.branch.querySelectorAll('.message[data-status="streaming"]')) {
    article.setAttribute("aria-busy", "true");
  }
}

// The branch of a "branch" frame: at the end of the conversation, or, after
// a switch between versions, with the message acted on where it was.
export function showBranch(html) {
  const sticky = refocus === null;
  setBranch(html);
  if (sticky) scrollToBottom();
  else applyRefocus();
}

export function rememberFocus(article, selector) {
  const articles = Array.from(el.branch.querySelectorAll(".message"));
  refocus = {
    index: articles.indexOf(article),
    top: article.getBoundingClientRect().top,
    selector: selector,
  };
}

export function forgetFocus() {
  refocus = null;
}

function applyRefocus() {
  const remembered = refocus;
  refocus = null;
  if (!remembered) return;
  const article = el.branch.querySelectorAll(".message")[remembered.index];
  if (!article) return;
  // Keep the message the person acted on where it was on the screen.
  el.messages.scrollTop += article.getBoundingClientRect().top - remembered.top;
  const target = article.querySelector(remembered.selector);
  if (target && !target.disabled) target.focus();
  else if (article.querySelector(".versions button:not([disabled])")) {
    article.querySelector(".versions button:not([disabled])").focus();
  }
}

// After the connection dropped: the page may have missed the end of a
// reply, so it takes the branch from a fresh copy of the conversation's page.
export function reloadBranch(pageUrl) {
  fetchHtml(pageUrl)
    .then((text) => {
      if (text === null) return;
      const fresh = new DOMParser().parseFromString(text, "text/html").getElementById("branch");
      if (fresh) keepingBottom(() => setBranch(fresh.innerHTML));
      const streaming = el.branch.querySelector('.message[data-status="streaming"]');
      if (streaming) showNotice("A reply is still being written; reload the page to see it finished.");
    })
    .catch(() => {});
}

export function showContextMarker(messageId) {
  for (const marker of el.branch.querySelectorAll(".context-marker")) marker.remove();
  const article = messageId ? articleOf(messageId) : null;
  if (!article) return;
  const marker = document.createElement("div");
  marker.className = "context-marker";
  marker.setAttribute("role", "note");
  marker.textContent = "Earlier messages are outside the model's view";
  article.parentElement.insertBefore(marker, article);
}
