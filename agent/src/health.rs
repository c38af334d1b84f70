//! The readiness checker: runs each running instance's tcp or http check
//! on its interval, from the node (the agent's network namespace, which
//! routes to every instance address), and records the results in the
//! executor, whose table decides readiness ([`Readiness`]).
//!
//! Readiness gates load balancing: the brain lists only ready instances as
//! a service's backends. Checks run concurrently, each bounded by its
//! timeout, so a hung instance delays nobody else's.
//!
//! [`Readiness`]: corral_proto::health::Readiness

use crate::executor::Executor;
use corral_proto::health::{CheckKind, HealthCheck};
use corral_proto::InstanceId;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How often the due checks are looked for.
const TICK: Duration = Duration::from_millis(100);

/// Runs forever (until the runtime ends).
pub async fn run(exec: Arc<Executor>) {
    let mut due: HashMap<InstanceId, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let checks = exec.checks();
        due.retain(|id, _| checks.iter().any(|(c, _, _)| c == id));
        for (id, addr, check) in checks {
            let next = due.entry(id.clone()).or_insert(now);
            if *next > now {
                continue;
            }
            *next = now + Duration::from_millis(u64::from(check.interval_ms));
            let exec = exec.clone();
            tokio::spawn(async move {
                let passed = probe(addr, &check).await;
                exec.record_check(&id, passed);
            });
        }
    }
}

/// Checks every instance once, concurrently (at most the longest timeout).
pub async fn check_all_once(exec: &Arc<Executor>) {
    let checks = exec.checks();
    let results =
        futures_util::future::join_all(checks.iter().map(|(_, addr, c)| probe(*addr, c))).await;
    for ((id, _, _), passed) in checks.iter().zip(results) {
        exec.record_check(id, passed);
    }
}

/// One check: `true` if it passed within its timeout.
pub async fn probe(addr: Ipv4Addr, check: &HealthCheck) -> bool {
    let timeout = Duration::from_millis(u64::from(check.timeout_ms));
    let target = SocketAddr::from((addr, check.port));
    let attempt = async {
        let mut stream = TcpStream::connect(target).await.ok()?;
        match check.kind {
            CheckKind::Process | CheckKind::Tcp => Some(true),
            CheckKind::Http => {
                let request = format!(
                    "GET {} HTTP/1.0\r\nHost: {addr}:{}\r\nUser-Agent: corral-agent\r\nConnection: close\r\n\r\n",
                    check.path, check.port
                );
                stream.write_all(request.as_bytes()).await.ok()?;
                let mut head = [0u8; 64];
                let mut len = 0;
                while len < 12 {
                    let n = stream.read(&mut head[len..]).await.ok()?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                }
                Some(status_code(&head[..len]) == Some(check.status))
            }
        }
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// The status code of an HTTP/1.x status line.
fn status_code(head: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(head.get(..12)?).ok()?;
    let rest = line.strip_prefix("HTTP/1.")?;
    let code = rest.get(2..5)?;
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(status_code(b"HTTP/2 200"), None);
        assert_eq!(status_code(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code(b"HTTP/1.1 2"), None);
    }

    #[tokio::test]
    async fn tcp_and_http_checks_against_real_listeners() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let status = if req.starts_with("GET /ok ") {
                    "200 OK"
                } else {
                    "500 No"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let lo = Ipv4Addr::LOCALHOST;
        let mut c = HealthCheck::tcp(port);
        assert!(probe(lo, &c).await);
        c.kind = CheckKind::Http;
        c.path = "/ok".into();
        assert!(probe(lo, &c).await);
        c.path = "/bad".into();
        assert!(!probe(lo, &c).await);
        server.abort();
        // Nothing listens there any more.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(!probe(lo, &HealthCheck::tcp(closed_port)).await);
    }
}
