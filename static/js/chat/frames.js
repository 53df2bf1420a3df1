// What the page does with each frame the server sends (docs/websocket.md,
// "Server → client"): the handlers socket.js dispatches to, by type, and
// what it does when the socket opens again after frames may have been missed.

import { forgetFocus, reloadBranch, showBranch } from "./branch.js";
import { giveBackRefusedMessage } from "./composer.js";
import { hideError, showError } from "./notices.js";
import { conversationUrl, showConversation, showTitle } from "./page.js";
import { appendReplyText, showReplyEnd, showReplyRender } from "./reply.js";
import { keepSettingsOfNewConversation } from "./settings.js";
import { refreshSidebar, showConversationTitle } from "./sidebar.js";
import { IDLE, STREAMING, WAITING, setBusy, state } from "./state.js";

export const frameHandlers = {
  conversation(frame) {
    const conversation = frame.conversation;
    state.conversationId = conversation.id;
    showConversation(conversation);
    keepSettingsOfNewConversation(conversation.id);
    refreshSidebar();
  },

  branch(frame) {
    if (frame.conversation !== state.conversationId) return;
    state.awaitingBranch = false;
    showBranch(frame.html);
  },

  started(frame) {
    if (frame.conversation !== state.conversationId) return;
    state.replyText[frame.reply] = "";
    setBusy(STREAMING, frame.reply);
    hideError();
  },

  delta(frame) {
    if (state.replyText[frame.reply] === undefined) state.replyText[frame.reply] = "";
    state.replyText[frame.reply] += frame.text;
    appendReplyText(frame.reply, frame.text);
  },

  render(frame) {
    showReplyRender(frame.reply, frame.html);
  },

  done(frame) {
    showReplyEnd(frame, state.replyText[frame.reply]);
    delete state.replyText[frame.reply];
    if (state.streamingReply === frame.reply || state.busy !== IDLE) setBusy(IDLE);
    refreshSidebar();
  },

  title(frame) {
    showConversationTitle(frame.conversation, frame.title);
    if (frame.conversation === state.conversationId) showTitle(frame.title);
  },

  error(frame) {
    // A stop that crossed the reply's end: nothing to tell.
    if (frame.code === "idle") return;
    showError(frame.message || "Something went wrong (" + frame.code + ").");
    if (state.busy === WAITING) {
      setBusy(IDLE);
      if (state.awaitingBranch) giveBackRefusedMessage();
    }
    state.awaitingBranch = false;
    forgetFocus();
  },
};

// After the connection dropped: the page may have missed the end of a
// reply, so it takes the branch from a fresh copy of itself.
export function resumeAfterMissedFrames() {
  if (!state.conversationId) return;
  reloadBranch(conversationUrl(state.conversationId));
  refreshSidebar();
}
