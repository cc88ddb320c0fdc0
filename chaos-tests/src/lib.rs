//! Process launcher for tests and fault scenarios: starts real `atlas node` processes on
//! 127.0.0.1, reads the address and certificate fingerprint they print, and stops them
//! gracefully or with SIGKILL.

pub mod cluster;
pub mod netns;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running node process.
pub struct NodeProcess {
    child: Child,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub fingerprint: String,
    pub data_dir: PathBuf,
    /// The network namespace the node runs in, if any; its listeners are reached from there.
    pub namespace: Option<String>,
}

/// Runs `task` on a new thread that has entered the network namespace `namespace` (as
/// `ip netns` names it), so that the sockets it opens belong to that namespace.
pub fn in_namespace<T: Send + 'static>(
    namespace: &str,
    task: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    use std::os::fd::AsRawFd;
    let path = format!("/var/run/netns/{namespace}");
    let thread = std::thread::spawn(move || {
        let file = std::fs::File::open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open the network namespace {path}: {e}"))?;
        // SAFETY: setns only reads the descriptor, which `file` keeps open for the call, and
        // changes the namespace of this thread alone.
        let status = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        anyhow::ensure!(
            status == 0,
            "cannot enter the network namespace {path}: {}",
            std::io::Error::last_os_error()
        );
        task()
    });
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in network namespace {namespace} panicked"))?
}

/// Sends an HTTP request with an empty body to the admin listener at `addr` and returns the
/// body of a 200 response.
fn admin_request_to(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("response to {method} {path} is not HTTP"))?;
    let status = head.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status.starts_with("HTTP/1.1 200"),
        "{method} {path}: {status}: {}",
        body.trim()
    );
    Ok(body.to_owned())
}

fn with_open_registration<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec!["--open-registration"];
    flags.extend_from_slice(extra);
    flags
}

impl NodeProcess {
    /// Starts `binary node` with its data in `data_dir`, listeners on free ports, open
    /// registration (devices register at their first login, as chat tests and benchmarks
    /// need) and the given extra flags. Waits up to 60 s until the node prints its address.
    pub fn start(binary: &Path, data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_stderr(
            binary,
            data_dir,
            &with_open_registration(extra),
            Stdio::inherit(),
        )
    }

    /// Like [`NodeProcess::start`], with the node's log (stderr) written to `log`.
    pub fn start_logged(
        binary: &Path,
        data_dir: &Path,
        extra: &[&str],
        log: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_logged_through(Command::new(binary), data_dir, extra, log)
    }

    /// Like [`NodeProcess::start_logged`], inside the network namespace `namespace` (see
    /// [`netns`]). Its listeners are on the namespace's own 127.0.0.1, which only programs
    /// run in that namespace reach.
    pub fn start_logged_in(
        namespace: &str,
        binary: &Path,
        data_dir: &Path,
        extra: &[&str],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", namespace]).arg(binary);
        let mut node = Self::start_logged_through(command, data_dir, extra, log)?;
        node.namespace = Some(namespace.to_owned());
        Ok(node)
    }

    /// Starts `atlas node` through `command` with open registration, its log in `log`.
    fn start_logged_through(
        command: Command,
        data_dir: &Path,
        extra: &[&str],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log)?;
        let filter = std::env::var("ATLAS_LOG").unwrap_or_else(|_| "warn".into());
        Self::spawn_command(
            command,
            data_dir,
            &with_open_registration(extra),
            Stdio::from(file),
            &filter,
        )
        .map_err(|e| with_log_tail(e, log))
    }

    /// Starts a node with its default account security: devices must be enrolled with a
    /// passkey access token or from a current device. The log goes to `log`.
    pub fn start_secure(
        binary: &Path,
        data_dir: &Path,
        extra: &[&str],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log)?;
        Self::start_with_stderr(binary, data_dir, extra, Stdio::from(file))
            .map_err(|e| with_log_tail(e, log))
    }

    /// Like [`NodeProcess::start_secure`], logging at every level (`ATLAS_LOG=trace`), for
    /// tests that check what the log contains.
    pub fn start_secure_traced(
        binary: &Path,
        data_dir: &Path,
        extra: &[&str],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log)?;
        Self::spawn(binary, data_dir, extra, Stdio::from(file), "trace")
            .map_err(|e| with_log_tail(e, log))
    }

    fn start_with_stderr(
        binary: &Path,
        data_dir: &Path,
        extra: &[&str],
        stderr: Stdio,
    ) -> anyhow::Result<Self> {
        let filter = std::env::var("ATLAS_LOG").unwrap_or_else(|_| "warn".into());
        Self::spawn(binary, data_dir, extra, stderr, &filter)
    }

    fn spawn(
        binary: &Path,
        data_dir: &Path,
        extra: &[&str],
        stderr: Stdio,
        log_filter: &str,
    ) -> anyhow::Result<Self> {
        Self::spawn_command(Command::new(binary), data_dir, extra, stderr, log_filter)
    }

    /// Runs `atlas node` through `command` (the binary, or a program that runs it, such as
    /// `ip netns exec`, which keeps the process id).
    fn spawn_command(
        mut command: Command,
        data_dir: &Path,
        extra: &[&str],
        stderr: Stdio,
        log_filter: &str,
    ) -> anyhow::Result<Self> {
        let mut child = command
            .arg("node")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .env("ATLAS_LOG", log_filter)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout pipe"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut addr, mut metrics, mut fingerprint) = (None, None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while addr.is_none() || metrics.is_none() || fingerprint.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait()?;
                    anyhow::bail!(
                        "node in {} exited with {status} before reporting its address; its \
                         log says why (a cluster port taken meanwhile is one cause)",
                        data_dir.display()
                    );
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    anyhow::bail!(
                        "node in {} did not report its address within 60 s",
                        data_dir.display()
                    );
                }
            };
            if let Some(rest) = line.strip_prefix("atlas node listening on wss://") {
                addr = rest.trim_end_matches("/v1/ws").parse().ok();
            } else if let Some(rest) = line.strip_prefix("metrics on http://") {
                metrics = rest.trim_end_matches("/metrics").parse().ok();
            } else if let Some(rest) = line.strip_prefix("certificate sha256 fingerprint: ") {
                fingerprint = rest.split_whitespace().next().map(str::to_owned);
            }
        }
        Ok(Self {
            child,
            addr: addr.unwrap_or_else(|| unreachable!("loop ends only once addr is set")),
            metrics_addr: metrics.unwrap_or_else(|| unreachable!("loop ends only once set")),
            fingerprint: fingerprint.unwrap_or_else(|| unreachable!("loop ends only once set")),
            data_dir: data_dir.to_owned(),
            namespace: None,
        })
    }

    /// Returns the HTTPS base URL of the node, with `localhost` as the server name.
    pub fn https_base(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// Returns the WebSocket URL of the node, with `localhost` as the server name.
    pub fn url(&self) -> String {
        format!("wss://localhost:{}/v1/ws", self.addr.port())
    }

    /// Returns the operating-system process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`STOP`, `CONT`, ...) to the process, for pauses that look like
    /// a partition to its peers.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{name} {} failed", self.child.id());
        Ok(())
    }

    /// Fetches a path from the node's metrics and admin listener and returns the body of a
    /// 200 response.
    pub fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        self.admin_request("GET", path)
    }

    /// Posts an empty body to a path of the node's admin listener and returns the body of a
    /// 200 response.
    pub fn admin_post(&self, path: &str) -> anyhow::Result<String> {
        self.admin_request("POST", path)
    }

    fn admin_request(&self, method: &str, path: &str) -> anyhow::Result<String> {
        match &self.namespace {
            Some(namespace) => {
                let (addr, method, path) = (self.metrics_addr, method.to_owned(), path.to_owned());
                in_namespace(namespace, move || admin_request_to(addr, &method, &path))
            }
            None => admin_request_to(self.metrics_addr, method, path),
        }
    }

    /// Sends SIGKILL and waits for the process to end.
    pub fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits up to `wait` for the exit status.
    pub fn terminate(mut self, wait: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", self.child.id());
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                anyhow::bail!("node did not exit within {wait:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resident memory of the process in KiB, from /proc.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS line for process {}", self.child.id()))
    }

    /// Fetches the node's Prometheus metrics text over plain HTTP.
    pub fn metrics(&self) -> anyhow::Result<String> {
        self.admin_get("/metrics")
    }

    /// Returns the value of a metric sample line starting with `name_and_labels`, or 0 if absent.
    pub fn metric(&self, name_and_labels: &str) -> anyhow::Result<f64> {
        let text = self.metrics()?;
        Ok(text
            .lines()
            .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0))
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that `read`, a group's messages as a member read them, contains every message of
/// `acknowledged` in that order and no message twice. Other messages may be in it, because a
/// send that failed may still have been stored.
pub fn assert_acknowledged_once(read: &[String], acknowledged: &[String]) {
    let mut only_acknowledged = read.to_vec();
    only_acknowledged.retain(|m| acknowledged.contains(m));
    assert_eq!(only_acknowledged, acknowledged, "{read:?}");
    let mut distinct = read.to_vec();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        read.len(),
        "a message appears twice: {read:?}"
    );
}

/// Polls `condition` every 50 ms until it is true or `timeout` passes, and returns whether it
/// became true.
pub async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Adds the last lines of a node's log to the error of a failed start, since the log's
/// directory is often removed with the test that started the node.
fn with_log_tail(error: anyhow::Error, log: &Path) -> anyhow::Error {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    anyhow::anyhow!(
        "{error:#}\nlast lines of the node's log {}:\n{tail}",
        log.display()
    )
}

/// Copies the directory `from` to `to` with `cp -a`, which keeps file modes and times, as an
/// operator's backup would.
pub fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    anyhow::ensure!(
        status.success(),
        "cp -a {} {} failed with {status}",
        from.display(),
        to.display()
    );
    Ok(())
}
