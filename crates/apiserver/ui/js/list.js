// A sortable, filterable table of live objects, with bulk actions.

import { collection, errorText } from './api.js';
import { $, el } from './dom.js';
import { keyOf, live } from './live.js';

// A sortable, filterable table of live objects.
export function listView(opts) {
  const state = { sort: opts.sort || 0, desc: false, filter: '', selected: new Set() };
  const filterBox = el('input', { id: 'filter', type: 'search', placeholder: 'name or label=value',
    'aria-label': 'Filter by name or label', oninput: () => refilter(), onchange: () => refilter() });
  const refilter = () => { state.filter = filterBox.value.trim(); draw(); };
  const count = el('span', { class: 'muted', id: 'count' });
  const error = el('p', { class: 'notice', role: 'alert' });
  const body = el('tbody');
  const head = el('tr');
  const selectable = !!opts.bulk;
  const bulkBar = el('span', { class: 'toolbar' });
  const table = el('table', { id: opts.id, 'aria-label': opts.title }, el('thead', {}, head), body);
  let items = new Map();
  const matches = (o) => {
    if (!state.filter) return true;
    return state.filter.split(/[\s,]+/).filter(Boolean).every((term) => {
      const eq = term.indexOf('=');
      if (eq > 0) {
        const labels = o.metadata.labels || {};
        return labels[term.slice(0, eq)] === term.slice(eq + 1);
      }
      return (opts.text ? opts.text(o) : o.metadata.name).toLowerCase().includes(term.toLowerCase());
    });
  };
  function drawHead() {
    head.replaceChildren();
    if (selectable) head.append(el('th', { scope: 'col' }, el('span', { class: 'visually-hidden' }, 'Select')));
    opts.columns.forEach((c, i) => {
      const sortKey = state.sort === i ? (state.desc ? 'descending' : 'ascending') : 'none';
      head.append(el('th', { scope: 'col', 'aria-sort': sortKey, class: c.wide ? 'wide' : null },
        el('button', { type: 'button', onclick: () => { state.desc = state.sort === i ? !state.desc : false; state.sort = i; drawHead(); draw(); } },
          c.title, state.sort === i ? (state.desc ? ' ▼' : ' ▲') : '')));
    });
  }
  function draw() {
    const col = opts.columns[state.sort];
    const key = col.sort || ((o) => String(col.get(o) ?? ''));
    const rows = [...items.values()].filter((o) => (!opts.keep || opts.keep(o)) && matches(o));
    rows.sort((a, b) => {
      const x = key(a); const y = key(b);
      const r = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
      return state.desc ? -r : r;
    });
    body.replaceChildren(...rows.map((o) => {
      const k = keyOf(o);
      const tr = el('tr', { 'data-name': o.metadata.name, class: state.selected.has(k) ? 'selected' : null });
      if (selectable) {
        tr.append(el('td', {}, el('input', { type: 'checkbox', 'aria-label': `Select ${o.metadata.name}`, checked: state.selected.has(k),
          onchange: (ev) => { if (ev.target.checked) state.selected.add(k); else state.selected.delete(k); draw(); } })));
      }
      for (const c of opts.columns) {
        const v = c.get(o);
        tr.append(el('td', { class: [c.cls ? c.cls(o) : null, c.wide ? 'wide' : null].filter(Boolean).join(' ') || null },
          v instanceof Node ? v : (v ?? '')));
      }
      return tr;
    }));
    count.textContent = `${rows.length} of ${items.size}`;
    bulkBar.replaceChildren();
    if (selectable && state.selected.size) {
      bulkBar.append(`${state.selected.size} selected:`, ...opts.bulk.map((b) => el('button', { type: 'button', class: b.cls || 'secondary',
        onclick: () => b.run([...state.selected].map((x) => items.get(x)).filter(Boolean), error) }, b.label)));
    }
  }
  drawHead();
  const view = el('section', { 'aria-labelledby': 'view-title' },
    el('div', { class: 'toolbar' }, el('h1', { id: 'view-title' }, opts.title), el('span', { class: 'grow' }),
      ...(opts.actions || []), el('label', { for: 'filter' }, 'Filter'), filterBox, count),
    bulkBar, error, el('div', { class: 'scroll' }, table));
  $('#view').replaceChildren(view);
  live(opts.path, (m) => { items = m; for (const k of [...state.selected]) if (!m.has(k)) state.selected.delete(k); draw(); },
    (e) => { error.textContent = e ? errorText(e) : ''; });
  return { redraw: draw };
}

// A list view of the collection `plural` with `columns`.
export function simpleView(id, title, plural, columns, namespaced = true) {
  listView({ id, title, path: collection(plural, namespaced), columns });
}
