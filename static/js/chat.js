// The chat page (templates/chat/chat.html): the WebSocket conversation, the
// message actions, the sidebar and the settings panel.
//
// The server renders everything the page shows (the branch, the sidebar
// list); this script speaks the chat consumer's protocol (chat/consumers.py,
// docs/websocket.md): it watches the conversation shown, sends
// send/stop/regenerate/edit/continue/switch frames and puts the frames it
// gets into the page, whichever tab or client caused them. Text from the
// model is only ever inserted as text (textContent), or as the HTML the
// server rendered and sanitized.
//
// An ES module (no build step), and the entry of the modules in chat/:
//   state.js            the conversation state: idle / waiting / streaming, ids, queue
//   socket.js           the socket and its protocol: session, (re)connecting, frames
//   frames.js           what each frame received does to the page
//   page.js             the page's elements and addresses, its title
//   branch.js           the messages shown, the reader's place in them
//   reply.js            a streaming reply: snapshot, progress, delta, render and done frames
//   stats.js            the stats line under a reply, in words
//   composer.js         the message box, Send and Stop
//   context-counter.js  the tokens of the conversation and the draft against the context
//   scroll-button.js    "Scroll to the newest message"
//   message-actions.js  edit, regenerate, continue, versions, copy
//   settings.js         the settings panel and the model picker
//   sidebar.js          the conversation list, search, pin, rename, delete, the drawer
//   notices.js          the notice line and the error banner
//   copy.js             the copy buttons and the clipboard
//   http.js             form posts and fetched HTML
// Imports are relative ("./chat/page.js"), each a statement ending with a
// semicolon, and form no cycle: collectstatic rewrites them to the hashed
// names (chatsite/storage.py).

import { scrollToBottom } from "./chat/branch.js";
import { initComposer, resizeInput, stopReply } from "./chat/composer.js";
import { addCodeCopyButtons } from "./chat/copy.js";
import { followBranch, frameHandlers, onSocketOpen } from "./chat/frames.js";
import { initMessageActions } from "./chat/message-actions.js";
import { initNotices } from "./chat/notices.js";
import { app, el } from "./chat/page.js";
import { initScrollButton } from "./chat/scroll-button.js";
import { closeSettings, initSettings, settingsOpen } from "./chat/settings.js";
import { closeNarrowSidebar, initSidebar, narrowSidebarOpen } from "./chat/sidebar.js";
import { connect, initSocket } from "./chat/socket.js";
import { IDLE, STREAMING, setBusy, state } from "./chat/state.js";

function start() {
  state.conversationId = app.dataset.conversationId || null;
  state.hasSession = app.dataset.session === "1";
  initSocket(frameHandlers, onSocketOpen);
  initComposer();
  initNotices();
  initMessageActions();
  initSidebar();
  initScrollButton();
  initSettings();

  // Escape stops a streaming reply, or else closes the settings panel, or
  // else the sidebar's drawer.
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if (state.busy === STREAMING) {
      event.preventDefault();
      stopReply();
    } else if (settingsOpen()) {
      closeSettings();
    } else if (narrowSidebarOpen()) {
      closeNarrowSidebar();
    }
  });

  addCodeCopyButtons(el.branch);
  setBusy(IDLE);
  followBranch(); // a reply still running shows Stop until the socket brings its text
  resizeInput();
  scrollToBottom();
  if (state.hasSession) connect();
  if (!("ontouchstart" in window)) el.input.focus();
}

if (app) start();
