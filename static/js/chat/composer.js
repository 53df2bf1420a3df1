// The composer: the message box, Send and Stop. Send and Stop follow the
// state (busy, connected); sending the first message of a browser makes its
// session first (socket.js). Also: the notice of a paste cut at the length
// limit of a message, the suggested prompts of an empty chat, and the token
// counter (context-counter.js).

import { forgetFocus, showPendingTurn } from "./branch.js";
import { countSoon, initContextCounter } from "./context-counter.js";
import { hideError, hideNotice, showError, showNotice } from "./notices.js";
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
  hidePasteNotice();
  state.lastSent = content;
  state.awaitingBranch = true;
  forgetFocus();
  showPendingTurn(content);
  el.input.value = "";
  resizeInput();
  setBusy(WAITING);
}

export function stopReply() {
  if (state.busy !== STREAMING || !state.conversationId) return;
  sendFrame({ type: "stop", conversation: state.conversationId });
}

// The textarea's maxlength cuts a paste that would make the message too
// long; the person is told, rather than finding the end of the text gone.
let pasteNotice = "";
const numbers = new Intl.NumberFormat("en");

function noticeCutPaste(event) {
  const limit = el.input.maxLength;
  if (limit < 0 || !event.clipboardData) return;
  // The textarea turns the pasted line ends into "\n", one character each.
  const pasted = event.clipboardData.getData("text/plain").replace(/\r\n?/g, "\n");
  const kept = el.input.value.length - (el.input.selectionEnd - el.input.selectionStart);
  if (kept + pasted.length <= limit) return;
  const size = numbers.format(limit);
  pasteNotice =
    kept === 0
      ? "The pasted text was cut to " + size + " characters, the limit of a message."
      : "The pasted text was cut to " +
        numbers.format(Math.max(0, limit - kept)) +
        " characters: a message holds at most " +
        size +
        ".";
  showNotice(pasteNotice);
}

function hidePasteNotice() {
  // Only the paste's notice: the connection's stays.
  if (pasteNotice && el.notice.textContent === pasteNotice) hideNotice();
  pasteNotice = "";
}

// A suggested prompt starts the message (before what is typed already, if
// anything is): the person finishes it and sends it.
function startWithSuggestion(button) {
  const start = button.dataset.prompt || "";
  const typed = el.input.value;
  const isSuggestion = Array.from(el.emptyState.querySelectorAll(".suggestion")).some(
    (other) => other.dataset.prompt === typed,
  );
  const text = typed.trim() === "" || isSuggestion ? start : start + typed;
  el.input.value = el.input.maxLength > 0 ? text.slice(0, el.input.maxLength) : text;
  resizeInput();
  updateSendButton();
  countSoon();
  el.input.focus();
  el.input.setSelectionRange(start.length, start.length);
}

export function initComposer() {
  onChange(showBusy);
  initContextCounter();

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
    if (el.input.value.length < el.input.maxLength) hidePasteNotice();
  });

  el.input.addEventListener("paste", noticeCutPaste);

  el.emptyState.addEventListener("click", (event) => {
    const button = event.target.closest(".suggestion");
    if (button) startWithSuggestion(button);
  });

  el.stop.addEventListener("click", stopReply);
}
