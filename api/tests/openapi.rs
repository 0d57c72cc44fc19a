//! The OpenAPI document checked into `docs/api/openapi.json` is the one the
//! code generates: a route, field or status changed in the code without
//! the reference following fails here. Regenerate with
//! `ZYGOTE_WRITE_OPENAPI=1 cargo test -p api --test openapi`.

use std::path::PathBuf;

fn checked_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/api/openapi.json")
}

#[test]
fn the_checked_in_openapi_document_is_the_generated_one() {
    let generated = api::openapi_json();
    let path = checked_in();
    if std::env::var_os("ZYGOTE_WRITE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write docs/api/openapi.json");
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/api/openapi.json differs from the API the code serves: regenerate it with \
         ZYGOTE_WRITE_OPENAPI=1 cargo test -p api --test openapi, and review the diff"
    );
}

#[test]
fn every_route_of_the_issue_is_documented() {
    let doc: serde_json::Value = serde_json::from_str(&api::openapi_json()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/v1/masters", "post"),
        ("/v1/masters", "get"),
        ("/v1/masters/{name}", "get"),
        ("/v1/masters/{name}", "delete"),
        ("/v1/masters/{name}/snapshot", "post"),
        ("/v1/masters:load", "post"),
        ("/v1/masters:fetch", "post"),
        ("/v1/masters/{name}/snapshot/offer", "get"),
        ("/v1/masters/{name}/snapshot/memory", "get"),
        ("/v1/instances", "post"),
        ("/v1/instances", "get"),
        ("/v1/instances/{id}", "get"),
        ("/v1/instances/{id}", "delete"),
        ("/v1/instances/{id}/ttl", "post"),
        ("/v1/instances/{id}/exec", "post"),
        ("/v1/instances/{id}/exec/ws", "get"),
        ("/v1/instances/{id}/console", "get"),
        ("/v1/instances/{id}/health", "get"),
        ("/v1/host", "get"),
        ("/metrics", "get"),
        ("/healthz", "get"),
        ("/v1/openapi.json", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not in the OpenAPI document"
        );
    }
    let create = &doc["components"]["schemas"]["CreateInstances"]["properties"];
    for field in ["master", "count", "labels", "ttl_s", "on_ttl"] {
        assert!(create.get(field).is_some(), "CreateInstances.{field}");
    }
}

fn checked_in_scheduler() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/api/scheduler.json")
}

#[test]
fn the_checked_in_scheduler_document_is_the_generated_one() {
    let generated = api::cluster::openapi_json();
    let path = checked_in_scheduler();
    if std::env::var_os("ZYGOTE_WRITE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write docs/api/scheduler.json");
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/api/scheduler.json differs from the API the scheduler serves: regenerate it \
         with ZYGOTE_WRITE_OPENAPI=1 cargo test -p api --test openapi, and review the diff"
    );
}

/// The (method, path) pairs `api::cluster::router` serves, read from its
/// source: every `.route("PATH", get(..).put(..))` call.
fn scheduler_routes() -> Vec<(String, String)> {
    let src =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/cluster.rs"))
            .unwrap();
    let body = &src[src.find("pub fn router(").expect("the router")..];
    let body = &body[..body.find("\n}\n").expect("the router's end")];
    let mut routes = Vec::new();
    for call in body.split(".route(").skip(1) {
        let path = call.split('"').nth(1).expect("a route's path").to_string();
        let handlers = &call[call.find(',').expect("a route's handlers")..];
        let handlers = &handlers[..handlers.find("\n        .").unwrap_or(handlers.len())];
        for method in ["get", "put", "post", "delete", "patch"] {
            let call = format!("{method}(");
            let served = handlers.match_indices(&call).any(|(i, _)| {
                !handlers[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            });
            if served {
                routes.push((method.to_string(), path.clone()));
            }
        }
    }
    routes
}

#[test]
fn every_scheduler_route_is_documented() {
    let doc: serde_json::Value = serde_json::from_str(&api::cluster::openapi_json()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    let routes = scheduler_routes();
    assert!(routes.len() >= 13, "read only {routes:?} from the router");
    for (method, path) in &routes {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is served but not in the scheduler's OpenAPI document"
        );
    }
    let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        documented,
        routes.len(),
        "the document has routes the router does not serve ({routes:?})"
    );
    // The store types have real schemas, with the bounds the service checks.
    let s = &doc["components"]["schemas"];
    assert_eq!(
        s["OnHostLoss"]["enum"],
        serde_json::json!(["recreate", "leave"])
    );
    assert_eq!(
        s["Strategy"]["enum"],
        serde_json::json!(["spread", "binpack"])
    );
    assert_eq!(s["SpreadBy"]["enum"], serde_json::json!(["host", "zone"]));
    assert_eq!(
        s["MasterHeld"]["enum"],
        serde_json::json!(["frozen", "files", "pending"])
    );
    assert!(s["MasterSpec"]["properties"].get("memory_mib").is_some());
    assert!(s["HealthSpec"]["properties"].get("interval_s").is_some());
    let master = &s["MasterBody"]["properties"];
    assert_eq!(master["name"]["pattern"], "^[a-z0-9][a-z0-9-]{0,23}$");
    assert_eq!(master["memory_mib"]["minimum"], 16);
    assert_eq!(master["memory_mib"]["maximum"], 1048576);
    assert_eq!(master["vcpus"]["maximum"], 64);
    assert_eq!(s["AppBody"]["properties"]["instances"]["maximum"], 10000);
}
