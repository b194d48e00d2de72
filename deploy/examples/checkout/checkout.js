#!/usr/bin/env node
// checkout: a Node.js service (Node 20, no npm packages) that talks to its `ferry sidecar`
// with Dapr's HTTP pub/sub API and Ferry's event store API, through plain fetch.
//
// - Publishes COUNT orders, one every INTERVAL_MS, to topic `orders` of pubsub `pubsub`
//   (POST /v1.0/publish/pubsub/orders, JSON body), keyed by customer
//   (?metadata.partitionKey=customer-N: one customer's orders stay in order).
// - Then reads back the stream of its last order from the event store, where the
//   order-processor recorded it (GET /v1.0-ferry/streams/order-<id>), appends an
//   OrderConfirmed event at the version it read (201), and shows that a second append at
//   the same version is refused (409: optimistic concurrency).
//
// Usage: node checkout.js [--count N] [--interval-ms MS]
// Environment: DAPR_HTTP_PORT (3500), COUNT (20), INTERVAL_MS (1000), STREAM_WAIT_MS (20000).

const args = process.argv.slice(2);
function option(name, env, fallback) {
  const i = args.indexOf(name);
  const text = i >= 0 ? args[i + 1] : process.env[env];
  const value = Number(text ?? fallback);
  if (!Number.isInteger(value) || value < 0) {
    console.error(`checkout: ${name} (or ${env}) must be a whole number, got ${text}`);
    process.exit(2);
  }
  return value;
}

const count = option("--count", "COUNT", 20);
const intervalMs = option("--interval-ms", "INTERVAL_MS", 1000);
const streamWaitMs = option("--stream-wait-ms", "STREAM_WAIT_MS", 20000);
const sidecar = `http://127.0.0.1:${process.env.DAPR_HTTP_PORT || "3500"}`;
// Order ids differ from run to run, so each run's streams are new.
const run = Date.now().toString(36);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function call(method, path, body) {
  const response = await fetch(sidecar + path, {
    method,
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = text;
  }
  return { status: response.status, json };
}

// One publish, tried again while the sidecar is not up yet or does not have the topic yet
// (404 ERR_TOPIC_NOT_FOUND, 503): a refused publish was not accepted, so nothing doubles.
async function publish(order) {
  const path = `/v1.0/publish/pubsub/orders?metadata.partitionKey=${order.customer}`;
  const until = Date.now() + 30000;
  for (;;) {
    let answer;
    try {
      answer = await call("POST", path, order);
    } catch (e) {
      answer = { status: 0, json: String(e.cause ?? e) };
    }
    if (answer.status === 204) return;
    const again = [0, 404, 503].includes(answer.status) && Date.now() < until;
    if (!again) {
      throw new Error(`publishing ${order.orderId}: ${answer.status} ${JSON.stringify(answer.json)}`);
    }
    console.log(`checkout: sidecar not ready (${answer.status}); trying again`);
    await sleep(1000);
  }
}

async function main() {
  console.log(`checkout: publishing ${count} orders to ${sidecar} (pubsub "pubsub", topic "orders")`);
  let last = null;
  for (let n = 1; n <= count; n++) {
    const customer = `customer-${n % 3}`;
    const order = { orderId: `${run}-${n}`, customer, items: ["book"], total: 10 * n };
    await publish(order);
    console.log(`checkout: published order ${order.orderId} for ${customer}`);
    last = order;
    if (n < count) await sleep(intervalMs);
  }
  if (!last) return;

  // The event store: the stream the order-processor appended to when the order arrived.
  const stream = `order-${last.orderId}`;
  console.log(`checkout: reading stream ${stream} from the event store`);
  const until = Date.now() + streamWaitMs;
  let read;
  for (;;) {
    read = await call("GET", `/v1.0-ferry/streams/${stream}`);
    if (read.status === 200 || Date.now() > until) break;
    await sleep(500);
  }
  if (read.status !== 200) {
    console.log(`checkout: stream ${stream} not there after ${streamWaitMs} ms (${read.status} ${JSON.stringify(read.json)}); is the order-processor running?`);
    process.exitCode = 1;
    return;
  }
  for (const e of read.json.events) {
    console.log(`  version ${e.version}: ${e.type} ${JSON.stringify(e.data)}`);
  }
  const version = read.json.version;
  const confirm = { expectedVersion: version, events: [{ type: "OrderConfirmed", data: { by: "checkout" } }] };
  const first = await call("POST", `/v1.0-ferry/streams/${stream}/events`, confirm);
  console.log(`checkout: append OrderConfirmed at expectedVersion ${version}: ${first.status} ${JSON.stringify(first.json)}`);
  const second = await call("POST", `/v1.0-ferry/streams/${stream}/events`, confirm);
  console.log(`checkout: the same append again: ${second.status} ${JSON.stringify(second.json)} (optimistic concurrency)`);
  const after = await call("GET", `/v1.0-ferry/streams/${stream}?fromVersion=1`);
  console.log(`checkout: stream ${stream} is at version ${after.json?.version}:`);
  for (const e of after.json?.events ?? []) {
    console.log(`  version ${e.version}: ${e.type}`);
  }
  if (first.status !== 201 || second.status !== 409) process.exitCode = 1;
}

main().catch((e) => {
  console.error(`checkout: ${e.message}`);
  process.exit(1);
});
