// The chat page as a whole (templates/chat/chat.html): its elements, the
// addresses it was rendered with, and what changes when a new chat becomes a
// conversation (its address, its title, its export links). The elements are
// looked up once, when this module is first evaluated: module scripts run
// after the document is parsed.

export const app = document.getElementById("app");

function byId(id) {
  return document.getElementById(id);
}

export const el = {
  branch: byId("branch"),
  messages: byId("messages"),
  emptyState: byId("empty-state"),
  composer: byId("composer"),
  input: byId("composer-input"),
  send: byId("send-button"),
  stop: byId("stop-button"),
  notice: byId("notice"),
  errorBanner: byId("error-banner"),
  errorText: byId("error-text"),
  errorDismiss: byId("error-dismiss"),
  title: byId("chat-title"),
  modelPicker: byId("model-picker"),
  settingsToggle: byId("settings-toggle"),
  settingsPanel: byId("settings-panel"),
  settingsForm: byId("settings-form"),
  settingsErrors: byId("settings-errors"),
  settingsStatus: byId("settings-status"),
  temperatureError: byId("temperature-error"),
  maxTokensError: byId("max-tokens-error"),
  exportMd: byId("export-md"),
  exportJson: byId("export-json"),
  sidebar: byId("sidebar"),
  sidebarToggle: byId("sidebar-toggle"),
  backdrop: byId("sidebar-backdrop"),
  list: byId("conversation-list"),
  searchForm: byId("search-form"),
  searchInput: byId("search-input"),
};

// A conversation's page, or one of its sub-resources ("settings", "export.md").
export function conversationUrl(id, suffix) {
  return app.dataset.conversationUrl.replace(app.dataset.placeholderId, id) + (suffix || "");
}

export function showTitle(title) {
  el.title.textContent = title;
  document.title = (title || "New chat") + " · chatsite";
}

// The first message of a new chat started this conversation: the page
// becomes its page, as a reload would show it.
export function showConversation(conversation) {
  app.dataset.conversationId = conversation.id;
  window.history.replaceState(null, "", conversation.url);
  el.exportMd.href = conversationUrl(conversation.id, "export.md");
  el.exportJson.href = conversationUrl(conversation.id, "export.json");
  el.exportMd.hidden = false;
  el.exportJson.hidden = false;
  showTitle(conversation.title || "New chat");
}
