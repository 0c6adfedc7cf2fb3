// Pools: replicas and rollouts.

import { simpleView } from '../list.js';

export function poolsView() {
  simpleView('vmpools', 'Pools', 'vmpools', [
    { title: 'Name', get: (o) => o.metadata.name },
    { title: 'Desired', get: (o) => o.spec.replicas, sort: (o) => o.spec.replicas },
    { title: 'Ready', get: (o) => (o.status && o.status.readyReplicas) || 0 },
    { title: 'Up to date', get: (o) => (o.status && o.status.updatedReplicas) || 0 },
    { title: 'Available', get: (o) => (o.status && o.status.availableReplicas) || 0 },
    { title: 'Revision', get: (o) => (o.status && o.status.updateRevision) || '' },
    { title: 'Rollout', get: (o) => (o.status && o.status.rollout && o.status.rollout.phase) || '', cls: (o) => (o.status && o.status.rollout && ['Halted', 'RolledBack'].includes(o.status.rollout.phase) ? 'bad' : null) },
    { title: 'Message', get: (o) => (o.status && o.status.rollout && o.status.rollout.message) || '', wide: true },
  ]);
}
