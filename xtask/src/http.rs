//! A tiny HTTP/1.1 client over the agent's unix socket: one request per
//! connection (`Connection: close`), body read to EOF.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
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
            socket: socket.to_path_buf(),
            timeout: Duration::from_secs(60),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
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
        let what = || format!("{method} {path} on {}", self.socket.display());
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str("\r\n");

        let mut stream = UnixStream::connect(&self.socket).with_context(what)?;
        stream
            .set_read_timeout(Some(self.timeout))
            .with_context(what)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .with_context(what)?;
        stream.write_all(head.as_bytes()).with_context(what)?;
        stream.write_all(body.as_bytes()).with_context(what)?;
        let mut raw = Vec::new();
        if let Err(e) = stream.read_to_end(&mut raw) {
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                bail!("{}: no answer within {}s", what(), self.timeout.as_secs());
            }
            return Err(e).with_context(what);
        }
        let mut response = parse_response(&raw).with_context(what)?;
        response.request = format!("{method} {path}");
        Ok(response)
    }
}

fn parse_response(raw: &[u8]) -> Result<Response> {
    let split = find(raw, b"\r\n\r\n").ok_or_else(|| {
        anyhow!(
            "incomplete response head ({} bytes received): {}",
            raw.len(),
            String::from_utf8_lossy(raw)
        )
    })?;
    let head = std::str::from_utf8(&raw[..split]).context("response head is not UTF-8")?;
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line.split(' ').collect::<Vec<_>>().as_slice() {
        [version, code, ..] if version.starts_with("HTTP/1.") => code
            .parse::<u16>()
            .with_context(|| format!("bad status line: {status_line}"))?,
        _ => bail!("bad status line: {status_line}"),
    };

    let mut chunked = false;
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("bad header line: {line}");
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .with_context(|| format!("bad Content-Length: {value}"))?,
            );
        }
    }

    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(len) = content_length {
        rest.get(..len)
            .ok_or_else(|| anyhow!("body truncated: Content-Length {len}, got {}", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        request: String::new(),
    })
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let eol = find(data, b"\r\n").ok_or_else(|| anyhow!("chunked body truncated"))?;
        let size_line = std::str::from_utf8(&data[..eol]).context("bad chunk size line")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size: {size_line}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            // Trailers, if any, are of no interest.
            return Ok(body);
        }
        let chunk = data
            .get(..size)
            .ok_or_else(|| anyhow!("chunked body truncated"))?;
        body.extend_from_slice(chunk);
        data = data
            .get(size..)
            .and_then(|d| d.strip_prefix(b"\r\n"))
            .ok_or_else(|| anyhow!("chunk not followed by CRLF"))?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_body() -> Result<()> {
        let raw = b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhello";
        let r = parse_response(raw)?;
        assert_eq!(r.status, 201);
        assert_eq!(r.body, "hello");
        Ok(())
    }

    #[test]
    fn chunked_body_with_extension_and_trailer() -> Result<()> {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    6;x=y\r\nhello \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n";
        assert_eq!(parse_response(raw)?.body, "hello world");
        Ok(())
    }

    #[test]
    fn body_to_eof_without_length() -> Result<()> {
        let r = parse_response(b"HTTP/1.0 503 Service Unavailable\r\n\r\nnot ready\n")?;
        assert_eq!((r.status, r.body.as_str()), (503, "not ready\n"));
        Ok(())
    }

    #[test]
    fn rejects_truncated_and_garbage() {
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
                .is_err()
        );
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
