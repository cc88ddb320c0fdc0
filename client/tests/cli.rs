//! End-to-end tests of the `atlas-chat` binary: a real `atlas node` process, and the CLI run as
//! separate processes the way a user runs it.

use atlas_chaos::{NodeProcess, copy_dir};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CHAT: &str = env!("CARGO_BIN_EXE_atlas-chat");

/// Environment variables that configure `atlas-chat`; every test starts without them.
const CHAT_VARIABLES: [&str; 5] = [
    "ATLAS_CHAT_STATE",
    "ATLAS_CHAT_ACCOUNT",
    "ATLAS_CHAT_SERVER",
    "ATLAS_CHAT_FINGERPRINT",
    "ATLAS_CHAT_CA",
];

/// Maximum run time of one `atlas-chat` process, and maximum wait for an expected output line.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A fingerprint in valid form that matches no certificate.
const WRONG_FINGERPRINT: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn node_binary() -> PathBuf {
    let path = Path::new(CHAT).with_file_name("atlas");
    assert!(
        path.is_file(),
        "node binary {} not found; build it first with `cargo build -p atlas-ops`",
        path.display()
    );
    path
}

/// A node on free ports and a temporary directory for its data and the clients' state.
struct Setup {
    dir: tempfile::TempDir,
    node: NodeProcess,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeProcess::start(&node_binary(), &dir.path().join("node"), &[]).unwrap();
        Self { dir, node }
    }

    /// Starts a node without open registration, so devices need a passkey account.
    fn secure() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeProcess::start_secure(
            &node_binary(),
            &dir.path().join("node"),
            &[],
            &dir.path().join("node.log"),
        )
        .unwrap();
        Self { dir, node }
    }

    fn state_dir(&self, account: &str) -> PathBuf {
        self.dir.path().join(account)
    }

    /// Builds an `atlas-chat` command for `account`, with state, server and fingerprint as flags.
    fn chat(&self, account: &str) -> Command {
        self.chat_as(account, account)
    }

    /// Builds an `atlas-chat` command for `account` with the state directory named `state`,
    /// for a second device of an account.
    fn chat_as(&self, state: &str, account: &str) -> Command {
        let mut command = bare_chat();
        command
            .arg("--state")
            .arg(self.state_dir(state))
            .args(["--account", account])
            .args(["--server", &self.node.url()])
            .args(["--fingerprint", &self.node.fingerprint]);
        command
    }

    fn run(&self, account: &str, args: &[&str]) -> Output {
        run(self.chat(account).args(args), "")
    }

    /// Runs `atlas-chat` for `account`, checks that it succeeded and returns its stdout.
    fn run_ok(&self, account: &str, args: &[&str]) -> String {
        let output = self.run(account, args);
        assert_success(&output, account, args);
        stdout(&output)
    }

    /// Registers each account, then creates a group as the first and adds the others. Returns
    /// the group id in hex.
    fn group(&self, accounts: &[&str]) -> String {
        for account in accounts {
            self.run_ok(account, &["register", "--key-packages", "3"]);
        }
        let group = self.run_ok(accounts[0], &["create-group", "team"]);
        let group = group.trim().to_owned();
        let mut add = vec!["add", group.as_str()];
        add.extend_from_slice(&accounts[1..]);
        self.run_ok(accounts[0], &add);
        group
    }
}

/// Builds an `atlas-chat` command without any `ATLAS_CHAT_*` variable of the test's
/// environment.
fn bare_chat() -> Command {
    let mut command = Command::new(CHAT);
    for variable in CHAT_VARIABLES {
        command.env_remove(variable);
    }
    command
}

/// Runs the command with `input` on stdin and returns its output. Panics if it runs longer
/// than [`TIMEOUT`].
fn run(command: &mut Command, input: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting atlas-chat failed");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let stdout = read_all_in_thread(child.stdout.take().unwrap());
    let stderr = read_all_in_thread(child.stderr.take().unwrap());
    let status = wait_with_timeout(&mut child);
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn read_all_in_thread(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

fn wait_with_timeout(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("atlas-chat did not exit within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_success(output: &Output, account: &str, args: &[&str]) {
    assert!(
        output.status.success(),
        "atlas-chat {args:?} as {account} exited with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        stdout(output),
        stderr(output)
    );
}

/// Returns whether `output` has a line `GROUP SEQ ACCOUNT: TEXT` with a numeric SEQ.
fn has_message(output: &str, group: &str, account: &str, text: &str) -> bool {
    output.lines().any(|line| {
        let mut parts = line.splitn(3, ' ');
        parts.next() == Some(group)
            && parts.next().is_some_and(|seq| seq.parse::<u64>().is_ok())
            && parts.next() == Some(&format!("{account}: {text}"))
    })
}

#[test]
fn ip_url_gets_server_url_hint() {
    let setup = Setup::new();
    let url = setup.node.url();
    let by_ip = url.replacen("localhost", "127.0.0.1", 1);
    let mut command = bare_chat();
    command
        .arg("--state")
        .arg(setup.state_dir("alice"))
        .args(["--account", "alice", "--server", &by_ip])
        .args(["--fingerprint", &setup.node.fingerprint, "register"]);
    let output = run(&mut command, "");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("the DPoP proof is for"), "{stderr}");
    assert!(stderr.contains(&format!("--server {url}")), "{stderr}");
}

#[test]
fn message_reaches_added_member() {
    let setup = Setup::new();
    let registered = setup.run_ok("alice", &["register"]);
    assert!(
        registered.contains("registered device"),
        "register output: {registered}"
    );

    // Bob is configured through the environment only; a flag must win over its variable.
    let bob_env = |command: &mut Command| {
        command
            .env("ATLAS_CHAT_STATE", setup.state_dir("bob"))
            .env("ATLAS_CHAT_ACCOUNT", "bob")
            .env("ATLAS_CHAT_SERVER", setup.node.url())
            .env("ATLAS_CHAT_FINGERPRINT", &setup.node.fingerprint);
    };
    let mut register_bob = bare_chat();
    bob_env(&mut register_bob);
    let output = run(register_bob.arg("register"), "");
    assert_success(&output, "bob", &["register"]);

    let created = setup.run_ok("alice", &["create-group", "team"]);
    let group = created.trim();
    let id = hex::decode(group).expect("create-group prints the group id in hex");
    assert!(
        id.starts_with(b"team-"),
        "group id {group} is not from name team"
    );

    let added = setup.run_ok("alice", &["add", group, "bob"]);
    assert!(
        added.contains(&format!("{group} 1 * alice added bob")),
        "add output: {added}"
    );
    let sent = setup.run_ok("alice", &["send", group, "hello bob"]);
    assert!(
        has_message(&sent, group, "alice", "hello bob"),
        "send output: {sent}"
    );

    let mut sync_bob = bare_chat();
    bob_env(&mut sync_bob);
    sync_bob
        .env("ATLAS_CHAT_ACCOUNT", "mallory")
        .args(["--account", "bob"]);
    let output = run(sync_bob.arg("sync"), "");
    assert_success(&output, "bob", &["sync"]);
    let synced = stdout(&output);
    assert!(
        synced.contains(&format!("{group} 1 * bob joined the group")),
        "bob's sync output has no joined line: {synced}"
    );
    assert!(
        has_message(&synced, group, "alice", "hello bob"),
        "bob's sync output has no message from alice: {synced}"
    );

    let history = setup.run_ok("bob", &["history", group]);
    assert!(
        history.lines().any(|l| l.ends_with(" alice: hello bob")),
        "bob's history: {history}"
    );
    let groups = setup.run_ok("bob", &["groups"]);
    assert!(
        groups.contains(&format!("{group} cursor 2 members alice,bob")),
        "bob's groups: {groups}"
    );
}

#[test]
fn send_to_unknown_group_fails() {
    let setup = Setup::new();
    setup.run_ok("alice", &["register"]);

    let output = setup.run("alice", &["send", "00ff00ff", "hello"]);
    let message = stderr(&output);
    assert!(
        !output.status.success(),
        "send to an unknown group succeeded"
    );
    assert!(
        message.contains("group 00ff00ff is not known"),
        "stderr: {message}"
    );
    assert!(message.contains("atlas-chat sync"), "stderr: {message}");
    assert!(stdout(&output).is_empty(), "stdout: {}", stdout(&output));

    let output = setup.run("alice", &["send", "not-hex", "hello"]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "stderr: {message}");
    assert!(message.contains("not a hex group id"), "stderr: {message}");
}

#[test]
fn wrong_fingerprint_is_rejected() {
    let setup = Setup::new();
    let mut command = bare_chat();
    command
        .arg("--state")
        .arg(setup.state_dir("alice"))
        .args(["--account", "alice", "--server", &setup.node.url()])
        .args(["--fingerprint", WRONG_FINGERPRINT, "register"]);
    let output = run(&mut command, "");
    let message = stderr(&output);
    assert!(
        !output.status.success(),
        "register with a wrong fingerprint succeeded"
    );
    assert!(
        message.contains("does not match the pinned one"),
        "stderr: {message}"
    );
    assert!(
        message.contains("compare --fingerprint"),
        "stderr: {message}"
    );
}

#[test]
fn interactive_sends_until_quit() {
    let setup = Setup::new();
    let group = setup.group(&["alice", "bob"]);

    let input = format!("/join\n/group {group}\nhi from bob\n/quit\nafter quit\n");
    let output = run(setup.chat("bob").arg("interactive"), &input);
    assert_success(&output, "bob", &["interactive"]);
    let printed = stdout(&output);
    assert!(
        has_message(&printed, &group, "bob", "hi from bob"),
        "bob's interactive output: {printed}"
    );

    // End of input ends a session like /quit.
    let input = "from alice at end of input\n";
    let output = run(
        setup.chat("alice").args(["interactive", "--group", &group]),
        input,
    );
    assert_success(&output, "alice", &["interactive"]);
    let printed = stdout(&output);
    assert!(
        has_message(&printed, &group, "bob", "hi from bob"),
        "alice's interactive output: {printed}"
    );
    assert!(
        has_message(&printed, &group, "alice", "from alice at end of input"),
        "alice's interactive output: {printed}"
    );

    let history = setup.run_ok("alice", &["history", &group]);
    assert!(
        history.contains("alice: from alice at end of input"),
        "alice's history: {history}"
    );
    assert!(
        !history.contains("after quit"),
        "a line after /quit was sent: {history}"
    );
}

/// Reads a running process's pipe on a thread and returns a channel of its lines.
fn line_channel(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits up to [`TIMEOUT`] for a line that satisfies `matches` and returns the lines read up
/// to it.
fn wait_for_line(lines: &mpsc::Receiver<String>, matches: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut seen = Vec::new();
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let found = matches(&line);
        seen.push(line);
        if found {
            return seen;
        }
    }
    panic!("no expected line within {TIMEOUT:?}; lines read: {seen:?}");
}

/// A child process that is killed on drop, so that a failed assertion does not leave it
/// running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts an `atlas-chat interactive` command with piped stdio. Returns its stdin, its
/// stdout and stderr lines, and the process, killed on drop.
fn start_session(
    command: &mut Command,
) -> (
    std::process::ChildStdin,
    mpsc::Receiver<String>,
    mpsc::Receiver<String>,
    KillOnDrop,
) {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting atlas-chat interactive failed");
    let stdin = child.stdin.take().unwrap();
    let out = line_channel(child.stdout.take().unwrap());
    let err = line_channel(child.stderr.take().unwrap());
    (stdin, out, err, KillOnDrop(child))
}

#[test]
fn interactive_prints_pushes() {
    let setup = Setup::new();
    let group = setup.group(&["alice", "bob"]);

    let (mut stdin, out, err, mut session) =
        start_session(setup.chat("bob").args(["interactive", "--group", &group]));

    // The session prints this after its first sync, so the next message arrives as a push.
    wait_for_line(&err, |line| line.starts_with("connected to"));
    setup.run_ok("alice", &["send", &group, "pushed while online"]);
    wait_for_line(&out, |line| {
        has_message(line, &group, "alice", "pushed while online")
    });

    stdin.write_all(b"/quit\n").unwrap();
    let status = wait_with_timeout(&mut session.0);
    assert!(status.success(), "interactive exited with {status}");
}

#[test]
fn connecting_needs_one_trust_option() {
    let dir = tempfile::tempdir().unwrap();
    let base = |command: &mut Command| {
        command
            .arg("--state")
            .arg(dir.path().join("alice"))
            .args(["--account", "alice", "sync"]);
    };

    let mut command = bare_chat();
    base(&mut command);
    let output = run(&mut command, "");
    let message = stderr(&output);
    assert!(!output.status.success(), "sync without trust succeeded");
    assert!(
        message.contains("no server trust option is set"),
        "stderr: {message}"
    );
    assert!(message.contains("--fingerprint HEX"), "stderr: {message}");
    assert!(message.contains("--ca FILE"), "stderr: {message}");

    let mut command = bare_chat();
    base(&mut command);
    command.args(["--fingerprint", WRONG_FINGERPRINT, "--ca", "ca.pem"]);
    let output = run(&mut command, "");
    let message = stderr(&output);
    assert!(
        !output.status.success(),
        "sync with two trust options succeeded"
    );
    assert!(message.contains("both"), "stderr: {message}");

    // A flag wins over the other trust option's variable, so the error is about the flag.
    let mut command = bare_chat();
    base(&mut command);
    command
        .env("ATLAS_CHAT_CA", dir.path().join("missing.pem"))
        .args(["--fingerprint", "not-hex"]);
    let output = run(&mut command, "");
    let message = stderr(&output);
    assert!(
        !output.status.success(),
        "sync with a bad fingerprint succeeded"
    );
    assert!(
        message.contains("invalid --fingerprint"),
        "stderr: {message}"
    );

    let mut command = bare_chat();
    base(&mut command);
    command
        .env("ATLAS_CHAT_FINGERPRINT", "not-hex")
        .arg("--ca")
        .arg(dir.path().join("missing.pem"));
    let output = run(&mut command, "");
    let message = stderr(&output);
    assert!(
        !output.status.success(),
        "sync with a missing CA file succeeded"
    );
    assert!(
        message.contains("missing.pem does not exist"),
        "stderr: {message}"
    );

    // A path that exists but is not a regular file, such as a directory or /dev/null, gets
    // its own message.
    let mut command = bare_chat();
    base(&mut command);
    command
        .env("ATLAS_CHAT_FINGERPRINT", "not-hex")
        .arg("--ca")
        .arg(dir.path());
    let output = run(&mut command, "");
    let message = stderr(&output);
    assert!(
        !output.status.success(),
        "sync with a directory as CA file succeeded"
    );
    assert!(
        message.contains("is not a regular file"),
        "stderr: {message}"
    );
}

#[test]
fn commands_need_registered_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("alice");
    let output = run(
        bare_chat()
            .arg("--state")
            .arg(&state)
            .args(["--account", "alice", "--fingerprint", WRONG_FINGERPRINT])
            .arg("sync"),
        "",
    );
    let message = stderr(&output);
    assert!(!output.status.success(), "sync without state succeeded");
    assert!(message.contains("no client state in"), "stderr: {message}");
    assert!(message.contains("atlas-chat register"), "stderr: {message}");
    assert!(!state.exists(), "sync created the state directory");
}

#[test]
fn receipt_verifies_offline_and_tampering_fails() {
    let setup = Setup::new();
    let group = setup.group(&["alice", "bob"]);
    let sent = setup.run_ok("alice", &["send", &group, "receipt please"]);
    let seq = sent
        .lines()
        .find(|l| l.ends_with("alice: receipt please"))
        .and_then(|l| l.split(' ').nth(1))
        .expect("send prints the sequence number")
        .to_owned();

    let receipt = setup.run_ok("alice", &["receipt", &group, &seq]);
    let file = setup.dir.path().join("receipt.json");
    std::fs::write(&file, &receipt).unwrap();

    // Verification against the node's JWKS over the WebSocket, then offline from a file.
    let mut verify = bare_chat();
    verify
        .args(["--fingerprint", &setup.node.fingerprint])
        .arg("verify-receipt")
        .arg(&file)
        .args(["--jwks", &setup.node.url()]);
    let output = run(&mut verify, "");
    assert_success(&output, "verifier", &["verify-receipt"]);
    assert!(
        stdout(&output).contains("receipt valid"),
        "{}",
        stdout(&output)
    );

    let jwks_file = setup.dir.path().join("jwks.json");
    std::fs::write(&jwks_file, setup.node.admin_get("/admin/jwks").unwrap()).unwrap();
    let offline = run(
        bare_chat()
            .arg("verify-receipt")
            .arg(&file)
            .arg("--jwks")
            .arg(&jwks_file),
        "",
    );
    assert_success(&offline, "verifier", &["verify-receipt", "offline"]);

    // Bob can fetch a receipt for alice's message as a member of the group.
    setup.run_ok("bob", &["sync"]);
    let fetched = setup.run_ok("bob", &["receipt", &group, &seq, "--fetch"]);
    assert!(fetched.contains("\"signature_input\""), "{fetched}");

    // Any changed signed field makes verification fail with the reason.
    let value: serde_json::Value = serde_json::from_str(&receipt).unwrap();
    let changes = [
        ("seq", serde_json::json!(999)),
        ("accepted_at_ms", serde_json::json!(1)),
        (
            "content_digest",
            serde_json::json!("sha-256=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:"),
        ),
    ];
    for (field, replacement) in changes {
        let mut tampered = value.clone();
        tampered["fields"][field] = replacement;
        let path = setup.dir.path().join(format!("tampered-{field}.json"));
        std::fs::write(&path, tampered.to_string()).unwrap();
        let output = run(
            bare_chat()
                .arg("verify-receipt")
                .arg(&path)
                .arg("--jwks")
                .arg(&jwks_file),
            "",
        );
        assert!(!output.status.success(), "tampered {field} verified");
        assert!(
            stderr(&output).contains("does not verify"),
            "tampered {field}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn lookup_shows_another_account() {
    let setup = Setup::new();
    let alice = setup.run_ok("alice", &["register", "--key-packages", "1"]);
    setup.run_ok("bob", &["register", "--key-packages", "1"]);
    let device = alice
        .split_whitespace()
        .nth(2)
        .expect("register prints the device id")
        .to_owned();
    let lookup = setup.run_ok("bob", &["lookup", "alice"]);
    assert!(
        lookup.lines().any(|l| l.starts_with(&device)),
        "lookup output: {lookup}"
    );
}

#[test]
fn closed_stdout_ends_quietly() {
    let setup = Setup::new();
    let mut child = setup
        .chat("alice")
        .arg("register")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the first line is written, as `| head -0` would.
    drop(child.stdout.take());
    let stderr = read_all_in_thread(child.stderr.take().unwrap());
    let status = wait_with_timeout(&mut child);
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.success(), "exit status {status}, stderr: {stderr}");
}

#[test]
fn signup_and_passkey_enroll() {
    let setup = Setup::secure();

    // Without an account, a device cannot log in, and the error names the command to run.
    let output = setup.run("alice", &["register"]);
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("device_not_enrolled"), "{err}");
    assert!(err.contains("atlas-chat signup"), "{err}");

    let out = setup.run_ok("alice", &["signup"]);
    assert!(out.contains("created account alice"), "{out}");
    assert!(out.contains("enrolled device"), "{out}");
    let passkey = setup.state_dir("alice").join("soft-passkey.cbor");
    assert!(passkey.is_file());
    setup.run_ok("alice", &["register"]);

    // The account name is taken now.
    let output = run(setup.chat_as("mallory", "alice").arg("signup"), "");
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("account_taken"), "{err}");
    // The failed signup left no state behind, so the directory can serve another account.
    assert!(
        !setup
            .state_dir("mallory")
            .join("soft-passkey.cbor")
            .exists()
    );
    let output = run(setup.chat_as("mallory", "mallory").arg("signup"), "");
    assert_success(&output, "mallory", &["signup"]);

    // A second device joins with the account's passkey file.
    let phone = setup
        .chat_as("phone", "alice")
        .args(["passkey-enroll", "--passkey"])
        .arg(&passkey)
        .output()
        .unwrap();
    assert!(
        phone.status.success(),
        "{}",
        String::from_utf8_lossy(&phone.stderr)
    );
    let output = run(setup.chat_as("phone", "alice").arg("register"), "");
    assert_success(&output, "alice", &["register"]);
    let out = stdout(&output);
    assert!(out.contains("alice"), "{out}");
    let devices = setup.run_ok("alice", &["lookup", "alice"]);
    assert_eq!(
        devices.lines().filter(|l| l.contains(" key ")).count(),
        2,
        "{devices}"
    );

    // A copy of the passkey file from before the last login is a cloned authenticator.
    let copy = setup.dir.path().join("copy.cbor");
    std::fs::copy(&passkey, &copy).unwrap();
    let again = setup
        .chat_as("tablet", "alice")
        .args(["passkey-enroll", "--passkey"])
        .arg(&passkey)
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let cloned = setup
        .chat_as("laptop", "alice")
        .args(["passkey-enroll", "--passkey"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(!cloned.status.success());
    let err = String::from_utf8_lossy(&cloned.stderr);
    assert!(err.contains("passkey_rejected"), "{err}");
}

#[test]
fn send_moves_to_another_cluster_node() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fixture = atlas_chaos::cluster::ClusterFixture::new(&node_binary(), None)
        .unwrap()
        .with_timing(200, 1500);
    let (_, mut nodes) = runtime
        .block_on(fixture.start_cluster(3, Duration::from_secs(60)))
        .unwrap();
    let names = ["node-a", "node-b", "node-c"];
    let servers: Vec<String> = names.iter().map(|n| nodes[*n].url()).collect();
    let fingerprints: Vec<String> = names
        .iter()
        .map(|n| nodes[*n].fingerprint.clone())
        .collect();
    let chat = |account: &str, args: &[&str]| {
        let mut command = bare_chat();
        command
            .arg("--state")
            .arg(fixture.path(account))
            .args(["--account", account])
            .args(["--server", &servers.join(",")])
            .args(["--fingerprint", &fingerprints.join(",")])
            .args(args);
        run(&mut command, "")
    };
    let chat_ok = |account: &str, args: &[&str]| {
        let output = chat(account, args);
        assert_success(&output, account, args);
        stdout(&output)
    };

    chat_ok("alice", &["register"]);
    chat_ok("bob", &["register"]);
    let group = chat_ok("alice", &["create-group", "team"])
        .trim()
        .to_owned();
    chat_ok("alice", &["add", &group, "bob"]);
    chat_ok("alice", &["send", &group, "before"]);

    // The first node of the list is paused: it accepts connections but never replies. The
    // same commands go to the next node.
    nodes["node-a"].signal("STOP").unwrap();
    let sent = chat_ok("alice", &["send", &group, "while paused"]);
    assert!(
        has_message(&sent, &group, "alice", "while paused"),
        "{sent}"
    );

    // bob's interactive session connects to the first node that accepts, which then dies.
    // The session moves to another node and prints every message, the one sent after the
    // death included.
    nodes["node-a"].signal("CONT").unwrap();
    let mut command = bare_chat();
    command
        .arg("--state")
        .arg(fixture.path("bob"))
        .args(["--account", "bob", "--server", &servers.join(",")])
        .args(["--fingerprint", &fingerprints.join(","), "interactive"]);
    let (mut stdin, out, err, mut session) = start_session(&mut command);
    let connected = wait_for_line(&err, |line| line.starts_with("connected to wss://"));
    let url = connected
        .last()
        .unwrap()
        .trim_start_matches("connected to ");
    let victim = names[servers.iter().position(|s| s == url).unwrap()];
    wait_for_line(&err, |line| line.contains("type a message"));
    nodes.remove(victim).unwrap().kill9().unwrap();

    let sent = chat_ok("alice", &["send", &group, "after"]);
    assert!(has_message(&sent, &group, "alice", "after"), "{sent}");
    for text in ["before", "while paused", "after"] {
        wait_for_line(&out, |line| has_message(line, &group, "alice", text));
    }
    stdin.write_all(b"/quit\n").unwrap();
    let status = wait_with_timeout(&mut session.0);
    assert!(status.success(), "interactive exited with {status}");
    let lost = format!("lost the connection to {url}");
    // The channel closes once the process has exited and its stderr is read to the end.
    let notes: Vec<String> = err.iter().collect();
    assert!(notes.iter().any(|l| l.starts_with(&lost)), "{notes:?}");

    // One fingerprint for three nodes verifies one node at most.
    let mut command = bare_chat();
    command
        .arg("--state")
        .arg(fixture.path("alice"))
        .args(["--account", "alice", "--server", &servers.join(",")])
        .args(["--fingerprint", &fingerprints[1], "sync"]);
    let output = run(&mut command, "");
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--server names 3 nodes but --fingerprint has 1 fingerprint"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn audit_without_node_exits_with_status_one() {
    // A port that nothing listens on: status 1 means the audit could not run, not that it
    // found evidence against the node (status 3).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("wss://localhost:{port}/v1/ws");
    let mut command = bare_chat();
    command.args([
        "--server",
        &url,
        "--fingerprint",
        WRONG_FINGERPRINT,
        "audit",
    ]);
    let output = run(&mut command, "");
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("cannot talk to the node"),
        "{}",
        stderr(&output)
    );
}

/// Runs `atlas-chat` for `account` against `node`, with its state directory in `dir`.
fn chat_on(dir: &Path, node: &NodeProcess, account: &str, args: &[&str]) -> Output {
    let mut command = bare_chat();
    command
        .arg("--state")
        .arg(dir.join(account))
        .args(["--account", account])
        .args(["--server", &node.url()])
        .args(["--fingerprint", &node.fingerprint])
        .args(args);
    run(&mut command, "")
}

#[test]
fn rolled_back_group_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let start = || NodeProcess::start(&node_binary(), &data, &[]).unwrap();
    let ok = |node: &NodeProcess, account: &str, args: &[&str]| {
        let output = chat_on(dir.path(), node, account, args);
        assert_success(&output, account, args);
        stdout(&output)
    };
    let mut node = start();
    ok(&node, "alice", &["register"]);
    ok(&node, "bob", &["register", "--key-packages", "3"]);
    let group = ok(&node, "alice", &["create-group", "team"])
        .trim()
        .to_owned();
    ok(&node, "alice", &["add", &group, "bob"]);
    ok(&node, "bob", &["sync"]);
    node.terminate(TIMEOUT).unwrap();
    copy_dir(&data, &dir.path().join("copy")).unwrap();

    node = start();
    ok(&node, "alice", &["send", &group, "lost later"]);
    ok(&node, "bob", &["sync"]);
    node.terminate(TIMEOUT).unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    copy_dir(&dir.path().join("copy"), &data).unwrap();
    node = start();

    // The first sync finds the conflict; later ones leave the group out, and still fail.
    let first = chat_on(dir.path(), &node, "bob", &["sync"]);
    assert_eq!(first.status.code(), Some(1), "{}", stderr(&first));
    assert!(
        stderr(&first).contains("ends at entry"),
        "{}",
        stderr(&first)
    );
    let again = chat_on(dir.path(), &node, "bob", &["sync"]);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("not read, because the server's log contradicts this device"),
        "{}",
        stderr(&again)
    );
    let groups = ok(&node, "bob", &["groups"]);
    assert!(groups.contains("[log conflict: not read]"), "{groups}");
    let history = ok(&node, "bob", &["history", &group]);
    assert!(history.contains("alice: lost later"), "{history}");
}

/// Returns the lines `SEQ ACCOUNT: TEXT` that `atlas-chat history` printed, as the sequence
/// number and `ACCOUNT: TEXT`.
fn history_lines(output: &str) -> Vec<(u64, String)> {
    output
        .lines()
        .filter_map(|line| {
            let (seq, message) = line.split_once(' ')?;
            Some((seq.parse().ok()?, message.to_owned()))
        })
        .collect()
}

#[test]
fn partitioned_minority_refuses_while_the_majority_serves() {
    use atlas_chaos::cluster::{ClusterFixture, agreed_leaders};
    use atlas_chaos::netns::Network;

    let names = ["node-a", "node-b", "node-c"];
    let network = match Network::create(&names) {
        Ok(network) => network,
        Err(e) => {
            println!("SKIPPED: network namespaces are not available here: {e}");
            return;
        }
    };
    let fixture = ClusterFixture::new(&node_binary(), None)
        .unwrap()
        .with_timing(200, 1500);
    let a = fixture.spec_in(&network, "node-a", &[]).unwrap();
    let b = fixture.spec_in(&network, "node-b", &[&a]).unwrap();
    let c = fixture.spec_in(&network, "node-c", &[&a]).unwrap();
    let mut nodes = std::collections::BTreeMap::new();
    for spec in [&a, &b, &c] {
        nodes.insert(spec.name.clone(), fixture.start(spec).unwrap());
    }
    let formed = |nodes: &std::collections::BTreeMap<String, NodeProcess>| {
        let everyone: Vec<&NodeProcess> = nodes.values().collect();
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if agreed_leaders(&everyone, &names).is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    };
    assert!(formed(&nodes), "the cluster did not form across namespaces");

    // Each client runs in the namespace of its node and reaches only that node.
    let chat = |node: &str, account: &str, args: &[&str]| {
        let mut command = network.command(node, Path::new(CHAT)).unwrap();
        for variable in CHAT_VARIABLES {
            command.env_remove(variable);
        }
        command
            .arg("--state")
            .arg(fixture.path(account))
            .args(["--account", account])
            .args(["--server", &nodes[node].url()])
            .args(["--fingerprint", &nodes[node].fingerprint])
            .args(args);
        run(&mut command, "")
    };
    let chat_ok = |node: &str, account: &str, args: &[&str]| {
        let output = chat(node, account, args);
        assert_success(&output, account, args);
        stdout(&output)
    };
    chat_ok("node-a", "alice", &["register"]);
    chat_ok("node-c", "bob", &["register"]);
    let group = chat_ok("node-a", "alice", &["create-group", "split"])
        .trim()
        .to_owned();
    chat_ok("node-a", "alice", &["add", &group, "bob"]);
    chat_ok("node-a", "alice", &["send", &group, "before"]);
    let synced = chat_ok("node-c", "bob", &["sync"]);
    assert!(has_message(&synced, &group, "alice", "before"), "{synced}");

    // node-c loses its link; every process keeps running.
    network.cut("node-c").unwrap();
    let mut acknowledged = vec!["alice: before".to_owned()];
    let mut rejections = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    let mut attempt = 0;
    while Instant::now() < deadline
        && !(acknowledged.len() >= 4
            && rejections
                .iter()
                .any(|r: &String| r.contains("cannot reach a majority")))
    {
        attempt += 1;
        // The majority side keeps taking messages, after an election if node-c led the log.
        let text = format!("majority {attempt}");
        if chat("node-a", "alice", &["send", &group, &text])
            .status
            .success()
        {
            acknowledged.push(format!("alice: {text}"));
        }
        // The minority side refuses them with a clear error.
        let text = format!("minority {attempt}");
        let output = chat("node-c", "bob", &["send", &group, &text]);
        assert!(
            !output.status.success(),
            "node-c acknowledged a message while cut off: {}",
            stdout(&output)
        );
        rejections.push(stderr(&output));
    }
    assert!(
        acknowledged.len() >= 4,
        "the majority side took too few messages: {acknowledged:?}"
    );
    assert!(
        rejections
            .iter()
            .any(|r| r.contains("cannot reach a majority")),
        "{rejections:?}"
    );

    // After healing, node-c serves again. Both members read one order, with every
    // acknowledged message once; a refused one may have been stored, but at most once.
    network.heal("node-c").unwrap();
    assert!(formed(&nodes), "the cluster did not heal");
    let deadline = Instant::now() + TIMEOUT;
    while !chat("node-c", "bob", &["send", &group, "after"])
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "node-c still refuses writes after healing"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    acknowledged.push("bob: after".to_owned());
    // Links between the nodes still come and go for a few seconds after the partition ends
    // (ractor_cluster drops second links), so node-c may count itself cut off once more.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let output = chat("node-c", "bob", &["sync"]);
        if output.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline && stderr(&output).contains("cannot reach a majority"),
            "node-c refuses reads after healing: {}",
            stderr(&output)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    chat_ok("node-a", "alice", &["sync"]);
    let bob_history = history_lines(&chat_ok("node-c", "bob", &["history", &group]));
    let alice_history = history_lines(&chat_ok("node-a", "alice", &["history", &group]));
    assert_eq!(bob_history, alice_history);
    let bob_read: Vec<String> = bob_history.into_iter().map(|(_, m)| m).collect();
    atlas_chaos::assert_acknowledged_once(&bob_read, &acknowledged);

    // The nodes end before their namespaces.
    for (_, node) in std::mem::take(&mut nodes) {
        node.kill9().unwrap();
    }
    drop(network);
}
