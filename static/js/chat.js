// The chat page (templates/chat/chat.html): the WebSocket conversation, the
// message actions, the sidebar and the settings panel.
//
// The server renders everything the page shows (the branch, the sidebar
// list); this script speaks the chat consumer's protocol (chat/consumers.py):
// it sends send/stop/regenerate/edit/switch frames and puts the frames it
// gets into the page. Text from the model is only ever inserted as text
// (textContent), or as the HTML the server rendered and sanitized.
(function () {
  "use strict";

  var app = document.getElementById("app");
  if (!app) return;

  function $(id) {
    return document.getElementById(id);
  }

  var el = {
    branch: $("branch"),
    messages: $("messages"),
    emptyState: $("empty-state"),
    composer: $("composer"),
    input: $("composer-input"),
    send: $("send-button"),
    stop: $("stop-button"),
    notice: $("notice"),
    errorBanner: $("error-banner"),
    errorText: $("error-text"),
    errorDismiss: $("error-dismiss"),
    title: $("chat-title"),
    modelPicker: $("model-picker"),
    settingsToggle: $("settings-toggle"),
    settingsPanel: $("settings-panel"),
    settingsForm: $("settings-form"),
    settingsErrors: $("settings-errors"),
    settingsStatus: $("settings-status"),
    exportMd: $("export-md"),
    exportJson: $("export-json"),
    sidebar: $("sidebar"),
    sidebarToggle: $("sidebar-toggle"),
    backdrop: $("sidebar-backdrop"),
    list: $("conversation-list"),
    searchForm: $("search-form"),
    searchInput: $("search-input"),
  };

  var state = {
    conversationId: app.dataset.conversationId || null,
    // Whether the browser has a session: the server makes one only when it
    // first sends a message (POST /session), then the socket can open.
    hasSession: app.dataset.session === "1",
    // A frame to send once the socket opens (the first message of a browser).
    queued: null,
    socket: null,
    connected: false,
    everConnected: false,
    // Whether the page may have missed frames while the socket was down.
    missedFrames: false,
    reconnectAttempts: 0,
    leaving: false,
    // "idle", "waiting" (a request is sent, no reply has started) or "streaming".
    busy: "idle",
    streamingReply: null,
    // The text of the last message sent, put back if the server refuses it.
    lastSent: "",
    awaitingBranch: false,
    // reply id -> the reply's Markdown so far (for Copy), and its pending text node.
    replyText: {},
    pending: {},
    // What to focus once the next branch frame has replaced the messages.
    refocus: null,
  };

  var narrowScreen = window.matchMedia("(max-width: 800px)");

  // --- Small helpers -----------------------------------------------------

  function conversationUrl(id, suffix) {
    return app.dataset.conversationUrl.replace(app.dataset.placeholderId, id) + (suffix || "");
  }

  function csrfToken() {
    var field = document.querySelector("input[name=csrfmiddlewaretoken]");
    return field ? field.value : "";
  }

  function articleOf(messageId) {
    return document.getElementById("m-" + messageId);
  }

  function sourceOf(article) {
    var template = article.querySelector("template.message-source");
    if (template) return template.content.textContent;
    var body = article.querySelector(".message-body");
    return body ? body.innerText : "";
  }

  function setSource(article, text) {
    var template = article.querySelector("template.message-source");
    if (template) template.content.textContent = text;
  }

  function isAtBottom() {
    var scroller = el.messages;
    return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 48;
  }

  function scrollToBottom() {
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  // Keep the view pinned to the end only when the reader was already there:
  // someone reading earlier messages is not pulled down by the stream.
  function keepingBottom(change) {
    var atBottom = isAtBottom();
    change();
    if (atBottom) scrollToBottom();
  }

  function showNotice(text) {
    el.notice.textContent = text;
    el.notice.hidden = false;
  }

  function hideNotice() {
    el.notice.hidden = true;
    el.notice.textContent = "";
  }

  function showError(text) {
    el.errorText.textContent = text;
    el.errorBanner.hidden = false;
  }

  function hideError() {
    el.errorBanner.hidden = true;
    el.errorText.textContent = "";
  }

  function setDocumentTitle(title) {
    document.title = (title || "New chat") + " · chatsite";
  }

  // --- Composer state ----------------------------------------------------

  function setBusy(busy) {
    state.busy = busy;
    app.dataset.busy = busy;
    if (busy !== "streaming") state.streamingReply = null;
    el.stop.hidden = busy !== "streaming";
    el.send.hidden = busy === "streaming";
    updateSendButton();
  }

  function updateSendButton() {
    // Without a session there is no socket yet: sending makes both.
    var reachable = state.connected || !state.hasSession;
    el.send.disabled = !reachable || state.busy !== "idle" || el.input.value.trim() === "";
  }

  function resizeInput() {
    // CSSOM, which the Content-Security-Policy allows (style attributes it does not).
    el.input.style.height = "auto";
    el.input.style.height = Math.min(el.input.scrollHeight, 240) + "px";
  }

  // --- Settings sent with a message ---------------------------------------

  // The reply settings for a frame: those typed into the panel for a new chat
  // (they go with its first message), the saved ones for an existing one.
  function replySettings() {
    var saved = state.conversationId !== null;
    var settings = {};
    var temperature = el.settingsForm.elements.temperature;
    var maxTokens = el.settingsForm.elements.max_tokens;
    var t = (saved ? temperature.defaultValue : temperature.value).trim();
    var m = (saved ? maxTokens.defaultValue : maxTokens.value).trim();
    if (t !== "" && isFinite(Number(t))) settings.temperature = Number(t);
    if (m !== "" && /^\d+$/.test(m)) settings.max_tokens = parseInt(m, 10);
    return settings;
  }

  function markSettingsSaved() {
    var elements = el.settingsForm.elements;
    ["temperature", "max_tokens", "system_prompt"].forEach(function (name) {
      elements[name].defaultValue = elements[name].value;
    });
  }

  // --- The socket ----------------------------------------------------------

  function connect() {
    var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    var socket = new WebSocket(scheme + "//" + window.location.host + "/ws/chat/");
    state.socket = socket;
    socket.addEventListener("open", function () {
      state.connected = true;
      state.everConnected = true;
      state.reconnectAttempts = 0;
      hideNotice();
      updateSendButton();
      if (state.queued) {
        var frame = state.queued;
        state.queued = null;
        sendFrame(frame);
      }
      if (state.missedFrames) {
        state.missedFrames = false;
        reloadBranch();
      }
    });
    socket.addEventListener("message", function (event) {
      var frame;
      try {
        frame = JSON.parse(event.data);
      } catch (error) {
        return;
      }
      var handler = handlers[frame.type];
      if (handler) handler(frame);
    });
    socket.addEventListener("close", function () {
      if (state.socket !== socket) return;
      state.socket = null;
      state.connected = false;
      if (state.leaving) return;
      // A reply streaming when the connection dropped goes on or ends on the
      // server; the page reloads the branch once it is connected again.
      if (state.busy !== "idle") setBusy("idle");
      if (state.everConnected) state.missedFrames = true;
      updateSendButton();
      showNotice("Connection lost, reconnecting…");
      var delay = Math.min(500 * Math.pow(2, state.reconnectAttempts), 10000);
      state.reconnectAttempts += 1;
      window.setTimeout(connect, delay * (0.8 + Math.random() * 0.4));
    });
  }

  // The browser's first message: make its session, then open the socket
  // and send the frame once it is open.
  function startSessionThenSend(frame) {
    state.queued = frame;
    return window
      .fetch(app.dataset.sessionUrl, {
        method: "POST",
        headers: { Accept: "application/json", "X-CSRFToken": csrfToken() },
        credentials: "same-origin",
      })
      .then(function (response) {
        if (!response.ok) throw new Error("status " + response.status);
        state.hasSession = true;
        connect();
      })
      .catch(function () {
        state.queued = null;
        showError("The server could not be reached; try again in a moment.");
        el.input.value = state.lastSent;
        resizeInput();
        setBusy("idle");
      });
  }

  function sendFrame(frame) {
    if (!state.connected || !state.socket) {
      showError("Not connected to the server yet; try again in a moment.");
      return false;
    }
    state.socket.send(JSON.stringify(frame));
    return true;
  }

  window.addEventListener("pagehide", function () {
    state.leaving = true;
  });

  // --- Rendering frames into the page ---------------------------------------

  // Code blocks get a Copy button, after every render of a message.
  function decorate(root) {
    var blocks = root.querySelectorAll(".message-body pre");
    for (var i = 0; i < blocks.length; i++) {
      var pre = blocks[i];
      var holder = pre.parentElement;
      if (!holder || holder.classList.contains("code-block")) continue;
      if (!holder.classList.contains("highlight")) {
        holder = document.createElement("div");
        pre.parentElement.insertBefore(holder, pre);
        holder.appendChild(pre);
      }
      holder.classList.add("code-block");
      var button = document.createElement("button");
      button.type = "button";
      button.className = "code-copy";
      button.dataset.action = "copy-code";
      button.textContent = "Copy";
      button.setAttribute("aria-label", "Copy code");
      holder.insertBefore(button, holder.firstChild);
    }
  }

  function setBranch(html) {
    el.branch.innerHTML = html;
    el.emptyState.hidden = el.branch.querySelector(".message") !== null;
    state.pending = {};
    decorate(el.branch);
    var streaming = el.branch.querySelectorAll('.message[data-status="streaming"]');
    for (var i = 0; i < streaming.length; i++) streaming[i].setAttribute("aria-busy", "true");
  }

  function applyRefocus() {
    var refocus = state.refocus;
    state.refocus = null;
    if (!refocus) return;
    var articles = el.branch.querySelectorAll(".message");
    var article = articles[refocus.index];
    if (!article) return;
    // Keep the message the person acted on where it was on the screen.
    el.messages.scrollTop += article.getBoundingClientRect().top - refocus.top;
    var target = article.querySelector(refocus.selector);
    if (target && !target.disabled) target.focus();
    else if (article.querySelector(".versions button:not([disabled])")) {
      article.querySelector(".versions button:not([disabled])").focus();
    }
  }

  // Where streamed text not yet rendered goes: at the end of the last block
  // of the rendered HTML, so that it continues the paragraph (or the code)
  // it belongs to instead of jumping below it until the next render.
  function pendingNode(replyId, body) {
    var node = state.pending[replyId];
    if (node && node.isConnected) return node;
    var parent = body;
    while (parent.lastElementChild && /^(P|UL|OL|LI|BLOCKQUOTE|DIV|PRE|CODE)$/.test(parent.lastElementChild.tagName)) {
      parent = parent.lastElementChild;
    }
    node = document.createElement("span");
    node.className = "pending-text";
    parent.appendChild(node);
    state.pending[replyId] = node;
    return node;
  }

  function setReplyHtml(replyId, article, html) {
    var body = article.querySelector(".message-body");
    body.innerHTML = html;
    delete state.pending[replyId];
    decorate(article);
  }

  function statParts(stats, model) {
    var parts = [];
    if (stats.completion_tokens !== null && stats.completion_tokens !== undefined) {
      parts.push(stats.completion_tokens + " tokens");
    }
    if (typeof stats.tokens_per_second === "number") parts.push(stats.tokens_per_second.toFixed(1) + " tok/s");
    if (typeof stats.time_to_first_token === "number") {
      parts.push("first token " + stats.time_to_first_token.toFixed(2) + " s");
    }
    if (stats.finish_reason) parts.push(stats.finish_reason);
    if (model) parts.push(model);
    return parts;
  }

  function showStats(article, stats) {
    var line = article.querySelector(".message-stats");
    if (!line) return;
    line.textContent = "";
    statParts(stats || {}, article.dataset.model).forEach(function (part) {
      var span = document.createElement("span");
      span.className = "stat";
      span.textContent = part;
      line.appendChild(span);
    });
  }

  function addNote(article, className, text) {
    var content = article.querySelector(".message-content");
    var note = document.createElement("p");
    note.className = className;
    if (className === "message-error") note.setAttribute("role", "alert");
    note.textContent = text;
    content.appendChild(note);
  }

  function showContextMarker(messageId) {
    var markers = el.branch.querySelectorAll(".context-marker");
    for (var i = 0; i < markers.length; i++) markers[i].remove();
    var article = messageId ? articleOf(messageId) : null;
    if (!article) return;
    var marker = document.createElement("div");
    marker.className = "context-marker";
    marker.setAttribute("role", "note");
    marker.textContent = "Earlier messages are outside the model's view";
    article.parentElement.insertBefore(marker, article);
  }

  var handlers = {
    conversation: function (frame) {
      var conversation = frame.conversation;
      state.conversationId = conversation.id;
      app.dataset.conversationId = conversation.id;
      window.history.replaceState(null, "", conversation.url);
      el.exportMd.href = conversationUrl(conversation.id, "export.md");
      el.exportJson.href = conversationUrl(conversation.id, "export.json");
      el.exportMd.hidden = false;
      el.exportJson.hidden = false;
      el.settingsForm.action = conversationUrl(conversation.id, "settings");
      // The panel's model and system prompt started the conversation; its
      // temperature and max tokens went with the first message only, so they
      // are saved for the next ones (and for a reload) as the Save button would.
      el.settingsStatus.textContent = "";
      var elements = el.settingsForm.elements;
      if (elements.temperature.value.trim() !== "" || elements.max_tokens.value.trim() !== "") {
        saveSettings();
      } else {
        markSettingsSaved();
      }
      el.title.textContent = conversation.title || "New chat";
      setDocumentTitle(conversation.title);
      refreshSidebar();
    },

    branch: function (frame) {
      if (frame.conversation !== state.conversationId) return;
      state.awaitingBranch = false;
      var sticky = state.refocus === null;
      setBranch(frame.html);
      if (sticky) scrollToBottom();
      else applyRefocus();
    },

    started: function (frame) {
      if (frame.conversation !== state.conversationId) return;
      state.replyText[frame.reply] = "";
      setBusy("streaming");
      state.streamingReply = frame.reply;
      hideError();
    },

    delta: function (frame) {
      if (state.replyText[frame.reply] === undefined) state.replyText[frame.reply] = "";
      state.replyText[frame.reply] += frame.text;
      var article = articleOf(frame.reply);
      if (!article) return;
      keepingBottom(function () {
        var node = pendingNode(frame.reply, article.querySelector(".message-body"));
        node.appendChild(document.createTextNode(frame.text));
      });
    },

    render: function (frame) {
      var article = articleOf(frame.reply);
      if (!article) return;
      // The render covers every delta before it: it replaces their text.
      keepingBottom(function () {
        setReplyHtml(frame.reply, article, frame.html);
      });
    },

    done: function (frame) {
      var article = articleOf(frame.reply);
      if (article) {
        keepingBottom(function () {
          setReplyHtml(frame.reply, article, frame.html || "");
          article.dataset.status = frame.status;
          article.removeAttribute("aria-busy");
          if (state.replyText[frame.reply] !== undefined) setSource(article, state.replyText[frame.reply]);
          showStats(article, frame.stats);
          if (frame.status === "stopped") addNote(article, "message-note", "Stopped: the reply was cut short.");
          if (frame.status === "error") addNote(article, "message-error", frame.error || "The reply failed.");
          showContextMarker(frame.view_starts_at);
        });
      }
      delete state.replyText[frame.reply];
      if (state.streamingReply === frame.reply || state.busy !== "idle") setBusy("idle");
      refreshSidebar();
    },

    title: function (frame) {
      var item = el.list.querySelector('[data-conversation-id="' + frame.conversation + '"] .conversation-title');
      if (item) item.textContent = frame.title;
      if (frame.conversation === state.conversationId) {
        el.title.textContent = frame.title;
        setDocumentTitle(frame.title);
      }
    },

    error: function (frame) {
      // A stop that crossed the reply's end: nothing to tell.
      if (frame.code === "idle") return;
      showError(frame.message || "Something went wrong (" + frame.code + ").");
      if (state.busy === "waiting") {
        setBusy("idle");
        if (state.awaitingBranch && el.input.value === "" && state.lastSent) {
          el.input.value = state.lastSent;
          resizeInput();
          updateSendButton();
        }
      }
      state.awaitingBranch = false;
      state.refocus = null;
    },
  };

  // After the connection dropped: the page may have missed the end of a
  // reply, so it takes the branch from a fresh copy of itself.
  function reloadBranch() {
    if (!state.conversationId) return;
    window
      .fetch(conversationUrl(state.conversationId), { headers: { Accept: "text/html" } })
      .then(function (response) {
        return response.ok ? response.text() : null;
      })
      .then(function (text) {
        if (text === null) return;
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("branch");
        if (fresh) keepingBottom(function () {
          setBranch(fresh.innerHTML);
        });
        var streaming = el.branch.querySelector('.message[data-status="streaming"]');
        if (streaming) showNotice("A reply is still being written; reload the page to see it finished.");
      })
      .catch(function () {});
    refreshSidebar();
  }

  // --- Sending -------------------------------------------------------------

  function submitMessage() {
    var content = el.input.value;
    if (content.trim() === "" || state.busy !== "idle") return;
    var frame = {
      type: "send",
      conversation: state.conversationId,
      content: content,
      model: el.modelPicker.value,
      settings: replySettings(),
    };
    if (state.conversationId === null) {
      var systemPrompt = el.settingsForm.elements.system_prompt.value;
      if (systemPrompt.trim() !== "") frame.system_prompt = systemPrompt;
    }
    if (!state.hasSession) {
      startSessionThenSend(frame);
    } else if (!sendFrame(frame)) {
      return;
    }
    hideError();
    state.lastSent = content;
    state.awaitingBranch = true;
    state.refocus = null;
    el.input.value = "";
    resizeInput();
    setBusy("waiting");
  }

  function stopReply() {
    if (state.busy !== "streaming" || !state.conversationId) return;
    sendFrame({ type: "stop", conversation: state.conversationId });
  }

  el.composer.addEventListener("submit", function (event) {
    event.preventDefault();
    submitMessage();
  });

  el.input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitMessage();
    }
  });

  el.input.addEventListener("input", function () {
    resizeInput();
    updateSendButton();
  });

  el.stop.addEventListener("click", stopReply);
  el.errorDismiss.addEventListener("click", hideError);

  document.addEventListener("keydown", function (event) {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if (state.busy === "streaming") {
      event.preventDefault();
      stopReply();
    } else if (app.classList.contains("sidebar-open")) {
      closeNarrowSidebar();
    }
  });

  // --- Message actions -------------------------------------------------------

  function rememberFocus(article, selector) {
    var articles = Array.prototype.slice.call(el.branch.querySelectorAll(".message"));
    state.refocus = {
      index: articles.indexOf(article),
      top: article.getBoundingClientRect().top,
      selector: selector,
    };
  }

  function requireIdle() {
    if (state.busy === "idle") return true;
    showError("Wait for the reply to finish, or stop it first.");
    return false;
  }

  function startEdit(article) {
    if (article.classList.contains("is-editing") || !requireIdle()) return;
    article.classList.add("is-editing");
    var editor = document.createElement("div");
    editor.className = "message-editor";
    var textarea = document.createElement("textarea");
    textarea.className = "edit-input";
    textarea.setAttribute("aria-label", "Edit your message");
    textarea.value = sourceOf(article);
    textarea.rows = Math.min(12, Math.max(2, textarea.value.split("\n").length));
    var buttons = document.createElement("div");
    buttons.className = "editor-actions";
    var cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "small-button";
    cancel.dataset.action = "cancel-edit";
    cancel.textContent = "Cancel";
    var save = document.createElement("button");
    save.type = "button";
    save.className = "primary-button";
    save.dataset.action = "submit-edit";
    save.textContent = "Send";
    buttons.appendChild(cancel);
    buttons.appendChild(save);
    editor.appendChild(textarea);
    editor.appendChild(buttons);
    article.querySelector(".message-content").appendChild(editor);
    textarea.addEventListener("keydown", function (event) {
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
    var editor = article.querySelector(".message-editor");
    if (editor) editor.remove();
    article.classList.remove("is-editing");
    var button = article.querySelector('[data-action="edit"]');
    if (button) button.focus();
  }

  function submitEdit(article) {
    var textarea = article.querySelector(".edit-input");
    var content = textarea.value;
    if (content.trim() === "") return;
    if (content === sourceOf(article)) {
      cancelEdit(article);
      return;
    }
    if (!requireIdle()) return;
    var sent = sendFrame({
      type: "edit",
      conversation: state.conversationId,
      message: article.dataset.messageId,
      content: content,
      settings: replySettings(),
    });
    if (!sent) return;
    hideError();
    state.awaitingBranch = true;
    setBusy("waiting");
  }

  function regenerate(article) {
    if (!requireIdle()) return;
    var sent = sendFrame({
      type: "regenerate",
      conversation: state.conversationId,
      message: article.dataset.messageId,
      settings: replySettings(),
    });
    if (!sent) return;
    hideError();
    state.awaitingBranch = true;
    setBusy("waiting");
  }

  function switchVersion(article, button) {
    if (!button.dataset.switchTo || !requireIdle()) return;
    var selector = button.classList.contains("version-previous") ? ".version-previous" : ".version-next";
    if (sendFrame({ type: "switch", conversation: state.conversationId, message: button.dataset.switchTo })) {
      rememberFocus(article, selector);
    }
  }

  function copyText(text, button) {
    function copied() {
      button.classList.add("is-copied");
      var label = button.getAttribute("aria-label");
      button.setAttribute("aria-label", "Copied");
      if (button.classList.contains("code-copy")) button.textContent = "Copied";
      window.setTimeout(function () {
        button.classList.remove("is-copied");
        button.setAttribute("aria-label", label);
        if (button.classList.contains("code-copy")) button.textContent = "Copy";
      }, 1500);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(copied, function () {
        showError("The browser did not allow copying.");
      });
      return;
    }
    // Plain http on another host: the older way.
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.appendChild(area);
    area.select();
    try {
      document.execCommand("copy");
      copied();
    } catch (error) {
      showError("The browser did not allow copying.");
    }
    area.remove();
  }

  el.branch.addEventListener("click", function (event) {
    var button = event.target.closest("button");
    if (!button || !el.branch.contains(button)) return;
    var article = button.closest(".message");
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
      case "copy":
        copyText(state.replyText[article.dataset.messageId] || sourceOf(article), button);
        break;
      case "copy-code": {
        var code = button.parentElement.querySelector("pre");
        copyText(code ? code.textContent : "", button);
        break;
      }
    }
  });

  // --- Sidebar -----------------------------------------------------------------

  function markCurrent() {
    var items = el.list.querySelectorAll(".conversation-item");
    for (var i = 0; i < items.length; i++) {
      var current = items[i].dataset.conversationId === state.conversationId;
      items[i].classList.toggle("is-current", current);
      var link = items[i].querySelector(".conversation-link");
      if (current) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
  }

  var listRequest = 0;

  function refreshSidebar() {
    var query = el.searchInput.value;
    var number = ++listRequest;
    var url = app.dataset.listUrl + (query ? "?q=" + encodeURIComponent(query) : "");
    window
      .fetch(url, { headers: { Accept: "text/html" } })
      .then(function (response) {
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        // An older answer arriving after a newer one is dropped.
        if (html === null || number !== listRequest) return;
        if (el.list.querySelector(".rename-form:not([hidden])")) return; // don't interrupt a rename
        el.list.innerHTML = html;
        markCurrent();
      })
      .catch(function () {});
  }

  var searchTimer = null;
  el.searchInput.addEventListener("input", function () {
    window.clearTimeout(searchTimer);
    searchTimer = window.setTimeout(refreshSidebar, 200);
  });
  el.searchForm.addEventListener("submit", function (event) {
    event.preventDefault();
    window.clearTimeout(searchTimer);
    refreshSidebar();
  });

  function closeRename(item) {
    var form = item.querySelector(".rename-form");
    form.hidden = true;
    item.classList.remove("is-renaming");
    var button = item.querySelector('[data-action="rename"]');
    if (button) button.focus();
  }

  el.list.addEventListener("click", function (event) {
    var button = event.target.closest("button");
    if (!button) return;
    var item = button.closest(".conversation-item");
    if (button.dataset.action === "rename") {
      item.classList.add("is-renaming");
      var form = item.querySelector(".rename-form");
      form.hidden = false;
      var input = form.elements.title;
      input.focus();
      input.select();
    } else if (button.dataset.action === "cancel-rename") {
      closeRename(item);
    }
  });

  el.list.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && event.target.classList.contains("rename-input")) {
      event.preventDefault();
      closeRename(event.target.closest(".conversation-item"));
    }
  });

  el.list.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.classList.contains("delete-form")) {
      var title = form.dataset.title || "this conversation";
      if (!window.confirm("Delete “" + title + "”? This cannot be undone.")) {
        event.preventDefault();
        return;
      }
      form.elements.next.value = window.location.pathname;
      return; // the browser posts it and follows the redirect
    }
    if (!form.classList.contains("rename-form")) return;
    event.preventDefault();
    var item = form.closest(".conversation-item");
    postForm(form).then(function (result) {
      if (!result.ok) {
        showError(firstError(result.data) || "The conversation could not be renamed.");
        return;
      }
      var title = result.data.title;
      item.querySelector(".conversation-title").textContent = title;
      item.querySelector(".delete-form").dataset.title = title;
      closeRename(item);
      if (item.dataset.conversationId === state.conversationId) {
        el.title.textContent = title;
        setDocumentTitle(title);
      }
    });
  });

  function openNarrowSidebar() {
    app.classList.add("sidebar-open");
    el.backdrop.hidden = false;
    el.sidebarToggle.setAttribute("aria-expanded", "true");
    var first = el.sidebar.querySelector("a, button, input");
    if (first) first.focus();
  }

  function closeNarrowSidebar() {
    app.classList.remove("sidebar-open");
    el.backdrop.hidden = true;
    el.sidebarToggle.setAttribute("aria-expanded", "false");
    el.sidebarToggle.focus();
  }

  function syncSidebarToggle() {
    var expanded = narrowScreen.matches
      ? app.classList.contains("sidebar-open")
      : !app.classList.contains("sidebar-collapsed");
    el.sidebarToggle.setAttribute("aria-expanded", String(expanded));
    if (!narrowScreen.matches) el.backdrop.hidden = true;
  }

  el.sidebarToggle.addEventListener("click", function () {
    if (narrowScreen.matches) {
      if (app.classList.contains("sidebar-open")) closeNarrowSidebar();
      else openNarrowSidebar();
      return;
    }
    var collapsed = app.classList.toggle("sidebar-collapsed");
    try {
      window.localStorage.setItem("chatsite-sidebar", collapsed ? "collapsed" : "open");
    } catch (error) {
      // Not remembered.
    }
    syncSidebarToggle();
  });
  el.backdrop.addEventListener("click", closeNarrowSidebar);
  narrowScreen.addEventListener("change", function () {
    app.classList.remove("sidebar-open");
    syncSidebarToggle();
  });
  try {
    if (window.localStorage.getItem("chatsite-sidebar") === "collapsed") app.classList.add("sidebar-collapsed");
  } catch (error) {
    // Open by default.
  }
  syncSidebarToggle();

  // --- Settings panel ------------------------------------------------------------

  function postForm(form) {
    return window
      .fetch(form.action, {
        method: "POST",
        body: new FormData(form),
        headers: { Accept: "application/json", "X-CSRFToken": csrfToken() },
        credentials: "same-origin",
      })
      .then(function (response) {
        return response
          .json()
          .catch(function () {
            return {};
          })
          .then(function (data) {
            return { ok: response.ok, data: data };
          });
      })
      .catch(function () {
        return { ok: false, data: { errors: { __all__: [{ message: "The server could not be reached." }] } } };
      });
  }

  function firstError(data) {
    var errors = (data && data.errors) || {};
    for (var name in errors) {
      if (errors[name].length) return errors[name][0].message;
    }
    return "";
  }

  function showSettingsErrors(errors) {
    el.settingsErrors.textContent = "";
    var fields = { temperature: $("temperature-error"), max_tokens: $("max-tokens-error") };
    Object.keys(fields).forEach(function (name) {
      fields[name].textContent = "";
      el.settingsForm.elements[name].removeAttribute("aria-invalid");
    });
    Object.keys(errors || {}).forEach(function (name) {
      var text = errors[name]
        .map(function (error) {
          return error.message;
        })
        .join(" ");
      if (fields[name]) {
        fields[name].textContent = text;
        el.settingsForm.elements[name].setAttribute("aria-invalid", "true");
      } else {
        var line = document.createElement("p");
        line.textContent = (name === "__all__" ? "" : name.replace("_", " ") + ": ") + text;
        el.settingsErrors.appendChild(line);
      }
    });
  }

  el.settingsToggle.addEventListener("click", function () {
    var open = el.settingsPanel.hidden;
    el.settingsPanel.hidden = !open;
    el.settingsToggle.setAttribute("aria-expanded", String(open));
    if (open) el.settingsForm.elements.system_prompt.focus();
  });

  el.settingsForm.addEventListener("submit", function (event) {
    event.preventDefault();
    showSettingsErrors({});
    if (state.conversationId === null) {
      el.settingsStatus.textContent = "These settings go with your first message.";
      return;
    }
    saveSettings();
  });

  function saveSettings() {
    el.settingsStatus.textContent = "Saving…";
    postForm(el.settingsForm).then(function (result) {
      if (result.ok) {
        markSettingsSaved();
        el.settingsStatus.textContent = "Saved.";
      } else {
        el.settingsStatus.textContent = "Not saved.";
        showSettingsErrors(result.data.errors);
      }
    });
  }

  el.modelPicker.addEventListener("change", function () {
    if (state.conversationId !== null) el.settingsForm.requestSubmit();
  });

  // --- Start ------------------------------------------------------------------------

  decorate(el.branch);
  setBusy("idle");
  resizeInput();
  scrollToBottom();
  if (state.hasSession) connect();
  if (!("ontouchstart" in window)) el.input.focus();
})();
