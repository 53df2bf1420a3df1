// The socket to the chat consumer (chat/consumers.py; docs/websocket.md):
// the session a browser makes before its first message (POST /session),
// connecting and reconnecting with backoff, sending frames, and handing
// each frame received to the handler for its type. The views learn of the
// connection through the state (connected) and the notice line.

import { csrfToken } from "./http.js";
import { hideNotice, showError, showNotice } from "./notices.js";
import { app } from "./page.js";
import { IDLE, setBusy, setConnected, state } from "./state.js";

let socket = null;
let everConnected = false;
let reconnectAttempts = 0;
let leaving = false;
// frame type -> function(frame), and what to do each time the socket opens
// (initSocket): resume(missedFrames), true when frames may have been missed.
let handlers = {};
let resume = () => {};

export function initSocket(frameHandlers, onResume) {
  handlers = frameHandlers;
  resume = onResume;
  window.addEventListener("pagehide", () => {
    leaving = true;
  });
}

export function connect() {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  const opened = new WebSocket(scheme + "//" + window.location.host + "/ws/chat/");
  socket = opened;
  opened.addEventListener("open", () => {
    everConnected = true;
    reconnectAttempts = 0;
    hideNotice();
    setConnected(true);
    if (state.queued) {
      const frame = state.queued;
      state.queued = null;
      sendFrame(frame);
    }
    const missed = state.missedFrames;
    state.missedFrames = false;
    resume(missed);
    app.dataset.connected = "true"; // for tests and styles: the socket is open and watching
  });
  opened.addEventListener("message", (event) => {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch (error) {
      return;
    }
    const handler = Object.hasOwn(handlers, frame.type) ? handlers[frame.type] : null;
    if (handler) handler(frame);
  });
  opened.addEventListener("close", () => {
    if (socket !== opened) return;
    socket = null;
    setConnected(false);
    app.dataset.connected = "false";
    if (leaving) return;
    // A reply streaming when the connection dropped goes on on the server;
    // once connected again, the page watches it again (frames.js).
    if (state.busy !== IDLE) setBusy(IDLE);
    if (everConnected) state.missedFrames = true;
    showNotice("Connection lost, reconnecting…");
    const delay = Math.min(500 * Math.pow(2, reconnectAttempts), 10000);
    reconnectAttempts += 1;
    window.setTimeout(connect, delay * (0.8 + Math.random() * 0.4));
  });
}

// The browser's first message: make its session, then open the socket and
// send the frame once it is open. The promise is rejected, and the frame
// dropped, when the session could not be made.
export function startSessionThenSend(sessionUrl, frame) {
  state.queued = frame;
  return window
    .fetch(sessionUrl, {
      method: "POST",
      headers: { Accept: "application/json", "X-CSRFToken": csrfToken() },
      credentials: "same-origin",
    })
    .then((response) => {
      if (!response.ok) throw new Error("status " + response.status);
      state.hasSession = true;
      connect();
    })
    .catch((error) => {
      state.queued = null;
      throw error;
    });
}

// Whether the frame went out; when not, the error banner says why.
export function sendFrame(frame) {
  if (!state.connected || !socket) {
    showError("Not connected to the server yet; try again in a moment.");
    return false;
  }
  socket.send(JSON.stringify(frame));
  return true;
}
