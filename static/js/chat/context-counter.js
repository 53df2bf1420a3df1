// The counter beside the composer: the tokens of the conversation and of the
// draft against the model's context window ("1,234 + 56 / 8,192 tokens"),
// counted by the server with the model's own tokenizer and chat template
// (POST /tokens, chat/views.py count_tokens), so that an overflow is seen
// before sending. It asks 400 ms after the typing stops, one request at a
// time. Near the limit and over it, the counter says so in words and in the
// warning colours; the announcer (a polite live region) says it once, when
// the counter crosses a limit, never at each keystroke.

import { csrfToken } from "./http.js";
import { el } from "./page.js";
import { systemPrompt } from "./settings.js";
import { IDLE, onChange, state } from "./state.js";

const DEBOUNCE_MS = 400;
// From this share of the context on, the counter warns.
const NEAR_SHARE = 0.9;

const numbers = new Intl.NumberFormat("en");
const WORDS = { ok: "", near: "near the limit", over: "over the limit" };

let counter = null;
let announcer = null;
let timer = null;
let inFlight = false;
let askAgain = false;
let level = "ok";
let wasIdle = true;

function levelOf(total, context) {
  if (total > context) return "over";
  if (total >= NEAR_SHARE * context) return "near";
  return "ok";
}

function announcement(newLevel, context) {
  const size = numbers.format(context);
  if (newLevel === "over") {
    return (
      "The conversation and your message are over the model's context of " +
      size +
      " tokens: the oldest messages will be left out, or the message refused."
    );
  }
  if (newLevel === "near") {
    return "The conversation and your message are near the model's context of " + size + " tokens.";
  }
  return "The conversation and your message fit in the model's context again.";
}

function show(counts) {
  const conversation = counts.conversation_tokens;
  const draft = counts.draft_tokens;
  const context = counts.context;
  const newLevel = levelOf(conversation + draft, context);
  const used = draft ? numbers.format(conversation) + " + " + numbers.format(draft) : numbers.format(conversation);
  const words = WORDS[newLevel];
  counter.textContent = used + " / " + numbers.format(context) + " tokens" + (words ? " · " + words : "");
  counter.title =
    "Conversation: " +
    numbers.format(conversation) +
    " tokens; your message: " +
    numbers.format(draft) +
    "; the model's context: " +
    numbers.format(context);
  counter.dataset.level = newLevel;
  counter.hidden = false;
  if (newLevel !== level) announcer.textContent = announcement(newLevel, context);
  level = newLevel;
}

function question() {
  const body = { conversation: state.conversationId, model: el.modelPicker.value, draft: el.input.value };
  // A new chat's system prompt is the one typed in the settings panel.
  if (state.conversationId === null) body.system_prompt = systemPrompt();
  return body;
}

function ask() {
  if (inFlight) {
    askAgain = true;
    return;
  }
  inFlight = true;
  window
    .fetch(counter.dataset.url, {
      method: "POST",
      body: JSON.stringify(question()),
      headers: { Accept: "application/json", "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
      credentials: "same-origin",
    })
    .then((response) =>
      response.json().then((data) => {
        if (response.ok) show(data);
        // Too many counts: the last one stays until the next.
        else if (response.status !== 429) counter.hidden = true;
      }),
    )
    .catch(() => {})
    .finally(() => {
      inFlight = false;
      if (askAgain) {
        askAgain = false;
        ask();
      }
    });
}

// Count again once the typing (or whatever changed the draft) has stopped.
export function countSoon() {
  if (!counter) return;
  window.clearTimeout(timer);
  timer = window.setTimeout(ask, DEBOUNCE_MS);
}

export function initContextCounter() {
  counter = document.getElementById("context-counter");
  announcer = document.getElementById("context-announcer");
  if (!counter || !announcer) return;
  el.input.addEventListener("input", countSoon);
  el.modelPicker.addEventListener("change", countSoon);
  el.settingsForm.elements.system_prompt.addEventListener("input", () => {
    if (state.conversationId === null) countSoon();
  });
  // A reply, an edit or a switch between versions changed the conversation.
  onChange(() => {
    const idle = state.busy === IDLE;
    if (idle && !wasIdle) countSoon();
    wasIdle = idle;
  });
  if (state.conversationId !== null) ask();
}
