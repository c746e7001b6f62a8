import { PresenceClient } from "./presence.js";
import { CursorOverlay, SelectionOverlay, trackPointer, trackSelection } from "./overlay.js";

// What the server says about itself in the <body>'s attributes (presence/server/app.py):
// data-auth ("none", "token", "jupyterhub"), data-names ("anonymous" or "hub": hub user
// names), data-user (on a hub: whose page this is). A copy served elsewhere has none.
const served = document.body.dataset;
const onHub = served.auth === "jupyterhub";
const hubNames = onHub && served.names === "hub";
const hubUser = onHub ? served.user || null : null;

// Everyone who opens the page meets in one room, so two windows see each other at once;
// "New private room" makes a hard-to-guess room whose link only its visitors know. On a
// hub, rooms belong to a hub server (<owner>/<server>:<room>) and there is no lobby for
// all: the page's own is that of its user's default server, open to whom they share it with.
const DEFAULT_ROOM = hubUser ? `${hubUser}/:lobby` : "lobby";
const params = new URLSearchParams(location.search);
const room = params.get("room") || DEFAULT_ROOM;
const roomLabel = room !== DEFAULT_ROOM ? room
  : hubUser ? `${room} (your server's lobby)` : onHub ? room : "the lobby (open to all)";
document.querySelector("#room").textContent = roomLabel;
document.querySelector("#new-room").addEventListener("click", () => {
  const name = crypto.randomUUID().slice(0, 13);
  location.search = `?room=${roomQuery(hubUser ? `${hubUser}/:${name}` : name)}`;
});

/** A room name for a query string, readable: "/", ":" and "@" stay ("+" must not). */
function roomQuery(name) {
  return encodeURIComponent(name).replace(/%2F/g, "/").replace(/%3A/g, ":").replace(/%40/g, "@");
}

// The page may be served below a path (--base-path, a hub's /services/presence/).
const url = new URL("rooms/", location.href);
url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
const client = new PresenceClient(room, { url: url.href });
const board = document.querySelector("#board");
const notes = document.querySelector("#notes");
if (onHub) {
  notes.value = notes.value.replace(
    "send the link to a colleague)", "send the link to a colleague you share your server with)");
}
if (hubNames) {
  notes.value = notes.value.replace(
    "You get an anonymous name, initials and a colour",
    "You appear under your hub name, with initials and a colour");
}
new CursorOverlay(client, board);
new SelectionOverlay(client, notes);
trackPointer(client, board);
trackSelection(client, notes);

// The link to this room: on a hub it always names the room (the page without one opens
// the lobby of whoever follows the link, not this one).
const link = document.querySelector("#link");
link.value = onHub && !params.get("room")
  ? `${location.origin}${location.pathname}?room=${roomQuery(room)}` : location.href;
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

// Only while connected: a closed socket hears nothing more of the room, so the list
// shows nobody rather than people who may have left (the client empties its members at
// every close, and the overlays their pointers and selections).
function renderMembers() {
  const list = document.querySelector("#members");
  const items = [];
  if (client.status === "open") {
    if (client.me) items.push(memberItem(client.me, "you"));
    for (const m of client.members.values()) items.push(memberItem(m, m.idle ? "idle" : "active"));
  }
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

/** A paragraph of text and links: parts are strings, or [text, href] for a link. */
function paragraph(className, ...parts) {
  const p = document.createElement("p");
  if (className) p.className = className;
  for (const part of parts) {
    if (typeof part === "string") { p.append(part); continue; }
    const [text, href, cls] = part;
    const a = document.createElement("a");
    a.textContent = text;
    a.href = href;
    if (cls) a.className = cls;
    p.append(a);
  }
  return p;
}

// The client gave up: the server refused this page (4401, 4403, 1008) or the service
// closed for good. Say why, with the server's words, and what to do next.
function showStopped({ code, reason }) {
  const notice = document.querySelector("#notice");
  const why = reason || `closed with code ${code}`;
  const here = location.pathname + location.search;
  const ownLobby = hubUser && room !== DEFAULT_ROOM
    ? [["open your own server's lobby", `?room=${roomQuery(DEFAULT_ROOM)}`]] : [];
  let title, next;
  if (code === 4401 && onHub) {
    title = why.startsWith("access revoked") ? "Your login is no longer valid."
      : "You are not logged in.";
    const login = new URL("login", location.href);
    login.search = `?next=${encodeURIComponent(here)}`;
    next = paragraph("next", ["Log in", login.href, "button login"]);
  } else if (code === 4403 && onHub && why.startsWith("this service takes no login cookie")) {
    title = "This hub does not let presence's pages use your login.";
    next = paragraph("next", "Other users' servers serve pages of this hub's address too, "
      + "so presence does not take the login cookie on its connections. An administrator "
      + "can allow it where users' servers have addresses of their own (per-user "
      + "subdomains): --jupyterhub-allow-websocket-cookie.");
  } else if (code === 4403 && onHub) {
    title = why.startsWith("access revoked") ? "Your access to this room was revoked."
      : "You may not enter this room.";
    const [, owner, server] = /^([^/]+)\/([^/:]*):./s.exec(room) ?? [];
    if (owner === undefined) {
      next = paragraph("next", "Rooms here belong to a hub server: name them ",
        "<owner>/<server>:<room>", ...(ownLobby.length ? [", or ", ...ownLobby] : []), ".");
    } else if (owner !== hubUser) {
      next = paragraph("next", `Next: ask the owner, ${owner}, to share their server `
        + `${owner}/${server} with you, then reload this page`,
        ...(ownLobby.length ? [", or ", ...ownLobby] : []), ".");
    } else {
      next = paragraph("next", "Next: reload this page to try again.");
    }
  } else if (code === 4401 || code === 4403) {
    title = "This service needs an access token for its rooms.";
    next = paragraph("next", "This demo page has none: see the service's docs (Access control).");
  } else if (code === 1008) {
    title = "The service refused this page.";
    next = paragraph("next", "Next: fix what it says, then ", ["reload this page", here], ".");
  } else {
    title = "Disconnected.";
    next = paragraph("next", ["Reload this page", here], " to connect again.");
  }
  const head = document.createElement("strong");
  head.textContent = title;
  const said = document.createElement("p");
  said.className = "reason";
  said.textContent = why;
  notice.replaceChildren(head, said, next);
  notice.dataset.code = String(code);
  notice.hidden = false;
}

for (const type of ["welcome", "me"]) client.addEventListener(type, () => { renderMe(); renderMembers(); });
for (const type of ["join", "leave", "idle", "active"]) client.addEventListener(type, renderMembers);
client.addEventListener("status", (e) => {
  const shown = e.detail.status === "closed" && !e.detail.retry ? "stopped" : e.detail.status;
  const text = {
    connecting: "connecting…", open: "connected", closed: "reconnecting…", stopped: "not connected",
  }[shown];
  const status = document.querySelector("#status");
  status.textContent = text;
  status.dataset.status = shown;
  renderMembers();
});
client.addEventListener("stopped", (e) => showStopped(e.detail));
window.presence = client; // for the curious, and for the browser tests
