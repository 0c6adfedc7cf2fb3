// Templates, and starting a VM from one in a dialog.

import { api, collection, errorText, kindNamed } from '../api.js';
import { $, el, enc, mib } from '../dom.js';
import { listView } from '../list.js';

export function templatesView() {
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
        await api('POST', collection('vms'), { apiVersion: 'nexus/v1', kind: kindNamed('vms').kind, metadata: meta, spec: { template, state: 'Running' } });
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
