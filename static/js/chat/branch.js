// The branch: the messages the conversation shows, as the server rendered
// them (templates/chat/_branch.html), replaced whole by every "branch" frame
// (each time the page watches the conversation, and when any tab changes
// it); the message just sent, shown until then; keeping the reader's place
// while it changes; the marker of the messages the model did not see.

import { addCodeCopyButtons } from "./copy.js";
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

// The reply streaming in the branch shown, if one is.
export function streamingArticle() {
  return el.branch.querySelector('.message-assistant[data-status="streaming"]');
}

function pendingArticle(role, text) {
  const article = document.createElement("article");
  article.className = "message message-" + role + " is-pending";
  article.dataset.role = role;
  article.setAttribute("aria-label", role === "user" ? "You said" : "Reply");
  const content = document.createElement("div");
  content.className = "message-content";
  if (text) {
    const body = document.createElement("div");
    body.className = "message-body";
    const paragraph = document.createElement("p");
    paragraph.textContent = text;
    body.appendChild(paragraph);
    content.appendChild(body);
  } else {
    const progress = document.createElement("div");
    progress.className = "reply-progress";
    progress.setAttribute("role", "status");
    const label = document.createElement("span");
    label.className = "reply-progress-label";
    label.textContent = "Sending…";
    progress.appendChild(label);
    content.appendChild(progress);
  }
  article.appendChild(content);
  return article;
}

// The message just sent, shown at once (as text) with its reply to come,
// until the server's branch frame replaces both.
export function showPendingTurn(text) {
  el.emptyState.hidden = true;
  el.branch.appendChild(pendingArticle("user", text));
  el.branch.appendChild(pendingArticle("assistant", ""));
  scrollToBottom();
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
