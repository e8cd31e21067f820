// Signed API requests with WebCrypto, exactly as src/dbplane/security/signing.py does them:
//
//   canonical request = METHOD \n path (as sent) \n sorted query \n host \n date \n nonce \n body SHA-256
//   string to sign    = DBPLANE1-HMAC-SHA256 \n date \n SHA-256(canonical request)
//   signature         = hex HMAC-SHA256(secret access key, string to sign)
//
// The console signs one request only, POST /v1/session-token, and keeps the token it gets
// back; the secret stays in the sign-in form's memory for that one call. No imports: this
// file also runs under node (tests/test_unit_console_signing.py compares it with Python).

export const ALGORITHM = "DBPLANE1-HMAC-SHA256";

const encoder = new TextEncoder();

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

function bytes(data) {
  return typeof data === "string" ? encoder.encode(data) : data;
}

export async function sha256Hex(data) {
  return hex(await crypto.subtle.digest("SHA-256", bytes(data)));
}

export async function hmacHex(secret, text) {
  const key = await crypto.subtle.importKey("raw", encoder.encode(secret),
    { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return hex(await crypto.subtle.sign("HMAC", key, encoder.encode(text)));
}

// urllib.parse.quote(s, safe="-_.~"): encodeURIComponent also leaves !'()* alone.
function quote(s) {
  return encodeURIComponent(s).replace(/[!'()*]/g,
    (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase());
}

// urllib.parse.unquote after "+" -> " " (what parse_qsl does to names and values)
function unquote(s) {
  const text = s.replace(/\+/g, " ");
  try {
    return decodeURIComponent(text);
  } catch {
    return text;                       // a malformed escape: left as is
  }
}

// signing.canonical_query: parse_qsl(query, keep_blank_values=True), sorted, re-quoted.
export function canonicalQuery(query) {
  const pairs = [];
  for (const part of query.split("&")) {
    if (!part) continue;
    const at = part.indexOf("=");
    const [k, v] = at < 0 ? [part, ""] : [part.slice(0, at), part.slice(at + 1)];
    pairs.push([unquote(k), unquote(v)]);
  }
  const cmp = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
  pairs.sort((a, b) => cmp(a[0], b[0]) || cmp(a[1], b[1]));
  return pairs.map(([k, v]) => `${quote(k)}=${quote(v)}`).join("&");
}

export async function stringToSign(method, path, query, host, date, nonce, contentSha256) {
  const canonical = [method.toUpperCase(), path, canonicalQuery(query), host.toLowerCase(),
    date, nonce, contentSha256].join("\n");
  return [ALGORITHM, date, await sha256Hex(canonical)].join("\n");
}

// 20261124T063500Z, as signing.DATE_FORMAT
export function signingDate(now = new Date()) {
  return now.toISOString().replace(/\.\d{3}Z$/, "Z").replace(/[-:]/g, "");
}

export function newNonce() {
  return hex(crypto.getRandomValues(new Uint8Array(16)));
}

// The headers that authenticate one request (signing.sign); date and nonce may be given.
export async function sign(keyId, secret, method, path, query, host, body,
  { date = signingDate(), nonce = newNonce() } = {}) {
  const content = await sha256Hex(body);
  const sig = await hmacHex(secret, await stringToSign(method, path, query, host, date, nonce, content));
  return {
    "Authorization": `${ALGORITHM} Credential=${keyId}, Signature=${sig}`,
    "X-Dbplane-Date": date,
    "X-Dbplane-Nonce": nonce,
    "X-Dbplane-Content-SHA256": content,
  };
}
