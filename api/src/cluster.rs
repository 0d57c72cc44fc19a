//! The scheduler's HTTP API (`zygote scheduler` serves it): apps declared
//! by users (`/v1/apps`), hosts (`/v1/hosts`, drain), and the daemons'
//! heartbeat (`POST /v1/hosts/{id}/heartbeat`). Same conventions as the
//! daemon's API: bearer tokens on TCP (a tenant sees its own apps, by the
//! names it gave them; hosts are the admin's), `{"error":{"code","message"}}`,
//! `/metrics`, `/healthz`, `/v1/openapi.json`.
//!
//! It also runs the reconcile loop ([`reconcile_loop`]) while this replica
//! leads. Handlers parse, authorise and call [`scheduler::service`]; the
//! store is blocking, so every call runs on a blocking thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use host::runtime::Tenant as HostTenant;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use scheduler::service::{Scheduler, ServiceError, Tenant};
use scheduler::store::{Millis, Store};
use scheduler::wire::{AppBody, AppStatus, Assignment, HostReport, HostView};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::{BearerAuth, HttpMetrics, MAX_BODY_BYTES};

/// The error answers of the scheduler's routes, for its OpenAPI document.
#[derive(utoipa::IntoResponses)]
pub enum SchedulerErrors {
    /// A field out of range, a bad name, host id or constraint.
    #[response(status = 400)]
    BadRequest(#[to_schema] ErrorBody),
    /// No token, or an unknown one.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// Hosts are the admin's: a tenant's token.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such app (for this tenant) or host.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The store kept changing under the request: retry.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The body is over the size limit.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Wrong content type.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// Well-formed JSON that does not fit the body (a wrong type, an
    /// unknown or missing field).
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// The store is unreachable (etcd down): retry.
    #[response(status = 503)]
    StoreUnavailable(ErrorBody),
}

/// The scheduler over any store backend.
pub type Service = Scheduler<dyn Store>;

/// The scheduler's own metrics.
#[derive(Debug, Clone, Default)]
pub struct ClusterMetrics {
    /// Reconcile steps run.
    pub steps: Counter,
    /// Slots placed (new or again).
    pub placed: Counter,
    /// Slot records deleted.
    pub stopped: Counter,
    /// Hosts found lost.
    pub lost: Counter,
    /// Batches that lost a race.
    pub conflicts: Counter,
    /// 1 while this replica leads.
    pub leader: Gauge,
}

impl ClusterMetrics {
    /// Registers them in `registry` under `zygote_scheduler_`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = ClusterMetrics::default();
        let r = registry.sub_registry_with_prefix("zygote_scheduler");
        r.register("reconcile_steps", "Reconcile steps run", m.steps.clone());
        r.register(
            "placed",
            "Instance slots placed, new or again",
            m.placed.clone(),
        );
        r.register(
            "stopped",
            "Instance slot records deleted",
            m.stopped.clone(),
        );
        r.register(
            "hosts_lost",
            "Hosts found lost (lease ran out)",
            m.lost.clone(),
        );
        r.register(
            "conflicts",
            "Reconcile batches that lost a race",
            m.conflicts.clone(),
        );
        r.register("leader", "1 while this replica leads", m.leader.clone());
        m
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct ClusterState {
    /// The service.
    pub service: Arc<Service>,
    /// Metrics registry, for `/metrics`.
    pub registry: Arc<Registry>,
    /// HTTP metrics.
    pub http: HttpMetrics,
    /// The scheduler's metrics.
    pub metrics: ClusterMetrics,
    /// Whether this replica leads (runs the reconcile loop).
    pub leader: Arc<AtomicBool>,
}

/// Now on the wall clock, as the store wants it.
pub fn now() -> Millis {
    Millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let msg = crate::error::chain(&e);
        match &e {
            ServiceError::NotFound { .. } => ApiError::not_found(msg),
            ServiceError::Invalid(_) => ApiError::bad_request(msg),
            ServiceError::Store(scheduler::store::StoreError::Conflict { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", msg)
            }
            ServiceError::Store(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", msg)
            }
        }
    }
}

fn tenant_of(t: &HostTenant) -> Tenant {
    (!t.admin).then(|| t.name.clone())
}

fn admin_only(t: &HostTenant) -> Result<(), ApiError> {
    if t.admin {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "hosts are the cluster admin's: use an admin token",
        ))
    }
}

async fn run<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ApiError> {
    crate::blocking(f).await
}

/// Every app the caller can see.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AppList {
    /// Apps by name.
    pub apps: Vec<AppStatus>,
}

/// Every host.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostList {
    /// Hosts by id.
    pub hosts: Vec<HostView>,
}

/// `POST /v1/apps/{name}/scale`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleBody {
    /// The new instance count (0 to 10000).
    #[schema(maximum = 10000)]
    pub instances: u32,
}

/// Declare an app's desired state (idempotent). 201 when it is new, 200
/// when it existed (changed or not).
#[utoipa::path(put, path = "/v1/apps/{name}", tag = "apps",
    params(("name" = String, Path, description = "App name: 1-24 of `a-z 0-9 -`", pattern = "^[a-z0-9][a-z0-9-]{0,23}$")),
    request_body = AppBody,
    responses((status = 200, description = "Updated (or unchanged)", body = AppStatus),
              (status = 201, description = "Created", body = AppStatus), SchedulerErrors))]
pub async fn put_app(
    State(st): State<ClusterState>,
    Caller(caller): Caller,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<AppBody>, JsonRejection>,
) -> Result<(StatusCode, Json<AppStatus>), ApiError> {
    let Path(name) = name?;
    let Json(body) = body?;
    let t = tenant_of(&caller);
    let svc = st.service.clone();
    let (status, created) = run(move || svc.apply_app(&t, &name, &body, now())).await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(status)))
}

/// The caller's apps: desired vs running per host, shortfalls, events.
#[utoipa::path(get, path = "/v1/apps", tag = "apps",
    responses((status = 200, body = AppList), SchedulerErrors))]
pub async fn list_apps(
    State(st): State<ClusterState>,
    Caller(caller): Caller,
) -> Result<Json<AppList>, ApiError> {
    let t = tenant_of(&caller);
    let svc = st.service.clone();
    let apps = run(move || svc.apps(&t, now())).await?;
    Ok(Json(AppList { apps }))
}

/// One app.
#[utoipa::path(get, path = "/v1/apps/{name}", tag = "apps",
    params(("name" = String, Path, description = "App name: 1-24 of `a-z 0-9 -`", pattern = "^[a-z0-9][a-z0-9-]{0,23}$")),
    responses((status = 200, body = AppStatus), SchedulerErrors))]
pub async fn get_app(
    State(st): State<ClusterState>,
    Caller(caller): Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<AppStatus>, ApiError> {
    let Path(name) = name?;
    let t = tenant_of(&caller);
    let svc = st.service.clone();
    Ok(Json(run(move || svc.app(&t, &name, now())).await?))
}

/// Remove an app: its instances are stopped on every host.
#[utoipa::path(delete, path = "/v1/apps/{name}", tag = "apps",
    params(("name" = String, Path, description = "App name: 1-24 of `a-z 0-9 -`", pattern = "^[a-z0-9][a-z0-9-]{0,23}$")),
    responses((status = 204, description = "Removed; its instances stop"), SchedulerErrors))]
pub async fn delete_app(
    State(st): State<ClusterState>,
    Caller(caller): Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(name) = name?;
    let t = tenant_of(&caller);
    let svc = st.service.clone();
    run(move || svc.delete_app(&t, &name, now())).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Set an app's instance count.
#[utoipa::path(post, path = "/v1/apps/{name}/scale", tag = "apps",
    params(("name" = String, Path, description = "App name: 1-24 of `a-z 0-9 -`", pattern = "^[a-z0-9][a-z0-9-]{0,23}$")),
    request_body = ScaleBody,
    responses((status = 200, body = AppStatus), SchedulerErrors))]
pub async fn scale_app(
    State(st): State<ClusterState>,
    Caller(caller): Caller,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<ScaleBody>, JsonRejection>,
) -> Result<Json<AppStatus>, ApiError> {
    let Path(name) = name?;
    let Json(body) = body?;
    let t = tenant_of(&caller);
    let svc = st.service.clone();
    Ok(Json(
        run(move || svc.scale(&t, &name, body.instances, now())).await?,
    ))
}

/// Every host: capacity, zone, labels, masters held, instances, lease.
#[utoipa::path(get, path = "/v1/hosts", tag = "hosts",
    responses((status = 200, body = HostList), SchedulerErrors))]
pub async fn list_hosts(
    State(st): State<ClusterState>,
    Caller(caller): Caller,
) -> Result<Json<HostList>, ApiError> {
    admin_only(&caller)?;
    let svc = st.service.clone();
    let hosts = run(move || svc.hosts(now())).await?;
    Ok(Json(HostList { hosts }))
}

/// One host.
#[utoipa::path(get, path = "/v1/hosts/{id}", tag = "hosts",
    params(("id" = String, Path, description = "Host id: 1-63 of `A-Z a-z 0-9 . _ -`", pattern = "^[A-Za-z0-9._-]{1,63}$")),
    responses((status = 200, body = HostView), SchedulerErrors))]
pub async fn get_host(
    State(st): State<ClusterState>,
    Caller(caller): Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<HostView>, ApiError> {
    admin_only(&caller)?;
    let Path(id) = id?;
    scheduler::service::check_host_id(&id)?;
    let svc = st.service.clone();
    let hosts = run(move || svc.hosts(now())).await?;
    hosts
        .into_iter()
        .find(|h| h.id == id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found("no such host"))
}

/// Drain a host: its instances move elsewhere, then it stays empty.
#[utoipa::path(post, path = "/v1/hosts/{id}/drain", tag = "hosts",
    params(("id" = String, Path, description = "Host id: 1-63 of `A-Z a-z 0-9 . _ -`", pattern = "^[A-Za-z0-9._-]{1,63}$")),
    responses((status = 200, body = HostView), SchedulerErrors))]
pub async fn drain(
    State(st): State<ClusterState>,
    Caller(caller): Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<HostView>, ApiError> {
    admin_only(&caller)?;
    let Path(id) = id?;
    let svc = st.service.clone();
    Ok(Json(run(move || svc.drain(&id, true, now())).await?))
}

/// End a drain: the host takes new instances again.
#[utoipa::path(post, path = "/v1/hosts/{id}/undrain", tag = "hosts",
    params(("id" = String, Path, description = "Host id: 1-63 of `A-Z a-z 0-9 . _ -`", pattern = "^[A-Za-z0-9._-]{1,63}$")),
    responses((status = 200, body = HostView), SchedulerErrors))]
pub async fn undrain(
    State(st): State<ClusterState>,
    Caller(caller): Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<HostView>, ApiError> {
    admin_only(&caller)?;
    let Path(id) = id?;
    let svc = st.service.clone();
    Ok(Json(run(move || svc.drain(&id, false, now())).await?))
}

/// A daemon's heartbeat: its report in, its lease renewed, every instance
/// slot it must run out (admin token).
#[utoipa::path(post, path = "/v1/hosts/{id}/heartbeat", tag = "hosts",
    params(("id" = String, Path, description = "Host id: 1-63 of `A-Z a-z 0-9 . _ -`", pattern = "^[A-Za-z0-9._-]{1,63}$")),
    request_body = HostReport,
    responses((status = 200, body = Assignment), SchedulerErrors))]
pub async fn heartbeat(
    State(st): State<ClusterState>,
    Caller(caller): Caller,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<HostReport>, JsonRejection>,
) -> Result<Json<Assignment>, ApiError> {
    admin_only(&caller)?;
    let Path(id) = id?;
    let Json(report) = body?;
    let svc = st.service.clone();
    Ok(Json(run(move || svc.heartbeat(&id, &report, now())).await?))
}

/// Prometheus metrics (text format).
#[utoipa::path(get, path = "/metrics", tag = "scheduler",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String), SchedulerErrors))]
pub async fn metrics(
    State(st): State<ClusterState>,
    _caller: Caller,
) -> Result<impl IntoResponse, ApiError> {
    crate::metrics_response(&st.registry)
}

/// Liveness of the scheduler itself (no authentication); says whether this
/// replica leads.
#[utoipa::path(get, path = "/healthz", tag = "scheduler",
    responses((status = 200, description = "The scheduler serves", content_type = "text/plain", body = String)))]
pub async fn healthz(State(st): State<ClusterState>) -> String {
    if st.leader.load(Ordering::Relaxed) {
        "ok leader\n".into()
    } else {
        "ok standby\n".into()
    }
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "scheduler",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json())
}

/// The scheduler API's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "zygote scheduler API",
        description = "Apps (desired state: a master and N instances placed across hosts) and hosts (membership by heartbeat and lease, drain). On TCP send `Authorization: Bearer TOKEN`; a tenant sees its own apps, hosts are the admin's. Errors are `{\"error\":{\"code\",\"message\"}}`.",
        license(name = "Apache-2.0")
    ),
    paths(
        put_app, list_apps, get_app, delete_app, scale_app,
        list_hosts, get_host, drain, undrain, heartbeat,
        metrics, healthz, openapi,
    ),
    components(schemas(crate::error::ErrorBody, crate::error::ErrorDetail)),
    modifiers(&BearerAuth),
    tags(
        (name = "apps", description = "Desired state: instances of a master across hosts"),
        (name = "hosts", description = "Members: capacity, masters, leases, drains; daemons' heartbeats"),
        (name = "scheduler", description = "The scheduler itself"),
    )
)]
pub struct ClusterApiDoc;

/// The OpenAPI document as pretty JSON (`docs/api/scheduler.json`).
pub fn openapi_json() -> String {
    crate::pretty(ClusterApiDoc::openapi())
}

/// The scheduler's router. Add an `Extension` of [`crate::auth::Transport`]
/// and of [`crate::auth::SharedTokens`] per listener, as the daemon does.
pub fn router(state: ClusterState) -> Router {
    let http = state.http.clone();
    Router::new()
        .route("/v1/apps", get(list_apps))
        .route(
            "/v1/apps/{name}",
            get(get_app).put(put_app).delete(delete_app),
        )
        .route("/v1/apps/{name}/scale", post(scale_app))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{id}", get(get_host))
        .route("/v1/hosts/{id}/drain", post(drain))
        .route("/v1/hosts/{id}/undrain", post(undrain))
        .route("/v1/hosts/{id}/heartbeat", post(heartbeat))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/v1/openapi.json", get(openapi))
        .fallback(crate::not_found)
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method (see /v1/openapi.json)",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(http, crate::count_requests))
        .with_state(state)
}

/// Runs a reconcile step when the store changes (its watch: an app
/// declared, a host joined or lost a slot) and at least every `every`,
/// while `leader` is set, until `stop` is; steps are at least 50 ms apart.
/// A failing step (the store unreachable) is logged and retried.
pub async fn reconcile_loop(state: ClusterState, every: Duration, stop: Arc<AtomicBool>) {
    let mut changes = state.service.store().watch();
    let mut led = false;
    while !stop.load(Ordering::Relaxed) {
        let t0 = tokio::time::Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            r = changes.changed() => {
                if r.is_err() {
                    // The store dropped its side: fall back to the timer.
                    tokio::time::sleep(every).await;
                }
            }
        }
        let spent = t0.elapsed();
        if spent < Duration::from_millis(50) {
            tokio::time::sleep(Duration::from_millis(50) - spent).await;
        }
        let leads = st_leads(&state);
        state.metrics.leader.set(i64::from(leads));
        if !leads {
            led = false;
            continue;
        }
        if !led {
            // Just began to lead: hosts get one lease to check in.
            state.service.begin_leading(now());
            led = true;
        }
        let svc = state.service.clone();
        match tokio::task::spawn_blocking(move || svc.reconcile(now())).await {
            Ok(Ok(step)) => {
                let m = &state.metrics;
                m.steps.inc();
                m.placed.inc_by(u64::from(step.placed));
                m.stopped.inc_by(u64::from(step.stopped));
                m.lost.inc_by(u64::from(step.lost));
                m.conflicts.inc_by(u64::from(step.conflicts));
                if step != Default::default() {
                    tracing::info!(
                        placed = step.placed,
                        stopped = step.stopped,
                        lost = step.lost,
                        conflicts = step.conflicts,
                        "reconciled"
                    );
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %crate::error::chain(&e), "reconcile step failed"),
            Err(e) => tracing::error!(error = %e, "reconcile worker failed"),
        }
    }
}

fn st_leads(state: &ClusterState) -> bool {
    state.leader.load(Ordering::Relaxed)
}
