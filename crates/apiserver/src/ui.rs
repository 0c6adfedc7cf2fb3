//! The web console at `/ui/`: one page, its ES modules (the entry
//! `app.js`, the API and session, the watch reader, the list, one module
//! per view) and one stylesheet, built into the binary (no build step,
//! nothing fetched from elsewhere).
//! The page signs in with an API token and uses only the public API, so
//! it can never do what the API refuses its user.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

const JS: &str = "text/javascript; charset=utf-8";

/// The console's files: (path, content type, body).
pub const ASSETS: &[(&str, &str, &str)] = &[
    ("/ui/", "text/html; charset=utf-8", include_str!("../ui/index.html")),
    ("/ui/app.js", JS, include_str!("../ui/app.js")),
    ("/ui/js/api.js", JS, include_str!("../ui/js/api.js")),
    ("/ui/js/dom.js", JS, include_str!("../ui/js/dom.js")),
    ("/ui/js/list.js", JS, include_str!("../ui/js/list.js")),
    ("/ui/js/live.js", JS, include_str!("../ui/js/live.js")),
    ("/ui/js/views/events.js", JS, include_str!("../ui/js/views/events.js")),
    ("/ui/js/views/images.js", JS, include_str!("../ui/js/views/images.js")),
    ("/ui/js/views/nodes.js", JS, include_str!("../ui/js/views/nodes.js")),
    ("/ui/js/views/overview.js", JS, include_str!("../ui/js/views/overview.js")),
    ("/ui/js/views/pools.js", JS, include_str!("../ui/js/views/pools.js")),
    ("/ui/js/views/snapshots.js", JS, include_str!("../ui/js/views/snapshots.js")),
    ("/ui/js/views/templates.js", JS, include_str!("../ui/js/views/templates.js")),
    ("/ui/js/views/vm.js", JS, include_str!("../ui/js/views/vm.js")),
    ("/ui/js/views/vm-storage.js", JS, include_str!("../ui/js/views/vm-storage.js")),
    ("/ui/js/views/vms.js", JS, include_str!("../ui/js/views/vms.js")),
    ("/ui/js/views/yaml.js", JS, include_str!("../ui/js/views/yaml.js")),
    ("/ui/app.css", "text/css; charset=utf-8", include_str!("../ui/app.css")),
];

/// What the page may load and where it may connect: itself only.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                      connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The console's routes (no token needed: the files hold no data).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new().route("/ui", get(|| async { Redirect::permanent("/ui/") }));
    for (path, content_type, body) in ASSETS {
        router = router.route(path, get(move || async move { asset(content_type, body) }));
    }
    router
}

/// Bytes the console's page, script and stylesheet weigh together.
pub fn weight() -> usize {
    ASSETS.iter().map(|(_, _, body)| body.len()).sum()
}
