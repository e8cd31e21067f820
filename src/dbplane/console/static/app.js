// The console's shell: hash routes (#/databases, #/databases/NAME, #/alarms,
// #/alarms/NAME), the signed-in principal in the top bar, and sign-in whenever there is no
// valid session token.

import { renderAlarm, renderAlarms } from "./alarms.js";
import { onSignedOut, session } from "./api.js";
import { renderDatabase } from "./database.js";
import { renderDatabases } from "./databases.js";
import { renderSignIn } from "./signin.js";

const PAGE = /^#\/(alarms|databases)(?:\/([^/]+))?$/;     // #/section or #/section/NAME
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
  const [, section = "databases", item] = location.hash.match(PAGE) || [];
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const name = item ? decodeURIComponent(item) : null;
  if (name) {
    document.title = `${name} · dbplane console`;
    current = section === "alarms" ? renderAlarm(main, name) : renderDatabase(main, name);
  } else if (section === "alarms") {
    document.title = "Alarms · dbplane console";
    current = renderAlarms(main);
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
