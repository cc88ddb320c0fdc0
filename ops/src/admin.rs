//! Client side of the node's admin endpoints, which listen in plain HTTP on the metrics
//! listener and so are meant for the node's own host.

use anyhow::Context;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Sends one HTTP/1.1 request without a body and returns the response body of a 2xx response.
pub fn request(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| {
        format!("cannot reach the node's admin listener at {addr}; is the node running, and is --admin its --metrics-listen address?")
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading the answer to {method} {path} from {addr} failed"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("the answer to {method} {path} from {addr} is not HTTP"))?;
    let status = head.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status
            .split(' ')
            .nth(1)
            .is_some_and(|code| code.starts_with('2')),
        "{method} {path} on {addr} failed: {status}: {}",
        body.trim()
    );
    Ok(body.trim().to_owned())
}
