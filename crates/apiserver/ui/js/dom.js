// DOM helpers shared by every view: building elements, formatting ages
// and sizes, announcing to screen readers, asking for confirmation.

export const $ = (sel, root = document) => root.querySelector(sel);

// Elements: el('a', {href: '#'}, 'text', child...).
export function el(tag, attrs, ...children) {
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

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export const enc = encodeURIComponent;
export const announce = (text) => { $('#live').textContent = text; };

export function age(ts) {
  if (!ts) return '';
  const s = Math.max(0, (Date.now() - Date.parse(ts)) / 1000);
  if (s < 120) return `${Math.floor(s)}s`;
  if (s < 7200) return `${Math.floor(s / 60)}m`;
  if (s < 172800) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

export function mib(n) {
  if (n === undefined || n === null || n === '') return '';
  return n >= 1024 ? `${(n / 1024).toFixed(n % 1024 ? 1 : 0)}Gi` : `${n}Mi`;
}

export function confirmDialog(question, yes) {
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
