// Inventory service (Node.js, no packages).
//
// GET  /stock/<id>                 units available
// POST /reserve {"item", "qty"}    take units out of stock (409 if not enough)
// GET  /health
'use strict';
const http = require('http');

const instance = process.env.GANTRY_INSTANCE || 'inventory';
const stock = { kettle: 25, mug: 200, teapot: 8 };

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
  reply(res, 404, { error: 'not found', path });
});

server.keepAliveTimeout = 65000;
server.listen(Number(process.env.PORT), '127.0.0.1', () => {
  console.log(`${instance} tracking stock on port ${process.env.PORT}`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
