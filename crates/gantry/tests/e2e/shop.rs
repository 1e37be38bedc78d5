//! The example system in examples/shop comes up and answers through the gateway.
use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;

#[test]
fn example_shop_answers_through_the_gateway() {
    let shop = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/shop")
        .canonicalize()
        .unwrap();
    let text = std::fs::read_to_string(shop.join("gantry.toml")).unwrap();
    // Same spec, but on free ports and with the scripts' directory made absolute.
    let mut out = String::new();
    for line in text.lines() {
        let line = line
            .replace("127.0.0.1:8080", "127.0.0.1:0")
            .replace("127.0.0.1:7070", "127.0.0.1:0")
            .replace("127.0.0.1:7072", "127.0.0.1:0");
        out.push_str(&line);
        out.push('\n');
        if line.starts_with("[services.") && !line.contains(".routes") && !line.starts_with("[[") {
            out.push_str(&format!("cwd = {:?}\n", shop.display().to_string()));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("gantry.toml");
    std::fs::write(&spec, out).unwrap();
    let g = Gantry::start_at(dir, spec);
    g.wait_healthy("catalog", 2, Duration::from_secs(30));
    g.wait_healthy("inventory", 1, Duration::from_secs(30));
    g.wait_healthy("orders", 2, Duration::from_secs(30));

    let r = g.get("/orders/quote?item=kettle&qty=2");
    assert_eq!(r.status, 200, "{}", r.body);
    let q = r.json();
    assert_eq!(q["total"], 78.0);
    assert_eq!(q["currency"], "USD");
    // orders reached catalog and inventory through the gateway, spread over catalog instances.
    let catalogs: std::collections::BTreeSet<String> = (0..6)
        .map(|_| {
            g.get("/orders/quote?item=mug&qty=1").json()["served_by"]["catalog"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(catalogs.len(), 2, "{catalogs:?}");

    let r = http(
        g.gateway,
        "POST",
        "/orders",
        &[("content-type", "application/json")],
        Some(r#"{"item":"teapot","qty":3}"#),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let order = r.json();
    assert_eq!(order["published"], true, "{order}");
    // The bus pushed the order to inventory, which prepared its shipment (seen in its output)
    // and acknowledged it: nothing left to deliver.
    let id = order["id"].as_str().unwrap().to_string();
    wait_for("the shipment", Duration::from_secs(20), || {
        let st = g.admin_get("/v1/topics/orders/subscriptions/inventory");
        let logs = g.admin_call("GET", "/v1/logs?service=inventory", None).body;
        (logs.contains(&format!("preparing shipment for order {id}"))
            && st["lag"] == 0
            && st["last_seq"].as_u64() >= Some(1))
        .then_some(())
    });
    // 8 teapots, 3 reserved: orders sees 5 left.
    let q =
        |n: u32| g.get(&format!("/orders/quote?item=teapot&qty={n}")).json()["in_stock"].clone();
    assert_eq!(
        (q(5), q(6)),
        (serde_json::json!(true), serde_json::json!(false))
    );
    let r = post(
        g.gateway,
        "/orders",
        r#"{"item":"teapot","qty":30}"#,
        Duration::from_secs(10),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(g.get("/catalog/items/mug").json()["price"], 12.5);

    // The shop runs under the deny policy. Inventory is internal: outside traffic is refused,
    // and so is catalog, which may not call it (orders may: see the quotes above).
    let r = g.get("/inventory/stock/teapot");
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"], "not_public");
    let r = g.get("/catalog/items/mug/stock");
    assert_eq!(r.status, 502, "{}", r.body);
    let said = r.json();
    assert_eq!(said["inventory_status"], 403, "{said}");
    assert_eq!(said["gateway_said"]["error"], "call_not_allowed", "{said}");
    // A forged identity header from outside is stripped: it does not make anyone orders.
    let r = http(
        g.gateway,
        "GET",
        "/inventory/stock/teapot",
        &[("gantry-auth-service", "orders")],
        None,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
}
