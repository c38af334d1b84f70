//! The agent's API for xtask: `corral_cli::client` (the CLI's own client)
//! with errors as `anyhow` and 2xx checks that carry the agent's message.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use corral_cli::client::Client as Inner;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Client {
    inner: Inner,
    socket: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
    /// `METHOD path`, for error messages.
    pub request: String,
}

impl Response {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("response is not JSON: {}", self.body.trim()))
    }

    /// `self` if the status is 2xx, else an error carrying the agent's own
    /// message (`{"error": "..."}`) or the raw body.
    pub fn ok(self) -> Result<Self> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        let msg = serde_json::from_str::<Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| self.body.trim().to_owned());
        bail!("{} answered HTTP {}: {msg}", self.request, self.status)
    }
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Self {
            inner: Inner::unix(socket).with_timeout(Some(Duration::from_secs(60))),
            socket: socket.display().to_string(),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.inner = self.inner.with_timeout(Some(timeout));
        self
    }

    pub fn get(&self, path: &str) -> Result<Response> {
        self.request("GET", path, None)
    }

    pub fn put(&self, path: &str, body: &Value) -> Result<Response> {
        self.request("PUT", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Result<Response> {
        self.request("DELETE", path, None)
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Response> {
        let body = body.map(Value::to_string);
        let r = self
            .inner
            .request(method, path, body.as_deref().map(str::as_bytes))
            .with_context(|| format!("{method} {path} on {}", self.socket))?;
        Ok(Response {
            status: r.status,
            body: r.text(),
            request: format!("{method} {path}"),
        })
    }
}
