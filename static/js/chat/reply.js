// One reply as it streams: the plain text of "delta" frames, the HTML of
// "render" frames that replaces it, the "snapshot" a page gets when it starts
// watching a reply already running, the progress before the first token, and
// the end ("done"): the final HTML, the status, the stats line and the note
// of a stopped or failed reply. Text from the model is only ever inserted as
// text, or as the HTML the server rendered and sanitized.
//
// Offsets count the reply's characters as the server does (code points):
// the page never measures text itself, it keeps the "end" the server sent.
// A delta whose offset is past what the page has means a frame was lost:
// the page watches the conversation again and gets a fresh snapshot.

import { articleOf, keepingBottom, setSource, showContextMarker } from "./branch.js";
import { addCodeCopyButtons } from "./copy.js";
import { statParts } from "./stats.js";
import { state } from "./state.js";

// reply id -> {have: the end of the text shown (-1: waiting for a snapshot),
// pending: the deltas shown since the last render, as {offset, end, text}}
const live = {};

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

function bodyOf(article) {
  let body = article.querySelector(".message-body");
  if (!body) {
    body = document.createElement("div");
    body.className = "message-body";
    article.querySelector(".message-content").prepend(body);
  }
  return body;
}

function setReplyHtml(article, html) {
  bodyOf(article).innerHTML = html;
  addCodeCopyButtons(article);
}

function appendText(article, text) {
  if (text) pendingNode(bodyOf(article)).appendChild(document.createTextNode(text));
}

// A reply this page watches from its start: "started" says where its text begins.
export function startReply(replyId, offset) {
  live[replyId] = { have: offset || 0, pending: [] };
  const article = articleOf(replyId);
  if (article) article.setAttribute("aria-busy", "true");
  if (state.replyText[replyId] === undefined) state.replyText[replyId] = "";
}

// A reply shown streaming (a reload, another tab's): its text waits for the snapshot.
export function awaitSnapshot(replyId) {
  if (!live[replyId]) live[replyId] = { have: -1, pending: [] };
}

export function showSnapshot(frame) {
  live[frame.reply] = {
    have: frame.end,
    pending: frame.pending ? [{ offset: frame.rendered_end, end: frame.end, text: frame.pending }] : [],
  };
  state.replyText[frame.reply] = frame.text;
  const article = articleOf(frame.reply);
  if (!article) return;
  keepingBottom(() => {
    setReplyHtml(article, frame.html || "");
    appendText(article, frame.pending);
    if (frame.progress && !frame.text) showProgress(article, frame.progress);
    else clearProgress(article);
  });
}

// Returns false when a frame was lost (the caller asks for a snapshot).
export function appendDelta(frame) {
  const reply = live[frame.reply];
  if (!reply || reply.have < 0) return true; // a snapshot is on its way and covers it
  if (frame.end <= reply.have) return true; // already shown (the snapshot had it)
  if (frame.offset !== reply.have) {
    reply.have = -1;
    return false;
  }
  reply.have = frame.end;
  reply.pending.push({ offset: frame.offset, end: frame.end, text: frame.text });
  state.replyText[frame.reply] = (state.replyText[frame.reply] || "") + frame.text;
  const article = articleOf(frame.reply);
  if (!article) return true;
  keepingBottom(() => {
    clearProgress(article);
    appendText(article, frame.text);
  });
  return true;
}

// A render covers the text up to its end: the deltas after it stay pending.
export function showReplyRender(frame) {
  const reply = live[frame.reply];
  const article = articleOf(frame.reply);
  if (!reply || reply.have < 0 || !article || frame.end > reply.have) return;
  reply.pending = reply.pending.filter((delta) => delta.offset >= frame.end);
  keepingBottom(() => {
    setReplyHtml(article, frame.html);
    for (const delta of reply.pending) appendText(article, delta.text);
  });
}

const PHASES = {
  loading: "Loading the model…",
  queued: "Waiting for the model…",
};

function showProgress(article, progress) {
  let box = article.querySelector(".reply-progress");
  if (!box) {
    box = document.createElement("div");
    box.className = "reply-progress";
    box.setAttribute("role", "status");
    const label = document.createElement("span");
    label.className = "reply-progress-label";
    box.appendChild(label);
    article.querySelector(".message-content").prepend(box);
  }
  const label = box.querySelector(".reply-progress-label");
  let bar = box.querySelector("progress");
  if (progress.phase === "prompt" && progress.total > 0) {
    label.textContent =
      "Reading the conversation (" + progress.done.toLocaleString() + " of " + progress.total.toLocaleString() + " tokens)";
    if (!bar) {
      bar = document.createElement("progress");
      bar.setAttribute("aria-label", "Reading the conversation");
      box.appendChild(bar);
    }
    bar.max = progress.total;
    bar.value = progress.done;
  } else {
    label.textContent = PHASES[progress.phase] || "Working…";
    if (bar) bar.remove();
  }
}

function clearProgress(article) {
  const box = article.querySelector(".reply-progress");
  if (box) box.remove();
}

export function showReplyProgress(frame) {
  const article = articleOf(frame.reply);
  const reply = live[frame.reply];
  if (!article || (reply && reply.have > 0)) return;
  keepingBottom(() => showProgress(article, frame));
}

// The "done" frame.
export function showReplyEnd(frame) {
  const source = state.replyText[frame.reply];
  delete live[frame.reply];
  delete state.replyText[frame.reply];
  const article = articleOf(frame.reply);
  if (!article) return;
  keepingBottom(() => {
    clearProgress(article);
    setReplyHtml(article, frame.html || "");
    article.dataset.status = frame.status;
    article.removeAttribute("aria-busy");
    if (source !== undefined) setSource(article, source);
    for (const note of article.querySelectorAll(".message-note, .message-error")) note.remove();
    showStats(article, frame.stats);
    if (frame.status === "stopped") addNote(article, "message-note", "Stopped: the reply was cut short.");
    if (frame.status === "error") addNote(article, "message-error", frame.error || "The reply failed.");
    showContinue(article, frame);
    showContextMarker(frame.view_starts_at);
  });
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

// "Continue" is offered on a reply the length limit cut, as the server renders it.
function showContinue(article, frame) {
  const actions = article.querySelector(".message-actions");
  const existing = article.querySelector('[data-action="continue"]');
  const cut = frame.status === "complete" && frame.stats && frame.stats.finish_reason === "length";
  if (!cut) {
    if (existing) existing.remove();
    return;
  }
  if (existing || !actions) return;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "icon-button continue-button";
  button.dataset.action = "continue";
  button.setAttribute("aria-label", "Continue the reply");
  button.title = "Continue";
  button.textContent = "Continue";
  actions.appendChild(button);
}

function addNote(article, className, text) {
  const note = document.createElement("p");
  note.className = className;
  if (className === "message-error") note.setAttribute("role", "alert");
  note.textContent = text;
  article.querySelector(".message-content").appendChild(note);
}
