// A client for the presence service's JSON protocol (docs/protocol.md). No build step:
//
//   import { PresenceClient } from "/static/presence.js";
//   const client = new PresenceClient("my-room");
//   client.addEventListener("update", (e) => console.log(e.detail.member));
//   client.update({ cursor: { x: 10, y: 20 } });
//
// Events (CustomEvent, details in `event.detail`): "welcome" {me, members}, "join",
// "update", "idle", "active" and "leave" {member}, "me" {me} (own identity changed),
// "status" {status: "connecting" | "open" | "closed", code, reason, retry} (retry: false
// once the client has given up), and "stopped" {code, reason} when it gives up: the
// server refused it (see NO_RETRY), or close() was called. `client.stopped` keeps that
// detail (null while the client is connected or reconnecting).
//
// At every close, whatever the code, the others leave ("leave" for each of them, and
// `client.members` is empty): nobody is shown whom the client no longer hears about.

// Closes that reconnecting will not mend: our own bug (1003, 1007, 1009), a refusal by
// policy (1008), a room this user may not enter (4403: not shared with them, a share
// revoked, a room token for another room or only to view). 1008 after an "invalid
// identity token" is retried, as someone new: that cause is gone.
const NO_RETRY = new Set([1003, 1007, 1008, 1009, 4403]);
// No, an invalid or an expired token (a room token; a hub login): retried only when
// options.accessToken is a function, which is asked for a new token.
const TOKEN_REFUSED = 4401;
const POLICY = 1008;

export class PresenceClient extends EventTarget {
  /**
   * @param {string} room
   * @param {object} [options]
   * @param {string} [options.url] WebSocket base, default: this page's host + "/rooms/"
   * @param {number} [options.rate] most updates per second (default: one per animation frame)
   * @param {string} [options.storageKey] where the identity token is kept
   * @param {string | ((room: string) => Promise<string>)} [options.accessToken] the room
   *   token, for a service run with --auth token: a function is asked for a fresh one
   *   at every connection, so that an expired token (close 4401) is replaced; a string
   *   is used as is, and the client stops when it is refused
   */
  constructor(room, options = {}) {
    super();
    this.room = room;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    this.base = options.url ?? `${scheme}//${location.host}/rooms/`;
    this.rate = options.rate ?? null;
    this.storageKey = options.storageKey ?? "presence:token";
    this.accessToken = options.accessToken ?? null;
    this.me = null;
    this.members = new Map(); // id -> {id, user, state, idle}
    this.timing = { idle_after: 3, expire_after: 30, heartbeat_interval: 10 };
    this.status = "closed";
    this._state = {}; // our full state, re-sent after a reconnect
    this._pending = null; // fields changed since the last send
    this._flushScheduled = false;
    this._lastSent = 0;
    this._retries = 0;
    this._closed = false;
    this._identityRefused = false; // the server said our identity token is invalid
    this.stopped = null; // {code, reason} once the client has given up
    this._socket = null;
    this._heartbeat = null;
    this._connect();
  }

  /** Merge fields into our state (null removes a field); sent at most once per frame. */
  update(fields) {
    Object.assign(this._state, fields);
    for (const [k, v] of Object.entries(fields)) if (v === null) delete this._state[k];
    this._pending = Object.assign(this._pending ?? {}, fields);
    this._scheduleFlush();
  }

  close() {
    this._closed = true;
    clearInterval(this._heartbeat);
    this._socket?.close(1000, "bye");
  }

  get token() {
    try { return localStorage.getItem(this.storageKey); } catch { return null; }
  }

  set token(value) {
    try {
      if (value) localStorage.setItem(this.storageKey, value);
      else localStorage.removeItem(this.storageKey);
    } catch { /* storage disabled: identity lasts for this page only */ }
  }

  async _connect() {
    this._setStatus("connecting");
    const params = new URLSearchParams();
    if (this.token) params.set("token", this.token);
    let access = this.accessToken;
    if (typeof access === "function") {
      try {
        access = await access(this.room);
      } catch (error) {
        console.warn(`presence: no room token: ${error}`);
        return this._onClose({ code: TOKEN_REFUSED, reason: "no room token" });
      }
    }
    if (access) params.set("access_token", access);
    if (this._closed) return;
    const query = params.toString();
    const url = this.base + encodeURIComponent(this.room) + (query ? `?${query}` : "");
    const socket = new WebSocket(url);
    this._socket = socket;
    socket.onmessage = (e) => this._receive(JSON.parse(e.data));
    socket.onclose = (e) => this._onClose(e);
  }

  _onClose(event) {
    clearInterval(this._heartbeat);
    const { code, reason } = event;
    const left = [...this.members.values()];
    this.members.clear();
    for (const member of left) this._emit("leave", { member });
    let retry = !this._closed && !NO_RETRY.has(code);
    if (code === POLICY && this._identityRefused) {
      this.token = null; // reconnect as someone new
      retry = !this._closed;
    }
    this._identityRefused = false;
    // A refused room token given as a string would be refused again, and so would a
    // hub login's (the page must log in again).
    if (code === TOKEN_REFUSED && typeof this.accessToken !== "function") retry = false;
    this._setStatus("closed", code, reason, retry);
    if (!retry) {
      this.stopped = { code, reason };
      this._emit("stopped", this.stopped);
      return;
    }
    // Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... 10 s.
    const delay = Math.min(10000, 500 * 2 ** this._retries) * (0.5 + Math.random() / 2);
    this._retries += 1;
    setTimeout(() => this._connect(), delay);
  }

  _receive(message) {
    switch (message.type) {
      case "welcome": {
        this._retries = 0;
        this.token = message.token;
        this.me = message.you;
        this.timing = message.timing;
        this.members = new Map(message.members.map((m) => [m.id, m]));
        this._setStatus("open");
        this._emit("welcome", { me: this.me, members: [...this.members.values()] });
        if (Object.keys(this._state).length) {
          this._pending = { ...this._state }; // a new member: send everything again
          this._scheduleFlush();
        }
        clearInterval(this._heartbeat);
        this._heartbeat = setInterval(() => this._beat(), this.timing.heartbeat_interval * 1000);
        break;
      }
      case "join":
        for (const member of message.members) {
          if (member.id === this.me?.id) {
            this.me = member;
            this._emit("me", { me: member });
          } else {
            this.members.set(member.id, member);
            this._emit("join", { member });
          }
        }
        break;
      case "update":
        for (const { id, state } of message.updates) {
          const member = this.members.get(id);
          if (!member) continue;
          for (const [k, v] of Object.entries(state)) {
            if (v === null) delete member.state[k];
            else member.state[k] = v;
          }
          this._emit("update", { member });
        }
        break;
      case "idle":
      case "active":
        for (const id of message.ids) {
          const member = this.members.get(id);
          if (!member) continue;
          member.idle = message.type === "idle";
          this._emit(message.type, { member });
        }
        break;
      case "leave":
        for (const id of message.ids) {
          const member = this.members.get(id);
          if (!member) continue;
          this.members.delete(id);
          this._emit("leave", { member });
        }
        break;
      case "error":
        // Our identity token (then the server closes with 1008); the same code names a
        // refused room or hub token (closed with 4401): that one is no reason to forget
        // who we are. Decided at the close.
        if (message.code === "invalid_token") this._identityRefused = true;
        console.warn(`presence: ${message.code}: ${message.message}`);
        break;
    }
  }

  _scheduleFlush() {
    if (this._flushScheduled) return;
    this._flushScheduled = true;
    const wait = this.rate ? Math.max(0, 1000 / this.rate - (performance.now() - this._lastSent)) : 0;
    const run = () => { this._flushScheduled = false; this._flush(); };
    if (this.rate || document.hidden) setTimeout(run, wait);
    else requestAnimationFrame(run);
  }

  _flush() {
    if (!this._pending || this._socket?.readyState !== WebSocket.OPEN || this.status !== "open") return;
    this._socket.send(JSON.stringify({ type: "update", state: this._pending }));
    this._pending = null;
    this._lastSent = performance.now();
  }

  _beat() {
    // Only while still: an update is a heartbeat too.
    if (performance.now() - this._lastSent < this.timing.heartbeat_interval * 1000) return;
    if (this._socket?.readyState === WebSocket.OPEN) {
      this._socket.send('{"type":"heartbeat"}');
      this._lastSent = performance.now();
    }
  }

  _setStatus(status, code, reason, retry = true) {
    this.status = status;
    this._emit("status", { status, code, reason, retry });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
