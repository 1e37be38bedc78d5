"""Orders service (Python, standard library only).

It calls catalog and inventory *through the Gantry gateway* ($GANTRY_GATEWAY_URL), so every call
is discovered and load-balanced by Gantry. Each call carries the instance's workload credential
(the token in $GANTRY_TOKEN_FILE, which Gantry keeps fresh): the system runs under
`service_policy = "deny"`, and the gateway lets orders reach only the services in its `calls`.

GET  /orders                      orders placed so far (by this instance)
GET  /orders/quote?item=ID&qty=N  price and stock for an item
POST /orders  {"item": ID, "qty": N}   reserve stock and place an order
GET  /health

A placed order is published to the bus's `orders` topic as a CloudEvent (`order.placed`, its
id the order's, so a retried publish is not stored twice); inventory subscribes and prepares
the shipment. Publishing goes through the gateway too ($GANTRY_BUS_URL, the bus's address on
it), with the same credential.
"""
import json
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

INSTANCE = os.environ.get("GANTRY_INSTANCE", "orders")
GATEWAY = os.environ.get("GANTRY_GATEWAY_URL", "http://127.0.0.1:8080")
BUS = os.environ.get("GANTRY_BUS_URL", GATEWAY + "/_gantry/topics")
ORDERS = []
LOCK = threading.Lock()


def credential():
    """The current workload token (re-read on every call: Gantry renews the file)."""
    path = os.environ.get("GANTRY_TOKEN_FILE")
    if path:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            pass
    return os.environ.get("GANTRY_TOKEN", "")


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    token = credential()
    if token:
        headers["Authorization"] = "Bearer " + token
    req = urllib.request.Request(GATEWAY + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None


def publish(order):
    """The order as a CloudEvent in binary mode; True once the bus holds it durably."""
    headers = {
        "Content-Type": "application/json",
        "ce-specversion": "1.0",
        "ce-id": order["id"],
        "ce-source": "/orders/" + INSTANCE,
        "ce-type": "order.placed",
        # Orders of one item are handled in order (the bus's ordering key).
        "ce-partitionkey": order["item"],
    }
    token = credential()
    if token:
        headers["Authorization"] = "Bearer " + token
    data = json.dumps(order).encode()
    for _ in range(3):
        req = urllib.request.Request(BUS + "/orders/messages", data=data,
                                     method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 201:
                    return True
        except (urllib.error.URLError, OSError) as e:
            print(f"{INSTANCE} publishing order {order['id']} failed: {e}", flush=True)
    return False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def quote(self, item, qty):
        st, product = call("GET", f"/catalog/items/{item}")
        if st != 200:
            return st, {"error": "catalog", "detail": product}
        st, stock = call("GET", f"/inventory/stock/{item}")
        if st != 200:
            return st, {"error": "inventory", "detail": stock}
        return 200, {
            "item": item, "qty": qty, "unit_price": product["price"],
            "total": round(product["price"] * qty, 2), "currency": product["currency"],
            "in_stock": stock["available"] >= qty,
            "served_by": {"orders": INSTANCE, "catalog": product["served_by"],
                          "inventory": stock["served_by"]},
        }

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/health":
            return self.reply(200, {"status": "ok"})
        if url.path in ("/orders", "/orders/"):
            with LOCK:
                return self.reply(200, {"served_by": INSTANCE, "orders": list(ORDERS)})
        if url.path == "/orders/quote":
            q = parse_qs(url.query)
            item = q.get("item", ["kettle"])[0]
            try:
                qty = int(q.get("qty", ["1"])[0])
            except ValueError:
                return self.reply(400, {"error": "qty must be a number"})
            return self.reply(*self.quote(item, qty))
        return self.reply(404, {"error": "not found", "path": self.path})

    def do_POST(self):
        if urlparse(self.path).path not in ("/orders", "/orders/"):
            return self.reply(404, {"error": "not found"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            item, qty = str(body["item"]), int(body.get("qty", 1))
        except (ValueError, KeyError, TypeError):
            return self.reply(400, {"error": "expected JSON {\"item\": ID, \"qty\": N}"})
        st, quote = self.quote(item, qty)
        if st != 200:
            return self.reply(st, quote)
        st, res = call("POST", "/inventory/reserve", {"item": item, "qty": qty})
        if st != 200:
            return self.reply(409 if st == 409 else 502, {"error": "reservation failed", "detail": res})
        with LOCK:
            order = {"id": f"{INSTANCE}-{len(ORDERS) + 1}", **quote}
            ORDERS.append(order)
        print(f"{INSTANCE} placed order {order['id']}: {qty} x {item}", flush=True)
        order["published"] = publish(order)
        return self.reply(201, order)

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    port = int(os.environ["PORT"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"{INSTANCE} taking orders on port {port}, calling services via {GATEWAY}", flush=True)
    server.serve_forever()
    print(f"{INSTANCE} stopped", flush=True)
