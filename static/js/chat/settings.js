// The settings panel of a conversation (its system prompt, temperature, max
// tokens, top-p, top-k and seed) and the model picker above it: saved with
// the panel's form, or, for a new chat, sent with its first message.

import { postForm } from "./http.js";
import { conversationUrl, el } from "./page.js";
import { state } from "./state.js";

// The panel's reply settings: their form field, how a typed value is read
// (null: not a value, so not sent) and the element that shows its error.
const REPLY_SETTINGS = {
  temperature: { read: decimal, error: "temperature-error" },
  max_tokens: { read: integer, error: "max-tokens-error" },
  top_p: { read: decimal, error: "top-p-error" },
  top_k: { read: integer, error: "top-k-error" },
  seed: { read: integer, error: "seed-error" },
};

function decimal(text) {
  return text !== "" && isFinite(Number(text)) ? Number(text) : null;
}

function integer(text) {
  return /^\d+$/.test(text) ? parseInt(text, 10) : null;
}

// The reply settings for a frame: those typed into the panel for a new chat
// (they go with its first message), the saved ones for an existing one.
export function replySettings() {
  const saved = state.conversationId !== null;
  const settings = {};
  for (const [name, setting] of Object.entries(REPLY_SETTINGS)) {
    const field = el.settingsForm.elements[name];
    const value = setting.read((saved ? field.defaultValue : field.value).trim());
    if (value !== null) settings[name] = value;
  }
  return settings;
}

// The system prompt typed for a new chat.
export function systemPrompt() {
  return el.settingsForm.elements.system_prompt.value;
}

function markSettingsSaved() {
  const elements = el.settingsForm.elements;
  for (const name of [...Object.keys(REPLY_SETTINGS), "system_prompt"]) {
    elements[name].defaultValue = elements[name].value;
  }
}

function saveSettings() {
  el.settingsStatus.textContent = "Saving…";
  postForm(el.settingsForm).then((result) => {
    if (result.ok) {
      markSettingsSaved();
      el.settingsStatus.textContent = "Saved.";
    } else {
      el.settingsStatus.textContent = "Not saved.";
      showSettingsErrors(result.data.errors);
    }
  });
}

// The panel's model and system prompt started the conversation; its other
// settings went with the first message only, so they are saved for the next
// ones (and for a reload) as the Save button would.
export function keepSettingsOfNewConversation(conversationId) {
  el.settingsForm.action = conversationUrl(conversationId, "settings");
  el.settingsStatus.textContent = "";
  const elements = el.settingsForm.elements;
  if (Object.keys(REPLY_SETTINGS).some((name) => elements[name].value.trim() !== "")) {
    saveSettings();
  } else {
    markSettingsSaved();
  }
}

function showSettingsErrors(errors) {
  el.settingsErrors.textContent = "";
  for (const [name, setting] of Object.entries(REPLY_SETTINGS)) {
    document.getElementById(setting.error).textContent = "";
    el.settingsForm.elements[name].removeAttribute("aria-invalid");
  }
  for (const name of Object.keys(errors || {})) {
    const text = errors[name].map((error) => error.message).join(" ");
    if (REPLY_SETTINGS[name]) {
      document.getElementById(REPLY_SETTINGS[name].error).textContent = text;
      el.settingsForm.elements[name].setAttribute("aria-invalid", "true");
    } else {
      const line = document.createElement("p");
      line.textContent = (name === "__all__" ? "" : name.replace("_", " ") + ": ") + text;
      el.settingsErrors.appendChild(line);
    }
  }
}

export function settingsOpen() {
  return !el.settingsPanel.hidden;
}

// On a touch screen, focusing a text box would open the keyboard over the
// panel the person just opened to look at.
function touchScreen() {
  return window.matchMedia("(pointer: coarse)").matches || "ontouchstart" in window;
}

function setSettingsOpen(open) {
  el.settingsPanel.hidden = !open;
  el.settingsToggle.setAttribute("aria-expanded", String(open));
}

// Esc: the panel closes, and the focus goes back to its button if it was
// inside the panel.
export function closeSettings() {
  const focusWasInside = el.settingsPanel.contains(document.activeElement);
  setSettingsOpen(false);
  if (focusWasInside) el.settingsToggle.focus();
}

export function initSettings() {
  el.settingsToggle.addEventListener("click", () => {
    const open = el.settingsPanel.hidden;
    setSettingsOpen(open);
    if (open && !touchScreen()) el.settingsForm.elements.system_prompt.focus();
  });

  el.settingsForm.addEventListener("submit", (event) => {
    event.preventDefault();
    showSettingsErrors({});
    if (state.conversationId === null) {
      el.settingsStatus.textContent = "These settings go with your first message.";
      return;
    }
    saveSettings();
  });

  el.modelPicker.addEventListener("change", () => {
    if (state.conversationId !== null) el.settingsForm.requestSubmit();
  });
}
