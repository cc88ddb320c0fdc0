//! `atlas demo`: a node on a free port with a temporary data directory and three clients that
//! sign up with passkeys (software authenticators), create a group, chat, go offline and come back, and remove a member. The final line is
//! PASS only if every client decrypted exactly the expected messages in the same order.

use crate::config::NodeConfig;
use crate::node;
use atlas_client::accounts::AccountSession;
use atlas_client::{Client, ServerTrust};
use atlas_protocol::{ErrorCode, GroupId};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use webauthn_authenticator_rs::prelude::Url;
use webauthn_authenticator_rs::softpasskey::SoftPasskey;

pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = NodeConfig {
        data_dir: dir.path().join("node"),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..NodeConfig::default()
    };
    let node = node::start(&config).await?;
    println!(
        "[node] listening on wss://{}/v1/ws, data in {}",
        node.addr,
        config.data_dir.display()
    );
    let url = format!("wss://localhost:{}/v1/ws", node.addr.port());
    let trust = ServerTrust::fingerprint(&node.fingerprint)?;

    let outcome = scenario(dir.path(), &url, &trust).await;
    node.shutdown().await?;
    match outcome {
        Ok(()) => {
            println!(
                "PASS: every client decrypted exactly the expected messages in the same order"
            );
            Ok(())
        }
        Err(e) => {
            println!("FAIL: {e:#}");
            anyhow::bail!("demo failed")
        }
    }
}

async fn connect(
    dir: &Path,
    account: &str,
    url: &str,
    trust: &ServerTrust,
) -> anyhow::Result<Client> {
    let mut client = Client::open(&dir.join(account), account)?;
    client.connect(url, trust).await?;
    Ok(client)
}

/// Creates `account` with a passkey of a software authenticator, then enrolls a new device
/// with the account's DPoP-bound access token and connects it.
async fn sign_up(
    dir: &Path,
    account: &str,
    url: &str,
    trust: &ServerTrust,
) -> anyhow::Result<Client> {
    let base = AccountSession::base_of(url)?;
    let origin = Url::parse(&base)?;
    let mut session = AccountSession::new(&base, trust)?;
    // Reports user verification as done: the node requires it, and there is no user here.
    let mut authenticator = SoftPasskey::new(true);
    session
        .register(account, &mut authenticator, &origin)
        .await?;
    let client = Client::open(&dir.join(account), account)?;
    let enrolled = session
        .enroll_device(&client.enrollment_request("localhost")?)
        .await?;
    println!(
        "[{account}] created the account with a passkey and enrolled device {} (key log entry {})",
        enrolled.device, enrolled.kt_index
    );
    drop(client);
    connect(dir, account, url, trust).await
}

async fn scenario(dir: &Path, url: &str, trust: &ServerTrust) -> anyhow::Result<()> {
    let mut alice = sign_up(dir, "alice", url, trust).await?;
    let mut bob = sign_up(dir, "bob", url, trust).await?;
    let mut carol = sign_up(dir, "carol", url, trust).await?;
    for client in [&mut alice, &mut bob, &mut carol] {
        client.publish_key_packages(5).await?;
        println!(
            "[{}] logged in with device {} and uploaded key packages",
            client.account(),
            client.device_id()
        );
    }

    let group = alice.create_group("demo").await?;
    println!("[alice] created group {group}");
    alice.add_members(&group, &["bob", "carol"]).await?;
    println!("[alice] added bob and carol");
    bob.sync().await?;
    carol.sync().await?;
    println!("[bob] joined: {}", bob.groups().contains(&group));
    println!("[carol] joined: {}", carol.groups().contains(&group));

    let mut expected: Vec<(String, String)> = Vec::new();
    for (client, text) in [
        (&mut alice, "hello from alice"),
        (&mut bob, "hi alice, bob here"),
        (&mut carol, "carol says hi"),
    ] {
        send(client, &group, text, &mut expected).await?;
    }
    for client in [&mut alice, &mut bob, &mut carol] {
        client.sync().await?;
    }

    carol.disconnect();
    drop(carol);
    println!("[carol] went offline");
    send(&mut alice, &group, "carol, are you there?", &mut expected).await?;
    send(&mut bob, &group, "she will catch up", &mut expected).await?;

    let mut carol = connect(dir, "carol", url, trust).await?;
    let caught_up = carol.sync().await?;
    println!(
        "[carol] restarted from her state directory and caught up on {} entries",
        caught_up.len()
    );

    bob.sync().await?;
    alice.remove_members(&group, &["bob"]).await?;
    println!("[alice] removed bob");
    // Bob has not yet seen his removal, so his client still encrypts for the group.
    let bob_cut = expected.len();
    match bob.send(&group, "can I still talk?").await {
        Err(e) if e.code() == Some(ErrorCode::NotMember) => {
            println!("[bob] send refused by the server: not a member")
        }
        Err(e) => anyhow::bail!("bob's send failed for another reason than membership: {e}"),
        Ok(seq) => anyhow::bail!("bob's message after removal was accepted at seq {seq}"),
    }
    bob.sync().await?;
    println!("[bob] sees his removal: {}", !bob.groups().contains(&group));

    send(&mut carol, &group, "bye bob", &mut expected).await?;
    send(&mut alice, &group, "just us now", &mut expected).await?;
    for client in [&mut alice, &mut carol] {
        client.sync().await?;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;

    check(&alice, &group, &expected)?;
    check(&carol, &group, &expected)?;
    check(&bob, &group, &expected[..bob_cut])?;
    Ok(())
}

async fn send(
    client: &mut Client,
    group: &GroupId,
    text: &str,
    expected: &mut Vec<(String, String)>,
) -> anyhow::Result<()> {
    client.sync_group(group).await?;
    let seq = client.send(group, text).await?;
    println!("[{}] sent {:?} (seq {seq})", client.account(), text);
    expected.push((client.account().to_owned(), text.to_owned()));
    Ok(())
}

fn check(client: &Client, group: &GroupId, expected: &[(String, String)]) -> anyhow::Result<()> {
    let seen: Vec<(String, String)> = client
        .transcript(group)
        .into_iter()
        .map(|(_, account, text)| (account, text))
        .collect();
    println!("[{}] decrypted {} messages", client.account(), seen.len());
    if seen != expected {
        anyhow::bail!("{} saw {seen:?}, expected {expected:?}", client.account());
    }
    Ok(())
}
