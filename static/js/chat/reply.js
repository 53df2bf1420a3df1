// One reply as it streams: the plain text of "delta" frames, the HTML of
// "render" frames that replaces it, and the end ("done"): the final HTML,
// the status, the stats line and the note of a stopped or failed reply.
// Text from the model is only ever inserted as text, or as the HTML the
// server rendered and sanitized.

import { articleOf, keepingBottom, setSource, showContextMarker } from "./branch.js";
import { addCodeCopyButtons } from "./copy.js";

// Where streamed text not yet rendered goes: at the end of the last block
// of the rendered HTML, so that it continues the paragraph (or the code)
// it belongs to instead of jumping below it until the next render. Every
// render replaces the body, and the pending text with it.
function pendingNode(body) {
  const pending = body.querySelector(".pending-text");
  if (pending) return pending;
  let parent = body;
  while (parent.lastElementChild && /^(P|UL|OL|LI|BLOCKQUOTE|DIV|PRE|CODE)$/.test(parent.lastElementChild.tagName)) {
    parent = parent.lastElementChild;
  }
  const node = document.createElement("span");
  node.className = "pending-text";
  parent.appendChild(node);
  return node;
}

function setReplyHtml(article, html) {
  article.querySelector(".message-body").innerHTML = html;
  addCodeCopyButtons(article);
}

export function appendReplyText(replyId, text) {
  const article = articleOf(replyId);
  if (!article) return;
  keepingBottom(() => {
    pendingNode(article.querySelector(".message-body")).appendChild(document.createTextNode(text));
  });
}

// A render covers every delta before it: it replaces their text.
export function showReplyRender(replyId, html) {
  const article = articleOf(replyId);
  if (!article) return;
  keepingBottom(() => setReplyHtml(article, html));
}

// The "done" frame; source is the reply's Markdown as streamed, if the page
// saw it stream.
export function showReplyEnd(frame, source) {
  const article = articleOf(frame.reply);
  if (!article) return;
  keepingBottom(() => {
    setReplyHtml(article, frame.html || "");
    article.dataset.status = frame.status;
    article.removeAttribute("aria-busy");
    if (source !== undefined) setSource(article, source);
    showStats(article, frame.stats);
    if (frame.status === "stopped") addNote(article, "message-note", "Stopped: the reply was cut short.");
    if (frame.status === "error") addNote(article, "message-error", frame.error || "The reply failed.");
    showContextMarker(frame.view_starts_at);
  });
}

function statParts(stats, model) {
  const parts = [];
  if (stats.completion_tokens !== null && stats.completion_tokens !== undefined) {
    parts.push(stats.completion_tokens + " tokens");
  }
  if (typeof stats.tokens_per_second === "number") parts.push(stats.tokens_per_second.toFixed(1) + " tok/s");
  if (typeof stats.time_to_first_token === "number") {
    parts.push("first token " + stats.time_to_first_token.toFixed(2) + " s");
  }
  if (stats.finish_reason) parts.push(stats.finish_reason);
  if (model) parts.push(model);
  return parts;
}

function showStats(article, stats) {
  const line = article.querySelector(".message-stats");
  if (!line) return;
  line.textContent = "";
  for (const part of statParts(stats || {}, article.dataset.model)) {
    const span = document.createElement("span");
    span.className = "stat";
    span.textContent = part;
    line.appendChild(span);
  }
}

function addNote(article, className, text) {
  const note = document.createElement("p");
  note.className = className;
  if (className === "message-error") note.setAttribute("role", "alert");
  note.textContent = text;
  article.querySelector(".message-content").appendChild(note);
}
