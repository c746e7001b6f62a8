// Remote cursors over any element, with name labels that fade when a member is idle.
//
//   import { PresenceClient } from "/static/presence.js";
//   import { CursorOverlay, SelectionOverlay, trackPointer, trackSelection } from "/static/overlay.js";
//   const client = new PresenceClient("my-room");
//   const board = document.querySelector("#board");
//   new CursorOverlay(client, board);           // others' pointers over #board
//   trackPointer(client, board);                // ours, sent as state.cursor = {x, y}
//   const notes = document.querySelector("textarea");
//   new SelectionOverlay(client, notes);        // others' carets and selections
//   trackSelection(client, notes);              // ours, as state.selection = {anchor, head}
//
// Pointer positions are CSS pixels from the element's top-left corner. Labels that would
// overlap are stacked; in a crowd they shrink to initials.

const STYLE = `
.presence-layer { position: absolute; pointer-events: none; overflow: hidden; z-index: 10; }
.presence-cursor { position: absolute; left: 0; top: 0; will-change: transform;
  transition: transform 60ms linear; }
.presence-cursor svg { display: block; margin: -1px 0 0 -1px; filter: drop-shadow(0 1px 1px rgba(0,0,0,.3)); }
.presence-label { position: absolute; white-space: nowrap; font: 600 12px/1.6 system-ui, sans-serif;
  padding: 0 6px; border-radius: 4px; box-shadow: 0 1px 2px rgba(0,0,0,.25);
  transition: opacity 300ms ease; opacity: 1; }
.presence-idle .presence-label { opacity: 0; }
.presence-compact .presence-label .presence-name { display: none; }
.presence-label .presence-initials { display: none; }
.presence-compact .presence-label .presence-initials { display: inline; }
.presence-caret { position: absolute; width: 2px; }
.presence-mirror { position: absolute; color: transparent; pointer-events: none; overflow: hidden;
  white-space: pre-wrap; overflow-wrap: break-word; box-sizing: border-box; }
.presence-mirror mark { color: transparent; border-radius: 2px; }
`;

let styled = false;
function addStyle() {
  if (styled) return;
  styled = true;
  const style = document.createElement("style");
  style.textContent = STYLE;
  document.head.append(style);
}

// The pointer has a dark outline inside a white halo: whatever the page behind it, one
// of the two contrasts with it by >= 3:1 (WCAG's rule for graphics), even for the light
// palette colours, whose fill alone nearly vanishes on white.
const POINTER = "M1 1 L1 17 L5.5 13 L8.5 20.5 L11.5 19.2 L8.6 12 L15 12 Z";
function pointerSvg(color) {
  return `<svg width="20" height="24" viewBox="-1 -1 20 24" aria-hidden="true">
    <path class="presence-halo" d="${POINTER}" fill="none" stroke="#FFFFFF" stroke-width="4"
      stroke-linejoin="round"/>
    <path class="presence-fill" d="${POINTER}" fill="${color}" stroke="#1D2330"
      stroke-width="1.25" stroke-linejoin="round"/></svg>`;
}

function label(member) {
  const el = document.createElement("span");
  el.className = "presence-label";
  const name = document.createElement("span");
  name.className = "presence-name";
  const initials = document.createElement("span");
  initials.className = "presence-initials";
  el.append(name, initials);
  return el;
}

function paintLabel(el, member) {
  el.style.background = member.user.color;
  el.style.color = member.user.text_color;
  el.querySelector(".presence-name").textContent = member.user.name;
  el.querySelector(".presence-initials").textContent = member.user.initials;
  el.title = member.user.name;
}

/** Keep labels from covering each other: stack overlapping ones, compact in a crowd. */
function declutter(entries) {
  const placed = [];
  entries.sort((a, b) => a.y - b.y || a.x - b.x);
  for (const entry of entries) {
    let dy = 0;
    let moved = 0;
    const w = entry.width;
    const h = entry.height;
    while (placed.some((p) => entry.x < p.x + p.w && p.x < entry.x + w
        && entry.y + dy < p.y + p.h && p.y < entry.y + dy + h) && moved < 6) {
      dy += h + 2;
      moved += 1;
    }
    entry.apply(dy, moved >= 2);
    placed.push({ x: entry.x, y: entry.y + dy, w, h });
  }
}

class Layer {
  constructor(client, surface) {
    addStyle();
    this.client = client;
    this.surface = surface;
    this.layer = document.createElement("div");
    this.layer.className = "presence-layer";
    document.body.append(this.layer);
    this.nodes = new Map(); // member id -> element
    this._scheduled = false;
    const schedule = () => this.schedule();
    for (const type of ["welcome", "join", "update", "idle", "active", "leave", "status"]) {
      client.addEventListener(type, schedule);
    }
    window.addEventListener("resize", schedule);
    window.addEventListener("scroll", schedule, true);
    new ResizeObserver(schedule).observe(surface);
  }

  schedule() {
    if (this._scheduled) return;
    this._scheduled = true;
    requestAnimationFrame(() => { this._scheduled = false; this.render(); });
  }

  place() {
    const r = this.surface.getBoundingClientRect();
    Object.assign(this.layer.style, {
      left: `${r.left + window.scrollX}px`, top: `${r.top + window.scrollY}px`,
      width: `${r.width}px`, height: `${r.height}px`,
    });
    return r;
  }

  prune(live) {
    for (const [id, node] of this.nodes) {
      if (!live.has(id)) { node.remove(); this.nodes.delete(id); }
    }
  }
}

export class CursorOverlay extends Layer {
  constructor(client, surface, { field = "cursor" } = {}) {
    super(client, surface);
    this.field = field;
    this.schedule();
  }

  render() {
    this.place();
    const live = new Set();
    const labels = [];
    for (const member of this.client.members.values()) {
      const pos = member.state[this.field];
      if (!pos || typeof pos.x !== "number" || typeof pos.y !== "number") continue;
      live.add(member.id);
      let node = this.nodes.get(member.id);
      if (!node) {
        node = document.createElement("div");
        node.className = "presence-cursor";
        node.dataset.member = member.id;
        node.innerHTML = pointerSvg(member.user.color);
        node.append(label(member));
        this.layer.append(node);
        this.nodes.set(member.id, node);
      }
      node.querySelector(".presence-fill").setAttribute("fill", member.user.color);
      node.classList.toggle("presence-idle", member.idle);
      const el = node.querySelector(".presence-label");
      paintLabel(el, member);
      node.style.transform = `translate(${pos.x}px, ${pos.y}px)`;
      if (!member.idle) {
        labels.push({
          x: pos.x + 12, y: pos.y + 18, width: el.offsetWidth || 80, height: el.offsetHeight || 19,
          apply: (dy, compact) => {
            el.style.left = "12px";
            el.style.top = `${18 + dy}px`;
            node.classList.toggle("presence-compact", compact);
          },
        });
      }
    }
    this.prune(live);
    declutter(labels);
  }
}

/**
 * Where a selection's name label goes, in the mirror's content coordinates: whole inside
 * the visible part of the textarea, and off the selected text. Tried in order: above the
 * caret's line, below it, then beside the caret on its line; the label slides sideways
 * to stay inside the edges. ``away`` is the direction in which stacking moves it.
 */
function labelSpot(mirror, caret, mark, w, h) {
  const box = mirror.getBoundingClientRect();
  const ox = box.left + mirror.clientLeft;
  const oy = box.top + mirror.clientTop - mirror.scrollTop;
  const selected = [...mark.getClientRects()].map((r) => ({
    x: r.left - ox, y: r.top - oy, w: r.width, h: r.height }));
  const top = mirror.scrollTop;
  const bottom = top + mirror.clientHeight;
  const right = mirror.clientWidth - 2; // off the edge (and the resize handle)
  const cx = caret.offsetLeft;
  const cy = caret.offsetTop;
  const line = caret.offsetHeight;
  const clampX = (x) => Math.max(0, Math.min(x, right - w));
  const candidates = [
    { x: clampX(cx), y: cy - h - 1, away: -1 },
    { x: clampX(cx), y: cy + line + 1, away: 1 },
    { x: cx - w - 3, y: cy + (line - h) / 2, away: 1 },
    { x: cx + 3, y: cy + (line - h) / 2, away: 1 },
  ];
  const inside = (c) => c.x >= 0 && c.x + w <= right && c.y >= top && c.y + h <= bottom;
  const free = (c) => !selected.some((r) => c.x < r.x + r.w && r.x < c.x + w
    && c.y < r.y + r.h && r.y < c.y + h);
  return candidates.find((c) => inside(c) && free(c))
    ?? candidates.find(inside)
    ?? { ...candidates[0], y: Math.max(top, Math.min(candidates[0].y, bottom - h)) };
}

const MIRRORED = ["fontFamily", "fontSize", "fontWeight", "fontStyle", "letterSpacing", "lineHeight",
  "paddingTop", "paddingRight", "paddingBottom", "paddingLeft", "borderTopWidth", "borderRightWidth",
  "borderBottomWidth", "borderLeftWidth", "textTransform", "tabSize", "textIndent", "wordSpacing"];

export class SelectionOverlay extends Layer {
  constructor(client, textarea, { field = "selection" } = {}) {
    super(client, textarea);
    this.field = field;
    textarea.addEventListener("scroll", () => this.schedule());
    textarea.addEventListener("input", () => this.schedule());
    this.schedule();
  }

  render() {
    const rect = this.place();
    const text = this.surface.value;
    const computed = getComputedStyle(this.surface);
    const live = new Set();
    const labels = [];
    for (const member of this.client.members.values()) {
      const sel = member.state[this.field];
      if (!sel || !Number.isInteger(sel.anchor) || !Number.isInteger(sel.head)) continue;
      live.add(member.id);
      let node = this.nodes.get(member.id);
      if (!node) {
        node = document.createElement("div");
        node.className = "presence-mirror";
        node.dataset.member = member.id;
        this.layer.append(node);
        this.nodes.set(member.id, node);
      }
      for (const p of MIRRORED) node.style[p] = computed[p];
      // The text wraps where the textarea's does: its scrollbar narrows the text too.
      const scrollbar = this.surface.offsetWidth - this.surface.clientWidth
        - parseFloat(computed.borderLeftWidth) - parseFloat(computed.borderRightWidth);
      Object.assign(node.style, { width: `${rect.width}px`, height: `${rect.height}px`, left: "0", top: "0",
        borderStyle: "solid", borderColor: "transparent",
        paddingRight: `${parseFloat(computed.paddingRight) + scrollbar}px` });
      const head = Math.min(Math.max(sel.head, 0), text.length);
      const anchor = Math.min(Math.max(sel.anchor, 0), text.length);
      const [from, to] = anchor < head ? [anchor, head] : [head, anchor];
      const mark = document.createElement("mark");
      mark.style.background = member.user.color_light;
      mark.textContent = text.slice(from, to);
      const caret = document.createElement("span");
      caret.className = "presence-caret";
      caret.style.background = member.user.color;
      caret.style.height = computed.lineHeight === "normal" ? "1.2em" : computed.lineHeight;
      const before = document.createTextNode(text.slice(0, from));
      const after = document.createTextNode(text.slice(to) + "\u200b");
      node.replaceChildren(before, ...(head === from ? [caret, mark] : [mark, caret]), after);
      node.scrollTop = this.surface.scrollTop;
      const el = label(member);
      paintLabel(el, member);
      node.append(el);
      node.classList.toggle("presence-idle", member.idle);
      // The label lives in the mirror, which scrolls with the text: content coordinates.
      const spot = labelSpot(node, caret, mark, el.offsetWidth, el.offsetHeight);
      el.style.left = `${spot.x}px`;
      el.style.top = `${spot.y}px`;
      if (!member.idle) {
        labels.push({ x: spot.x, y: spot.y, width: el.offsetWidth, height: el.offsetHeight,
          apply: (dy, compact) => {
            el.style.top = `${spot.y + spot.away * dy}px`;
            node.classList.toggle("presence-compact", compact);
          } });
      }
    }
    this.prune(live);
    declutter(labels);
  }
}

/** Send our pointer over `surface` as `state[field] = {x, y}` (null when it leaves). */
export function trackPointer(client, surface, { field = "cursor" } = {}) {
  surface.addEventListener("pointermove", (e) => {
    const r = surface.getBoundingClientRect();
    client.update({ [field]: { x: Math.round(e.clientX - r.left), y: Math.round(e.clientY - r.top) } });
  });
  surface.addEventListener("pointerleave", () => client.update({ [field]: null }));
}

/** Send our caret and selection in a textarea as `state[field] = {anchor, head}`. */
export function trackSelection(client, textarea, { field = "selection" } = {}) {
  const send = () => {
    const { selectionStart: start, selectionEnd: end, selectionDirection: dir } = textarea;
    const [anchor, head] = dir === "backward" ? [end, start] : [start, end];
    client.update({ [field]: { anchor, head } });
  };
  document.addEventListener("selectionchange", () => {
    if (document.activeElement === textarea) send();
  });
  textarea.addEventListener("keyup", send);
  textarea.addEventListener("blur", () => client.update({ [field]: null }));
}
