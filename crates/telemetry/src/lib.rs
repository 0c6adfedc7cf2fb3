//! How every nexus process logs and traces: JSON lines on stderr (level
//! from `RUST_LOG`), and, when an OTLP endpoint is configured, every span
//! (an apiserver request, a reconcile, an agent request) exported to it as
//! OpenTelemetry traces over OTLP/HTTP with JSON bodies. Off by default.
//!
//! Each exported span carries the `request_id` attribute the logs carry,
//! so one user's request is found across processes by that id.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// What [`init`] could not set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the OTLP endpoint {endpoint:?} is not an http:// or https:// URL")]
    BadEndpoint { endpoint: String },
    #[error("building the OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
}

/// Keeps span export running; dropping it flushes what is queued.
#[derive(Debug, Default)]
pub struct Guard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// The URL spans are posted to: `endpoint` as given when it names the
/// traces path, else the collector's base URL with `/v1/traces`.
pub fn traces_url(endpoint: &str) -> Result<String, TelemetryError> {
    let e = endpoint.trim();
    if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() <= "https://".len() {
        return Err(TelemetryError::BadEndpoint { endpoint: endpoint.to_string() });
    }
    Ok(if e.ends_with("/v1/traces") { e.to_string() } else { format!("{}/v1/traces", e.trim_end_matches('/')) })
}

/// Installs the process' subscriber: JSON logs filtered by `RUST_LOG`
/// (else `default_filter`), and span export to `otlp_endpoint` when given,
/// as service `service`. Call once, first thing in `main`; keep the guard.
pub fn init(service: &'static str, default_filter: &str, otlp_endpoint: Option<&str>) -> Result<Guard, TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr);
    let Some(endpoint) = otlp_endpoint.filter(|e| !e.trim().is_empty()) else {
        tracing_subscriber::registry().with(filter).with(logs).init();
        return Ok(Guard::default());
    };
    let url = traces_url(endpoint)?;
    // The exporter's HTTP client uses rustls with the process' default
    // provider; nexus speaks TLS with ring everywhere.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
        .with_endpoint(url.clone())
        .build()
        .map_err(|e| TelemetryError::Exporter { endpoint: url.clone(), message: e.to_string() })?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let traces = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
    tracing_subscriber::registry().with(filter).with(logs).with(traces).init();
    tracing::info!(endpoint = %url, "exporting spans over OTLP/HTTP");
    Ok(Guard { provider: Some(provider) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_become_the_traces_url() {
        assert_eq!(traces_url("http://otel:4318").unwrap(), "http://otel:4318/v1/traces");
        assert_eq!(traces_url("http://otel:4318/").unwrap(), "http://otel:4318/v1/traces");
        assert_eq!(traces_url("https://c.example/v1/traces").unwrap(), "https://c.example/v1/traces");
        for bad in ["otel:4318", "ftp://x", "http://", ""] {
            assert!(traces_url(bad).is_err(), "{bad}");
        }
    }
}
