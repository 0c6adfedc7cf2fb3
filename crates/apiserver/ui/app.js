// The nexus web console. Plain script, no dependencies: every request is
// one the public API serves (the same nexusctl makes), with the token the
// user signed in with, so the console can do nothing the API refuses.
'use strict';
(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const session = window.sessionStorage;
  let token = session.getItem('nexus.token');
  let project = session.getItem('nexus.project') || 'default';
  let teardown = [];

  // Elements: el('a', {href: '#'}, 'text', child...).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else if (k === 'text') node.textContent = v;
      else node.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  class ApiError extends Error {
    constructor(status, body) {
      super(body.message || `HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  function headers(extra) {
    return Object.assign({ Authorization: `Bearer ${token}` }, extra || {});
  }

  async function api(method, path, body, contentType) {
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
  function errorText(e) {
    if (!(e instanceof ApiError)) return String((e && e.message) || e);
    const b = e.body;
    let text = b.message || `HTTP ${e.status}`;
    if (b.faultMessage) text += `\nFirecracker: ${b.faultMessage}`;
    if (b.suggestion) text += `\n${b.suggestion}`;
    return text;
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const enc = encodeURIComponent;
  const announce = (text) => { $('#live').textContent = text; };

  function age(ts) {
    if (!ts) return '';
    const s = Math.max(0, (Date.now() - Date.parse(ts)) / 1000);
    if (s < 120) return `${Math.floor(s)}s`;
    if (s < 7200) return `${Math.floor(s / 60)}m`;
    if (s < 172800) return `${Math.floor(s / 3600)}h`;
    return `${Math.floor(s / 86400)}d`;
  }

  function mib(n) {
    if (n === undefined || n === null || n === '') return '';
    return n >= 1024 ? `${(n / 1024).toFixed(n % 1024 ? 1 : 0)}Gi` : `${n}Mi`;
  }

  const collection = (plural, namespaced = true) =>
    namespaced ? `/v1/projects/${enc(project)}/${plural}` : `/v1/${plural}`;
  const keyOf = (o) => `${o.metadata.project || ''}/${o.metadata.name}`;
  const condition = (o, type) => ((o.status && o.status.conditions) || []).find((c) => c.type === type);

  // A live collection: a list, then a watch from its version, again after
  // any break. `onChange` gets the items (a Map) after each change.
  function live(path, onChange, onError) {
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
    teardown.push(() => handle.stop());
    return handle;
  }

  // A sortable, filterable table of live objects.
  function listView(opts) {
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

  // Changes a VM's spec.state, reading it fresh and writing it back.
  async function setState(name, state) {
    for (let i = 0; i < 5; i++) {
      const path = `${collection('vms')}/${enc(name)}`;
      const vm = await api('GET', path);
      if (vm.spec.state === state) return;
      vm.spec.state = state;
      try { await api('PUT', path, vm); return; } catch (e) { if (!(e instanceof ApiError) || e.status !== 409) throw e; }
    }
  }

  function confirmDialog(question, yes) {
    return new Promise((resolve) => {
      const dialog = el('dialog', { 'aria-labelledby': 'confirm-title' },
        el('form', { method: 'dialog' },
          el('h2', { id: 'confirm-title' }, question),
          el('div', { class: 'toolbar' },
            el('button', { type: 'submit', value: 'yes', class: 'danger', id: 'confirm-yes' }, yes),
            el('button', { type: 'submit', value: 'no', class: 'secondary' }, 'Cancel'))));
      dialog.addEventListener('close', () => { resolve(dialog.returnValue === 'yes'); dialog.remove(); });
      document.body.append(dialog);
      dialog.showModal();
    });
  }

  const phaseCell = (o) => (o.status && o.status.phase) || 'Pending';

  function vmsView() {
    const act = (state, verb) => async (vms, error) => {
      error.textContent = '';
      for (const vm of vms) {
        try { await setState(vm.metadata.name, state); } catch (e) { error.textContent = `${vm.metadata.name}: ${errorText(e)}`; return; }
      }
      announce(`${vms.length} VM(s) ${verb}`);
    };
    listView({
      id: 'vms', title: 'VMs', path: collection('vms'), bulk: [
        { label: 'Start', run: act('Running', 'started') },
        { label: 'Stop', run: act('Stopped', 'stopped') },
        { label: 'Delete', cls: 'danger', run: async (vms, error) => {
          if (!(await confirmDialog(`Delete ${vms.length} VM(s)?`, 'Delete'))) return;
          for (const vm of vms) {
            try { await api('DELETE', `${collection('vms')}/${enc(vm.metadata.name)}`); } catch (e) { error.textContent = errorText(e); return; }
          }
        } }],
      columns: [
        { title: 'Name', get: (o) => el('a', { href: `#/vm/${enc(o.metadata.name)}` }, o.metadata.name), sort: (o) => o.metadata.name },
        { title: 'Phase', get: phaseCell, cls: (o) => `phase-${phaseCell(o)}` },
        { title: 'Node', get: (o) => o.spec.nodeName || '' },
        { title: 'vCPU', get: (o) => (o.status && o.status.config && o.status.config.vcpu) || o.spec.vcpu || '', sort: (o) => (o.status && o.status.config && o.status.config.vcpu) || o.spec.vcpu || 0 },
        { title: 'Memory', get: (o) => mib((o.status && o.status.config && o.status.config.memMib) || o.spec.memMib), sort: (o) => (o.status && o.status.config && o.status.config.memMib) || o.spec.memMib || 0 },
        { title: 'IP', get: (o) => (o.status && o.status.runtime && o.status.runtime.ip) || '', wide: true },
        { title: 'Age', get: (o) => age(o.metadata.creationTimestamp), sort: (o) => -Date.parse(o.metadata.creationTimestamp || 0) },
        { title: 'Restarts', get: (o) => (o.status && o.status.runtime && o.status.runtime.restarts) || 0, sort: (o) => (o.status && o.status.runtime && o.status.runtime.restarts) || 0, wide: true },
      ],
    });
  }

  function templatesView() {
    listView({
      id: 'templates', title: 'Templates', path: collection('templates'),
      columns: [
        { title: 'Name', get: (o) => o.metadata.name },
        { title: 'vCPU', get: (o) => o.spec.vcpu },
        { title: 'Memory', get: (o) => mib(o.spec.memMib), sort: (o) => o.spec.memMib },
        { title: 'Kernel', get: (o) => o.spec.kernel, wide: true },
        { title: 'Root filesystem', get: (o) => o.spec.rootfs, wide: true },
        { title: 'Action', get: (o) => el('button', { type: 'button', class: 'start-from-template', 'data-template': o.metadata.name,
          onclick: () => createFromTemplate(o.metadata.name) }, `Start VM from ${o.metadata.name}`) },
      ],
    });
  }

  function createFromTemplate(template) {
    const suffix = Math.random().toString(16).slice(2, 7);
    const name = el('input', { id: 'new-name', value: `${template}-${suffix}`.slice(0, 63), required: true, pattern: '[a-z0-9]([a-z0-9-]*[a-z0-9])?' });
    const labels = el('input', { id: 'new-labels', placeholder: 'team=ci, purpose=test' });
    const error = el('p', { class: 'error', role: 'alert', id: 'create-error' });
    const dialog = el('dialog', { 'aria-labelledby': 'create-title' },
      el('form', { method: 'dialog', onsubmit: async (ev) => {
        ev.preventDefault();
        const meta = { name: name.value.trim(), labels: {} };
        for (const pair of labels.value.split(',').map((s) => s.trim()).filter(Boolean)) {
          const [k, ...v] = pair.split('=');
          meta.labels[k.trim()] = v.join('=').trim();
        }
        try {
          await api('POST', collection('vms'), { apiVersion: 'nexus/v1', kind: 'VM', metadata: meta, spec: { template, state: 'Running' } });
          dialog.close();
          location.hash = `#/vm/${enc(meta.name)}`;
        } catch (e) { error.textContent = errorText(e); }
      } },
      el('h2', { id: 'create-title' }, `New VM from template ${template}`),
      el('label', { for: 'new-name' }, 'Name'), name,
      el('label', { for: 'new-labels' }, 'Labels (optional)'), labels,
      error,
      el('div', { class: 'toolbar' },
        el('button', { type: 'submit', id: 'create-vm' }, 'Create and start'),
        el('button', { type: 'button', class: 'secondary', onclick: () => dialog.close() }, 'Cancel'))));
    dialog.addEventListener('close', () => dialog.remove());
    document.body.append(dialog);
    dialog.showModal();
    $('#create-vm').focus();
  }

  function simpleView(id, title, plural, columns, namespaced = true) {
    listView({ id, title, path: collection(plural, namespaced), columns });
  }

  function eventsView() {
    listView({
      id: 'events', title: 'Events', path: '/v1/events', sort: 5,
      keep: (o) => !o.spec.involvedObject.project || o.spec.involvedObject.project === project,
      text: (o) => `${o.spec.reason} ${o.spec.involvedObject.kind}/${o.spec.involvedObject.name} ${o.spec.message}`,
      columns: [
        { title: 'Type', get: (o) => o.spec.type, cls: (o) => (o.spec.type === 'Warning' ? 'bad' : null) },
        { title: 'Reason', get: (o) => o.spec.reason },
        { title: 'Object', get: (o) => `${o.spec.involvedObject.kind.toLowerCase()}/${o.spec.involvedObject.name}` },
        { title: 'Message', get: (o) => o.spec.message },
        { title: 'Count', get: (o) => o.spec.count, sort: (o) => o.spec.count, wide: true },
        { title: 'Last seen', get: (o) => age(o.spec.lastTimestamp || o.metadata.creationTimestamp), sort: (o) => -Date.parse(o.spec.lastTimestamp || o.metadata.creationTimestamp) },
      ],
    });
  }

  function nodesView() {
    simpleView('nodes', 'Nodes', 'nodes', [
      { title: 'Name', get: (o) => o.metadata.name },
      { title: 'Ready', get: (o) => { const c = condition(o, 'Ready'); return c ? c.status : 'Unknown'; }, cls: (o) => { const c = condition(o, 'Ready'); return c && c.status === 'True' ? 'ok' : 'bad'; } },
      { title: 'VMs', get: (o) => `${(o.status && o.status.allocated && o.status.allocated.vms) || 0} / ${(o.status && o.status.capacity && o.status.capacity.maxVms) || 0}` },
      { title: 'Memory', get: (o) => `${mib((o.status && o.status.allocated && o.status.allocated.memMib) || 0)} / ${mib((o.status && o.status.capacity && o.status.capacity.memMib) || 0)}` },
      { title: 'vCPU', get: (o) => `${(o.status && o.status.allocated && o.status.allocated.vcpu) || 0} / ${(o.status && o.status.capacity && o.status.capacity.vcpu) || 0}`, wide: true },
      { title: 'Address', get: (o) => (o.status && o.status.address) || '', wide: true },
      { title: 'Heartbeat', get: (o) => age(o.status && o.status.lastHeartbeatTime), wide: true },
    ], false);
  }

  // One VM: what it is, how it is, its events, console and metrics, and actions.
  function vmView(name) {
    const notice = el('p', { class: 'notice', role: 'alert', id: 'vm-error' });
    const title = el('h1', { id: 'view-title' }, name, ' ', el('span', { id: 'vm-phase' }));
    const overview = el('dl', { class: 'kv' });
    const conditions = el('tbody');
    const events = el('tbody');
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
        await api('POST', collection('snapshots'), { apiVersion: 'nexus/v1', kind: 'Snapshot', metadata: { name: snap }, spec: { vmName: name, resumeAfter: true } });
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
        el('div', { class: 'card' }, el('h2', {}, 'Console'), consoleLog),
        el('div', { class: 'card' }, el('h2', {}, 'Metrics'), charts),
        el('div', { class: 'card' }, el('h2', {}, 'Events'), el('table', {}, el('thead', {}, el('tr', {},
          ...['Type', 'Reason', 'Message', 'Last seen'].map((h) => el('th', { scope: 'col' }, h)))), events)),
        el('div', { class: 'card' }, el('h2', {}, 'Spec and status'), spec))));
    let seen = false;
    live(`${collection('vms')}?fieldSelector=${enc(`metadata.name=${name}`)}`, (items) => {
      const vm = [...items.values()][0];
      if (!vm) { $('#vm-phase').textContent = seen ? '(deleted)' : '(not found)'; return; }
      seen = true;
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
      spec.textContent = JSON.stringify({ spec: vm.spec, status: vm.status }, null, 2);
    }, (e) => { notice.textContent = e ? errorText(e) : notice.textContent; });
    live('/v1/events', (items) => {
      const mine = [...items.values()].filter((e) => e.spec.involvedObject.kind === 'VM' && e.spec.involvedObject.name === name
        && (e.spec.involvedObject.project || project) === project);
      mine.sort((a, b) => Date.parse(b.spec.lastTimestamp || 0) - Date.parse(a.spec.lastTimestamp || 0));
      events.replaceChildren(...mine.map((e) => el('tr', {}, el('td', { class: e.spec.type === 'Warning' ? 'bad' : null }, e.spec.type),
        el('td', {}, e.spec.reason), el('td', {}, e.spec.message), el('td', {}, age(e.spec.lastTimestamp)))));
    });
    followConsole(name, consoleLog);
    metrics(name, charts);
  }

  // Follows the VM's console, starting again when the stream ends.
  function followConsole(name, pre) {
    const abort = new AbortController();
    let stopped = false;
    teardown.push(() => { stopped = true; abort.abort(); });
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

  // Charts of the VM's recent CPU and memory, sampled every 5 s.
  function metrics(name, box) {
    const series = { 'CPU %': [], 'Resident MiB': [] };
    let stopped = false;
    teardown.push(() => { stopped = true; });
    const spark = (label, values) => {
      const w = 300; const h = 60;
      const max = Math.max(1, ...values);
      const pts = values.map((v, i) => `${(i / Math.max(1, values.length - 1)) * w},${h - (v / max) * (h - 4) - 2}`).join(' ');
      const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
      svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
      svg.setAttribute('class', 'spark');
      svg.setAttribute('role', 'img');
      svg.setAttribute('aria-label', `${label}: latest ${values.length ? values[values.length - 1].toFixed(1) : 'none'}`);
      const line = document.createElementNS('http://www.w3.org/2000/svg', 'polyline');
      line.setAttribute('points', pts);
      line.setAttribute('fill', 'none');
      line.setAttribute('stroke', '#0b5cad');
      line.setAttribute('stroke-width', '2');
      svg.append(line);
      return el('figure', {}, el('figcaption', {}, `${label}: ${values.length ? values[values.length - 1].toFixed(1) : '—'}`), svg);
    };
    (async () => {
      while (!stopped) {
        try {
          const m = await api('GET', `${collection('vms')}/${enc(name)}/metrics`);
          series['CPU %'].push(m.cpuPercent || 0);
          series['Resident MiB'].push((m.rssBytes || 0) / 1048576);
          for (const v of Object.values(series)) if (v.length > 60) v.shift();
          box.replaceChildren(...Object.entries(series).map(([k, v]) => spark(k, v)));
        } catch (e) {
          box.replaceChildren(el('p', { class: 'muted' }, `No metrics yet: ${errorText(e).split('\n')[0]}`));
        }
        await sleep(5000);
      }
    })();
  }

  const KINDS = { VM: 'vms', VMPool: 'vmpools', Template: 'templates', Image: 'images', Snapshot: 'snapshots',
    RoleBinding: 'rolebindings', ResourceQuota: 'resourcequotas', Node: null, Lease: null, Event: null, ClusterRoleBinding: null };
  const CLUSTER = { Node: 'nodes', Lease: 'leases', Event: 'events', ClusterRoleBinding: 'clusterrolebindings' };

  // Create from YAML: the server parses and validates (dry run first);
  // each error is shown with the line it points at.
  function yamlView() {
    const text = el('textarea', { id: 'yaml', spellcheck: 'false', 'aria-describedby': 'yaml-help' },
      'apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: my-vm\nspec:\n  template: ci-runner\n  state: Running\n');
    const out = el('div', { id: 'yaml-errors', role: 'alert' });
    const lineOf = (field) => {
      const lines = text.value.split('\n');
      const keyName = field.split('.').pop().replace(/\[\d+\]$/, '');
      const i = lines.findIndex((l) => new RegExp(`^\\s*-?\\s*${keyName}\\s*:`).test(l));
      return i >= 0 ? i + 1 : null;
    };
    const show = (e) => {
      const b = e instanceof ApiError ? e.body : { message: String(e) };
      const found = [];
      const yamlLine = /line (\d+)/.exec(b.message || '');
      if (b.error === 'Malformed' && yamlLine) found.push([Number(yamlLine[1]), b.message]);
      else {
        for (const raw of (b.message || '').split('; ')) {
          const part = raw.replace(/^[A-Za-z]+ is invalid: /, '');
          const m = /^([A-Za-z0-9_.[\]]+): /.exec(part);
          found.push([m ? lineOf(m[1]) : null, part]);
        }
      }
      out.replaceChildren(el('ul', { class: 'error' }, ...found.map(([line, msg]) => el('li', {}, line ? `line ${line}: ${msg}` : msg))),
        b.suggestion && !found.some(([, msg]) => b.suggestion.includes(msg.split(': ').pop())) ? el('p', {}, b.suggestion) : '');
      const first = found.find(([line]) => line);
      if (first) {
        const lines = text.value.split('\n');
        const start = lines.slice(0, first[0] - 1).join('\n').length + (first[0] > 1 ? 1 : 0);
        text.focus();
        text.setSelectionRange(start, start + (lines[first[0] - 1] || '').length);
      }
    };
    const send = async (dryRun) => {
      out.replaceChildren();
      const kind = (/^kind:\s*(\S+)/m.exec(text.value) || [])[1];
      if (!kind || !(kind in KINDS)) { out.replaceChildren(el('p', { class: 'error' }, `line 2: kind must be one of ${Object.keys(KINDS).join(', ')}`)); return; }
      const path = KINDS[kind] ? collection(KINDS[kind]) : collection(CLUSTER[kind], false);
      try {
        const obj = await api('POST', `${path}?dryRun=All`, text.value, 'application/yaml');
        if (dryRun) { out.replaceChildren(el('p', { class: 'ok' }, `${kind} ${obj.metadata.name} is valid (nothing was saved).`)); return; }
        const made = await api('POST', path, text.value, 'application/yaml');
        out.replaceChildren(el('p', { class: 'ok' }, `${kind} ${made.metadata.name} created.`));
        if (kind === 'VM') location.hash = `#/vm/${enc(made.metadata.name)}`;
      } catch (e) { show(e); }
    };
    $('#view').replaceChildren(el('section', { 'aria-labelledby': 'view-title' },
      el('h1', { id: 'view-title' }, 'Create from YAML'),
      el('p', { id: 'yaml-help' }, `One object, as nexusctl apply takes it, in project ${project}. It is checked by the server before it is saved.`),
      el('label', { for: 'yaml' }, 'Object'), text,
      el('div', { class: 'toolbar' },
        el('button', { type: 'button', class: 'secondary', id: 'yaml-validate', onclick: () => send(true) }, 'Validate'),
        el('button', { type: 'button', id: 'yaml-create', onclick: () => send(false) }, 'Create')),
      out));
  }

  function route() {
    for (const stop of teardown) stop();
    teardown = [];
    const hash = location.hash || '#/vms';
    const [, page, arg] = hash.split('/');
    for (const a of document.querySelectorAll('#nav a')) {
      if (a.getAttribute('href') === `#/${page}` || (page === 'vm' && a.getAttribute('href') === '#/vms')) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    switch (page) {
      case 'vm': vmView(decodeURIComponent(arg || '')); break;
      case 'vmpools': simpleView('vmpools', 'Pools', 'vmpools', [
        { title: 'Name', get: (o) => o.metadata.name },
        { title: 'Desired', get: (o) => o.spec.replicas, sort: (o) => o.spec.replicas },
        { title: 'Ready', get: (o) => (o.status && o.status.readyReplicas) || 0 },
        { title: 'Up to date', get: (o) => (o.status && o.status.updatedReplicas) || 0 },
        { title: 'Available', get: (o) => (o.status && o.status.availableReplicas) || 0 },
        { title: 'Revision', get: (o) => (o.status && o.status.updateRevision) || '' },
        { title: 'Rollout', get: (o) => (o.status && o.status.rollout && o.status.rollout.phase) || '', cls: (o) => (o.status && o.status.rollout && ['Halted', 'RolledBack'].includes(o.status.rollout.phase) ? 'bad' : null) },
        { title: 'Message', get: (o) => (o.status && o.status.rollout && o.status.rollout.message) || '', wide: true },
      ]); break;
      case 'templates': templatesView(); break;
      case 'images': simpleView('images', 'Images', 'images', [
        { title: 'Name', get: (o) => o.metadata.name }, { title: 'Type', get: (o) => o.spec.type },
        { title: 'Path', get: (o) => o.spec.path, wide: true }, { title: 'Phase', get: (o) => (o.status && o.status.phase) || 'Pending' },
        { title: 'Size', get: (o) => (o.spec.sizeBytes ? mib(Math.round(o.spec.sizeBytes / 1048576)) : ''), sort: (o) => o.spec.sizeBytes || 0 }]); break;
      case 'snapshots': simpleView('snapshots', 'Snapshots', 'snapshots', [
        { title: 'Name', get: (o) => o.metadata.name }, { title: 'VM', get: (o) => o.spec.vmName },
        { title: 'Phase', get: (o) => (o.status && o.status.phase) || 'Pending' }, { title: 'Node', get: (o) => (o.status && o.status.nodeName) || '' },
        { title: 'Size', get: (o) => (o.status && o.status.sizeBytes ? mib(Math.round(o.status.sizeBytes / 1048576)) : ''), sort: (o) => (o.status && o.status.sizeBytes) || 0 },
        { title: 'Age', get: (o) => age(o.metadata.creationTimestamp), sort: (o) => -Date.parse(o.metadata.creationTimestamp || 0) }]); break;
      case 'nodes': nodesView(); break;
      case 'events': eventsView(); break;
      case 'create': yamlView(); break;
      default: vmsView();
    }
    $('#main').focus({ preventScroll: true });
  }

  // The projects the token may see: those it holds a role in, and, for a
  // cluster-wide role, every project that has objects.
  async function projects(who) {
    const names = new Set(Object.keys(who.projects || {}));
    if ((who.cluster || []).length) {
      for (const plural of ['vms', 'templates', 'images']) {
        try { for (const o of (await api('GET', `/v1/${plural}`)).items) names.add(o.metadata.project); } catch (_) { /* not readable */ }
      }
      names.add('default');
    }
    return [...names].filter(Boolean).sort();
  }

  async function start() {
    if (!token) { $('#signin').hidden = false; $('#token').focus(); return; }
    let who;
    try { who = await api('GET', '/v1/whoami'); } catch (e) {
      session.removeItem('nexus.token');
      token = null;
      $('#signin').hidden = false;
      $('#signin-error').textContent = errorText(e);
      return;
    }
    $('#signin').hidden = true;
    $('#nav').hidden = false;
    $('#who').hidden = false;
    $('#subject').textContent = who.subject;
    const list = await projects(who);
    if (!list.includes(project)) project = list[0] || 'default';
    const picker = $('#project');
    picker.replaceChildren(...list.map((p) => el('option', { value: p, selected: p === project }, p)));
    picker.onchange = () => { project = picker.value; session.setItem('nexus.project', project); route(); };
    window.addEventListener('hashchange', route);
    route();
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('#signin').addEventListener('submit', (ev) => {
      ev.preventDefault();
      token = $('#token').value.trim();
      session.setItem('nexus.token', token);
      $('#signin-error').textContent = '';
      start();
    });
    $('#signout').addEventListener('click', () => { session.clear(); location.hash = ''; location.reload(); });
    document.documentElement.dataset.app = 'loaded';
    start();
  });
})();
