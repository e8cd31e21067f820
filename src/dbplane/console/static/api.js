// The console's only way to the platform: the REST API on this origin, with a bearer
// session token kept in sessionStorage (gone when the tab closes). The access key's secret
// is used once, to sign POST /v1/session-token, and never stored.

import { sign } from "./signing.js";

const STORAGE_KEY = "dbplane.session";
const TOKEN_SECONDS = 3600;

// An API refusal: {"error": {"code", "message", "hint"}} and the HTTP status.
export class ApiError extends Error {
  constructor(status, code, message, hint = "") {
    super(message);
    this.status = status;
    this.code = code;
    this.hint = hint;
  }
}

export const session = {
  get() {
    try {
      const s = JSON.parse(sessionStorage.getItem(STORAGE_KEY) || "null");
      return s && typeof s.token === "string" ? s : null;
    } catch {
      return null;
    }
  },
  set(value) {
    sessionStorage.setItem(STORAGE_KEY, JSON.stringify(value));
  },
  clear() {
    sessionStorage.removeItem(STORAGE_KEY);
  },
};

const signedOutListeners = [];

// Called with the ApiError when the API refuses the token (expired, key deactivated...).
export function onSignedOut(listener) {
  signedOutListeners.push(listener);
}

async function parse(response) {
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (response.ok) return body;
  const err = body && body.error;
  if (err && typeof err.message === "string") {
    throw new ApiError(response.status, err.code || `http_${response.status}`, err.message, err.hint || "");
  }
  const detail = body && typeof body.detail === "string" ? body.detail : response.statusText;
  throw new ApiError(response.status, `http_${response.status}`, detail || `HTTP ${response.status}`);
}

async function send(path, init) {
  let response;
  try {
    response = await fetch(path, { ...init, cache: "no-store", credentials: "omit" });
  } catch (e) {
    throw new ApiError(0, "unreachable", `the API did not answer (${e.message})`,
      "check that the platform is up: dbplane status");
  }
  return parse(response);
}

// Exchange an access key for a session token: the only signed request the console makes.
export async function signIn(keyId, secret) {
  const body = new TextEncoder().encode(JSON.stringify({ duration_seconds: TOKEN_SECONDS }));
  const path = "/v1/session-token";
  const headers = await sign(keyId, secret, "POST", path, "", location.host, body);
  const data = await send(path, {
    method: "POST", body, headers: { ...headers, "Content-Type": "application/json" },
  });
  session.set({ token: data.token, principal: data.principal, expires_at: data.expires_at });
  return data;
}

// Use a token made elsewhere (dbplane iam get-session-token): checked with GET /v1/whoami.
export async function useToken(token) {
  const me = await send("/v1/whoami", { headers: { Authorization: `Bearer ${token}` } });
  session.set({ token, principal: me.principal, expires_at: tokenExpiry(token) });
  return me;
}

// The expiry the token claims (not verified here: the API verifies every call).
function tokenExpiry(token) {
  try {
    const claims = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(claims)).e || null;
  } catch {
    return null;
  }
}

// One API call with the session token. A 401 ends the session.
export async function api(method, path, body) {
  const s = session.get();
  if (!s) throw new ApiError(401, "unauthenticated", "not signed in", "sign in with an access key");
  const init = { method, headers: { Authorization: `Bearer ${s.token}` } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  try {
    return await send(path, init);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      session.clear();
      for (const listener of signedOutListeners) listener(e);
    }
    throw e;
  }
}

export const enc = encodeURIComponent;
