// One VM: what it is, how it is, its events, console and metrics, and actions.

import { api, collection, errorText, headers, kindNamed, session } from '../api.js';
import { $, age, announce, confirmDialog, el, enc, mib, sleep } from '../dom.js';
import { live, onLeave } from '../live.js';
import { setState } from './vms.js';
import { drivesPart, templatePart } from './vm-storage.js';

export function vmView(name) {
  const notice = el('p', { class: 'notice', role: 'alert', id: 'vm-error' });
  const title = el('h1', { id: 'view-title' }, name, ' ', el('span', { id: 'vm-phase' }));
  const overview = el('dl', { class: 'kv' });
  const made = el('div', { id: 'vm-made' });
  const drives = el('div', { id: 'vm-storage' });
  const conditions = el('tbody');
  const events = el('tbody', { id: 'vm-events' });
  const consoleLog = el('pre', { id: 'console', tabindex: '0', 'aria-label': 'Console log' });
  const spec = el('pre', { tabindex: '0', 'aria-label': 'Spec and status' });
  const charts = el('div', { id: 'charts' });
  const act = async (fn) => {
    notice.textContent = '';
    try { await fn(); } catch (e) { notice.textContent = errorText(e); }
  };
  const power = (label, state, id) => el('button', { type: 'button', id, onclick: () => act(() => setState(name, state)) }, label);
  const actions = el('div', { class: 'toolbar', role: 'group', 'aria-label': 'Actions' },
    power('Start', 'Running', 'vm-start'), power('Stop', 'Stopped', 'vm-stop'),
    power('Pause', 'Paused', 'vm-pause'), power('Resume', 'Running', 'vm-resume'),
    el('button', { type: 'button', class: 'secondary', id: 'vm-snapshot', onclick: () => act(async () => {
      const snap = `${name}-${Math.random().toString(16).slice(2, 7)}`.slice(0, 63);
      await api('POST', collection('snapshots'), { apiVersion: 'nexus/v1', kind: kindNamed('snapshots').kind, metadata: { name: snap }, spec: { vmName: name, resumeAfter: true } });
      announce(`snapshot ${snap} requested`);
      notice.textContent = '';
    }) }, 'Snapshot'),
    el('button', { type: 'button', class: 'danger', id: 'vm-delete', onclick: () => act(async () => {
      if (!(await confirmDialog(`Delete VM ${name}? Its disk goes with it.`, 'Delete'))) return;
      await api('DELETE', `${collection('vms')}/${enc(name)}`);
      location.hash = '#/vms';
    }) }, 'Delete'));
  $('#view').replaceChildren(el('section', { 'aria-labelledby': 'view-title' },
    el('p', {}, el('a', { href: '#/vms' }, '← VMs')), title, actions, notice,
    el('div', { class: 'grid' },
      el('div', { class: 'card' }, el('h2', {}, 'Overview'), overview),
      el('div', { class: 'card' }, el('h2', {}, 'Conditions'), el('table', {}, el('thead', {}, el('tr', {},
        ...['Type', 'Status', 'Reason', 'Message'].map((h) => el('th', { scope: 'col' }, h)))), conditions)),
      el('div', { class: 'card' }, el('h2', {}, 'Template'), made),
      el('div', { class: 'card' }, el('h2', {}, 'Drives'), drives),
      el('div', { class: 'card' }, el('h2', {}, 'Console'), consoleLog),
      el('div', { class: 'card' }, el('h2', {}, 'Metrics'), charts),
      el('div', { class: 'card' }, el('h2', {}, 'Events'), el('table', {}, el('thead', {}, el('tr', {},
        ...['Type', 'Reason', 'Message', 'Last seen'].map((h) => el('th', { scope: 'col' }, h)))), events)),
      el('div', { class: 'card' }, el('h2', {}, 'Spec and status'), spec))));
  let seen = false;
  // The VM's own events only (by uid, once known): not those of an
  // earlier VM of the same name.
  let uid = null;
  let allEvents = new Map();
  const showEvents = () => {
    const kind = kindNamed('vms').kind;
    const mine = [...allEvents.values()].filter((e) => e.spec.involvedObject.kind === kind && e.spec.involvedObject.name === name
      && (e.spec.involvedObject.project || session.project) === session.project
      && (!uid || !e.spec.involvedObject.uid || e.spec.involvedObject.uid === uid));
    mine.sort((a, b) => Date.parse(b.spec.lastTimestamp || 0) - Date.parse(a.spec.lastTimestamp || 0));
    events.replaceChildren(...mine.map((e) => el('tr', {}, el('td', { class: e.spec.type === 'Warning' ? 'bad' : null }, e.spec.type),
      el('td', {}, e.spec.reason), el('td', {}, e.spec.message), el('td', {}, age(e.spec.lastTimestamp)))));
  };
  live(`${collection('vms')}?fieldSelector=${enc(`metadata.name=${name}`)}`, (items) => {
    const vm = [...items.values()][0];
    if (!vm) { $('#vm-phase').textContent = seen ? '(deleted)' : '(not found)'; return; }
    seen = true;
    if (vm.metadata.uid !== uid) {
      uid = vm.metadata.uid;
      showEvents();
    }
    const s = vm.status || {};
    const r = s.runtime || {};
    const c = s.config || {};
    const phase = s.phase || 'Pending';
    $('#vm-phase').replaceChildren(el('span', { class: `phase-${phase}` }, phase));
    const rows = [['Node', vm.spec.nodeName], ['Desired state', vm.spec.state], ['Template', c.template || vm.spec.template],
      ['vCPU', c.vcpu || vm.spec.vcpu], ['Memory', mib(c.memMib || vm.spec.memMib)], ['IP', r.ip], ['MAC', r.mac],
      ['PID', r.pid], ['Started', r.startedAt], ['Restarts', r.restarts || 0], ['Expires', s.expiresAt],
      ['Last error', s.lastError && [s.lastError.message, s.lastError.faultMessage, s.lastError.suggestion].filter(Boolean).join(' — ')]];
    overview.replaceChildren(...rows.filter(([, v]) => v !== undefined && v !== null && v !== '').flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, String(v))]));
    conditions.replaceChildren(...(s.conditions || []).map((x) => el('tr', {}, el('td', {}, x.type),
      el('td', { class: x.status === 'True' ? 'ok' : 'warn' }, x.status), el('td', {}, x.reason), el('td', {}, x.message))));
    made.replaceChildren(templatePart(s.template));
    drives.replaceChildren(drivesPart(r));
    spec.textContent = JSON.stringify({ spec: vm.spec, status: vm.status }, null, 2);
  }, (e) => { notice.textContent = e ? errorText(e) : notice.textContent; });
  live('/v1/events', (items) => {
    allEvents = items;
    showEvents();
  });
  followConsole(name, consoleLog);
  metrics(name, charts);
}

// Follows the VM's console, starting again when the stream ends.
function followConsole(name, pre) {
  const abort = new AbortController();
  let stopped = false;
  onLeave(() => { stopped = true; abort.abort(); });
  (async () => {
    while (!stopped) {
      try {
        const res = await fetch(`${collection('vms')}/${enc(name)}/log?follow=true&tail=200`, { headers: headers(), signal: abort.signal });
        if (!res.ok) {
          const body = await res.json().catch(() => ({}));
          pre.textContent = body.message || `HTTP ${res.status}`;
          await sleep(2000);
          continue;
        }
        pre.textContent = '';
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
          pre.textContent = (pre.textContent + decoder.decode(value, { stream: true })).slice(-200000);
          if (atEnd) pre.scrollTop = pre.scrollHeight;
        }
      } catch (_) {
        if (stopped) return;
      }
      await sleep(2000);
    }
  })();
}

// Charts of the VM's recent CPU and memory, sampled every 5 s, drawn
// from the first sample on (one sample is a dot), with their units.
function metrics(name, box) {
  const series = [
    { label: 'CPU', unit: '% of one vCPU', values: [], of: (m) => m.cpuPercent || 0 },
    { label: 'Memory', unit: 'MiB resident', values: [], of: (m) => (m.rssBytes || 0) / 1048576 },
  ];
  let stopped = false;
  onLeave(() => { stopped = true; });
  const svgEl = (tag, attrs) => {
    const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  };
  const spark = ({ label, unit, values }) => {
    const w = 300; const h = 60;
    const max = Math.max(1, ...values);
    const latest = values.length ? values[values.length - 1].toFixed(1) : '—';
    const x = (i) => (values.length > 1 ? (i / (values.length - 1)) * w : w / 2);
    const y = (v) => h - (v / max) * (h - 4) - 2;
    const svg = svgEl('svg', { viewBox: `0 0 ${w} ${h}`, class: 'spark', role: 'img',
      'aria-label': `${label}: latest ${latest} ${unit}, highest ${max.toFixed(1)}` });
    if (values.length === 1) svg.append(svgEl('circle', { cx: x(0), cy: y(values[0]), r: 3, fill: '#0b5cad' }));
    else if (values.length > 1) {
      svg.append(svgEl('polyline', { points: values.map((v, i) => `${x(i)},${y(v)}`).join(' '),
        fill: 'none', stroke: '#0b5cad', 'stroke-width': 2 }));
    }
    return el('figure', {}, el('figcaption', {}, `${label}: ${latest} ${unit} (highest ${max.toFixed(1)})`), svg);
  };
  const draw = () => box.replaceChildren(...series.map(spark));
  draw();
  (async () => {
    while (!stopped) {
      try {
        const m = await api('GET', `${collection('vms')}/${enc(name)}/metrics`);
        for (const s of series) {
          s.values.push(s.of(m));
          if (s.values.length > 60) s.values.shift();
        }
        draw();
      } catch (e) {
        box.replaceChildren(...series.map(spark),
          el('p', { class: 'muted' }, `No sample yet: ${errorText(e).split('\n')[0]}`));
      }
      await sleep(5000);
    }
  })();
}
