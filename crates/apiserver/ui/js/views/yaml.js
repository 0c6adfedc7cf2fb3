// Create from YAML: the server parses and validates (dry run first); each
// error is shown with the line it points at. Any kind the server serves
// (as /v1/kinds says) may be created here.

import { ApiError, api, collectionOf, kindNamed, kinds, session } from '../api.js';
import { $, el, enc } from '../dom.js';

export function yamlView() {
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
    const path = kind && kinds().some((k) => k.kind === kind) ? collectionOf(kind) : null;
    if (!path) { out.replaceChildren(el('p', { class: 'error' }, `line 2: kind must be one of ${kinds().map((k) => k.kind).join(', ')}`)); return; }
    try {
      const obj = await api('POST', `${path}?dryRun=All`, text.value, 'application/yaml');
      if (dryRun) { out.replaceChildren(el('p', { class: 'ok' }, `${kind} ${obj.metadata.name} is valid (nothing was saved).`)); return; }
      const made = await api('POST', path, text.value, 'application/yaml');
      out.replaceChildren(el('p', { class: 'ok' }, `${kind} ${made.metadata.name} created.`));
      if (kind === kindNamed('vms').kind) location.hash = `#/vm/${enc(made.metadata.name)}`;
    } catch (e) { show(e); }
  };
  $('#view').replaceChildren(el('section', { 'aria-labelledby': 'view-title' },
    el('h1', { id: 'view-title' }, 'Create from YAML'),
    el('p', { id: 'yaml-help' }, `One object, as nexusctl apply takes it, in project ${session.project}. It is checked by the server before it is saved.`),
    el('label', { for: 'yaml' }, 'Object'), text,
    el('div', { class: 'toolbar' },
      el('button', { type: 'button', class: 'secondary', id: 'yaml-validate', onclick: () => send(true) }, 'Validate'),
      el('button', { type: 'button', id: 'yaml-create', onclick: () => send(false) }, 'Create')),
    out));
}
