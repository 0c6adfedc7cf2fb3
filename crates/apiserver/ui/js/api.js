// The session (token and project, kept for the tab only), the API's calls
// and errors, and the kinds the server serves, learnt from /v1/kinds.

const store = window.sessionStorage;

// The signed-in token and the project shown.
export const session = {
  token: store.getItem('nexus.token'),
  project: store.getItem('nexus.project') || 'default',
  signIn(token) { this.token = token; store.setItem('nexus.token', token); },
  choose(project) { this.project = project; store.setItem('nexus.project', project); },
  forgetToken() { store.removeItem('nexus.token'); this.token = null; },
  signOut() { store.clear(); this.token = null; },
};

export class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

export function headers(extra) {
  return Object.assign({ Authorization: `Bearer ${session.token}` }, extra || {});
}

export async function api(method, path, body, contentType) {
  const init = { method, headers: headers() };
  if (body !== undefined) {
    init.headers['Content-Type'] = contentType || 'application/json';
    init.body = typeof body === 'string' ? body : JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { message: text }; }
  if (!res.ok) throw new ApiError(res.status, data || {});
  return data;
}

// An error as the API's error contract words it: the message, then what to do.
export function errorText(e) {
  if (!(e instanceof ApiError)) return String((e && e.message) || e);
  const b = e.body;
  let text = b.message || `HTTP ${e.status}`;
  if (b.faultMessage) text += `\nFirecracker: ${b.faultMessage}`;
  if (b.suggestion) text += `\n${b.suggestion}`;
  return text;
}

let kindList = [];

// Learns the kinds the server serves (kind, plural, namespaced).
export async function loadKinds() {
  kindList = (await api('GET', '/v1/kinds')).kinds;
  return kindList;
}

// The kinds the server serves, as loadKinds found them.
export const kinds = () => kindList;

// The kind named `name` (its kind or its plural), if served.
export const kindNamed = (name) => kindList.find((k) => k.kind === name || k.plural === name);

// The collection path of `plural` in the session's project (or cluster-wide).
export const collection = (plural, namespaced = true) =>
  namespaced ? `/v1/projects/${encodeURIComponent(session.project)}/${plural}` : `/v1/${plural}`;

// The collection path of a served kind, by its kind or plural.
export function collectionOf(name) {
  const k = kindNamed(name);
  return k ? collection(k.plural, k.namespaced) : null;
}
