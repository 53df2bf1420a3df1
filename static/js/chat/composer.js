// The composer: the message box, Send and Stop. Send and Stop follow the
// state (busy, connected); sending the first message of a browser makes its
// session first (socket.js).

import { forgetFocus } from "./branch.js";
import { hideError, showError } from "./notices.js";
import { app, el } from "./page.js";
import { replySettings, systemPrompt } from "./settings.js";
import { sendFrame, startSessionThenSend } from "./socket.js";
import { IDLE, STREAMING, WAITING, onChange, setBusy, state } from "./state.js";

function showBusy() {
  app.dataset.busy = state.busy;
  el.stop.hidden = state.busy !== STREAMING;
  el.send.hidden = state.busy === STREAMING;
  updateSendButton();
}

function updateSendButton() {
  // Without a session there is no socket yet: sending makes both.
  const reachable = state.connected || !state.hasSession;
  el.send.disabled = !reachable || state.busy !== IDLE || el.input.value.trim() === "";
}

export function resizeInput() {
  // CSSOM, which the Content-Security-Policy allows (style attributes it does not).
  el.input.style.height = "auto";
  el.input.style.height = Math.min(el.input.scrollHeight, 240) + "px";
}

function putBackLastSent() {
  el.input.value = state.lastSent;
  resizeInput();
  updateSendButton();
}

// The server refused the message just sent: its text goes back into the
// box, unless the person has started typing another.
export function giveBackRefusedMessage() {
  if (el.input.value === "" && state.lastSent) putBackLastSent();
}

function submitMessage() {
  const content = el.input.value;
  if (content.trim() === "" || state.busy !== IDLE) return;
  const frame = {
    type: "send",
    conversation: state.conversationId,
    content: content,
    model: el.modelPicker.value,
    settings: replySettings(),
  };
  if (state.conversationId === null) {
    const prompt = systemPrompt();
    if (prompt.trim() !== "") frame.system_prompt = prompt;
  }
  if (!state.hasSession) {
    startSessionThenSend(app.dataset.sessionUrl, frame).catch(() => {
      showError("The server could not be reached; try again in a moment.");
      putBackLastSent();
      setBusy(IDLE);
    });
  } else if (!sendFrame(frame)) {
    return;
  }
  hideError();
  state.lastSent = content;
  state.awaitingBranch = true;
  forgetFocus();
  el.input.value = "";
  resizeInput();
  setBusy(WAITING);
}

export function stopReply() {
  if (state.busy !== STREAMING || !state.conversationId) return;
  sendFrame({ type: "stop", conversation: state.conversationId });
}

export function initComposer() {
  onChange(showBusy);

  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    submitMessage();
  });

  el.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitMessage();
    }
  });

  el.input.addEventListener("input", () => {
    resizeInput();
    updateSendButton();
  });

  el.stop.addEventListener("click", stopReply);
}
