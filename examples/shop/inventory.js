// Inventory service (Node.js, no packages).
//
// GET  /stock/<id>                 units available
// POST /reserve {"item", "qty"}    take units out of stock (409 if not enough)
// POST /events/orders              an `order.placed` CloudEvent from the bus (binary mode):
//                                  a shipment to prepare (each order once, however often sent)
// GET  /shipments                  shipments prepared so far
// GET  /health
'use strict';
const http = require('http');

const instance = process.env.GANTRY_INSTANCE || 'inventory';
const stock = { kettle: 25, mug: 200, teapot: 8 };
const shipments = [];
const seen = new Set();

function reply(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) });
  res.end(data);
}

const server = http.createServer((req, res) => {
  const path = req.url.split('?')[0];
  if (path === '/health') return reply(res, 200, { status: 'ok' });
  if (req.method === 'GET' && path.startsWith('/stock/')) {
    const id = decodeURIComponent(path.slice('/stock/'.length));
    if (!(id in stock)) return reply(res, 404, { error: 'no such item', id });
    return reply(res, 200, { id, available: stock[id], served_by: instance });
  }
  if (req.method === 'POST' && path === '/reserve') {
    let body = '';
    req.on('data', (c) => { body += c; if (body.length > 65536) req.destroy(); });
    req.on('end', () => {
      let item, qty;
      try { ({ item, qty } = JSON.parse(body)); } catch (e) { return reply(res, 400, { error: 'invalid JSON' }); }
      qty = Number(qty);
      if (!(item in stock) || !Number.isInteger(qty) || qty < 1) return reply(res, 400, { error: 'expected {"item": ID, "qty": N>0}' });
      if (stock[item] < qty) return reply(res, 409, { error: 'not enough stock', available: stock[item] });
      stock[item] -= qty;
      console.log(`${instance} reserved ${qty} x ${item}, ${stock[item]} left`);
      return reply(res, 200, { item, qty, left: stock[item], served_by: instance });
    });
    return;
  }
  if (req.method === 'POST' && path === '/events/orders') {
    let body = '';
    req.on('data', (c) => { body += c; if (body.length > 65536) req.destroy(); });
    req.on('end', () => {
      const id = req.headers['ce-id'];
      if (req.headers['ce-type'] !== 'order.placed' || !id) return reply(res, 400, { error: 'expected an order.placed CloudEvent' });
      let order;
      try { order = JSON.parse(body); } catch (e) { return reply(res, 400, { error: 'invalid JSON' }); }
      // At-least-once delivery: the same event may come again; handle it once.
      if (!seen.has(id)) {
        seen.add(id);
        shipments.push({ order: id, item: order.item, qty: order.qty, attempt: Number(req.headers['gantry-delivery-attempt'] || 1) });
        console.log(`${instance} preparing shipment for order ${id}: ${order.qty} x ${order.item}`);
      }
      res.writeHead(204);
      res.end();
    });
    return;
  }
  if (req.method === 'GET' && path === '/shipments') return reply(res, 200, { shipments, served_by: instance });
  reply(res, 404, { error: 'not found', path });
});

server.keepAliveTimeout = 65000;
server.listen(Number(process.env.PORT), '127.0.0.1', () => {
  console.log(`${instance} tracking stock on port ${process.env.PORT}`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
