// Nodes: readiness and what their VMs take of them.

import { age, mib } from '../dom.js';
import { simpleView } from '../list.js';
import { condition } from '../live.js';

export function nodesView() {
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
