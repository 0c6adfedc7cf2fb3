// Snapshots: of which VM, on which node, how big.

import { age, mib } from '../dom.js';
import { simpleView } from '../list.js';

export function snapshotsView() {
  simpleView('snapshots', 'Snapshots', 'snapshots', [
    { title: 'Name', get: (o) => o.metadata.name }, { title: 'VM', get: (o) => o.spec.vmName },
    { title: 'Phase', get: (o) => (o.status && o.status.phase) || 'Pending' }, { title: 'Node', get: (o) => (o.status && o.status.nodeName) || '' },
    { title: 'Size', get: (o) => (o.status && o.status.sizeBytes ? mib(Math.round(o.status.sizeBytes / 1048576)) : ''), sort: (o) => (o.status && o.status.sizeBytes) || 0 },
    { title: 'Age', get: (o) => age(o.metadata.creationTimestamp), sort: (o) => -Date.parse(o.metadata.creationTimestamp || 0) },
  ]);
}
