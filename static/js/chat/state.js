// The conversation as the page knows it. No DOM here: the views read this
// state, and the composer follows it through onChange.
//
// busy is what the page is doing with the conversation:
//   IDLE      nothing is asked; the person may send.
//   WAITING   a send, edit or regenerate frame went out; no reply started yet.
//   STREAMING a reply streams (streamingReply is its id); Stop shows.
// IDLE -> WAITING when a frame goes out; WAITING -> STREAMING on "started";
// back to IDLE on "done", on an "error" frame while waiting, when the
// browser's session could not be made, or when the connection drops (the
// reply goes on or ends on the server, and the page reloads the branch).

export const IDLE = "idle";
export const WAITING = "waiting";
export const STREAMING = "streaming";

export const state = {
  // The conversation shown; null for a new chat until the server starts one.
  conversationId: null,
  // Whether the browser has a session: the server makes one only when it
  // first sends a message (POST /session), then the socket can open.
  hasSession: false,
  // Whether the socket is open.
  connected: false,
  // A frame to send once the socket opens (the first message of a browser).
  queued: null,
  // Whether the page may have missed frames while the socket was down.
  missedFrames: false,
  busy: IDLE,
  streamingReply: null,
  // The text of the last message sent, put back if the server refuses it.
  lastSent: "",
  // Whether a frame went out whose branch frame has not come yet.
  awaitingBranch: false,
  // reply id -> the reply's Markdown so far (for Copy).
  replyText: {},
};

const listeners = [];

// Call listener() after every change of busy or connected.
export function onChange(listener) {
  listeners.push(listener);
}

function changed() {
  for (const listener of listeners) listener();
}

export function setBusy(busy, streamingReply = null) {
  state.busy = busy;
  state.streamingReply = busy === STREAMING ? streamingReply : null;
  changed();
}

export function setConnected(connected) {
  state.connected = connected;
  changed();
}
