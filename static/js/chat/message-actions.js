// The buttons of each message in the branch: Edit (a new version of one of
// your messages), Regenerate (a new version of a reply), Continue (a reply
// the length limit cut, extended in place), the switch between
// versions, Copy of a reply's Markdown and of a code block. Each action that
// asks the server waits for the branch frame that shows its result.

import { rememberFocus, sourceOf } from "./branch.js";
import { copyText } from "./copy.js";
import { hideError, showError } from "./notices.js";
import { el } from "./page.js";
import { replySettings } from "./settings.js";
import { sendFrame } from "./socket.js";
import { IDLE, WAITING, setBusy, state } from "./state.js";

function requireIdle() {
  if (state.busy === IDLE) return true;
  showError("Wait for the reply to finish, or stop it first.");
  return false;
}

// A frame that makes a new version went out: the page waits for its branch.
function sendNewVersion(frame) {
  if (!sendFrame(frame)) return;
  hideError();
  state.awaitingBranch = true;
  setBusy(WAITING);
}

function startEdit(article) {
  if (article.classList.contains("is-editing") || !requireIdle()) return;
  article.classList.add("is-editing");
  const editor = document.createElement("div");
  editor.className = "message-editor";
  const textarea = document.createElement("textarea");
  textarea.className = "edit-input";
  textarea.setAttribute("aria-label", "Edit your message");
  textarea.value = sourceOf(article);
  textarea.rows = Math.min(12, Math.max(2, textarea.value.split("\n").length));
  const buttons = document.createElement("div");
  buttons.className = "editor-actions";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "small-button";
  cancel.dataset.action = "cancel-edit";
  cancel.textContent = "Cancel";
  const save = document.createElement("button");
  save.type = "button";
  save.className = "primary-button";
  save.dataset.action = "submit-edit";
  save.textContent = "Send";
  buttons.appendChild(cancel);
  buttons.appendChild(save);
  editor.appendChild(textarea);
  editor.appendChild(buttons);
  article.querySelector(".message-content").appendChild(editor);
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitEdit(article);
    } else if (event.key === "Escape") {
      event.preventDefault();
      cancelEdit(article);
    }
  });
  textarea.focus();
  textarea.setSelectionRange(textarea.value.length, textarea.value.length);
}

function cancelEdit(article) {
  const editor = article.querySelector(".message-editor");
  if (editor) editor.remove();
  article.classList.remove("is-editing");
  const button = article.querySelector('[data-action="edit"]');
  if (button) button.focus();
}

function submitEdit(article) {
  const content = article.querySelector(".edit-input").value;
  if (content.trim() === "") return;
  if (content === sourceOf(article)) {
    cancelEdit(article);
    return;
  }
  if (!requireIdle()) return;
  sendNewVersion({
    type: "edit",
    conversation: state.conversationId,
    message: article.dataset.messageId,
    content: content,
    settings: replySettings(),
  });
}

function regenerate(article) {
  if (!requireIdle()) return;
  sendNewVersion({
    type: "regenerate",
    conversation: state.conversationId,
    message: article.dataset.messageId,
    settings: replySettings(),
  });
}

// A reply the length limit cut goes on in place: the same message grows.
function continueReply(article) {
  if (!requireIdle()) return;
  if (!sendFrame({ type: "continue", conversation: state.conversationId, message: article.dataset.messageId, settings: replySettings() })) return;
  hideError();
  article.querySelector('[data-action="continue"]')?.remove();
  setBusy(WAITING);
}

function switchVersion(article, button) {
  if (!button.dataset.switchTo || !requireIdle()) return;
  const selector = button.classList.contains("version-previous") ? ".version-previous" : ".version-next";
  if (sendFrame({ type: "switch", conversation: state.conversationId, message: button.dataset.switchTo })) {
    rememberFocus(article, selector);
  }
}

export function initMessageActions() {
  el.branch.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button || !el.branch.contains(button)) return;
    const article = button.closest(".message");
    if (!article) return;
    if (button.dataset.switchTo !== undefined) {
      switchVersion(article, button);
      return;
    }
    switch (button.dataset.action) {
      case "edit":
        startEdit(article);
        break;
      case "cancel-edit":
        cancelEdit(article);
        break;
      case "submit-edit":
        submitEdit(article);
        break;
      case "regenerate":
        regenerate(article);
        break;
      case "continue":
        continueReply(article);
        break;
      case "copy":
        copyText(state.replyText[article.dataset.messageId] || sourceOf(article), button);
        break;
    }
  });
}
