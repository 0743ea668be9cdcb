// The console's one way to the gateway: the ordinary API, authenticated by the session's cookie
// (HttpOnly: this script never sees it) and the session's CSRF token, sent on every request.

import { toSignIn } from "./ui.js";

let csrf = "";

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `The gateway answered ${status}.`);
    this.status = status;
    this.code = error?.code || "";
  }
}

export function headers(extra = {}) {
  return { "X-CSRF-Token": csrf, ...extra };
}

// Who is signed in: {key_id, name, admin, csrf, expires_at}; null without a session.
export async function currentSession() {
  const answer = await fetch("/console/api/session", { credentials: "same-origin", cache: "no-store" });
  if (answer.status === 401) return null;
  const session = await answered(answer);
  csrf = session.csrf;
  return session;
}

export async function signOut() {
  await fetch("/console/api/session", { method: "DELETE", credentials: "same-origin", headers: headers() });
  csrf = "";
}

// GET (or `method`) `path`, with `body` as JSON; the answer's JSON, or an ApiError with the
// gateway's own message (OpenAI's error shape).
export async function api(path, { method = "GET", body, signal } = {}) {
  const options = { method, credentials: "same-origin", headers: headers(), signal, cache: "no-store" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  return answered(await fetch(path, options));
}

export async function answered(answer) {
  if (answer.status === 204) return null;
  let body = null;
  try {
    body = await answer.json();
  } catch {
    body = null;
  }
  if (!answer.ok) {
    // A session that ended (expired, signed out elsewhere, its key rotated or revoked): sign in again.
    if (answer.status === 401 && body?.error?.code === "invalid_session") toSignIn();
    throw new ApiError(answer.status, body?.error);
  }
  return body;
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(name, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

// Every page of a usage query (/admin/usage or /v1/usage), following next_page; at most `pages`.
export async function usageBuckets(path, params, pages = 40) {
  const buckets = [];
  let page;
  for (let count = 0; count < pages; count++) {
    const answer = await api(path + query({ ...params, page }));
    buckets.push(...answer.data);
    if (!answer.has_more) return { buckets, answer };
    page = answer.next_page;
  }
  return { buckets, answer: null, truncated: true };
}
