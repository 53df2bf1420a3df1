// The line above the composer: a notice (the connection) and the error
// banner (a refused frame, a failed request), which the person dismisses.

import { el } from "./page.js";

export function showNotice(text) {
  el.notice.textContent = text;
  el.notice.hidden = false;
}

export function hideNotice() {
  el.notice.hidden = true;
  el.notice.textContent = "";
}

export function showError(text) {
  el.errorText.textContent = text;
  el.errorBanner.hidden = false;
}

export function hideError() {
  el.errorBanner.hidden = true;
  el.errorText.textContent = "";
}

export function initNotices() {
  el.errorDismiss.addEventListener("click", hideError);
}
