// Stock Yjs clients for the load generator: node stock.mjs < PLAN.json > RESULT.json
//
// Each member is what a JupyterLab tab runs: a Y.Doc and a provider (y-websocket's
// WebsocketProvider, or Hocuspocus's own) whose awareness moves a cursor on an open-loop
// schedule. Stock providers send every awareness change they receive back to the server
// and renew their own state every 15 s; nothing here changes that. The result has the
// shape of the Python workers' (load/clients.py): a latency histogram with the same
// buckets, and what each member saw of the others.
//
// A member may have its own rate (``hz``, 0: it sets one state and stays still) and a
// time to join (``join_at``); ``plan.watch`` names the only sender whose updates count
// for latency (a presenter), and ``plan.storm_end`` splits latency and the bytes clients
// receive into "while members were joining" and after.
import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import WebSocket from "ws";
import * as Y from "yjs";
import { WebsocketProvider } from "y-websocket";
import { HocuspocusProvider, HocuspocusProviderWebsocket } from "@hocuspocus/provider";

const plan = JSON.parse(readFileSync(0, "utf8")); // stdin: the plan, whole
const clock = () => (performance.timeOrigin + performance.now()) / 1000; // wall, in s
const measureFrom = plan.start_at + plan.warmup;
const end = plan.start_at + plan.warmup + plan.duration;
const GROWTH = Math.log(1.01); // load/hist.py's buckets

const latency = { counts: {}, total: 0, max_us: 0 };
const latencyStorm = { counts: {}, total: 0, max_us: 0 };
const bytes = { storm: 0, after: 0 };
const tally = {
  close_codes: {},
  worst_by_second: {},
  latency_storm: latencyStorm,
  bytes_received_storm: 0,
  bytes_received_after: 0,
  sent: 0,
  received: 0,
  errors: 0,
  disconnects: 0,
  joined: 0,
  highest: {},
  sent_by: {},
  first_by: {},
  latency,
};

function record(seconds, at) {
  const histogram = plan.storm_end && at < plan.storm_end ? latencyStorm : latency;
  const us = Math.max(1, Math.floor(seconds * 1e6));
  const bucket = Math.floor(Math.log(us) / GROWTH);
  histogram.counts[bucket] = (histogram.counts[bucket] || 0) + 1;
  histogram.total += 1;
  histogram.max_us = Math.max(histogram.max_us, us);
}

// What the clients receive, counted on their sockets.
class CountingWebSocket extends WebSocket {
  constructor(...args) {
    super(...args);
    this.on("message", (data) => {
      const size = data.length ?? data.byteLength ?? 0;
      if (plan.storm_end && clock() < plan.storm_end) bytes.storm += size;
      else bytes.after += size;
    });
  }
}

function connect(member) {
  const doc = new Y.Doc();
  if (plan.kind === "hocuspocus") {
    const websocketProvider = new HocuspocusProviderWebsocket({
      url: member.server,
      WebSocketPolyfill: CountingWebSocket,
    });
    const provider = new HocuspocusProvider({ websocketProvider, name: member.room, document: doc });
    provider.attach?.();
    return { provider, awareness: provider.awareness, doc, socket: () => websocketProvider };
  }
  const provider = new WebsocketProvider(member.server, member.room, doc, {
    WebSocketPolyfill: CountingWebSocket,
    disableBc: true,
  });
  return { provider, awareness: provider.awareness, doc, socket: () => provider };
}

function join(member) {
  const name = `c${member.index}`;
  const highest = (tally.highest[name] = {});
  const client = connect(member);
  let joined = false;
  const onStatus = ({ status }) => {
    if (status === "connected" && !joined) {
      joined = true;
      tally.joined += 1;
    } else if (status === "disconnected" && joined && clock() < end) {
      tally.disconnects += 1;
    }
  };
  client.provider.on("status", onStatus);
  // Why sockets closed, by close code (a server that refuses or drops clients).
  client.provider.on("connection-close", (event) => {
    const code = String(event?.code ?? "none");
    tally.close_codes[code] = (tally.close_codes[code] || 0) + 1;
  });
  client.awareness.on("change", ({ added, updated }) => {
    const now = clock();
    const states = client.awareness.getStates();
    for (const id of added.concat(updated)) {
      if (id === client.doc.clientID) continue;
      const state = states.get(id);
      const sender = state?.n;
      if (typeof sender !== "string" || sender === name) continue;
      if (Number.isInteger(state.s) && state.s > (highest[sender] ?? -1)) highest[sender] = state.s;
      if (typeof state.t === "number" && state.t >= measureFrom) {
        tally.received += 1;
        if (!plan.watch || sender === plan.watch) {
          record(now - state.t, state.t);
          if (plan.watch) {
            // The worst latency of each second of the run: when do spikes come?
            const second = Math.floor(state.t - plan.start_at);
            tally.worst_by_second[second] = Math.max(tally.worst_by_second[second] || 0, now - state.t);
          }
        }
      }
    }
  });
  const entry = { member, name, client };
  members.push(entry);
  move(entry);
}

const members = [];

function later(fn, at) {
  setTimeout(fn, Math.max(0, (at - clock()) * 1000));
}

function move({ member, name, client }) {
  const hz = member.hz ?? plan.hz;
  if (!hz) {
    client.awareness.setLocalState({ cursor: { x: 0, y: member.index % 500 }, n: name });
    return; // still: the provider only renews this state
  }
  const period = 1 / hz;
  // Spread the phases; one that joins late starts from its join.
  const start = Math.max(plan.start_at, clock()) + Math.random() * period;
  let seq = 0;
  const step = () => {
    const intended = start + seq * period;
    if (intended >= end) return;
    // Open loop: stamped with when it should have gone out, so that a late send counts
    // as latency. Node's timers count whole milliseconds and may fire up to one early:
    // then it is stamped with when it did go out.
    client.awareness.setLocalState({
      cursor: { x: seq % 800, y: member.index % 500 },
      t: Math.min(intended, clock()),
      s: seq,
      n: name,
    });
    if (intended >= measureFrom) {
      tally.sent += 1;
      tally.sent_by[name] = (tally.sent_by[name] || 0) + 1;
      if (!(name in tally.first_by)) tally.first_by[name] = seq;
    }
    seq += 1;
    later(step, start + seq * period);
  };
  later(step, start);
}

for (const member of plan.members) later(() => join(member), member.join_at ?? 0);
setTimeout(() => {
  tally.errors = plan.members.length - tally.joined;
  tally.bytes_received_storm = bytes.storm;
  tally.bytes_received_after = bytes.after;
  process.stdout.write(JSON.stringify(tally));
  for (const { client } of members) client.provider.destroy();
  process.exit(0);
}, Math.max(0, (end + 1 - clock()) * 1000));
