//! The passkey ceremonies in a real headless Chromium, driven over WebDriver (chromedriver),
//! against the node's own `/login` page, with Chromium's virtual WebAuthn authenticator.
//!
//! Skipped, with the reason printed, where `chromium` or `chromedriver` is not installed
//! (Debian packages `chromium` and `chromium-driver`; `.ci/run` installs them).

use atlas_chaos::NodeProcess;
use atlas_client::ServerTrust;
use atlas_client::accounts::AccountSession;
use base64::Engine;
use rcgen::PublicKeyData;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_atlas");

/// WebDriver's key for element references (W3C WebDriver, "web element identifier").
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A chromedriver process, ended when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A chromedriver process and one browser session; both end when this is dropped.
struct Browser {
    _driver: Driver,
    http: reqwest::Client,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(chromium: &Path, chromedriver: &Path, spki_hash: &str) -> Self {
        let port = atlas_chaos::cluster::free_port();
        let driver = Driver(
            Command::new(chromedriver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver starts"),
        );
        // reqwest is built without a default TLS provider; chromedriver speaks plain HTTP,
        // but the client still needs one installed.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http.get(format!("{base}/status")).send().await;
            if let Ok(response) = ready
                && let Ok(body) = response.json::<Value>().await
                && body["value"]["ready"] == true
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver not ready in 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            format!("--user-data-dir={}", profile.path().display()),
            // Trusts the node's self-signed certificate by its public key, so the page is a
            // secure context without a certificate error (WebAuthn rejects those).
            format!("--ignore-certificate-errors-spki-list={spki_hash}"),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver created no session: {created}"))
            .to_owned();
        Self {
            _driver: driver,
            http,
            base,
            session,
            _profile: profile,
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.http.request(method, url);
        if !body.is_null() {
            request = request.json(&body);
        }
        let response: Value = request.send().await.unwrap().json().await.unwrap();
        assert!(
            response["value"]["error"].is_null(),
            "WebDriver {path} failed: {response}"
        );
        response["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.command(reqwest::Method::POST, path, body).await
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        found[ELEMENT_KEY].as_str().unwrap().to_owned()
    }

    async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.post(&format!("/element/{id}/click"), json!({})).await;
    }

    /// Waits until the page's status line starts with one of `endings`, and returns it.
    async fn wait_status(&self, endings: &[&str]) -> String {
        let id = self.element("#status").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self
                .command(
                    reqwest::Method::GET,
                    &format!("/element/{id}/text"),
                    Value::Null,
                )
                .await;
            let text = text.as_str().unwrap_or_default().to_owned();
            if endings.iter().any(|e| text.starts_with(e)) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "page status stayed {text:?} for 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the browser session, which closes Chromium, with a plain blocking request,
        // because this may run during a panic inside the async test.
        let address = self.base.trim_start_matches("http://");
        if let Ok(mut stream) = std::net::TcpStream::connect(address) {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\n\
                 Connection: close\r\n\r\n",
                self.session
            );
            if stream.write_all(request.as_bytes()).is_ok() {
                let mut response = Vec::new();
                let _ = stream.read_to_end(&mut response);
            }
        }
        // Dropping `_driver` afterwards ends chromedriver.
    }
}

/// Base64 of the SHA-256 of the node certificate's SubjectPublicKeyInfo.
fn spki_hash(data_dir: &Path) -> String {
    let pem = std::fs::read_to_string(data_dir.join("tls/dev-key.pem")).unwrap();
    let key = rcgen::KeyPair::from_pem(&pem).unwrap();
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(key.subject_public_key_info()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passkey_ceremonies_in_browser() {
    ceremonies_in_browser("passkey_ceremonies_in_browser", &[]).await;
}

/// The page learns the server nonce from the first rejection and retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_ceremonies_with_nonces() {
    ceremonies_in_browser("browser_ceremonies_with_nonces", &["--dpop-nonces"]).await;
}

async fn ceremonies_in_browser(test: &str, node_flags: &[&str]) {
    let (Some(chromium), Some(chromedriver)) =
        (find_program("chromium"), find_program("chromedriver"))
    else {
        println!(
            "SKIPPED {test}: chromium or chromedriver is not on PATH (install the Debian \
             packages chromium and chromium-driver)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let node = NodeProcess::start_secure(
        Path::new(BIN),
        &data,
        node_flags,
        &dir.path().join("node.log"),
    )
    .unwrap();
    let browser = Browser::start(&chromium, &chromedriver, &spki_hash(&data)).await;
    let authenticator = browser
        .post(
            "/webauthn/authenticator",
            json!({
                "protocol": "ctap2",
                "transport": "internal",
                "hasResidentKey": true,
                "hasUserVerification": true,
                "isUserVerified": true,
            }),
        )
        .await;
    let authenticator = authenticator.as_str().unwrap().to_owned();

    let page = format!("{}/login", node.https_base());
    browser.post("/url", json!({"url": page})).await;
    let account = browser.element("#account").await;
    browser
        .post(
            &format!("/element/{account}/value"),
            json!({"text": "browser-user"}),
        )
        .await;

    browser.click("#register").await;
    let status = browser.wait_status(&["registered", "error"]).await;
    assert_eq!(status, "registered browser-user");

    browser.click("#login").await;
    let status = browser.wait_status(&["logged in", "error"]).await;
    assert_eq!(status, "logged in as browser-user with 1 passkey(s)");

    // The account exists on the node for other clients too.
    let trust = ServerTrust::fingerprint(&node.fingerprint).unwrap();
    let session = AccountSession::new(&node.https_base(), &trust).unwrap();
    session.login_start("browser-user").await.unwrap();

    // Put the credential back with its signature counter reset, as a cloned authenticator
    // would have it: the node must reject the next login.
    let credentials_path = format!("/webauthn/authenticator/{authenticator}/credentials");
    let credentials = browser
        .command(reqwest::Method::GET, &credentials_path, Value::Null)
        .await;
    let mut credential = credentials[0].clone();
    assert!(
        credential["signCount"].as_u64().unwrap() >= 1,
        "{credential}"
    );
    browser
        .command(reqwest::Method::DELETE, &credentials_path, Value::Null)
        .await;
    credential["signCount"] = json!(0);
    browser
        .post(
            &format!("/webauthn/authenticator/{authenticator}/credential"),
            credential,
        )
        .await;
    browser.click("#login").await;
    let status = browser.wait_status(&["logged in", "error"]).await;
    assert!(status.contains("passkey_rejected"), "{status}");
}
