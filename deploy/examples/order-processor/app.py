"""order-processor: a Python service written with Dapr's own SDK (dapr-ext-fastapi), talking to
a `ferry sidecar` exactly as it would to Dapr's daprd.

- Subscribes to topic `orders` of pubsub `pubsub` through `DaprApp.subscribe`: the sidecar
  learns it from `GET /dapr/subscribe` and POSTs each order as a CloudEvent to
  `/events/pubsub/orders`.
- Records each order in memory; `GET /received` lists them (CloudEvent id, source, type,
  topic, pubsubname, data), so tests and people can see what arrived.
- Appends an `OrderReceived` event to the stream `order-<orderId>` of the sidecar's event
  store (`POST /v1.0-ferry/streams/order-<id>/events`, expectedVersion 0, so a redelivered
  order is recognised by its 409). Set ORDER_STREAMS=0 to skip it.

Run: APP_PORT=6001 DAPR_HTTP_PORT=3501 python -m uvicorn app:app --port 6001
(or `python app.py`, which reads APP_PORT).
"""

import json
import os
import re
import threading
import urllib.error
import urllib.request

from dapr.ext.fastapi import DaprApp
from fastapi import Body, FastAPI

APP_PORT = int(os.environ.get("APP_PORT", "6001"))
DAPR_HTTP_PORT = os.environ.get("DAPR_HTTP_PORT", "3500")
SIDECAR = f"http://127.0.0.1:{DAPR_HTTP_PORT}"
STREAMS = os.environ.get("ORDER_STREAMS", "1") != "0"

app = FastAPI(title="order-processor")
dapr_app = DaprApp(app)

_lock = threading.Lock()
_received = []  # one entry per distinct CloudEvent id, in arrival order
_seen = set()
_deliveries = 0  # every POST, redeliveries included


def _append_to_stream(order_id, event):
    """Records the order in its stream. True when the stream has it (201, or 409: it was
    already there from an earlier delivery of the same order)."""
    stream = "order-" + re.sub(r"[^A-Za-z0-9_.:-]", "_", str(order_id))
    body = json.dumps(
        {
            "expectedVersion": 0,
            "events": [
                {
                    "type": "OrderReceived",
                    "data": {"order": event.get("data"), "cloudEventId": event.get("id")},
                }
            ],
        }
    ).encode()
    request = urllib.request.Request(
        f"{SIDECAR}/v1.0-ferry/streams/{stream}/events",
        data=body,
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status == 201
    except urllib.error.HTTPError as e:
        if e.code == 409:
            return True
        print(f"order-processor: appending to {stream}: {e.code} {e.read()!r}", flush=True)
        return False
    except OSError as e:
        print(f"order-processor: appending to {stream}: {e}", flush=True)
        return False


@dapr_app.subscribe(pubsub="pubsub", topic="orders")
def orders(event: dict = Body(...)):
    """One order, as the CloudEvent the sidecar delivers (Dapr's shape)."""
    global _deliveries
    data = event.get("data")
    order_id = data.get("orderId") if isinstance(data, dict) else None
    if STREAMS and order_id is not None and not _append_to_stream(order_id, event):
        # Not recorded: the sidecar delivers it again later (Dapr's RETRY).
        return {"status": "RETRY"}
    with _lock:
        _deliveries += 1
        if event.get("id") not in _seen:
            _seen.add(event.get("id"))
            _received.append(
                {
                    "id": event.get("id"),
                    "source": event.get("source"),
                    "type": event.get("type"),
                    "topic": event.get("topic"),
                    "pubsubname": event.get("pubsubname"),
                    "data": data,
                }
            )
    print(f"order-processor: received order {order_id} (event {event.get('id')})", flush=True)
    return {"status": "SUCCESS"}


@app.get("/received")
def received():
    """What arrived so far, one entry per CloudEvent id."""
    with _lock:
        return list(_received)


@app.get("/stats")
def stats():
    with _lock:
        return {"distinct": len(_received), "deliveries": _deliveries}


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=APP_PORT)
