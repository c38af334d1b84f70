//! A blocking HTTP/1.1 client over a unix socket or TCP, enough for the
//! agent's JSON API: one request per connection, `Content-Length` and
//! chunked responses, and streaming for followed logs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
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

#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    timeout: Option<Duration>,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "http://{a}"),
        }
    }
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            timeout: Some(Duration::from_secs(120)),
        }
    }

    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self::new(Endpoint::Unix(path.into()))
    }

    /// `None` waits forever (for followed logs).
    pub fn with_timeout(mut self, t: Option<Duration>) -> Self {
        self.timeout = t;
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
        Ok(match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = UnixStream::connect(p).map_err(cerr)?;
                s.set_read_timeout(self.timeout).map_err(self.io_err())?;
                s.set_write_timeout(self.timeout).map_err(self.io_err())?;
                Box::new(s)
            }
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a).map_err(cerr)?;
                s.set_read_timeout(self.timeout).map_err(self.io_err())?;
                s.set_write_timeout(self.timeout).map_err(self.io_err())?;
                Box::new(s)
            }
        })
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
        let mut s = self.connect()?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: corral\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
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
        let mut length = None;
        let mut chunked = false;
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
                if k == "content-length" {
                    length = Some(
                        v.parse::<usize>()
                            .map_err(|_| malformed("bad content-length"))?,
                    );
                } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        if chunked {
            loop {
                line.clear();
                r.read_line(&mut line).map_err(self.io_err())?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| malformed("bad chunk size"))?;
                if size == 0 {
                    break;
                }
                let mut chunk = vec![0; size];
                r.read_exact(&mut chunk).map_err(self.io_err())?;
                let mut crlf = [0; 2];
                r.read_exact(&mut crlf).map_err(self.io_err())?;
                if !sink(&chunk) {
                    break;
                }
            }
        } else if let Some(n) = length {
            let mut b = vec![0; n];
            r.read_exact(&mut b).map_err(self.io_err())?;
            sink(&b);
        } else {
            let mut b = Vec::new();
            r.read_to_end(&mut b).map_err(self.io_err())?;
            sink(&b);
        }
        Ok(status)
    }
}
