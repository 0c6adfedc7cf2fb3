// The fleet at a glance: how full each node is, the project's VMs by
// phase, VMs created and deleted per minute, and the latest warnings, all
// live from the watch streams.

import { collection, session } from '../api.js';
import { $, age, el, mib } from '../dom.js';
import { condition, live } from '../live.js';

const PHASES = ['Pending', 'Scheduled', 'Running', 'Paused', 'Stopped', 'Succeeded', 'Failed', 'Terminating'];
const MINUTES = 10;

// A labelled bar: used of total, with the numbers beside it.
function gauge(label, used, total, text, id) {
  return el('div', { class: 'gauge' },
    el('span', { class: 'gauge-label' }, label),
    el('meter', { min: 0, max: Math.max(total, 1), value: used, high: total * 0.85, 'aria-label': `${label}: ${text}` }),
    el('span', { id, class: 'gauge-text' }, text));
}

function nodeCard(n) {
  const s = n.status || {};
  const cap = s.capacity || {};
  const used = s.allocated || {};
  const ready = condition(n, 'Ready');
  const ok = ready && ready.status === 'True';
  const name = n.metadata.name;
  return el('div', { class: 'node', 'data-node': name },
    el('h3', {}, name, ' ', el('span', { class: ok ? 'ok' : 'bad' }, ok ? 'Ready' : 'NotReady')),
    gauge('VMs', used.vms || 0, cap.maxVms || 0, `${used.vms || 0} / ${cap.maxVms || 0}`, `node-${name}-vms`),
    gauge('vCPU', used.vcpu || 0, cap.vcpu || 0, `${used.vcpu || 0} / ${cap.vcpu || 0}`, `node-${name}-vcpu`),
    gauge('Memory', used.memMib || 0, cap.memMib || 0, `${mib(used.memMib || 0)} / ${mib(cap.memMib || 0)}`, `node-${name}-mem`));
}

// Creations and deletions per minute over the last ten minutes, as bars.
function perMinute(created, deleted) {
  const w = 300; const h = 70; const bw = w / MINUTES;
  const max = Math.max(1, ...created, ...deleted);
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
  svg.setAttribute('preserveAspectRatio', 'none');
  svg.setAttribute('class', 'spark');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', `VMs created per minute: ${created.join(', ')}; deleted: ${deleted.join(', ')} (oldest first)`);
  const bar = (x, value, color) => {
    const r = document.createElementNS('http://www.w3.org/2000/svg', 'rect');
    const bh = (value / max) * (h - 4);
    r.setAttribute('x', x); r.setAttribute('y', h - bh); r.setAttribute('width', bw / 2 - 2); r.setAttribute('height', bh);
    r.setAttribute('fill', color);
    svg.append(r);
  };
  created.forEach((v, i) => bar(i * bw + 1, v, '#0b5cad'));
  deleted.forEach((v, i) => bar(i * bw + bw / 2, v, '#b3261e'));
  return svg;
}

export function overviewView() {
  const nodes = el('div', { class: 'nodes', id: 'overview-nodes' });
  const phases = el('tbody', { id: 'overview-phases' });
  const total = el('span', { id: 'overview-total' });
  const rate = el('div', { id: 'overview-rate' });
  const rateText = el('p', { class: 'muted', id: 'overview-rate-text' });
  const warnings = el('tbody', { id: 'overview-warnings' });
  $('#view').replaceChildren(el('section', { 'aria-labelledby': 'view-title' },
    el('h1', { id: 'view-title' }, 'Overview'),
    el('div', { class: 'grid' },
      el('div', { class: 'card' }, el('h2', {}, 'Nodes'), nodes),
      el('div', { class: 'card' }, el('h2', {}, 'VMs by phase (', total, ')'),
        el('table', { 'aria-label': 'VMs by phase' }, el('thead', {}, el('tr', {},
          el('th', { scope: 'col' }, 'Phase'), el('th', { scope: 'col' }, 'VMs'))), phases)),
      el('div', { class: 'card' }, el('h2', {}, 'Created and deleted per minute'), rate, rateText),
      el('div', { class: 'card' }, el('h2', {}, 'Recent warnings'),
        el('table', { 'aria-label': 'Recent warnings' }, el('thead', {}, el('tr', {},
          ...['Object', 'Reason', 'Message', 'Last seen'].map((t) => el('th', { scope: 'col' }, t)))), warnings)))));

  live('/v1/nodes', (items) => {
    const list = [...items.values()].sort((a, b) => a.metadata.name.localeCompare(b.metadata.name));
    nodes.replaceChildren(...(list.length ? list.map(nodeCard) : [el('p', { class: 'muted' }, 'No nodes have joined.')]));
  });

  // Deletions are seen as they happen: the VMs gone since the last change.
  const deletedAt = [];
  let known = null;
  live(collection('vms'), (items) => {
    const vms = [...items.values()];
    if (known) for (const k of known) if (!items.has(k)) deletedAt.push(Date.now());
    known = new Set(items.keys());
    const counts = Object.fromEntries(PHASES.map((p) => [p, 0]));
    for (const v of vms) counts[(v.status && v.status.phase) || 'Pending'] += 1;
    total.textContent = `${vms.length} in ${session.project}`;
    phases.replaceChildren(...PHASES.filter((p) => counts[p] > 0 || p === 'Running').map((p) => el('tr', {},
      el('td', { class: `phase-${p}` }, p), el('td', { id: `phase-${p}` }, String(counts[p])))));
    const now = Date.now();
    const bucket = (t) => MINUTES - 1 - Math.floor((now - t) / 60000);
    const created = new Array(MINUTES).fill(0);
    const deleted = new Array(MINUTES).fill(0);
    for (const v of vms) {
      const b = bucket(Date.parse(v.metadata.creationTimestamp));
      if (b >= 0 && b < MINUTES) created[b] += 1;
    }
    for (const t of deletedAt) { const b = bucket(t); if (b >= 0 && b < MINUTES) deleted[b] += 1; }
    rate.replaceChildren(perMinute(created, deleted));
    rateText.textContent = `last minute: ${created[MINUTES - 1]} created, ${deleted[MINUTES - 1]} deleted. `
      + `Bars: the last ${MINUTES} minutes, oldest left; blue created, red deleted (counted since this page opened); `
      + `tallest ${Math.max(1, ...created, ...deleted)} a minute.`;
  });

  live('/v1/events', (items) => {
    const recent = [...items.values()].filter((e) => e.spec.type === 'Warning')
      .sort((a, b) => Date.parse(b.spec.lastTimestamp || 0) - Date.parse(a.spec.lastTimestamp || 0)).slice(0, 8);
    warnings.replaceChildren(...(recent.length ? recent.map((e) => el('tr', {},
      el('td', {}, `${e.spec.involvedObject.kind.toLowerCase()}/${e.spec.involvedObject.name}`),
      el('td', { class: 'bad' }, e.spec.reason), el('td', {}, e.spec.message), el('td', {}, age(e.spec.lastTimestamp))))
      : [el('tr', {}, el('td', { colspan: 4, class: 'muted' }, 'No warnings.'))]));
  });
}
