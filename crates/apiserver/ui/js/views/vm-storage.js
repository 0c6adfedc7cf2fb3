// Parts of a VM's page about what it is made of: its template beside what
// the VM overrides, field by field, and its drives with their I/O limits.

import { el } from '../dom.js';

const table = (id, heads, rows) => el('div', { class: 'scroll' }, el('table', { id }, el('thead', {}, el('tr', {},
  ...heads.map((h) => el('th', { scope: 'col' }, h)))), el('tbody', {}, rows)));
const code = (v) => el('code', {}, JSON.stringify(v));

// status.template: { name, revision, overrides: [{ field, template?, vm }] }.
export function templatePart(view) {
  if (!view) return el('p', { class: 'muted' }, 'Not made from a template.');
  const overrides = view.overrides || [];
  return el('div', {},
    el('p', {}, 'Template ', el('a', { href: '#/templates' }, view.name), ` at revision ${view.revision}`),
    overrides.length === 0 ? el('p', { class: 'muted' }, 'No overrides: the VM is its template.')
      : table('vm-template', ['Field', 'Template (base)', 'VM (override)'], overrides.map((o) => el('tr', {},
        el('td', {}, o.field), el('td', {}, o.template === undefined ? el('span', { class: 'muted' }, 'not set') : code(o.template)),
        el('td', {}, code(o.vm))))));
}

// A rate limiter in a few words: "bandwidth 10485760 B/100 ms, ops 100/1000 ms".
function limits(l) {
  if (!l) return '—';
  const parts = [];
  if (l.bandwidth) parts.push(`bandwidth ${l.bandwidth.size} B/${l.bandwidth.refillTimeMs} ms`);
  if (l.ops) parts.push(`ops ${l.ops.size}/${l.ops.refillTimeMs} ms`);
  return parts.join(', ') || '—';
}

// status.runtime: drives as the node reports them and the limits in force.
export function drivesPart(runtime) {
  const applied = runtime.limits || {};
  const rows = [['rootfs', 'root filesystem', 'rw', limits(applied.rootfs)],
    ...(runtime.drives || []).map((d) => [d.name, d.source, d.readOnly ? 'ro' : 'rw', limits((applied.drives || {})[d.name])])];
  const net = applied.network || {};
  return el('div', {},
    table('vm-drives', ['Drive', 'Source', 'Mode', 'Limits'], rows.map((r) => el('tr', {}, ...r.map((c) => el('td', {}, c))))),
    el('p', {}, `Network: rx ${limits(net.rx)}, tx ${limits(net.tx)}`),
    applied.generation ? el('p', { class: 'muted' }, `Limits applied from generation ${applied.generation}.`) : null);
}
