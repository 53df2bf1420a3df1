// The "Scroll to the newest message" button: it shows while the reader is
// scrolled up in the messages, and takes them to the end when pressed
// (smoothly, unless they asked for reduced motion).

import { scrollToBottom } from "./branch.js";
import { el } from "./page.js";

// Further than this from the end (CSS pixels), the button shows: a little
// more than the stream's own "at the end" (branch.js), so that a reply
// growing under a reader who is at the end never shows it.
const SHOW_FROM_PX = 120;

const reducedMotion = window.matchMedia("(prefers-reduced-motion: reduce)");
let button = null;
let queued = false;

function distanceFromEnd() {
  const scroller = el.messages;
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight;
}

function update() {
  queued = false;
  button.hidden = distanceFromEnd() <= SHOW_FROM_PX;
}

// At most once a frame, however many scroll events come.
function updateSoon() {
  if (queued) return;
  queued = true;
  window.requestAnimationFrame(update);
}

function scrollDown() {
  // Pressed from the keyboard: the focus goes on to the message box, as
  // the button goes away.
  const fromKeyboard = button.matches(":focus-visible");
  if (reducedMotion.matches) scrollToBottom();
  else el.messages.scrollTo({ top: el.messages.scrollHeight, behavior: "smooth" });
  if (fromKeyboard) el.input.focus({ preventScroll: true });
}

export function initScrollButton() {
  button = document.getElementById("scroll-button");
  if (!button) return;
  button.addEventListener("click", scrollDown);
  el.messages.addEventListener("scroll", updateSoon, { passive: true });
  // A branch replaced, a reply growing, a window resized.
  const observer = new ResizeObserver(updateSoon);
  observer.observe(el.branch);
  observer.observe(el.messages);
  updateSoon();
}
