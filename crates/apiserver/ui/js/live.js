// Live collections: a list, then a watch from its version, again after any
// break; and the teardown of what the current view started.

import { ApiError, api, headers } from './api.js';
import { enc, sleep } from './dom.js';

let teardown = [];

// Runs `stop` when the view changes.
export const onLeave = (stop) => { teardown.push(stop); };

// Stops everything the previous view started.
export function leave() {
  for (const stop of teardown) stop();
  teardown = [];
}

export const keyOf = (o) => `${o.metadata.project || ''}/${o.metadata.name}`;
export const condition = (o, type) => ((o.status && o.status.conditions) || []).find((c) => c.type === type);

// A live collection: a list, then a watch from its version, again after
// any break. `onChange` gets the items (a Map) after each change.
export function live(path, onChange, onError) {
  const items = new Map();
  const abort = new AbortController();
  let stopped = false;
  let queued = false;
  const changed = () => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; if (!stopped) onChange(items); });
  };
  (async () => {
    while (!stopped) {
      try {
        const list = await api('GET', path);
        items.clear();
        for (const o of list.items) items.set(keyOf(o), o);
        changed();
        if (onError) onError(null);
        const sep = path.includes('?') ? '&' : '?';
        const res = await fetch(`${path}${sep}watch=true&resourceVersion=${enc(list.metadata.resourceVersion || '')}`,
          { headers: headers(), signal: abort.signal });
        if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => ({})));
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let nl;
          while ((nl = buffer.indexOf('\n')) >= 0) {
            const line = buffer.slice(0, nl).trim();
            buffer = buffer.slice(nl + 1);
            if (!line) continue;
            const ev = JSON.parse(line);
            if (ev.type === 'BOOKMARK') continue;
            if (ev.type === 'ERROR') throw new ApiError(ev.object.status || 500, ev.object);
            if (ev.type === 'DELETED') items.delete(keyOf(ev.object));
            else items.set(keyOf(ev.object), ev.object);
            changed();
          }
        }
      } catch (e) {
        if (stopped) return;
        if (onError) onError(e);
        if (e instanceof ApiError && (e.status === 401 || e.status === 403)) return;
        await sleep(1000);
      }
    }
  })();
  const handle = { items, stop() { stopped = true; abort.abort(); } };
  onLeave(() => handle.stop());
  return handle;
}
