// The VM list: live phases, bulk start, stop and delete.

import { ApiError, api, collection, errorText } from '../api.js';
import { announce, age, confirmDialog, el, enc, mib } from '../dom.js';
import { listView } from '../list.js';

// Changes a VM's spec.state, reading it fresh and writing it back.
export async function setState(name, state) {
  for (let i = 0; i < 5; i++) {
    const path = `${collection('vms')}/${enc(name)}`;
    const vm = await api('GET', path);
    if (vm.spec.state === state) return;
    vm.spec.state = state;
    try { await api('PUT', path, vm); return; } catch (e) { if (!(e instanceof ApiError) || e.status !== 409) throw e; }
  }
}

export const phaseCell = (o) => (o.status && o.status.phase) || 'Pending';

export function vmsView() {
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
