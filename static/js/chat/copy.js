// Copy buttons: the Copy button of every code block of a message, and
// copying a text to the clipboard with the button's "Copied" feedback.

import { showError } from "./notices.js";

// Code blocks get a Copy button, after every render of a message.
export function addCodeCopyButtons(root) {
  for (const pre of root.querySelectorAll(".message-body pre")) {
    let holder = pre.parentElement;
    if (!holder || holder.classList.contains("code-block")) continue;
    if (!holder.classList.contains("highlight")) {
      holder = document.createElement("div");
      pre.parentElement.insertBefore(holder, pre);
      holder.appendChild(pre);
    }
    holder.classList.add("code-block");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "code-copy";
    button.dataset.action = "copy-code";
    button.textContent = "Copy";
    button.setAttribute("aria-label", "Copy code");
    holder.insertBefore(button, holder.firstChild);
  }
}

export function copyText(text, button) {
  function copied() {
    button.classList.add("is-copied");
    const label = button.getAttribute("aria-label");
    button.setAttribute("aria-label", "Copied");
    if (button.classList.contains("code-copy")) button.textContent = "Copied";
    window.setTimeout(() => {
      button.classList.remove("is-copied");
      button.setAttribute("aria-label", label);
      if (button.classList.contains("code-copy")) button.textContent = "Copy";
    }, 1500);
  }
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(copied, () => {
      showError("The browser did not allow copying.");
    });
    return;
  }
  // Plain http on another host: the older way.
  const area = document.createElement("textarea");
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
