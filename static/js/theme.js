// The colour theme of every page: "light", "dark" or "system" (the default,
// which follows prefers-color-scheme), remembered in localStorage.
//
// Loaded without defer in <head>, before the stylesheets, so that
// <html data-theme="..."> is set before the first paint (no flash of the
// wrong theme); the CSS styles only [data-theme]. The buttons carrying
// data-theme-choice are wired once the document is parsed.
(function () {
  "use strict";

  var STORAGE_KEY = "chatsite-theme";
  var CHOICES = ["light", "dark", "system"];
  var systemDark = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;

  function storedChoice() {
    try {
      var value = window.localStorage.getItem(STORAGE_KEY);
      return CHOICES.indexOf(value) >= 0 ? value : "system";
    } catch (error) {
      return "system"; // storage refused (privacy settings): follow the system
    }
  }

  function apply(choice) {
    var dark = choice === "dark" || (choice === "system" && systemDark !== null && systemDark.matches);
    var root = document.documentElement;
    root.dataset.theme = dark ? "dark" : "light";
    root.dataset.themeChoice = choice;
    var buttons = document.querySelectorAll("button[data-theme-choice]");
    for (var i = 0; i < buttons.length; i++) {
      buttons[i].setAttribute("aria-pressed", String(buttons[i].dataset.themeChoice === choice));
    }
  }

  function choose(choice) {
    try {
      window.localStorage.setItem(STORAGE_KEY, choice);
    } catch (error) {
      // Not remembered, but still applied to this page.
    }
    apply(choice);
  }

  apply(storedChoice());

  if (systemDark !== null) {
    systemDark.addEventListener("change", function () {
      apply(storedChoice());
    });
  }
  // Another tab changed the theme.
  window.addEventListener("storage", function (event) {
    if (event.key === STORAGE_KEY) apply(storedChoice());
  });

  document.addEventListener("DOMContentLoaded", function () {
    apply(storedChoice());
    document.addEventListener("click", function (event) {
      var button = event.target.closest ? event.target.closest("button[data-theme-choice]") : null;
      if (button) choose(button.dataset.themeChoice);
    });
  });
})();
