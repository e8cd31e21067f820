// The console's shell: hash routes (#/databases, #/databases/NAME), the signed-in
// principal in the top bar, and sign-in whenever there is no valid session token.

import { onSignedOut, session } from "./api.js";
import { renderDatabase } from "./database.js";
import { renderDatabases } from "./databases.js";
import { renderSignIn } from "./signin.js";

let current = null;
let signInMessage = "";

function showPrincipal(s) {
  const who = document.getElementById("who");
  who.hidden = !s;
  document.getElementById("principal").textContent = s ? s.principal || "" : "";
  const expiry = document.getElementById("expiry");
  expiry.textContent = s && s.expires_at
    ? `session until ${new Date(s.expires_at * 1000).toISOString().slice(11, 16)}Z` : "";
}

function route() {
  if (current) current.dispose();
  current = null;
  const main = document.getElementById("main");
  const s = session.get();
  showPrincipal(s);
  if (!s) {
    document.title = "Sign in · dbplane console";
    current = renderSignIn(main, { message: signInMessage, onSignedIn: () => {
      signInMessage = "";
      if (location.hash === "#/signin" || !location.hash) location.hash = "#/databases";   // routes
      else route();
    } });
    return;
  }
  const match = location.hash.match(/^#\/databases\/([^/]+)$/);
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.setAttribute("aria-current", "page");
  }
  if (match) {
    const name = decodeURIComponent(match[1]);
    document.title = `${name} · dbplane console`;
    current = renderDatabase(main, name);
  } else {
    document.title = "Databases · dbplane console";
    current = renderDatabases(main);
  }
  main.focus({ preventScroll: true });
}

onSignedOut((err) => {
  signInMessage = `Your session ended: ${err.message}. Sign in again.`;
  route();
});

document.getElementById("signout").addEventListener("click", () => {
  session.clear();
  signInMessage = "Signed out.";
  if (location.hash !== "#/signin") location.hash = "#/signin";          // hashchange routes
  else route();
});

window.addEventListener("hashchange", route);
route();
