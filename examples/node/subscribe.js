#!/usr/bin/env node
// Subscribe to one pair's books on the krakenfeed bus and print best bid and ask.
//
//   cd examples/node && npm ci
//   node subscribe.js <endpoint> [pair] [count]
//   node subscribe.js tcp://127.0.0.1:23456 BTC/USD 10
//
// <endpoint> is the bus's JSON PUB socket: tcp://127.0.0.1:<[bus] json_port> (a bare
// port number is taken as that), or ipc://<run dir>/<namespace>.bus.json.
// `python -m ingest --check-config` prints the port in effect ("bus.json_port in
// effect: N"). pair defaults to BTC/USD, count to 10 (0 = run until Ctrl-C).
//
// The wire format (docs/events.md): one ZMQ frame per message, the topic, one space,
// then a JSON envelope {"v", "topic", "epoch", "seq", "pub_ns", "type", "event"}.
// Prices and quantities are decimal strings: print or parse them as such, never as
// floats. epoch and the *_ns fields exceed 2^53, so JSON.parse would round them; this
// example reads epoch from the text and only compares it for equality.

"use strict"

const zmq = require("zeromq")

function usage() {
  console.error("usage: node subscribe.js <endpoint|port> [pair=BTC/USD] [count=10]")
  process.exit(2)
}

function level(side) {
  return side.length ? `${side[0][0]} x ${side[0][1]}` : "- x -"
}

async function main() {
  const [endpointArg, pair = "BTC/USD", countArg = "10"] = process.argv.slice(2)
  if (!endpointArg || !/^\d+$/.test(countArg)) usage()
  const endpoint = /^\d+$/.test(endpointArg) ? `tcp://127.0.0.1:${endpointArg}` : endpointArg
  const count = Number.parseInt(countArg, 10)
  const topic = `book.${pair}`

  const sock = new zmq.Subscriber({ linger: 0 })
  // The trailing space makes the prefix match exactly this topic: "book.BTC/USD "
  // never matches book.BTC/USDT. ("book." alone would get every pair's books.)
  sock.subscribe(`${topic} `)
  sock.connect(endpoint)
  console.error(`subscribe.js: ${topic} on ${endpoint}`)

  let last = null // {epoch, seq} of the previous message: loss and restart detection
  let printed = 0
  for await (const [frame] of sock) {
    const text = frame.toString("utf8")
    const payload = text.slice(text.indexOf(" ") + 1)
    const epoch = /"epoch":(\d+)/.exec(payload)[1] // exact, as a string
    const env = JSON.parse(payload)
    if (env.topic !== topic || env.type !== "MarketDataL2Event") continue
    if (last && last.epoch !== epoch) {
      console.error("subscribe.js: the bus restarted (new epoch); seq starts again")
    } else if (last && env.seq !== last.seq + 1) {
      console.error(`subscribe.js: lost ${env.seq - last.seq - 1} message(s) (seq jump)`)
    }
    last = { epoch, seq: env.seq }
    const ev = env.event
    console.log(`${ev.pair}  bid ${level(ev.bids)}  ask ${level(ev.asks)}  seq ${env.seq}`)
    printed += 1
    if (count && printed >= count) break
  }
  sock.close()
}

main().catch((err) => {
  console.error(`subscribe.js: ${err.message || err}`)
  process.exit(1)
})
