// Requests to the site other than the socket's: forms posted for a JSON
// answer, and HTML fragments. Every request is same-origin and carries the
// page's CSRF token where it posts.

export function csrfToken() {
  const field = document.querySelector("input[name=csrfmiddlewaretoken]");
  return field ? field.value : "";
}

// Resolves to {ok, data}: data is the JSON answer ({} when there is none),
// or, when the server could not be reached, an error in the same shape as
// the server's form errors.
export function postForm(form) {
  return window
    .fetch(form.action, {
      method: "POST",
      body: new FormData(form),
      headers: { Accept: "application/json", "X-CSRFToken": csrfToken() },
      credentials: "same-origin",
    })
    .then((response) =>
      response
        .json()
        .catch(() => ({}))
        .then((data) => ({ ok: response.ok, data: data })),
    )
    .catch(() => ({ ok: false, data: { errors: { __all__: [{ message: "The server could not be reached." }] } } }));
}

// The first message of a form's errors ({field: [{message}]}), or "".
export function firstError(data) {
  const errors = (data && data.errors) || {};
  for (const name in errors) {
    if (errors[name].length) return errors[name][0].message;
  }
  return "";
}

// Resolves to the page's HTML, or null when the server answered with an error.
export function fetchHtml(url) {
  return window
    .fetch(url, { headers: { Accept: "text/html" } })
    .then((response) => (response.ok ? response.text() : null));
}
