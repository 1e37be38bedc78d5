"""Catalog service (Python, standard library only).

GET /items          all items with prices in $CURRENCY
GET /items/<id>     one item
GET /health         liveness/readiness
"""
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTANCE = os.environ.get("GANTRY_INSTANCE", "catalog")
CURRENCY = os.environ.get("CURRENCY", "USD")
RATES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0}
ITEMS = {
    "kettle": {"name": "Electric kettle", "price_usd": 39.0},
    "mug": {"name": "Stoneware mug", "price_usd": 12.5},
    "teapot": {"name": "Cast-iron teapot", "price_usd": 64.0},
}


def priced(item_id):
    item = ITEMS[item_id]
    rate = RATES.get(CURRENCY, 1.0)
    return {"id": item_id, "name": item["name"], "price": round(item["price_usd"] * rate, 2),
            "currency": CURRENCY, "served_by": INSTANCE}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/health":
            return self.reply(200, {"status": "ok"})
        if path in ("/", "/items"):
            return self.reply(200, [priced(i) for i in ITEMS])
        if path.startswith("/items/"):
            item_id = path[len("/items/"):]
            if item_id in ITEMS:
                return self.reply(200, priced(item_id))
            return self.reply(404, {"error": "no such item", "id": item_id})
        return self.reply(404, {"error": "not found", "path": self.path})

    def log_message(self, fmt, *args):
        if "/health" not in self.path:
            sys.stdout.write("%s %s\n" % (INSTANCE, fmt % args))
            sys.stdout.flush()


if __name__ == "__main__":
    port = int(os.environ["PORT"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"{INSTANCE} serving the catalog in {CURRENCY} on port {port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
