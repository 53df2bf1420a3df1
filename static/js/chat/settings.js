// The settings panel of a conversation (its system prompt, temperature and
// max tokens) and the model picker above it: saved with the panel's form,
// or, for a new chat, sent with its first message.

import { postForm } from "./http.js";
import { conversationUrl, el } from "./page.js";
import { state } from "./state.js";

// The reply settings for a frame: those typed into the panel for a new chat
// (they go with its first message), the saved ones for an existing one.
export function replySettings() {
  const saved = state.conversationId !== null;
  const settings = {};
  const temperature = el.settingsForm.elements.temperature;
  const maxTokens = el.settingsForm.elements.max_tokens;
  const t = (saved ? temperature.defaultValue : temperature.value).trim();
  const m = (saved ? maxTokens.defaultValue : maxTokens.value).trim();
  if (t !== "" && isFinite(Number(t))) settings.temperature = Number(t);
  if (m !== "" && /^\d+$/.test(m)) settings.max_tokens = parseInt(m, 10);
  return settings;
}

// The system prompt typed for a new chat.
export function systemPrompt() {
  return el.settingsForm.elements.system_prompt.value;
}

function markSettingsSaved() {
  const elements = el.settingsForm.elements;
  for (const name of ["temperature", "max_tokens", "system_prompt"]) {
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

// The panel's model and system prompt started the conversation; its
// temperature and max tokens went with the first message only, so they are
// saved for the next ones (and for a reload) as the Save button would.
export function keepSettingsOfNewConversation(conversationId) {
  el.settingsForm.action = conversationUrl(conversationId, "settings");
  el.settingsStatus.textContent = "";
  const elements = el.settingsForm.elements;
  if (elements.temperature.value.trim() !== "" || elements.max_tokens.value.trim() !== "") {
    saveSettings();
  } else {
    markSettingsSaved();
  }
}

function showSettingsErrors(errors) {
  el.settingsErrors.textContent = "";
  const fields = { temperature: el.temperatureError, max_tokens: el.maxTokensError };
  for (const name of Object.keys(fields)) {
    fields[name].textContent = "";
    el.settingsForm.elements[name].removeAttribute("aria-invalid");
  }
  for (const name of Object.keys(errors || {})) {
    const text = errors[name].map((error) => error.message).join(" ");
    if (fields[name]) {
      fields[name].textContent = text;
      el.settingsForm.elements[name].setAttribute("aria-invalid", "true");
    } else {
      const line = document.createElement("p");
      line.textContent = (name === "__all__" ? "" : name.replace("_", " ") + ": ") + text;
      el.settingsErrors.appendChild(line);
    }
  }
}

export function initSettings() {
  el.settingsToggle.addEventListener("click", () => {
    const open = el.settingsPanel.hidden;
    el.settingsPanel.hidden = !open;
    el.settingsToggle.setAttribute("aria-expanded", String(open));
    if (open) el.settingsForm.elements.system_prompt.focus();
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
