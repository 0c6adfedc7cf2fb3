//! Who may do what, against real apiservers on both backends: the whole
//! authorization matrix (`matrix`), what anonymous callers get and raw host
//! paths (`edge`), events written in one request (`events`), a token's
//! life on two apiservers sharing one PostgreSQL and node credentials
//! (`tokens`), image checksums and a VM's history on record (`audit`).
//! This file holds what they share.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nexus_api::auth::{RotateRequest, TokenRequest};
use nexus_client::Client;
use nexus_e2e::postgres::TestPostgres;
use nexus_e2e::{ApiServer, Backend};
use serde_json::{Value, json};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Raw HTTP as one caller (or nobody).
#[derive(Clone)]
struct As {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl As {
    /// Raw access to `server` presenting `token`.
    fn at(server: &ApiServer, token: Option<&str>) -> Self {
        As::new(server.http(), &server.url, token)
    }

    fn new(http: reqwest::Client, base: &str, token: Option<&str>) -> Self {
        As { base: base.to_string(), token: token.map(str::to_string), http }
    }

    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        if path.contains("watch=true") && status == 200 {
            // A stream that stays open: the status is the answer.
            return (status, Value::Null);
        }
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// A token for `subject`, issued by the admin.
async fn issue(admin: &Client, subject: &str) -> String {
    nexus_e2e::issue_token(admin, subject).await
}

/// A VM's status in `default` (empty while it does not exist).
async fn vm_status(client: &Client, name: &str) -> nexus_api::VmStatus {
    client.get::<nexus_api::VmSpec>("default", name).await.map(|v| v.status_or_default()).unwrap_or_default()
}

mod audit;
mod edge;
mod events;
mod matrix;
mod tokens;
