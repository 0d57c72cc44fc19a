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
