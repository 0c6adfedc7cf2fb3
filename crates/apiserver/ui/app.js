// The nexus web console's entry: sign-in, the project picker and the
// router. Plain ES modules served by the apiserver, no dependencies and no
// build step: every request is one the public API serves (the same
// nexusctl makes), with the token the user signed in with, so the console
// can do nothing the API refuses. The kinds it may create come from
// /v1/kinds; each page is a module of js/views/.

import { api, errorText, loadKinds, session } from './js/api.js';
import { $, el } from './js/dom.js';
import { leave } from './js/live.js';
import { eventsView } from './js/views/events.js';
import { imagesView } from './js/views/images.js';
import { nodesView } from './js/views/nodes.js';
import { overviewView } from './js/views/overview.js';
import { poolsView } from './js/views/pools.js';
import { snapshotsView } from './js/views/snapshots.js';
import { templatesView } from './js/views/templates.js';
import { vmView } from './js/views/vm.js';
import { vmsView } from './js/views/vms.js';
import { yamlView } from './js/views/yaml.js';

// Each page of the console, by the first segment of its hash.
const PAGES = {
  overview: overviewView,
  vm: (arg) => vmView(decodeURIComponent(arg || '')),
  vmpools: poolsView,
  templates: templatesView,
  images: imagesView,
  snapshots: snapshotsView,
  nodes: nodesView,
  events: eventsView,
  create: yamlView,
};

function route() {
  leave();
  const hash = location.hash || '#/vms';
  const [, page, arg] = hash.split('/');
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.getAttribute('href') === `#/${page}` || (page === 'vm' && a.getAttribute('href') === '#/vms')) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  (PAGES[page] || vmsView)(arg);
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
  if (!session.token) { $('#signin').hidden = false; $('#token').focus(); return; }
  let who;
  try { who = await api('GET', '/v1/whoami'); await loadKinds(); } catch (e) {
    session.forgetToken();
    $('#signin').hidden = false;
    $('#signin-error').textContent = errorText(e);
    return;
  }
  $('#signin').hidden = true;
  $('#nav').hidden = false;
  $('#who').hidden = false;
  $('#subject').textContent = who.subject;
  const list = await projects(who);
  if (!list.includes(session.project)) session.project = list[0] || 'default';
  const picker = $('#project');
  picker.replaceChildren(...list.map((p) => el('option', { value: p, selected: p === session.project }, p)));
  picker.onchange = () => { session.choose(picker.value); route(); };
  window.addEventListener('hashchange', route);
  route();
}

// Modules run after the document is parsed.
{
  $('#signin').addEventListener('submit', (ev) => {
    ev.preventDefault();
    session.signIn($('#token').value.trim());
    $('#signin-error').textContent = '';
    start();
  });
  $('#signout').addEventListener('click', () => { session.signOut(); location.hash = ''; location.reload(); });
  document.documentElement.dataset.app = 'loaded';
  start();
}
