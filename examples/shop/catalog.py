"""Catalog service (Python, standard library only).

GET /items             all items with prices in $CURRENCY
GET /items/<id>        one item
GET /items/<id>/stock  asks inventory through the gateway -- which refuses: catalog may not
                       call inventory (it is not in catalog's `calls`), so this shows the 403
GET /health            liveness/readiness
"""
import json
import os
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GATEWAY = os.environ.get("GANTRY_GATEWAY_URL", "http://127.0.0.1:8080")

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
        if path.startswith("/items/") and path.endswith("/stock"):
            return self.reply(*self.stock(path[len("/items/"):-len("/stock")]))
        if path.startswith("/items/"):
            item_id = path[len("/items/"):]
            if item_id in ITEMS:
                return self.reply(200, priced(item_id))
            return self.reply(404, {"error": "no such item", "id": item_id})
        return self.reply(404, {"error": "not found", "path": self.path})

    def stock(self, item_id):
        """Call inventory with this instance's credential, and report what the gateway said."""
        token = ""
        try:
            with open(os.environ["GANTRY_TOKEN_FILE"]) as f:
                token = f.read().strip()
        except (KeyError, OSError):
            pass
        req = urllib.request.Request(f"{GATEWAY}/inventory/stock/{item_id}",
                                     headers={"Authorization": "Bearer " + token})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return 200, {"inventory_status": r.status, "stock": json.loads(r.read())}
        except urllib.error.HTTPError as e:
            return 502, {"inventory_status": e.code, "gateway_said": json.loads(e.read() or b"null")}

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
