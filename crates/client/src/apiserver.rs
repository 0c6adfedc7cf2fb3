//! Typed HTTP client for the apiserver, with watch streams.

use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;

use crate::tls::Trust;
use nexus_api::ErrorBody;
use nexus_api::meta::{Object, ObjectList, ResourceSpec};
use nexus_api::watch::{WatchEvent, WatchEventType};

/// Failures of a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("{0}")]
    Api(Box<ErrorBody>),
    /// The request did not get an answer.
    #[error("cannot reach the apiserver at {url}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The TLS handshake failed: the server's certificate is not signed by
    /// a trusted CA, names another host, or the server does not speak TLS.
    #[error("TLS with the apiserver at {url} failed: {message}")]
    Tls { url: String, message: String },
    /// The answer was not what the API promises.
    #[error("unexpected response from the apiserver: {0}")]
    Decode(String),
}

impl ClientError {
    /// HTTP status of an API error, if that is what this is.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api(body) => Some(body.status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }

    /// Whether the watch's resourceVersion is too old and a relist is needed.
    pub fn is_gone(&self) -> bool {
        self.status() == Some(410)
    }
}

/// A request that got no answer, as [`ClientError::Tls`] when TLS is why.
fn transport_error(url: &str, source: reqwest::Error) -> ClientError {
    match crate::tls::tls_failure(&source) {
        Some(message) => ClientError::Tls { url: url.to_string(), message },
        None => ClientError::Transport { url: url.to_string(), source },
    }
}

/// Query parameters of a list or watch.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
    pub limit: Option<u32>,
    pub continue_token: Option<String>,
}

impl ListParams {
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(s) = &self.label_selector {
            q.push(("labelSelector", s.clone()));
        }
        if let Some(s) = &self.field_selector {
            q.push(("fieldSelector", s.clone()));
        }
        if let Some(l) = self.limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(c) = &self.continue_token {
            q.push(("continue", c.clone()));
        }
        q
    }
}

/// A change seen on a watch stream, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<T> {
    Added(T),
    Modified(T),
    Deleted(T),
    /// The stream has seen everything up to this resourceVersion.
    Bookmark(String),
}

/// Client of the apiservers (one, or several sharing one database). Clones
/// share the token, so a token rotated through one ([`Client::set_token`])
/// is used by all from then on, and which apiserver they use.
#[derive(Debug, Clone)]
pub struct Client {
    servers: std::sync::Arc<crate::servers::Servers>,
    token: std::sync::Arc<std::sync::RwLock<Option<String>>>,
    /// The lease fence every write carries, when this client is a leader's.
    fence: std::sync::Arc<crate::fence::Slot>,
    trust: Trust,
    http: reqwest::Client,
}

impl Client {
    /// A client for the apiserver at `base` (such as `https://127.0.0.1:7443`)
    /// that trusts the system's root certificates.
    pub fn new(base: &str, token: Option<String>) -> Self {
        Client::with_trust(base, token, Trust::system())
    }

    /// A client for the apiserver at `base` that verifies it with `trust`
    /// (the cluster's CA, usually). `base` may list several apiservers,
    /// separated by commas: requests go to the first until it stops
    /// answering, then to the next (see [`crate::servers`]).
    pub fn with_trust(base: &str, token: Option<String>, trust: Trust) -> Self {
        let http = trust
            .apply(crate::http_builder().connect_timeout(Duration::from_secs(5)))
            .build()
            .expect("a client with rustls and loaded certificates always builds");
        Self {
            servers: std::sync::Arc::new(crate::servers::Servers::parse(base)),
            token: std::sync::Arc::new(std::sync::RwLock::new(token)),
            fence: Default::default(),
            trust,
            http,
        }
    }

    /// A client of the same server and token (shared: a rotation reaches
    /// both) with connections of its own, for use on another runtime.
    pub fn with_fresh_connections(&self) -> Client {
        let fresh = Client::with_trust(&self.servers.list(), None, self.trust.clone());
        Client { token: self.token.clone(), fence: self.fence.clone(), ..fresh }
    }

    /// Sends `fence` with every request from now on (in every clone of this
    /// client), so that the apiserver refuses this process's writes once
    /// the lease it names has passed to another; `None` sends none.
    pub fn set_fence(&self, fence: Option<&nexus_api::lease::Fence>) {
        self.fence.set(fence);
    }

    pub(crate) fn fence_slot(&self) -> std::sync::Arc<crate::fence::Slot> {
        self.fence.clone()
    }

    /// Returns when the apiserver next refuses one of this client's writes
    /// because the lease term its fence names has ended.
    pub async fn fenced_off(&self) {
        self.fence.wait_refused().await
    }

    /// Presents `token` from now on (in every clone of this client).
    pub fn set_token(&self, token: Option<String>) {
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = token;
    }

    /// The token presented, if any.
    pub fn token(&self) -> Option<String> {
        self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The certificate authorities this client trusts.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// The server this client talks to now.
    pub fn base(&self) -> &str {
        self.servers.current()
    }

    /// Path of the collection of kind `S` in `project` (all projects if `None`
    /// for project-scoped kinds).
    pub fn collection_path<S: ResourceSpec>(project: Option<&str>) -> String {
        match (S::NAMESPACED, project) {
            (true, Some(p)) => format!("/v1/projects/{p}/{}", S::PLURAL),
            _ => format!("/v1/{}", S::PLURAL),
        }
    }

    /// Path of one object of kind `S`.
    pub fn object_path<S: ResourceSpec>(project: &str, name: &str) -> String {
        if S::NAMESPACED {
            format!("/v1/projects/{project}/{}/{name}", S::PLURAL)
        } else {
            format!("/v1/{}/{name}", S::PLURAL)
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = crate::trace::tag(self.http.request(method, format!("{}{path}", self.servers.current())));
        if let Some(fence) = self.fence.header() {
            req = req.header(nexus_api::lease::FENCE_HEADER, fence);
        }
        match self.token() {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends `req` (see [`Client::execute`]); an answer of 429 is waited
    /// out (its Retry-After, at most 10 s) and the request sent again, up
    /// to five times.
    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let mut req = req.timeout(Duration::from_secs(30)).build().map_err(|e| self.transport(e))?;
        let mut attempt = 0;
        loop {
            let again = req.try_clone();
            let resp = self.execute(req).await?;
            if resp.status().as_u16() == 429
                && attempt < 5
                && let Some(next) = again
            {
                let wait = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1)
                    .min(10);
                tracing::debug!(wait, "the apiserver asked to slow down");
                tokio::time::sleep(Duration::from_secs(wait)).await;
                req = next;
                attempt += 1;
                continue;
            }
            let answer = decode(resp).await;
            if let Err(ClientError::Api(body)) = &answer
                && body.error == crate::fence::FENCED
            {
                self.fence.refused();
            }
            return answer;
        }
    }

    /// Sends `request` to the current apiserver. One that refuses the
    /// connection never saw the request, which goes to the next at once;
    /// one that stops answering later is left for the next request (the
    /// request may have been carried out there).
    async fn execute(&self, mut request: reqwest::Request) -> Result<reqwest::Response, ClientError> {
        let mut tries = 0;
        loop {
            let again = request.try_clone();
            let url = request.url().clone();
            match self.http.execute(request).await {
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    if e.is_connect() || e.is_timeout() || e.is_request() {
                        self.servers.failed(&url);
                    }
                    tries += 1;
                    match again {
                        Some(next) if e.is_connect() && tries < self.servers.len() => {
                            request = self.servers.retarget(next);
                        }
                        _ => return Err(transport_error(url.origin().ascii_serialization().as_str(), e)),
                    }
                }
            }
        }
    }

    fn transport(&self, source: reqwest::Error) -> ClientError {
        transport_error(self.servers.current(), source)
    }

    /// Reads one object.
    pub async fn get<S: ResourceSpec>(&self, project: &str, name: &str) -> Result<Object<S>, ClientError> {
        self.send(self.request(reqwest::Method::GET, &Self::object_path::<S>(project, name))).await
    }

    /// Lists objects; `project: None` lists across projects.
    pub async fn list<S: ResourceSpec>(
        &self,
        project: Option<&str>,
        params: &ListParams,
    ) -> Result<ObjectList<Object<S>>, ClientError> {
        let req = self.request(reqwest::Method::GET, &Self::collection_path::<S>(project)).query(&params.query());
        self.send(req).await
    }

    /// Creates an object; its project comes from `metadata.project`.
    pub async fn create<S: ResourceSpec>(&self, obj: &Object<S>) -> Result<Object<S>, ClientError> {
        let project = obj.metadata.project.as_deref().unwrap_or(nexus_api::DEFAULT_PROJECT);
        let req = self.request(reqwest::Method::POST, &Self::collection_path::<S>(Some(project))).json(obj);
        self.send(req).await
    }

    /// Replaces an object's spec and metadata; fails with 409 when
    /// `metadata.resourceVersion` is stale.
    pub async fn replace<S: ResourceSpec>(&self, obj: &Object<S>) -> Result<Object<S>, ClientError> {
        let project = obj.metadata.project.as_deref().unwrap_or(nexus_api::DEFAULT_PROJECT);
        let req = self.request(reqwest::Method::PUT, &Self::object_path::<S>(project, obj.name())).json(obj);
        self.send(req).await
    }

    /// Replaces an object's status; fails with 409 when
    /// `metadata.resourceVersion` is stale.
    pub async fn replace_status<S: ResourceSpec>(&self, obj: &Object<S>) -> Result<Object<S>, ClientError> {
        let project = obj.metadata.project.as_deref().unwrap_or(nexus_api::DEFAULT_PROJECT);
        let path = format!("{}/status", Self::object_path::<S>(project, obj.name()));
        self.send(self.request(reqwest::Method::PUT, &path).json(obj)).await
    }

    /// Requests deletion. Returns the object as it is now: still present with
    /// `deletionTimestamp` set while finalizers remain.
    pub async fn delete<S: ResourceSpec>(&self, project: &str, name: &str) -> Result<Object<S>, ClientError> {
        self.send(self.request(reqwest::Method::DELETE, &Self::object_path::<S>(project, name))).await
    }

    /// Sends raw JSON to a path and decodes the answer: the escape hatch for
    /// callers that handle kinds generically (such as `nexusctl apply`).
    pub async fn raw<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, ClientError> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send(req).await
    }

    /// Forks running VM `name` in `project`: `copies` VMs restored from one
    /// new Snapshot of it, in one request.
    pub async fn fork(
        &self,
        project: &str,
        name: &str,
        copies: u32,
    ) -> Result<nexus_api::fork::ForkResult, ClientError> {
        let req = self
            .request(reqwest::Method::POST, &format!("/v1/projects/{project}/vms/{name}/fork"))
            .json(&nexus_api::fork::ForkRequest { copies });
        self.send(req).await
    }

    /// Writes `events` in one request: each is created, or folded into the
    /// Event of its name when one exists (`POST /v1/events:record`).
    pub async fn record_events(
        &self,
        events: Vec<nexus_api::Event>,
    ) -> Result<nexus_api::event::EventRecordResult, ClientError> {
        let body = nexus_api::event::EventRecordRequest { items: events };
        self.send(self.request(reqwest::Method::POST, "/v1/events:record").json(&body)).await
    }

    /// Who the token stands for and what it holds.
    pub async fn whoami(&self) -> Result<nexus_api::auth::WhoAmI, ClientError> {
        self.send(self.request(reqwest::Method::GET, "/v1/whoami")).await
    }

    /// Issues a token (the secret is in the answer, and nowhere else).
    pub async fn create_token(
        &self,
        req: &nexus_api::auth::TokenRequest,
    ) -> Result<nexus_api::auth::IssuedToken, ClientError> {
        self.send(self.request(reqwest::Method::POST, "/v1/tokens").json(req)).await
    }

    /// The tokens the caller may see (of `subject` only, when given).
    pub async fn list_tokens(&self, subject: Option<&str>) -> Result<nexus_api::auth::TokenList, ClientError> {
        let mut req = self.request(reqwest::Method::GET, "/v1/tokens");
        if let Some(s) = subject {
            req = req.query(&[("subject", s)]);
        }
        self.send(req).await
    }

    /// Revokes token `id`.
    pub async fn revoke_token(&self, id: &str) -> Result<nexus_api::auth::TokenInfo, ClientError> {
        self.send(self.request(reqwest::Method::DELETE, &format!("/v1/tokens/{id}"))).await
    }

    /// Issues a successor of token `id`; the old one works for the grace.
    pub async fn rotate_token(
        &self,
        id: &str,
        req: &nexus_api::auth::RotateRequest,
    ) -> Result<nexus_api::auth::IssuedToken, ClientError> {
        self.send(self.request(reqwest::Method::POST, &format!("/v1/tokens/{id}/rotate")).json(req)).await
    }

    /// Joins node `name` (with a join token): its own token comes back.
    pub async fn join(&self, name: &str) -> Result<nexus_api::auth::IssuedToken, ClientError> {
        self.send(self.request(reqwest::Method::POST, &format!("/v1/nodes/{name}/join"))).await
    }

    /// Node `name`'s agent credential (controller and cluster admins).
    pub async fn node_credential(&self, name: &str) -> Result<nexus_api::auth::NodeCredential, ClientError> {
        self.send(self.request(reqwest::Method::GET, &format!("/v1/nodes/{name}/credential"))).await
    }

    /// Sets node `name`'s agent credential (the node itself).
    pub async fn set_node_credential(
        &self,
        name: &str,
        cred: &nexus_api::auth::NodeCredential,
    ) -> Result<(), ClientError> {
        let req = self.request(reqwest::Method::PUT, &format!("/v1/nodes/{name}/credential")).json(cred);
        let resp = req.timeout(Duration::from_secs(30)).send().await.map_err(|e| self.transport(e))?;
        if resp.status().is_success() {
            return Ok(());
        }
        decode::<serde_json::Value>(resp).await.map(|_| ())
    }

    /// Audit records matching `query` (`(name, value)` pairs: project,
    /// kind, name, actor, result, since, until, limit, continue).
    pub async fn audit(&self, query: &[(&str, String)]) -> Result<nexus_api::auth::AuditList, ClientError> {
        self.send(self.request(reqwest::Method::GET, "/v1/audit").query(query)).await
    }

    /// Streams the body of `GET path` (a watch, a log) as it arrives.
    pub async fn get_stream(
        &self,
        path: &str,
    ) -> Result<impl Stream<Item = Result<bytes::Bytes, ClientError>> + Send + use<>, ClientError> {
        self.stream(self.request(reqwest::Method::GET, path)).await
    }

    /// Sends `req` and streams its body. A stream that breaks marks its
    /// apiserver as not answering, so that the watch or follow started
    /// again goes to the next one.
    async fn stream(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<impl Stream<Item = Result<bytes::Bytes, ClientError>> + Send + use<>, ClientError> {
        let resp = self.execute(req.build().map_err(|e| self.transport(e))?).await?;
        if !resp.status().is_success() {
            return Err(decode::<serde_json::Value>(resp)
                .await
                .err()
                .unwrap_or_else(|| ClientError::Decode("error status with a success body".into())));
        }
        let (servers, url) = (self.servers.clone(), resp.url().clone());
        Ok(resp.bytes_stream().map_err(move |source| {
            servers.failed(&url);
            transport_error(url.origin().ascii_serialization().as_str(), source)
        }))
    }

    /// Uploads `file` (`len` bytes) as the body of `PUT path`, streamed
    /// (an Image's file: `.../images/{name}/content`).
    pub async fn put_file<T: DeserializeOwned>(
        &self,
        path: &str,
        file: impl tokio::io::AsyncRead + Send + Sync + 'static,
        len: u64,
    ) -> Result<T, ClientError> {
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
        let req = self
            .request(reqwest::Method::PUT, path)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body)
            // A large file takes its time; a stalled upload still ends.
            .timeout(Duration::from_secs(3600));
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        decode(resp).await
    }

    /// Server version information (`GET /version`).
    pub async fn version(&self) -> Result<serde_json::Value, ClientError> {
        self.send(self.request(reqwest::Method::GET, "/version")).await
    }

    /// Watches kind `S` from `resource_version` (exclusive); with `None` the
    /// stream starts with an ADDED event for every existing object.
    ///
    /// The stream ends with `Err` on a transport failure or an ERROR event
    /// (410 when `resource_version` is too old: relist and watch again).
    pub async fn watch<S: ResourceSpec>(
        &self,
        project: Option<&str>,
        params: &ListParams,
        resource_version: Option<&str>,
    ) -> Result<impl Stream<Item = Result<Event<Object<S>>, ClientError>> + Send + use<S>, ClientError> {
        let traced = self.watch_traced::<S>(project, params, resource_version).await?;
        Ok(traced.map(|e| e.map(|(event, _)| event)))
    }

    /// [`Client::watch`], each event with the id of the request that made
    /// the change (empty for bookmarks and changes older than request ids),
    /// for a watcher that acts on the change to pass on (see [`crate::trace`]).
    pub async fn watch_traced<S: ResourceSpec>(
        &self,
        project: Option<&str>,
        params: &ListParams,
        resource_version: Option<&str>,
    ) -> Result<impl Stream<Item = Result<(Event<Object<S>>, String), ClientError>> + Send + use<S>, ClientError> {
        let mut query = params.query();
        query.push(("watch", "true".to_string()));
        if let Some(rv) = resource_version {
            query.push(("resourceVersion", rv.to_string()));
        }
        let req = self.request(reqwest::Method::GET, &Self::collection_path::<S>(project)).query(&query);
        let bytes = self.stream(req).await?;
        Ok(lines(bytes).map(|line| line.and_then(|l| parse_event::<S>(&l))))
    }
}

fn parse_event<S: ResourceSpec>(line: &[u8]) -> Result<(Event<Object<S>>, String), ClientError> {
    let event: WatchEvent =
        serde_json::from_slice(line).map_err(|e| ClientError::Decode(format!("watch event: {e}")))?;
    let request_id = event.request_id;
    let typed = |v: serde_json::Value| {
        serde_json::from_value::<Object<S>>(v).map_err(|e| ClientError::Decode(format!("watch object: {e}")))
    };
    let event = match event.type_ {
        WatchEventType::Added => Event::Added(typed(event.object)?),
        WatchEventType::Modified => Event::Modified(typed(event.object)?),
        WatchEventType::Deleted => Event::Deleted(typed(event.object)?),
        WatchEventType::Bookmark => {
            let rv = event.object["metadata"]["resourceVersion"].as_str().unwrap_or("").to_string();
            Event::Bookmark(rv)
        }
        WatchEventType::Error => {
            return Err(match serde_json::from_value::<ErrorBody>(event.object) {
                Ok(body) => ClientError::Api(Box::new(body)),
                Err(e) => ClientError::Decode(format!("watch error event: {e}")),
            });
        }
    };
    Ok((event, request_id))
}

/// Splits a byte stream into newline-terminated lines (without the newline).
fn lines<S>(bytes: S) -> impl Stream<Item = Result<Vec<u8>, ClientError>> + Send
where
    S: Stream<Item = Result<bytes::Bytes, ClientError>> + Send + Unpin + 'static,
{
    futures::stream::unfold((bytes, Vec::<u8>::new(), false), |(mut bytes, mut buf, done)| async move {
        loop {
            if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).take(pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some((Ok(line), (bytes, buf, done)));
            }
            if done {
                return None;
            }
            match bytes.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Some((Err(e), (bytes, buf, true))),
                None => {
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        return None;
                    }
                    let rest = std::mem::take(&mut buf);
                    return Some((Ok(rest), (bytes, buf, true)));
                }
            }
        }
    })
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| ClientError::Decode(format!("reading the body: {e}")))?;
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()));
    }
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(err) => Err(ClientError::Api(Box::new(err))),
        Err(_) => Err(ClientError::Api(Box::new(ErrorBody {
            error: status.canonical_reason().unwrap_or("Error").replace(' ', ""),
            message: String::from_utf8_lossy(&body).chars().take(500).collect(),
            status: status.as_u16(),
            fault_message: None,
            suggestion: None,
            request_id: String::new(),
        }))),
    }
}
