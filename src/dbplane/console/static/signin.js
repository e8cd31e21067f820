// Sign-in: an access key (id + secret) is exchanged for a session token at once; or a
// session token made with `dbplane iam get-session-token` is pasted. Only the token is kept.

import { signIn, useToken } from "./api.js";
import { errorBox, h } from "./dom.js";

export function renderSignIn(main, { message, onSignedIn }) {
  const status = h("div", { class: "signin-status", "aria-live": "polite" });
  if (message) status.append(message);

  const keyId = h("input", { id: "key-id", name: "key-id", required: true, autocomplete: "username",
    spellcheck: "false", autocapitalize: "off", placeholder: "DPAK…" });
  const secret = h("input", { id: "secret", name: "secret", type: "password", required: true,
    autocomplete: "off", spellcheck: "false" });
  const submit = h("button", { type: "submit", class: "btn btn-primary" }, "Sign in");
  const keyForm = h("form", { class: "form", "aria-labelledby": "signin-title" },
    field("Access key ID", keyId),
    field("Secret access key", secret),
    h("p", { class: "help" }, "The secret signs one request in this browser (HMAC-SHA256, as the CLI does) ",
      "for a session token of one hour; the secret is not sent and not stored."),
    h("div", { class: "form-actions" }, submit));

  const token = h("textarea", { id: "token", name: "token", rows: 3, required: true, spellcheck: "false",
    autocomplete: "off" });
  const tokenSubmit = h("button", { type: "submit", class: "btn" }, "Use token");
  const tokenForm = h("form", { class: "form" },
    field("Session token", token),
    h("p", { class: "help" }, "From ", h("code", null, "dbplane iam get-session-token"), "."),
    h("div", { class: "form-actions" }, tokenSubmit));

  async function attempt(form, button, action) {
    button.disabled = true;
    status.replaceChildren("Signing in…");
    try {
      await action();
      onSignedIn();
    } catch (e) {
      status.replaceChildren(errorBox(e, "sign-in failed"));
      button.disabled = false;
    } finally {
      secret.value = "";            // never left in the page after the attempt
      token.value = "";
    }
  }

  keyForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    attempt(keyForm, submit, () => signIn(keyId.value.trim(), secret.value));
  });
  tokenForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    attempt(tokenForm, tokenSubmit, () => useToken(token.value.trim()));
  });

  if (location.protocol !== "https:") {
    // the API accepts session tokens over TLS only: signing in here would get a token
    // over plaintext that no call could then use
    for (const b of [submit, tokenSubmit]) b.disabled = true;
    status.replaceChildren(h("div", { class: "alert alert-error", role: "alert",
      "data-code": "insecure_transport" },
      h("p", { class: "alert-title" }, "This console is served over http"),
      h("p", { class: "alert-message" }, "The API accepts session tokens over TLS only."),
      h("p", { class: "alert-hint" }, "Hint: start the platform with the API on https (dbplane up ",
        "--api-tls, the default) and open its https:// URL.")));
  }
  main.replaceChildren(h("div", { class: "signin" },
    h("h1", { id: "signin-title" }, "Sign in to dbplane"),
    status,
    keyForm,
    h("details", { class: "token-signin" }, h("summary", null, "Use a session token instead"), tokenForm)));
  keyId.focus();
  return { dispose() {} };
}

function field(label, input) {
  return h("div", { class: "field" }, h("label", { for: input.id }, label), input);
}
