//! A blocking HTTP/1.1 client over a unix socket or TCP, enough for the
//! agent's and the brain's JSON APIs: one request per connection,
//! `Content-Length` and chunked responses, an optional bearer token, and
//! streaming for followed logs and the brain's event stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
    /// `host:port` with a host name, resolved at each connection (every
    /// address is tried).
    Host(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to {endpoint}: {source}")]
    Io {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed response from {endpoint}: {what}")]
    Malformed { endpoint: String, what: String },
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

#[derive(Clone)]
pub struct Client {
    endpoint: Endpoint,
    timeout: Option<Duration>,
    token: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "http://{a}"),
            Endpoint::Host(h) => write!(f, "http://{h}"),
        }
    }
}

/// How the body of a response is delimited.
enum Framing {
    Chunked,
    Length(usize),
    UntilClose,
}

/// A response whose body is read as it arrives: [`status`](Self::status)
/// is known before any of the body.
pub struct BodyStream {
    status: u16,
    reader: BufReader<Box<dyn Stream>>,
    framing: Framing,
    done: bool,
    endpoint: String,
}

impl std::fmt::Debug for BodyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyStream")
            .field("status", &self.status)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl BodyStream {
    pub fn status(&self) -> u16 {
        self.status
    }

    fn io_err(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            endpoint: self.endpoint.clone(),
            source,
        }
    }

    /// The next piece of the body as it arrives; `None` at its end.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        if self.done {
            return Ok(None);
        }
        match self.framing {
            Framing::Chunked => {
                let mut line = String::new();
                self.reader
                    .read_line(&mut line)
                    .map_err(|e| self.io_err(e))?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| ClientError::Malformed {
                    endpoint: self.endpoint.clone(),
                    what: "bad chunk size".into(),
                })?;
                if size == 0 {
                    self.done = true;
                    return Ok(None);
                }
                let mut chunk = vec![0; size];
                self.reader
                    .read_exact(&mut chunk)
                    .map_err(|e| self.io_err(e))?;
                let mut crlf = [0; 2];
                self.reader
                    .read_exact(&mut crlf)
                    .map_err(|e| self.io_err(e))?;
                Ok(Some(chunk))
            }
            Framing::Length(n) => {
                self.done = true;
                let mut b = vec![0; n];
                self.reader.read_exact(&mut b).map_err(|e| self.io_err(e))?;
                Ok(Some(b))
            }
            Framing::UntilClose => {
                let mut b = vec![0; 8192];
                let n = self.reader.read(&mut b).map_err(|e| self.io_err(e))?;
                if n == 0 {
                    self.done = true;
                    return Ok(None);
                }
                b.truncate(n);
                Ok(Some(b))
            }
        }
    }
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            timeout: Some(Duration::from_secs(120)),
            token: None,
        }
    }

    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self::new(Endpoint::Unix(path.into()))
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// `None` waits forever (for followed logs).
    pub fn with_timeout(mut self, t: Option<Duration>) -> Self {
        self.timeout = t;
        self
    }

    /// Sends `Authorization: Bearer <token>` with every request. The token
    /// must be visible ASCII (it goes in a header line as it is).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    fn io_err(&self) -> impl Fn(std::io::Error) -> ClientError + '_ {
        move |source| ClientError::Io {
            endpoint: self.endpoint.to_string(),
            source,
        }
    }

    fn connect(&self) -> Result<Box<dyn Stream>, ClientError> {
        let cerr = |source| ClientError::Connect {
            endpoint: self.endpoint.to_string(),
            source,
        };
        let tcp = |s: TcpStream| -> Result<Box<dyn Stream>, ClientError> {
            s.set_read_timeout(self.timeout).map_err(self.io_err())?;
            s.set_write_timeout(self.timeout).map_err(self.io_err())?;
            Ok(Box::new(s))
        };
        match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = UnixStream::connect(p).map_err(cerr)?;
                s.set_read_timeout(self.timeout).map_err(self.io_err())?;
                s.set_write_timeout(self.timeout).map_err(self.io_err())?;
                Ok(Box::new(s))
            }
            Endpoint::Tcp(a) => tcp(TcpStream::connect(a).map_err(cerr)?),
            Endpoint::Host(h) => tcp(TcpStream::connect(h.as_str()).map_err(cerr)?),
        }
    }

    pub fn get(&self, path: &str) -> Result<Response, ClientError> {
        self.request("GET", path, None)
    }

    pub fn delete(&self, path: &str) -> Result<Response, ClientError> {
        self.request("DELETE", path, None)
    }

    pub fn put_json(&self, path: &str, body: &serde_json::Value) -> Result<Response, ClientError> {
        self.request("PUT", path, Some(body.to_string().as_bytes()))
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Result<Response, ClientError> {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    pub fn patch_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Response, ClientError> {
        self.request("PATCH", path, Some(body.to_string().as_bytes()))
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let mut body_out = Vec::new();
        let status = self.stream(method, path, body, |chunk| {
            body_out.extend_from_slice(chunk);
            true
        })?;
        Ok(Response {
            status,
            body: body_out,
        })
    }

    /// Sends a request and hands the body to `sink` as it arrives; `sink`
    /// returns false to stop reading. Returns the status code.
    pub fn stream(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        mut sink: impl FnMut(&[u8]) -> bool,
    ) -> Result<u16, ClientError> {
        let mut b = self.open(method, path, body)?;
        while let Some(chunk) = b.next_chunk()? {
            if !sink(&chunk) {
                break;
            }
        }
        Ok(b.status())
    }

    /// Sends a request and reads the response's head; the body is then read
    /// piece by piece from the returned stream.
    pub fn open(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<BodyStream, ClientError> {
        let mut s = self.connect()?;
        let body = body.unwrap_or_default();
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: corral\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).map_err(self.io_err())?;
        s.write_all(body).map_err(self.io_err())?;
        let mut r = BufReader::new(s);
        let malformed = |what: &str| ClientError::Malformed {
            endpoint: self.endpoint.to_string(),
            what: what.into(),
        };
        let mut line = String::new();
        r.read_line(&mut line).map_err(self.io_err())?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| malformed("no status line"))?;
        let mut framing = Framing::UntilClose;
        loop {
            line.clear();
            r.read_line(&mut line).map_err(self.io_err())?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                let v = v.trim();
                if k == "content-length" && !matches!(framing, Framing::Chunked) {
                    framing = Framing::Length(
                        v.parse::<usize>()
                            .map_err(|_| malformed("bad content-length"))?,
                    );
                } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    framing = Framing::Chunked;
                }
            }
        }
        Ok(BodyStream {
            status,
            reader: r,
            framing,
            done: false,
            endpoint: self.endpoint.to_string(),
        })
    }
}
