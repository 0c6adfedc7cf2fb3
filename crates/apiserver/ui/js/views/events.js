// Events of the project's objects, newest first.

import { session } from '../api.js';
import { age } from '../dom.js';
import { listView } from '../list.js';

export function eventsView() {
  listView({
    id: 'events', title: 'Events', path: '/v1/events', sort: 5,
    keep: (o) => !o.spec.involvedObject.project || o.spec.involvedObject.project === session.project,
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
