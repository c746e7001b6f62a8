import { PresenceClient } from "./presence.js";
import { CursorOverlay, SelectionOverlay, trackPointer, trackSelection } from "./overlay.js";

// Everyone who opens the page meets in one room, so two windows see each other at once;
// "New private room" makes a hard-to-guess room whose link only its visitors know.
const DEFAULT_ROOM = "lobby";
const params = new URLSearchParams(location.search);
const room = params.get("room") || DEFAULT_ROOM;
document.querySelector("#room").textContent = room === DEFAULT_ROOM ? "the lobby (open to all)" : room;
document.querySelector("#new-room").addEventListener("click", () => {
  location.search = `?room=${crypto.randomUUID().slice(0, 13)}`;
});

// The page may be served below a path (--base-path, a hub's /services/presence/).
const url = new URL("rooms/", location.href);
url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
const client = new PresenceClient(room, { url: url.href });
const board = document.querySelector("#board");
const notes = document.querySelector("#notes");
new CursorOverlay(client, board);
new SelectionOverlay(client, notes);
trackPointer(client, board);
trackSelection(client, notes);

const link = document.querySelector("#link");
link.value = location.href;
document.querySelector("#copy").addEventListener("click", async () => {
  await navigator.clipboard?.writeText(link.value);
  document.querySelector("#copy").textContent = "Copied";
  setTimeout(() => { document.querySelector("#copy").textContent = "Copy link"; }, 1500);
});

function avatar(user, extra = "") {
  const el = document.createElement("span");
  el.className = `avatar ${extra}`;
  el.style.background = user.color;
  el.style.color = user.text_color;
  el.textContent = user.initials;
  el.title = user.name;
  return el;
}

function renderMe() {
  const me = document.querySelector("#me");
  if (!client.me) return;
  const name = document.createElement("span");
  name.className = "me-name";
  name.textContent = client.me.user.name;
  me.replaceChildren(avatar(client.me.user), name);
  me.dataset.name = client.me.user.name;
  me.dataset.color = client.me.user.color;
}

function renderMembers() {
  const list = document.querySelector("#members");
  const items = [];
  if (client.me) items.push(memberItem(client.me, "you"));
  for (const m of client.members.values()) items.push(memberItem(m, m.idle ? "idle" : "active"));
  list.replaceChildren(...items);
  document.querySelector("#count").textContent = String(items.length);
}

function memberItem(member, note) {
  const li = document.createElement("li");
  li.dataset.member = member.id;
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = member.user.name;
  const tag = document.createElement("span");
  tag.className = `tag ${note}`;
  tag.textContent = note;
  li.append(avatar(member.user), name, tag);
  return li;
}

for (const type of ["welcome", "me"]) client.addEventListener(type, () => { renderMe(); renderMembers(); });
for (const type of ["join", "leave", "idle", "active"]) client.addEventListener(type, renderMembers);
client.addEventListener("status", (e) => {
  const text = { connecting: "connecting…", open: "connected", closed: "reconnecting…" }[e.detail.status];
  const status = document.querySelector("#status");
  status.textContent = text;
  status.dataset.status = e.detail.status;
});
window.presence = client; // for the curious, and for the browser tests
