// What the page does with each frame the server sends (docs/websocket.md,
// "Server → client"): the handlers socket.js dispatches to, by type, and
// what it does each time the socket opens: it watches the conversation it
// shows, and the server answers with the branch as it stands and the text
// of a reply still running, whoever started it.

import { forgetFocus, showBranch, streamingArticle } from "./branch.js";
import { giveBackRefusedMessage } from "./composer.js";
import { hideError, showError } from "./notices.js";
import { showConversation, showTitle } from "./page.js";
import {
  appendDelta,
  awaitSnapshot,
  showReplyEnd,
  showReplyProgress,
  showReplyRender,
  showSnapshot,
  startReply,
} from "./reply.js";
import { keepSettingsOfNewConversation } from "./settings.js";
import { refreshSidebar, showConversationTitle } from "./sidebar.js";
import { sendFrame } from "./socket.js";
import { IDLE, STREAMING, WAITING, setBusy, state } from "./state.js";

function mine(frame) {
  return frame.conversation === state.conversationId;
}

// The page's state follows the branch shown: a reply streaming in it (this
// tab's, another's, the API's) means Stop, and no sending until it ends.
export function followBranch() {
  const article = streamingArticle();
  if (article) {
    const id = article.dataset.messageId;
    awaitSnapshot(id);
    if (state.busy !== STREAMING || state.streamingReply !== id) setBusy(STREAMING, id);
  } else if (state.busy === STREAMING) {
    setBusy(IDLE);
  }
}

// Watch the conversation shown (each time the socket opens).
// With what it shows ("<last message id>:<status>"), so that the server sends
// the branch again only when it changed.
export function watchShownConversation({ fresh = false } = {}) {
  if (!state.conversationId) return;
  const frame = { type: "watch", conversation: state.conversationId };
  const articles = document.querySelectorAll("#branch .message:not(.is-pending)");
  const last = articles[articles.length - 1];
  if (!fresh && last && last.dataset.messageId) frame.shown = last.dataset.messageId + ":" + last.dataset.status;
  sendFrame(frame);
}

let sidebarTimer = null;

export const frameHandlers = {
  conversation(frame) {
    const conversation = frame.conversation;
    state.conversationId = conversation.id;
    showConversation(conversation);
    keepSettingsOfNewConversation(conversation.id);
    refreshSidebar();
  },

  branch(frame) {
    if (!mine(frame)) return;
    state.awaitingBranch = false;
    showBranch(frame.html);
    followBranch();
  },

  started(frame) {
    if (!mine(frame)) return;
    startReply(frame.reply, frame.offset);
    setBusy(STREAMING, frame.reply);
    hideError();
  },

  snapshot(frame) {
    if (!mine(frame)) return;
    showSnapshot(frame);
    if (state.busy !== STREAMING) setBusy(STREAMING, frame.reply);
  },

  progress(frame) {
    if (mine(frame)) showReplyProgress(frame);
  },

  delta(frame) {
    if (!mine(frame)) return;
    if (!appendDelta(frame)) watchShownConversation({ fresh: true }); // a frame was lost: start again
  },

  render(frame) {
    if (mine(frame)) showReplyRender(frame);
  },

  done(frame) {
    if (!mine(frame)) return;
    showReplyEnd(frame);
    if (state.streamingReply === frame.reply || state.busy !== IDLE) setBusy(IDLE);
  },

  title(frame) {
    showConversationTitle(frame.conversation, frame.title);
    if (mine(frame)) showTitle(frame.title);
  },

  // The conversation was deleted (in another tab, on another device): its
  // page is gone, so this one goes where a new visit would.
  deleted(frame) {
    if (!mine(frame)) return;
    showError("This conversation was deleted.");
    window.setTimeout(() => window.location.assign(document.querySelector(".brand").href), 1500);
  },

  // Something changed in the owner's conversations (another tab, the API):
  // the list is fetched again, once for a burst of news.
  sidebar() {
    window.clearTimeout(sidebarTimer);
    sidebarTimer = window.setTimeout(refreshSidebar, 300);
  },

  error(frame) {
    // A stop that crossed the reply's end: nothing to tell.
    if (frame.code === "idle") return;
    showError(frame.message || "Something went wrong (" + frame.code + ").");
    if (state.busy === WAITING) {
      setBusy(IDLE);
      if (state.awaitingBranch) giveBackRefusedMessage();
      for (const pending of document.querySelectorAll(".message.is-pending")) pending.remove();
      followBranch();
    }
    state.awaitingBranch = false;
    forgetFocus();
  },
};

// Each time the socket opens: the branch and any running reply, from the
// server; the sidebar too, after frames may have been missed.
export function onSocketOpen(missedFrames) {
  watchShownConversation();
  if (missedFrames) refreshSidebar();
}
