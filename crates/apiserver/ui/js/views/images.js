// Images: kernels, root filesystems and initrds, and whether nodes found them sound.

import { mib } from '../dom.js';
import { simpleView } from '../list.js';

export function imagesView() {
  simpleView('images', 'Images', 'images', [
    { title: 'Name', get: (o) => o.metadata.name }, { title: 'Type', get: (o) => o.spec.type },
    { title: 'Path', get: (o) => o.spec.path, wide: true }, { title: 'Phase', get: (o) => (o.status && o.status.phase) || 'Pending' },
    { title: 'Size', get: (o) => (o.spec.sizeBytes ? mib(Math.round(o.spec.sizeBytes / 1048576)) : ''), sort: (o) => o.spec.sizeBytes || 0 },
  ]);
}
