// Stock y-websocket providers (v3 and v1, with yjs and y-protocols as published), driven
// by tests/test_yjs_js.py over stdin/stdout: one JSON command per line in, one JSON reply
// per line out ({id, ok: true, ...} or {id, ok: false, error}).
//
//   {"id", "cmd": "connect", "peer", "version": "v1"|"v3", "url", "room", "state"?,
//    "params"?}
//       a provider (params: its URL query, such as an identity token); replies once it
//       is synced, with its clientID
//   {"id", "cmd": "set", "peer", "state"}           awareness.setLocalState(state)
//   {"id", "cmd": "states", "peer"}                 the others' states it holds, by clientID
//   {"id", "cmd": "wait", "expect": {peer: {clientID: state|null}}, "timeout"}
//       until every peer holds exactly those states (null: none), plus the server's
//       fields: `presence`, and `user` where the state has none; on timeout, ok: false
//   {"id", "cmd": "log", "peer"}                    the others' states appearing and
//       disappearing, in order, since the last call: [["+", id], ["-", id], ...]
//   {"id", "cmd": "disconnect", "peer"}             provider.destroy(): the clean leave
//   {"id", "cmd": "terminate", "peer", "reconnect"} the socket dies (no close frame); with
//       reconnect, the provider reconnects by itself as after a network blip, and the
//       reply comes once it is synced again
import { createInterface } from 'node:readline'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider as V3 } from 'y-websocket'
import { WebsocketProvider as V1 } from 'y-websocket-v1'

const PROVIDERS = { v1: V1, v3: V3 }
// Each v3 provider listens for the process's exit: many of them are no leak here.
process.setMaxListeners(0)
const peers = new Map()

const peer = (name) => {
  const provider = peers.get(name)
  if (provider === undefined) throw new Error(`no peer ${name}`)
  return provider
}

const others = (provider) => {
  const out = {}
  for (const [clientID, state] of provider.awareness.getStates()) {
    if (clientID !== provider.awareness.clientID) out[clientID] = state
  }
  return out
}

const equal = (a, b) => {
  if (a === b) return true
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false
  if (Array.isArray(a) !== Array.isArray(b)) return false
  const keys = Object.keys(a)
  return keys.length === Object.keys(b).length &&
    keys.every((k) => Object.hasOwn(b, k) && equal(a[k], b[k]))
}

// A state as its owner set it, plus the server's fields and nothing else.
const exactly = (seen, expected) => {
  if (seen === undefined || typeof seen.presence !== 'object') return false
  const { presence, ...rest } = seen
  if (!Object.hasOwn(expected, 'user')) {
    if (typeof rest.user?.name !== 'string') return false
    delete rest.user
  }
  return equal(rest, expected)
}

const synced = (provider) => new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error('not synced within 10 s')), 10000)
  const onSync = (isSynced) => {
    if (!isSynced) return
    clearTimeout(timer)
    provider.off('sync', onSync)
    resolve({})
  }
  provider.on('sync', onSync)
})

const holds = (provider, expected) => Object.entries(expected).every(([clientID, state]) => {
  const seen = provider.awareness.getStates().get(Number(clientID))
  return state === null ? seen === undefined : exactly(seen, state)
})

const until = (providers, check, timeout, what) => new Promise((resolve, reject) => {
  const done = (ok) => {
    clearTimeout(timer)
    for (const p of providers) p.awareness.off('change', onChange)
    ok ? resolve({}) : reject(new Error(what()))
  }
  const onChange = () => { if (check()) done(true) }
  const timer = setTimeout(() => done(check()), timeout * 1000)
  for (const p of providers) p.awareness.on('change', onChange)
  if (check()) done(true)
})

const commands = {
  async connect ({ peer: name, version, url, room, state, params = {} }) {
    const doc = new Y.Doc()
    // disableBc: providers of one process would otherwise talk over a BroadcastChannel.
    const provider = new PROVIDERS[version](url, room, doc, {
      WebSocketPolyfill: WebSocket,
      disableBc: true,
      params
    })
    if (state !== undefined) provider.awareness.setLocalState(state)
    // Which clients appear and disappear. y-protocols reports a client it held before as
    // "updated" when it comes back, so what it holds is tracked here.
    provider.log = []
    const held = new Set()
    provider.awareness.on('change', ({ added, updated, removed }) => {
      for (const c of [...added, ...updated]) {
        if (!held.has(c)) provider.log.push(['+', c])
        held.add(c)
      }
      for (const c of removed) {
        if (held.delete(c)) provider.log.push(['-', c])
      }
    })
    peers.set(name, provider)
    await synced(provider)
    return { clientID: doc.clientID }
  },
  set ({ peer: name, state }) {
    peer(name).awareness.setLocalState(state)
    return {}
  },
  states ({ peer: name }) {
    return { states: others(peer(name)) }
  },
  async wait ({ expect, timeout = 5 }) {
    const providers = Object.keys(expect).map(peer)
    const check = () => Object.entries(expect).every(([name, e]) => holds(peer(name), e))
    const what = () => JSON.stringify({
      expected: expect,
      seen: Object.fromEntries(Object.keys(expect).map((n) => [n, others(peer(n))]))
    }).slice(0, 4000)
    return until(providers, check, timeout, what)
  },
  log ({ peer: name }) {
    const provider = peer(name)
    const log = provider.log
    provider.log = []
    return { log }
  },
  disconnect ({ peer: name }) {
    peer(name).destroy()
    peers.delete(name)
    return {}
  },
  async terminate ({ peer: name, reconnect }) {
    const provider = peer(name)
    provider.shouldConnect = reconnect
    const back = reconnect ? synced(provider) : {}
    provider.ws.terminate()
    return back
  }
}

createInterface({ input: process.stdin }).on('line', async (line) => {
  const { id, cmd, ...args } = JSON.parse(line)
  let reply
  try {
    reply = { id, ok: true, ...(await commands[cmd](args)) }
  } catch (error) {
    reply = { id, ok: false, error: String(error.message ?? error) }
  }
  process.stdout.write(JSON.stringify(reply) + '\n')
}).on('close', () => {
  for (const provider of peers.values()) provider.destroy()
  process.exit(0)
})
