//! zygote's HTTP API as a library: the axum router ([`app`]), request and
//! response types ([`types`]), the OpenAPI document ([`ApiDoc`]), callers
//! and tenants ([`auth`]), and the one error type ([`error::ApiError`]).
//! `zygote daemon` serves it on a Unix socket and, with tokens, on TCP.
//!
//! It must not: hold logic of its own (handlers parse, authorise and call
//! `host::runtime`, which does the work), block the async runtime (runtime
//! calls that wait on guests run on blocking threads), or touch KVM.
#![deny(missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use host::runtime::Runtime;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use utoipa::OpenApi;

pub mod auth;
pub mod client;
pub mod cluster;
pub mod error;
pub mod join;
pub mod peer;
pub mod routes;
pub mod types;

use error::ApiError;

/// Largest request body accepted (413 beyond it).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Labels of the HTTP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route's pattern (`/v1/instances/{id}`), not the raw path.
    pub route: String,
    /// HTTP method.
    pub method: String,
    /// Status code.
    pub status: u16,
}

/// The daemon's HTTP metrics.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    /// Requests by route, method and status.
    pub requests: Family<RouteLabels, Counter>,
    /// Request latency by route, seconds.
    pub latency: Family<RouteLabels, Histogram>,
}

impl HttpMetrics {
    /// Registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = HttpMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.0001, 2.0, 18,
                ))
            }),
        };
        let r = registry.sub_registry_with_prefix("zygote_http");
        r.register(
            "requests",
            "HTTP requests by route and status",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "HTTP request latency by route and status",
            m.latency.clone(),
        );
        m
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The host runtime.
    pub runtime: Arc<Runtime>,
    /// Metrics registry (runtime and HTTP), for `/metrics`.
    pub registry: Arc<Registry>,
    /// HTTP metrics.
    pub http: HttpMetrics,
    /// The bearer token this daemon sends to peer daemons (`--peer-token-file`).
    pub peer_token: Option<String>,
}

/// Runs a blocking runtime call off the async threads.
pub async fn blocking<T, E>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(ApiError::internal(format!("worker failed: {e}"))),
    }
}

/// The OpenAPI document of every route.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "zygote host daemon API",
        description = "Masters (warm, frozen VMs), instances (their copy-on-write clones), exec, console, health, host capacity. On the Unix socket the caller is the host's admin; on TCP send `Authorization: Bearer TOKEN`. Errors are `{\"error\":{\"code\",\"message\"}}`.",
        license(name = "Apache-2.0")
    ),
    paths(
        routes::masters::create, routes::masters::list, routes::masters::get,
        routes::masters::delete, routes::masters::save, routes::masters::load,
        routes::transfer::offer, routes::transfer::memory, routes::transfer::fetch,
        routes::instances::create, routes::instances::list, routes::instances::get,
        routes::instances::delete, routes::instances::ttl, routes::instances::health,
        routes::instances::console,
        routes::exec::exec, routes::exec::exec_ws,
        routes::system::host, routes::system::metrics, routes::system::healthz,
        routes::system::openapi,
    ),
    components(schemas(routes::exec::ExecStart, error::ErrorBody, error::ErrorDetail)),
    modifiers(&BearerAuth),
    tags(
        (name = "masters", description = "Warm, frozen VMs that instances are cloned from"),
        (name = "instances", description = "Clones of masters"),
        (name = "exec", description = "Commands in instances"),
        (name = "host", description = "The host and the daemon"),
    )
)]
pub struct ApiDoc;

pub(crate) struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        doc.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

/// The OpenAPI document as pretty JSON (what `/v1/openapi.json` serves and
/// `docs/api/openapi.json` holds).
pub fn openapi_json() -> String {
    pretty(ApiDoc::openapi())
}

/// An OpenAPI document as pretty JSON with a final newline (the form the
/// checked-in documents have).
pub(crate) fn pretty(doc: utoipa::openapi::OpenApi) -> String {
    let mut s = doc
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}

/// A registry's metrics as a Prometheus (OpenMetrics) text response.
pub(crate) fn metrics_response(
    registry: &Registry,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)
        .map_err(|e| ApiError::internal(format!("encoding metrics: {e}")))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}

pub(crate) async fn count_requests(
    State(m): State<HttpMetrics>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    // Known methods only: any other token would be a new label set each.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m.to_string(),
        _ => "other".to_string(),
    };
    let t0 = Instant::now();
    let resp = next.run(req).await;
    let labels = RouteLabels {
        route,
        method,
        status: resp.status().as_u16(),
    };
    m.requests.get_or_create(&labels).inc();
    m.latency
        .get_or_create(&labels)
        .observe(t0.elapsed().as_secs_f64());
    resp
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("no such route (see /v1/openapi.json)")
}

/// The whole router. The daemon adds an `Extension` of [`auth::Transport`]
/// and of [`auth::SharedTokens`] per listener.
pub fn app(state: AppState) -> Router {
    use routes::{exec, instances, masters, system, transfer};
    let http = state.http.clone();
    Router::new()
        .route("/v1/masters", post(masters::create).get(masters::list))
        .route("/v1/masters:load", post(masters::load))
        .route(
            "/v1/masters/{name}",
            get(masters::get).delete(masters::delete),
        )
        .route("/v1/masters/{name}/snapshot", post(masters::save))
        .route("/v1/masters:fetch", post(transfer::fetch))
        .route("/v1/masters/{name}/snapshot/offer", get(transfer::offer))
        .route("/v1/masters/{name}/snapshot/memory", get(transfer::memory))
        .route(
            "/v1/instances",
            post(instances::create).get(instances::list),
        )
        .route(
            "/v1/instances/{id}",
            get(instances::get).delete(instances::delete),
        )
        .route("/v1/instances/{id}/ttl", post(instances::ttl))
        .route("/v1/instances/{id}/health", get(instances::health))
        .route("/v1/instances/{id}/console", get(instances::console))
        .route("/v1/instances/{id}/exec", post(exec::exec))
        .route("/v1/instances/{id}/exec/ws", get(exec::exec_ws))
        .route("/v1/host", get(system::host))
        .route("/metrics", get(system::metrics))
        .route("/healthz", get(system::healthz))
        .route("/v1/openapi.json", get(system::openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method (see /v1/openapi.json)",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(http, count_requests))
        .with_state(state)
}
