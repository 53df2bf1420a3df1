// Code blocks' buttons (Copy and the Wrap toggle, in the header the server
// renders above each block: chat/rendering.py), and copying a text to the
// clipboard with the button's "Copied" feedback.

import { showError } from "./notices.js";

function codeButton(className, text, title) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "code-button " + className;
  button.textContent = text;
  button.title = title;
  return button;
}

// The header of a code block: the server's, or (for a pre it did not render)
// a new one.
function codeHeader(holder) {
  let header = holder.querySelector(":scope > .code-header");
  if (!header) {
    header = document.createElement("div");
    header.className = "code-header";
    holder.insertBefore(header, holder.firstChild);
  }
  return header;
}

// Every code block of root's messages gets its buttons, after every render
// of a message. Their clicks are handled here, not by message-actions.js.
export function addCodeCopyButtons(root) {
  for (const pre of root.querySelectorAll(".message-body pre")) {
    let holder = pre.parentElement;
    if (!holder || holder.classList.contains("code-block")) continue;
    if (!holder.classList.contains("highlight")) {
      holder = document.createElement("div");
      pre.parentElement.insertBefore(holder, pre);
      holder.appendChild(pre);
    }
    if (!pre.hasAttribute("tabindex")) {
      // Focusable, so that the keyboard can scroll it, as the server's are.
      pre.tabIndex = 0;
      pre.setAttribute("role", "group");
      pre.setAttribute("aria-label", "Code");
    }
    holder.classList.add("code-block");
    const tools = document.createElement("span");
    tools.className = "code-tools";
    // Long lines scroll by default; the toggle wraps them instead.
    const wrap = codeButton("code-wrap", "Wrap", "Wrap long lines");
    wrap.setAttribute("aria-pressed", "false");
    wrap.addEventListener("click", () => {
      const wrapped = holder.classList.toggle("is-wrapped");
      wrap.setAttribute("aria-pressed", String(wrapped));
    });
    const copy = codeButton("code-copy", "Copy", "Copy the code");
    copy.setAttribute("aria-label", "Copy code");
    copy.addEventListener("click", () => copyText(pre.textContent, copy));
    tools.append(wrap, copy);
    codeHeader(holder).appendChild(tools);
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
