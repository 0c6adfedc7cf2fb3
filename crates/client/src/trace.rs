//! The request id a task works for: one id follows a user's request from
//! nexusctl through the apiserver (which stores it with the change), the
//! controller (which reads it off the watch event) and the node agent
//! (which logs it beside each Firecracker call).
//!
//! A task runs inside [`scope`]; the clients of this crate send
//! [`current`] as `X-Request-Id` on every request they make from it.

use std::future::Future;

/// The header the id travels in.
pub const HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request this task works for, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok().filter(|id| !id.is_empty())
}

/// Runs `f` as part of request `id`.
pub async fn scope<F: Future>(id: String, f: F) -> F::Output {
    REQUEST_ID.scope(id, f).await
}

/// A fresh id, for work that no request started.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Whether `id` may be passed on and logged: short, printable ASCII.
pub fn is_sane(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Adds the current id, if any, to `req`.
pub(crate) fn tag(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match current() {
        Some(id) => req.header(HEADER, id),
        None => req,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_id_is_there_inside_its_scope_only() {
        assert_eq!(current(), None);
        let inside = scope("abc".into(), async { current() }).await;
        assert_eq!(inside.as_deref(), Some("abc"));
        assert!(is_sane("2f0c-11"));
        assert!(!is_sane("a b"));
        assert!(!is_sane(&"x".repeat(65)));
    }
}
