//! Prometheus metrics: request counts and latency histograms by route,
//! method and status code.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds, from 0.5 ms to 10 s.
const BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Installs the process-wide recorder; call once, from `main`.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("http_request_duration_seconds".into()), BUCKETS)?
        .install_recorder()
}

/// Middleware: counts and times every request under its route template.
pub async fn layer(req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    // A watch or a followed log lasts as long as its reader wants: counted,
    // not timed, so the latency histogram is of requests that answer.
    let query = req.uri().query().unwrap_or("");
    let streaming = query.split('&').any(|kv| matches!(kv, "watch=true" | "watch=1" | "follow=true" | "follow=1"));
    let started = Instant::now();
    let resp = next.run(req).await;
    let labels = [("route", route), ("method", method), ("code", resp.status().as_u16().to_string())];
    metrics::counter!("http_requests_total", &labels).increment(1);
    if !streaming {
        metrics::histogram!("http_request_duration_seconds", &labels).record(started.elapsed().as_secs_f64());
    }
    resp
}
