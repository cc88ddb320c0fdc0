//! Cluster membership with real node processes on 127.0.0.1: joining through seeds, mutual TLS
//! and the cookie, failure detection after SIGKILL and SIGSTOP, and re-admission.

use atlas_chaos::cluster::{
    COOKIE, ClusterFixture, NodeSpec, agreed_leader, agreed_leaders, free_port, group_leader,
    log_view, log_views, logs_caught_up, loopback,
};
use atlas_chaos::{NodeProcess, wait_until};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_atlas");

/// Time a membership change may take to show: the failure timeout plus heartbeats.
const CONVERGE: Duration = Duration::from_secs(20);

/// Creates a cluster directory whose nodes use a 200 ms heartbeat and a 1.5 s failure
/// timeout, so that tests see failures quickly.
fn fixture() -> ClusterFixture {
    ClusterFixture::new(Path::new(BIN), None)
        .unwrap()
        .with_timing(200, 1500)
}

/// Reads the member states a node reports, by name.
fn states(node: &NodeProcess) -> BTreeMap<String, String> {
    let Ok(body) = node.admin_get("/admin/cluster") else {
        return BTreeMap::new();
    };
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn alive(node: &NodeProcess, members: &[&str]) -> bool {
    let states = states(node);
    members
        .iter()
        .all(|m| matches!(states.get(*m).map(String::as_str), Some("alive" | "local")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_detect_failures_and_rejoin() {
    let fixture = fixture();
    let a = fixture.spec("node-a", &[]).unwrap();
    let b = fixture.spec("node-b", &[a.port]).unwrap();
    let c = fixture.spec("node-c", &[b.port]).unwrap();
    let node_a = fixture.start(&a).unwrap();
    let node_b = fixture.start(&b).unwrap();
    let node_c = fixture.start(&c).unwrap();
    let all = ["node-a", "node-b", "node-c"];

    // node-c has only node-b as seed and learns of node-a through it.
    for (name, node) in [("a", &node_a), ("b", &node_b), ("c", &node_c)] {
        let joined = wait_until(CONVERGE, || alive(node, &all)).await;
        assert!(joined, "node-{name} sees {:?}", states(node));
    }
    let status: serde_json::Value =
        serde_json::from_str(&node_a.admin_get("/admin/cluster").unwrap()).unwrap();
    let shards = status["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 16);
    assert!(
        shards
            .iter()
            .all(|s| s["replicas"].as_array().unwrap().len() == 3),
        "every shard has three replicas"
    );

    // SIGKILL: the others mark node-c dead, then alive again after a restart in place.
    let logged_before = fixture.log("node-a").len();
    node_c.kill9().unwrap();
    for node in [&node_a, &node_b] {
        let dead = wait_until(CONVERGE, || {
            states(node).get("node-c").map(String::as_str) == Some("dead")
        })
        .await;
        assert!(dead, "node-c still listed as {:?}", states(node));
    }
    // Each of the 17 logs retries its replication to node-c, but openraft's lines about it
    // are limited to one per source line every 10 s: a few, not hundreds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let retries = fixture.log("node-a")[logged_before..]
        .lines()
        .filter(|line| line.contains("openraft::replication"))
        .count();
    assert!(
        retries <= 30,
        "{retries} lines about replication to the dead node"
    );
    let status: serde_json::Value =
        serde_json::from_str(&node_a.admin_get("/admin/cluster").unwrap()).unwrap();
    assert!(
        status["shards"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["replicas"].as_array().unwrap().len() == 2),
        "placement uses the two live nodes only"
    );
    let node_c = fixture.start(&c).unwrap();
    for node in [&node_a, &node_b, &node_c] {
        let back = wait_until(CONVERGE, || alive(node, &all)).await;
        assert!(back, "after the restart: {:?}", states(node));
    }
    let dead_count = node_a
        .metric("atlas_cluster_membership_changes_total{event=\"dead\"}")
        .unwrap();
    assert!(dead_count >= 1.0, "membership changes are counted");

    // SIGSTOP looks like a partition of node-b: the others mark it dead, and alive once it
    // resumes.
    node_b.signal("STOP").unwrap();
    let paused = wait_until(CONVERGE, || {
        states(&node_a).get("node-b").map(String::as_str) == Some("dead")
    })
    .await;
    node_b.signal("CONT").unwrap();
    assert!(paused, "node-b during SIGSTOP: {:?}", states(&node_a));
    let resumed = wait_until(CONVERGE, || alive(&node_a, &all)).await;
    assert!(resumed, "after SIGCONT: {:?}", states(&node_a));
}

/// Starts node-a and node-b, joined through node-a, and waits until node-a reports both
/// alive.
async fn two_nodes() -> (ClusterFixture, NodeSpec, NodeProcess, NodeProcess) {
    let fixture = fixture();
    let a = fixture.spec("node-a", &[]).unwrap();
    let b = fixture.spec("node-b", &[a.port]).unwrap();
    let node_a = fixture.start(&a).unwrap();
    let node_b = fixture.start(&b).unwrap();
    let pair = ["node-a", "node-b"];
    assert!(wait_until(CONVERGE, || alive(&node_a, &pair)).await);
    (fixture, a, node_a, node_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_and_wrong_cookie_are_refused() {
    let (fixture, a, node_a, node_b) = two_nodes().await;
    let pair = ["node-a", "node-b"];

    // A node whose certificate comes from another CA.
    let rogue_ca = fixture.path("rogue-ca");
    fixture
        .run(&["cert", "ca", "--dir", rogue_ca.to_str().unwrap()])
        .unwrap();
    fixture.certificate("rogue", &rogue_ca).unwrap();
    let rogue = NodeSpec {
        name: "rogue".into(),
        host: [127, 0, 0, 1].into(),
        port: free_port(),
        seeds: loopback(&[a.port]),
        ca_dir: rogue_ca,
        cookie: COOKIE.into(),
        namespace: None,
    };
    let _rogue = fixture.start(&rogue).unwrap();

    // A node with a valid certificate and the wrong cookie.
    let mut stranger = fixture.spec("stranger", &[a.port]).unwrap();
    stranger.cookie = "not-the-cluster-cookie".into();
    let _stranger = fixture.start(&stranger).unwrap();

    // The rogue node rejects node-a's certificate during the handshake, which node-a's
    // listener logs; node-a's own verifier would reject the rogue's certificate next.
    let refused = wait_until(CONVERGE, || {
        let log = fixture.log("node-a");
        (log.contains("cluster peer refused: the TLS handshake failed")
            || log.contains("not from the cluster CA"))
            && log.contains("closed before authenticating")
    })
    .await;
    assert!(refused, "node-a log:\n{}", fixture.log("node-a"));
    let members = states(&node_a);
    assert!(!members.contains_key("rogue"), "{members:?}");
    assert!(!members.contains_key("stranger"), "{members:?}");
    assert!(alive(&node_a, &pair), "{:?}", states(&node_a));
    assert!(alive(&node_b, &pair), "{:?}", states(&node_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_do_not_stop_the_cluster_port() {
    let (fixture, a, node_a, node_b) = two_nodes().await;
    let pair = ["node-a", "node-b"];

    // 100 connections to node-a's cluster port that never start TLS: beyond the handshakes
    // the node runs at once, the rest are closed at once and reported.
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let socket = tokio::net::TcpStream::connect(("127.0.0.1", a.port))
            .await
            .unwrap();
        stalled.push(socket);
    }
    let refused = wait_until(CONVERGE, || {
        fixture
            .log("node-a")
            .contains("too many TLS handshakes in progress")
    })
    .await;
    assert!(refused, "node-a log:\n{}", fixture.log("node-a"));
    // The link between node-a and node-b, open before, keeps working.
    for node in [&node_a, &node_b] {
        let linked = wait_until(CONVERGE, || alive(node, &pair)).await;
        assert!(linked, "{:?}", states(node));
    }

    // Once the stalled handshakes time out, a new node joins through the same port.
    drop(stalled);
    let c = fixture.spec("node-c", &[a.port]).unwrap();
    let _node_c = fixture.start(&c).unwrap();
    let all = ["node-a", "node-b", "node-c"];
    let joined = wait_until(CONVERGE, || alive(&node_a, &all)).await;
    assert!(joined, "{:?}", states(&node_a));
}

/// Membership events of the in-process peer, which the test does not need.
struct Unobserved;

impl atlas_cluster::MembershipObserver for Unobserved {
    fn changed(&self, _event: &'static str, _member: &str) {}
}

/// Starts, in this process, a cluster member that declares the name node-b, with the
/// certificate made for `certificate`, the right cookie and raft id `raft_id`. It listens on
/// `port` and dials the cluster ports `seeds`. The `atlas` binary refuses such a start
/// unless the certificate is node-b's, so the test builds it.
async fn start_posing_peer(
    fixture: &ClusterFixture,
    certificate: &str,
    raft_id: u64,
    port: u16,
    seeds: &[u16],
) -> atlas_cluster::Cluster {
    let certs = fixture.path("certs");
    let tls = atlas_cluster::tls::load_for(
        certificate,
        &fixture.path("ca").join("ca.pem"),
        &certs.join(format!("{certificate}.pem")),
        &certs.join(format!("{certificate}-key.pem")),
    )
    .unwrap();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let settings = atlas_cluster::ClusterSettings {
        node_name: "node-b".into(),
        raft_id,
        advertise: listen,
        seeds: seeds
            .iter()
            .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
            .collect(),
        cookie: COOKIE.into(),
        server_tls: tls.server,
        client_tls: tls.client,
        heartbeat_interval: Duration::from_millis(200),
        failure_timeout: Duration::from_millis(1500),
        formed: Default::default(),
        cluster_id: Default::default(),
        layout: Default::default(),
    };
    let listener = atlas_cluster::Cluster::bind(listen).unwrap();
    atlas_cluster::Cluster::start(settings, listener, std::sync::Arc::new(Unobserved))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_claiming_a_member_name_is_refused_before_its_session() {
    // node-a dials node-b, so a session that node-a accepts under the name node-b is the one
    // ractor_cluster would keep if it ever saw one.
    let fixture = fixture();
    let b = fixture.spec("node-b", &[]).unwrap();
    let a = fixture.spec("node-a", &[b.port]).unwrap();
    let node_b = fixture.start(&b).unwrap();
    let node_a = fixture.start(&a).unwrap();
    let pair = ["node-a", "node-b"];
    assert!(wait_until(CONVERGE, || alive(&node_a, &pair)).await);
    // Closes of authenticated sessions; the fields follow the message.
    let closed = |log: &str| log.matches("cluster session closed peer=").count();
    let closed_before = closed(&fixture.log("node-a"));

    // A peer with a valid certificate made for node-x that declares the name of the live
    // member node-b.
    fixture.certificate("node-x", &fixture.path("ca")).unwrap();
    let posing = start_posing_peer(&fixture, "node-x", 77, free_port(), &[a.port]).await;

    // node-a reads the name from the link's first frame and closes the link before
    // ractor_cluster receives it, and logs both names.
    let refused = |log: &str| {
        log.lines()
            .filter(|line| {
                line.contains("cluster peer refused before its session started")
                    && line.contains("declared=node-b")
                    && line.contains("certificate=node-x")
            })
            .count()
    };
    // The peer dials again after each refusal; two refusals show that no attempt got further.
    let refused_twice = wait_until(CONVERGE, || refused(&fixture.log("node-a")) >= 2).await;
    posing.stop();
    let log_a = fixture.log("node-a");
    eprintln!(
        "PROBE refused={refused_twice} closed_before={closed_before} closed_after={}",
        closed(&log_a)
    );
    // node-a kept its session with the real node-b throughout.
    assert_eq!(closed(&log_a), closed_before, "node-a log:\n{log_a}");
    // No heartbeat of the peer reached node-a: it would show as a new replicated log id.
    assert!(!log_a.contains("new=77"), "node-a log:\n{log_a}");
    assert!(wait_until(CONVERGE, || alive(&node_a, &pair)).await);
    assert!(wait_until(CONVERGE, || alive(&node_b, &pair)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialed_impostor_is_refused() {
    let fixture = fixture();
    let a = fixture.spec("node-a", &[]).unwrap();
    let b = fixture.spec("node-b", &[a.port]).unwrap();
    let c = fixture.spec("node-c", &[a.port]).unwrap();
    let node_a = fixture.start(&a).unwrap();
    let node_b = fixture.start(&b).unwrap();
    let node_c = fixture.start(&c).unwrap();
    let trio = ["node-a", "node-b", "node-c"];
    assert!(wait_until(CONVERGE, || alive(&node_a, &trio)).await);
    node_c.kill9().unwrap();
    let dead = wait_until(CONVERGE, || {
        states(&node_a).get("node-c").map(String::as_str) == Some("dead")
    })
    .await;
    assert!(dead, "node-a did not mark node-c dead");
    let closed = |log: &str| log.matches("cluster session closed peer=").count();
    let closed_before = closed(&fixture.log("node-a"));

    // A process with node-b's certificate and key listens at node-c's address, which the
    // others dial to reach node-c again.
    let posing = start_posing_peer(&fixture, "node-b", 78, c.port, &[]).await;

    // node-a ends the link after the TLS handshake, before ractor_cluster receives it.
    let refused = |log: &str| {
        log.lines()
            .filter(|line| {
                line.contains("cluster peer refused before its session started; dialling")
                    && line.contains("certificate of node-b, but node-c was the member")
            })
            .count()
    };
    let refused_twice = wait_until(CONVERGE, || refused(&fixture.log("node-a")) >= 2).await;
    posing.stop();
    let log_a = fixture.log("node-a");
    assert!(refused_twice, "node-a log:\n{log_a}");
    // node-a kept its session with the real node-b throughout.
    assert_eq!(closed(&log_a), closed_before, "node-a log:\n{log_a}");
    assert!(!log_a.contains("new=78"), "node-a log:\n{log_a}");
    assert!(wait_until(CONVERGE, || alive(&node_a, &trio[..2])).await);
    assert!(wait_until(CONVERGE, || alive(&node_b, &trio[..2])).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_name_keeps_the_first_member() {
    let fixture = fixture();
    let a = fixture.spec("node-a", &[]).unwrap();
    let b = fixture.spec("node-b", &[a.port]).unwrap();
    let node_a = fixture.start(&a).unwrap();
    let _node_b = fixture.start(&b).unwrap();
    let pair = ["node-a", "node-b"];
    assert!(wait_until(CONVERGE, || alive(&node_a, &pair)).await);

    // A second node under the name node-b, on another port, with node-b's certificate.
    let impostor = NodeSpec {
        name: "node-b".into(),
        host: [127, 0, 0, 1].into(),
        port: free_port(),
        seeds: loopback(&[a.port]),
        ca_dir: fixture.path("ca"),
        cookie: COOKIE.into(),
        namespace: None,
    };
    let certs = fixture.path("certs");
    let impostor_dir = fixture.path("impostor");
    let args = [
        "--node-name".to_owned(),
        "node-b".into(),
        "--cluster-listen".into(),
        format!("127.0.0.1:{}", impostor.port),
        "--cluster-cookie".into(),
        COOKIE.into(),
        "--cluster-ca".into(),
        fixture.path("ca").join("ca.pem").display().to_string(),
        "--cluster-cert".into(),
        certs.join("node-b.pem").display().to_string(),
        "--cluster-key".into(),
        certs.join("node-b-key.pem").display().to_string(),
        "--seeds".into(),
        format!("127.0.0.1:{}", a.port),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _impostor = NodeProcess::start(Path::new(BIN), &impostor_dir, &args).unwrap();

    // Depending on timing, ractor_cluster refuses the second link during authentication or
    // drops it as a duplicate, or its heartbeat arrives and the membership ignores it. In
    // every case node-a logs why.
    let noticed = wait_until(CONVERGE, || {
        let log = fixture.log("node-a");
        [
            "two nodes claim the same name",
            "duplicate_connection",
            "auth_fail",
        ]
        .iter()
        .any(|reason| log.contains(reason))
    })
    .await;
    assert!(noticed, "node-a log:\n{}", fixture.log("node-a"));
    let status: serde_json::Value =
        serde_json::from_str(&node_a.admin_get("/admin/cluster").unwrap()).unwrap();
    let member = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "node-b")
        .cloned()
        .unwrap();
    assert_eq!(member["addr"], format!("127.0.0.1:{}", b.port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_log_elects_leader_after_kill() {
    let fixture = fixture();
    let a = fixture.spec("node-a", &[]).unwrap();
    let b = fixture.spec("node-b", &[a.port]).unwrap();
    let c = fixture.spec("node-c", &[a.port]).unwrap();
    let mut nodes = BTreeMap::new();
    nodes.insert("node-a", fixture.start(&a).unwrap());
    nodes.insert("node-b", fixture.start(&b).unwrap());
    nodes.insert("node-c", fixture.start(&c).unwrap());
    let all = ["node-a", "node-b", "node-c"];

    // node-a starts the log alone; its leader makes the others voters as they join.
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let formed = wait_until(CONVERGE, || agreed_leader(&everyone, &all).is_some()).await;
    let views: Vec<_> = everyone.iter().map(|n| log_view(n)).collect();
    assert!(formed, "the three nodes do not agree: {views:?}");
    let leader = agreed_leader(&everyone, &all).unwrap();
    let leaders = everyone
        .iter()
        .filter(|n| log_view(n).is_some_and(|v| v.role == "leader"))
        .count();
    assert_eq!(leaders, 1, "{views:?}");

    // SIGKILL of the leader: the two others elect a new one among themselves.
    let killed = nodes.remove(leader.as_str()).unwrap();
    killed.kill9().unwrap();
    let started = std::time::Instant::now();
    let survivors: Vec<&NodeProcess> = nodes.values().collect();
    // A write through a survivor right away, here a key rotation, waits for the next leader
    // rather than failing on the missing link to the dead one. A request forwarded before
    // the link closed fails with an unknown outcome, and is tried again.
    let deadline = std::time::Instant::now() + CONVERGE;
    let mut failures = Vec::new();
    loop {
        match survivors[0].admin_post("/admin/keys/rotate") {
            Ok(body) => {
                assert!(body.contains("kid"), "{body}");
                break;
            }
            Err(e) => failures.push(e.to_string()),
        }
        assert!(std::time::Instant::now() < deadline, "{failures:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        failures.iter().all(|f| !f.contains("no link")),
        "{failures:?}"
    );
    let elected = wait_until(CONVERGE, || {
        agreed_leader(&survivors, &all).is_some_and(|new| new != leader)
    })
    .await;
    let views: Vec<_> = survivors.iter().map(|n| log_view(n)).collect();
    assert!(elected, "no new leader after killing {leader}: {views:?}");
    println!(
        "new leader of the directory log {:.1} s after SIGKILL of {leader}",
        started.elapsed().as_secs_f64()
    );

    // The killed node restarts from its data directory and follows the new leader.
    let spec = [&a, &b, &c].into_iter().find(|s| s.name == leader).unwrap();
    let name = all.into_iter().find(|n| *n == leader).unwrap();
    nodes.insert(name, fixture.start(spec).unwrap());
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let rejoined = wait_until(CONVERGE, || {
        agreed_leader(&everyone, &all).is_some_and(|new| new != leader)
    })
    .await;
    let views: Vec<_> = everyone.iter().map(|n| log_view(n)).collect();
    assert!(rejoined, "after the restart: {views:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_leader_write_fails_early() {
    let fixture = fixture();
    let (nodes, follower) = three_nodes_and_a_directory_follower(&fixture).await;
    let names = ["node-a", "node-b", "node-c"];
    let everyone: Vec<&NodeProcess> = nodes.iter().collect();
    let leader = agreed_leader(&everyone, &names).unwrap();
    let paused = names.iter().position(|n| *n == leader).unwrap();
    let node = &nodes[follower];
    let trust = atlas_client::ServerTrust::fingerprint(&node.fingerprint).unwrap();

    // A first login registers its device in the directory log, through its leader. Sent
    // right after the pause, it waits for the paused leader until the others elect a new
    // one, and fails 1 s later instead of waiting out the 8 s call limit.
    nodes[paused].signal("STOP").unwrap();
    let mut failures = Vec::new();
    let mut joined = false;
    for attempt in 0..20 {
        let state = fixture.path(&format!("newcomer-{attempt}"));
        let mut client = atlas_client::Client::open(&state, &format!("newcomer{attempt}")).unwrap();
        match client.connect(&node.url(), &trust).await {
            Ok(_) => {
                joined = true;
                break;
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    nodes[paused].signal("CONT").unwrap();
    println!("logins refused before one succeeded: {failures:?}");
    assert!(joined, "no login succeeded: {failures:?}");
    for failure in &failures {
        assert!(!failure.contains("did not answer within"), "{failure}");
        if failure.contains("stopped leading") {
            assert!(
                failure.contains(&format!("{leader} stopped leading")),
                "{failure}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_moves_past_paused_owner() {
    let fixture = fixture();
    let (_, nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    let (alice, bob, group) =
        alice_and_bob(&fixture, &nodes["node-a"], &nodes["node-b"], "owner").await;
    let names = ["node-a", "node-b", "node-c"];
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let mut owner = None;
    wait_until(CONVERGE, || {
        owner = group_leader(&everyone, &names, group.as_bytes());
        owner.is_some()
    })
    .await;
    let owner = owner.expect("no agreed leader of the group's shard");

    // The sender is connected to a node that forwards the send to the group's owner, which
    // is paused. Once the others elect a new leader of the shard, the forwarding node stops
    // waiting for the paused one and stores the send through the new owner.
    let (mut sender, via) = if owner == "node-a" {
        (bob, "node-b")
    } else {
        (alice, "node-a")
    };
    nodes[owner.as_str()].signal("STOP").unwrap();
    let sent = sender.send(&group, "while the owner was paused").await;
    nodes[owner.as_str()].signal("CONT").unwrap();
    sent.unwrap();
    let line = logged_line(&fixture, via, "forwarding to the group's owner failed").await;
    assert!(line.contains("stopped owning the group"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_refuses_writes_until_healed() {
    let fixture = fixture();
    // The node to cut off follows the directory's log: a follower keeps the leader it last
    // heard of, so only its count of live voters shows it is cut off.
    let (nodes, index) = three_nodes_and_a_directory_follower(&fixture).await;
    let cut = &nodes[index];
    let others = all_but(&nodes, index);

    // A client of the node to cut off writes while the cluster is whole.
    let trust = atlas_client::ServerTrust::fingerprint(&cut.fingerprint).unwrap();
    let mut client = atlas_client::Client::open(&fixture.path("alice-state"), "alice").unwrap();
    client.connect(&cut.url(), &trust).await.unwrap();
    let group = client.create_group("partition").await.unwrap();
    let mut acknowledged = vec!["before".to_owned()];
    let mut seqs = vec![client.send(&group, "before").await.unwrap()];

    // Pausing the two others cuts it off with a minority: once its failure detector marks
    // them dead, it refuses writes with a clear error. A request that passed that check
    // before fails in the log.
    for node in &others {
        node.signal("STOP").unwrap();
    }
    let mut refusals = Vec::new();
    let deadline = std::time::Instant::now() + CONVERGE;
    let mut attempt = 0;
    let cut_off = |e: &atlas_client::ClientError| e.to_string().contains("cannot reach a majority");
    while !refusals.iter().any(cut_off) && std::time::Instant::now() < deadline {
        attempt += 1;
        let text = format!("during {attempt}");
        match client.send(&group, &text).await {
            Ok(seq) => {
                acknowledged.push(text);
                seqs.push(seq);
            }
            Err(e) => refusals.push(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A first login, which registers a device, and a read that confirms the latest changes
    // with a majority fail the same way, at once.
    let mut newcomer = atlas_client::Client::open(&fixture.path("carol-state"), "carol").unwrap();
    let login = newcomer.connect(&cut.url(), &trust).await;
    let lookup = client.lookup_devices("alice").await;
    // A rotation cannot publish its new key, so the node keeps signing with the current one.
    let own_keys = |node: &NodeProcess| node.admin_get("/admin/jwks").unwrap();
    let keys_before = own_keys(cut);
    let rotation = cut.admin_post("/admin/keys/rotate");
    let keys_after = own_keys(cut);
    for node in &others {
        node.signal("CONT").unwrap();
    }
    let rotation = rotation.expect_err("a rotation on a node cut off with a minority");
    for part in ["503", "the current key stays in use"] {
        assert!(rotation.to_string().contains(part), "{rotation}");
    }
    assert_eq!(keys_before, keys_after);
    let login = login.expect_err("a device registered on a node cut off with a minority");
    assert!(
        login.to_string().contains("cannot reach a majority"),
        "{login}"
    );
    let lookup = lookup.expect_err("a lookup confirmed on a node cut off with a minority");
    assert!(
        lookup.to_string().contains("cannot reach a majority"),
        "{lookup}"
    );
    let texts: Vec<String> = refusals.iter().map(|e| e.to_string()).collect();
    assert!(refusals.iter().any(cut_off), "refusals: {texts:?}");
    for refusal in &refusals {
        assert_eq!(
            refusal.code(),
            Some(atlas_protocol::ErrorCode::Unavailable),
            "{refusal}"
        );
    }

    // After healing it accepts writes again, and the log contains every acknowledged message
    // once, in order. The send is retried under one message id: an attempt refused while
    // leadership settles may still commit.
    match client.send_reliably(&group, "after").await {
        Ok(seq) => seqs.push(seq),
        Err(e) => panic!("the node still refuses writes after the partition healed: {e}"),
    }
    acknowledged.push("after".to_owned());
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");

    // Every acknowledged message is in the log once, in order. A send refused with
    // `unavailable` may still have been committed (a request queued on a paused node), but
    // at most once. For a few seconds after the pause links may close and reopen, and the
    // node may refuse the read once more, so it is retried then.
    let deadline = std::time::Instant::now() + CONVERGE;
    while let Err(e) = client.sync().await {
        assert_eq!(
            e.code(),
            Some(atlas_protocol::ErrorCode::Unavailable),
            "{e}"
        );
        assert!(std::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let transcript = messages(&client, &group);
    atlas_chaos::assert_acknowledged_once(&transcript, &acknowledged);
    assert!(
        transcript
            .iter()
            .all(|m| acknowledged.contains(m) || m.starts_with("during ")),
        "{transcript:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_node_deposes_no_leader() {
    let fixture = fixture();
    let (nodes, index) = three_nodes_and_a_directory_follower(&fixture).await;
    let names = ["node-a", "node-b", "node-c"];
    let everyone: Vec<&NodeProcess> = nodes.iter().collect();
    let paused = names[index];
    let others = all_but(&nodes, index);

    // Leaders follow placement first, so that the only handovers left are those back to the
    // paused node once it returns.
    let placed = wait_until(2 * CONVERGE, || {
        agreed_leaders(&everyone, &names).is_some()
            && log_views(everyone[0]).is_some_and(|views| {
                views
                    .iter()
                    .skip(1)
                    .all(|v| v.preferred.is_some() && v.leader == v.preferred)
            })
    })
    .await;
    assert!(placed, "the shard logs' leaders did not follow placement");
    let preferred: Vec<Option<String>> = log_views(everyone[0])
        .unwrap()
        .into_iter()
        .map(|v| v.preferred)
        .collect();
    // A follower closes its elections once it hears its leader, at its next check (every
    // 200 ms). The shard logs have just started.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Paused for well over its election timeouts, the node finds every election timer run
    // out when it resumes. The two others elect leaders for the logs it led meanwhile.
    nodes[index].signal("STOP").unwrap();
    let took_over = wait_until(CONVERGE, || {
        agreed_leaders(&others, &names).is_some_and(|leaders| leaders.iter().all(|l| l != paused))
    })
    .await;
    if !took_over {
        nodes[index].signal("CONT").unwrap();
    }
    assert!(
        took_over,
        "the others did not take over the logs {paused} led"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = log_views(others[0]).unwrap();
    nodes[index].signal("CONT").unwrap();

    let back = wait_until(CONVERGE, || others.iter().all(|n| alive(n, &[paused]))).await;
    assert!(back, "{paused} was not heard again");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = log_views(others[0]).unwrap();
    // A log that does not hand its leadership back to the paused node keeps its leader and
    // term: the node raised no term when it resumed.
    for (i, (was, now)) in before.iter().zip(&after).enumerate() {
        if preferred[i].as_deref() == Some(paused) {
            continue;
        }
        assert_eq!(
            (was.term, &was.leader),
            (now.term, &now.leader),
            "log {i} changed its term or leader after {paused} resumed"
        );
    }
    let log = fixture.log(paused);
    assert!(log.contains("did not run for a while"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_presents_no_stale_tree_head() {
    let fixture = fixture();
    // The node that falls behind follows the directory's log, so the others keep its leader.
    let (nodes, index) = three_nodes_and_a_directory_follower(&fixture).await;
    let lagging = &nodes[index];
    let others = all_but(&nodes, index);
    let everyone: Vec<&NodeProcess> = nodes.iter().collect();

    // dave's device is known to every node before one of them falls behind.
    let mut dave = client_on(&fixture, "dave", others[0]).await;
    let lag = address(lagging);
    let caught_up = wait_until(CONVERGE, || logs_caught_up(&everyone)).await;
    assert!(caught_up, "the nodes did not apply the same entries");
    let reached = {
        let mut reached = false;
        let deadline = std::time::Instant::now() + CONVERGE;
        while !reached && std::time::Instant::now() < deadline {
            reached = dave.connect(&lag.url, &lag.trust).await.is_ok();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        reached
    };
    assert!(reached, "dave could not log in on the node to pause");

    // While that node is paused, erin registers elsewhere and dave verifies the larger head.
    lagging.signal("STOP").unwrap();
    let home = address(others[0]);
    dave.connect(&home.url, &home.trust).await.unwrap();
    let _erin = client_on(&fixture, "erin", others[0]).await;
    dave.lookup_devices("erin").await.unwrap();
    let seen = dave.kt_latest_head().unwrap().size;

    // It resumes alone, behind the head dave saw, and cannot catch up.
    for node in &others {
        node.signal("STOP").unwrap();
    }
    lagging.signal("CONT").unwrap();
    let stale = dave.connect(&lag.url, &lag.trust).await;
    for node in &others {
        node.signal("CONT").unwrap();
    }
    let error = stale.expect_err("a node cut off cannot confirm the latest head");
    assert!(
        !matches!(error, atlas_client::ClientError::Security(_)),
        "an honest node that lags was taken for a rolled-back log: {error}"
    );
    assert_eq!(dave.kt_violation(), None);

    // Once healed, it presents a head at least as large as the one dave saw.
    let mut healed = Err(error);
    let deadline = std::time::Instant::now() + CONVERGE;
    while healed.is_err() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        healed = dave.connect(&lag.url, &lag.trust).await;
    }
    if let Err(e) = healed {
        panic!("dave could not connect to the lagging node after healing: {e}");
    }
    assert_eq!(dave.kt_violation(), None);
    assert!(dave.kt_latest_head().unwrap().size >= seen);
}

/// Starts node-a, node-b and node-c, waits until they agree on the leader of every log, and
/// returns them with the index of one that follows the directory's log.
async fn three_nodes_and_a_directory_follower(
    fixture: &ClusterFixture,
) -> ([NodeProcess; 3], usize) {
    let a = fixture.spec("node-a", &[]).unwrap();
    let b = fixture.spec("node-b", &[a.port]).unwrap();
    let c = fixture.spec("node-c", &[a.port]).unwrap();
    let nodes = [
        fixture.start(&a).unwrap(),
        fixture.start(&b).unwrap(),
        fixture.start(&c).unwrap(),
    ];
    let all = ["node-a", "node-b", "node-c"];
    let everyone: Vec<&NodeProcess> = nodes.iter().collect();
    let formed = wait_until(CONVERGE, || agreed_leaders(&everyone, &all).is_some()).await;
    assert!(formed, "the replicated logs did not form");
    let directory_leader = agreed_leaders(&everyone, &all).unwrap()[0].clone();
    let index = all.iter().position(|n| *n != directory_leader).unwrap();
    (nodes, index)
}

/// Returns every node of `nodes` but the one at `index`.
fn all_but(nodes: &[NodeProcess], index: usize) -> Vec<&NodeProcess> {
    nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != index)
        .map(|(_, node)| node)
        .collect()
}

fn address(node: &NodeProcess) -> atlas_client::NodeAddress {
    atlas_client::NodeAddress {
        url: node.url(),
        trust: atlas_client::ServerTrust::fingerprint(&node.fingerprint).unwrap(),
    }
}

/// Opens the client state of `account` in the fixture and connects it to `node`.
async fn client_on(
    fixture: &ClusterFixture,
    account: &str,
    node: &NodeProcess,
) -> atlas_client::Client {
    let state = fixture.path(&format!("{account}-state"));
    let mut client = atlas_client::Client::open(&state, account).unwrap();
    let home = address(node);
    client.connect(&home.url, &home.trust).await.unwrap();
    client
}

/// Connects alice to `alice_node` and bob to `bob_node`, and returns them once alice created
/// the group `name` with bob in it and bob joined.
async fn alice_and_bob(
    fixture: &ClusterFixture,
    alice_node: &NodeProcess,
    bob_node: &NodeProcess,
    name: &str,
) -> (
    atlas_client::Client,
    atlas_client::Client,
    atlas_protocol::GroupId,
) {
    let mut alice = client_on(fixture, "alice", alice_node).await;
    let mut bob = client_on(fixture, "bob", bob_node).await;
    bob.publish_key_packages(2).await.unwrap();
    let group = alice.create_group(name).await.unwrap();
    alice.add_members(&group, &["bob"]).await.unwrap();
    bob.sync().await.unwrap();
    (alice, bob, group)
}

/// Returns the messages of a client's transcript, in log order.
fn messages(client: &atlas_client::Client, group: &atlas_protocol::GroupId) -> Vec<String> {
    client
        .transcript(group)
        .into_iter()
        .map(|(_, _, text)| text)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_spans_nodes_and_survives_killing_the_leader() {
    let fixture = fixture();
    let (specs, mut nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    let all = ["node-a", "node-b", "node-c"];

    // One member per node, each with a list of every node, its own first. KeyPackages uploaded on
    // node-b and node-c are claimed on node-a.
    let homes = [("alice", "node-a"), ("bob", "node-b"), ("carol", "node-c")];
    let mut clients = BTreeMap::new();
    for (account, home) in homes {
        let mut client =
            atlas_client::Client::open(&fixture.path(&format!("{account}-state")), account)
                .unwrap();
        let mut list = vec![address(&nodes[home])];
        list.extend(
            nodes
                .iter()
                .filter(|(name, _)| name.as_str() != home)
                .map(|(_, node)| address(node)),
        );
        client.connect_any(&list).await.unwrap();
        client.publish_key_packages(3).await.unwrap();
        clients.insert(account, client);
    }
    let alice = clients.get_mut("alice").unwrap();
    let group = alice.create_group("across-nodes").await.unwrap();
    alice.add_members(&group, &["bob", "carol"]).await.unwrap();
    let mut acknowledged = Vec::new();
    for (account, _) in homes {
        let client = clients.get_mut(account).unwrap();
        client.sync().await.unwrap();
        let text = format!("hello from {account}");
        client.send_reliably(&group, &text).await.unwrap();
        acknowledged.push(text);
    }

    // A message accepted on node-a reaches bob on node-b as a push, without a sync.
    let alice = clients.get_mut("alice").unwrap();
    alice.send_reliably(&group, "pushed across").await.unwrap();
    acknowledged.push("pushed across".into());
    let bob = clients.get_mut("bob").unwrap();
    let mut pushed = false;
    for _ in 0..50 {
        bob.receive(Duration::from_millis(200)).await.unwrap();
        if messages(bob, &group).iter().any(|m| m == "pushed across") {
            pushed = true;
            break;
        }
    }
    assert!(
        pushed,
        "bob on node-b got no push: {:?}",
        messages(bob, &group)
    );

    // A node that falls behind serves a sync only once it has caught up. Pause a follower
    // of the group's shard log while another member sends, resume it, and sync through it
    // at once.
    let leader = group_leader(&nodes.values().collect::<Vec<_>>(), &all, group.as_bytes()).unwrap();

    // The group's owner wrote its messages through its shard log's append queue, whose
    // metrics count the appends and time the writes. Each append carries one or more
    // messages, and a message sent again may be written twice.
    let owner = &nodes[&leader];
    let appends = owner
        .metric("atlas_replication_appends_per_entry_sum")
        .unwrap();
    let writes = owner
        .metric("atlas_replication_append_write_seconds_count")
        .unwrap();
    assert!(
        appends >= 1.0 && writes >= 1.0 && writes <= appends,
        "{leader} counted {appends} appends in {writes} entries for {} messages",
        acknowledged.len()
    );

    let (reader, reader_home) = *homes.iter().find(|(_, home)| *home != leader).unwrap();
    let (writer, _) = *homes.iter().find(|(_, home)| *home != reader_home).unwrap();
    nodes[reader_home].signal("STOP").unwrap();
    let mut last = String::new();
    for i in 0..5 {
        last = format!("while {reader_home} was paused {i}");
        let client = clients.get_mut(writer).unwrap();
        client.send_reliably(&group, &last).await.unwrap();
        acknowledged.push(last.clone());
    }
    nodes[reader_home].signal("CONT").unwrap();
    let client = clients.get_mut(reader).unwrap();
    client.sync_group(&group).await.unwrap();
    let seen = messages(client, &group);
    assert_eq!(
        seen.last(),
        Some(&last),
        "{reader} on {reader_home} read a stale log"
    );

    // SIGKILL of the leader of the group's shard log, which owns the group. Every member
    // keeps chatting: the one whose node died moves to another node, and sends that failed
    // are sent again under the same message id.
    let (orphan, _) = homes.iter().find(|(_, home)| *home == leader).unwrap();
    nodes.remove(&leader).unwrap().kill9().unwrap();
    let killed_at = std::time::Instant::now();
    let mut first_ack = None;
    for round in 0..3 {
        for (account, _) in homes {
            let text = format!("{account} after the kill, round {round}");
            let client = clients.get_mut(account).unwrap();
            client.send_reliably(&group, &text).await.unwrap();
            first_ack.get_or_insert_with(|| killed_at.elapsed());
            acknowledged.push(text);
        }
    }
    println!(
        "first acknowledged send {:.1} s after SIGKILL of the leader {leader}",
        first_ack.unwrap().as_secs_f64()
    );

    // The killed node restarts from its data, catches up, and its member reads everything.
    let spec = specs.iter().find(|s| s.name == leader).unwrap();
    nodes.insert(leader.clone(), fixture.start(spec).unwrap());
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let rejoined = wait_until(CONVERGE, || agreed_leaders(&everyone, &all).is_some()).await;
    assert!(rejoined, "the restarted node did not rejoin every log");
    let caught_up = wait_until(CONVERGE, || logs_caught_up(&everyone)).await;
    assert!(
        caught_up,
        "the restarted node did not catch up with every log: {:?}",
        everyone.iter().map(|n| log_view(n)).collect::<Vec<_>>()
    );
    let orphan_client = clients.get_mut(orphan).unwrap();
    orphan_client.disconnect();
    let home = address(&nodes[&leader]);
    orphan_client.connect(&home.url, &home.trust).await.unwrap();
    let text = format!("{orphan} back on {leader}");
    orphan_client.send_reliably(&group, &text).await.unwrap();
    acknowledged.push(text);

    // Every member reads every acknowledged message exactly once, in the same order.
    for (account, _) in homes {
        let client = clients.get_mut(account).unwrap();
        let deadline = std::time::Instant::now() + CONVERGE;
        loop {
            client.sync().await.unwrap();
            if messages(client, &group).len() >= acknowledged.len()
                || std::time::Instant::now() >= deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let seen = messages(client, &group);
        let mut in_acknowledged_order = seen.clone();
        in_acknowledged_order.retain(|m| acknowledged.contains(m));
        assert_eq!(
            in_acknowledged_order, acknowledged,
            "{account} saw {seen:?}"
        );
        assert_eq!(seen.len(), acknowledged.len(), "{account} saw {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_leave_hands_over_without_failed_sends() {
    let fixture = fixture();
    let (_specs, mut nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    let all = ["node-a", "node-b", "node-c"];
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let leader = agreed_leader(&everyone, &all).unwrap();
    let others: Vec<String> = all
        .iter()
        .filter(|n| **n != leader)
        .map(|n| (*n).to_owned())
        .collect();

    // alice is on the leader's node, bob on another; both know every node.
    let mut list = vec![address(&nodes[&leader])];
    list.extend(others.iter().map(|n| address(&nodes[n])));
    let mut alice = atlas_client::Client::open(&fixture.path("alice-state"), "alice").unwrap();
    alice.connect_any(&list).await.unwrap();
    let mut bob = atlas_client::Client::open(&fixture.path("bob-state"), "bob").unwrap();
    bob.connect(&list[1].url, &list[1].trust).await.unwrap();
    bob.publish_key_packages(2).await.unwrap();
    let group = alice.create_group("leave").await.unwrap();
    alice.add_members(&group, &["bob"]).await.unwrap();

    // SIGTERM of the leader while alice sends: every send is acknowledged, some after the
    // SDK moved alice to another node.
    let leaving = nodes.remove(&leader).unwrap();
    let stopped = tokio::task::spawn_blocking(move || leaving.terminate(Duration::from_secs(30)));
    let mut acknowledged = Vec::new();
    for i in 0..30 {
        let text = format!("message {i}");
        if let Err(e) = alice.send_reliably(&group, &text).await {
            panic!("send {i} failed: {e}");
        }
        acknowledged.push(text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = match stopped.await.unwrap() {
        Ok(status) => status,
        Err(e) => panic!(
            "{leader} did not stop: {e}; its log:\n{}",
            fixture.log(&leader)
        ),
    };
    assert!(status.success(), "the leaving node exited with {status}");
    let moved_to = alice.current_node().map(|n| n.url.clone());
    assert!(
        moved_to.is_some() && moved_to != Some(list[0].url.clone()),
        "alice did not move off the leaving node: {moved_to:?}"
    );

    // The two others lead every log. The leaver stays a voter: leaving would shrink the logs
    // below the replication factor of 3.
    let survivors: Vec<&NodeProcess> = nodes.values().collect();
    let handed_over = wait_until(CONVERGE, || {
        agreed_leaders(&survivors, &all).is_some_and(|leaders| leaders.iter().all(|l| *l != leader))
    })
    .await;
    let views: Vec<_> = survivors.iter().map(|n| log_views(n)).collect();
    assert!(handed_over, "no leader without {leader}: {views:?}");

    // bob reads every acknowledged message once, in order.
    bob.sync().await.unwrap();
    assert_eq!(messages(&bob, &group), acknowledged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_node_catches_up_from_snapshot() {
    // Snapshots every 10 entries, after which the older entries are removed.
    let fixture = fixture().with_flags(&["--log-snapshot-entries", "10"]);
    let (specs, mut nodes) = fixture.start_cluster(2, CONVERGE).await.unwrap();
    let (mut alice, mut bob, group) =
        alice_and_bob(&fixture, &nodes["node-a"], &nodes["node-b"], "compacted").await;
    let mut sent = Vec::new();
    for i in 0..40 {
        let text = format!("before node-c joined {i}");
        alice.send_reliably(&group, &text).await.unwrap();
        sent.push(text);
    }
    let purged = group_log_number(&nodes["node-a"], &group, "purged").or(group_log_number(
        &nodes["node-b"],
        &group,
        "purged",
    ));
    assert!(
        purged.is_some_and(|p| p > 1),
        "no node removed entries after a snapshot: {purged:?}"
    );

    // node-c joins. The group's shard log no longer starts at its first entry, so node-c can
    // only catch up from a snapshot. Then bob reads the whole group through it.
    let c = fixture.spec("node-c", &[specs[0].port]).unwrap();
    nodes.insert("node-c".into(), fixture.start(&c).unwrap());
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let all = ["node-a", "node-b", "node-c"];
    let joined = wait_until(CONVERGE, || agreed_leaders(&everyone, &all).is_some()).await;
    assert!(joined, "node-c did not become a voter of every log");
    let caught_up = wait_until(CONVERGE, || logs_caught_up(&everyone)).await;
    assert!(
        caught_up,
        "node-c did not reach the others' applied indexes"
    );
    let snapshot = group_log_number(&nodes["node-c"], &group, "snapshot");
    assert!(snapshot.is_some(), "node-c holds no snapshot");
    bob.disconnect();
    let home = address(&nodes["node-c"]);
    bob.connect(&home.url, &home.trust).await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(messages(&bob, &group), sent);
    let text = "after node-c joined".to_owned();
    bob.send_reliably(&group, &text).await.unwrap();
    alice.sync().await.unwrap();
    assert_eq!(messages(&alice, &group).last(), Some(&text));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_from_a_snapshot_reach_connected_members() {
    // Snapshots every 10 entries, after which the older entries are removed.
    let fixture = fixture().with_flags(&["--log-snapshot-entries", "10"]);
    let (_, nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    let (mut alice, mut bob, group) =
        alice_and_bob(&fixture, &nodes["node-a"], &nodes["node-c"], "installed").await;
    let mut carol = client_on(&fixture, "carol", &nodes["node-c"]).await;
    carol.publish_key_packages(2).await.unwrap();
    let applied_before = group_log_number(&nodes["node-c"], &group, "last_applied").unwrap();

    // node-c, which bob and carol are connected to, stops while alice sends through node-a
    // and adds carol. The sends go on until the others' latest snapshots hold every entry, so
    // that node-c gets the later messages and carol's Welcome from a snapshot and none as an
    // entry applied after it. (Requests sent to node-c before its links timed out wait in
    // its sockets, so it may apply the first few entries one by one when it resumes.)
    nodes["node-c"].signal("STOP").unwrap();
    let others = [("node-a", &nodes["node-a"]), ("node-b", &nodes["node-b"])];
    let mut sent = Vec::new();
    let mut covered = false;
    while !covered && sent.len() < 80 {
        if sent.len() == 15 {
            // A log that node-c led refuses writes until the others elect a new leader.
            let deadline = tokio::time::Instant::now() + CONVERGE;
            while let Err(e) = alice.add_members(&group, &["carol"]).await {
                assert!(tokio::time::Instant::now() < deadline, "{e}");
                eprintln!("adding carol failed, trying again: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        let text = format!("while node-c was stopped {}", sent.len());
        alice.send_reliably(&group, &text).await.unwrap();
        sent.push(text);
        covered = sent.len() >= 20
            && wait_until(Duration::from_secs(2), || {
                others.iter().all(|(_, node)| {
                    let snapshot = group_log_number(node, &group, "snapshot");
                    snapshot.is_some() && snapshot == group_log_number(node, &group, "last_applied")
                })
            })
            .await;
    }
    nodes["node-c"].signal("CONT").unwrap();
    assert!(
        covered,
        "no snapshot held the last of {} entries",
        sent.len()
    );
    for (name, node) in others {
        let purged = group_log_number(node, &group, "purged");
        assert!(
            purged.is_some_and(|p| p > applied_before),
            "{name} kept entries after {applied_before}, which node-c applied: {purged:?}"
        );
    }

    // bob and carol only wait for pushes: one from node-c shows bob the new entries, and
    // carol her Welcome, and each reads the group then. That read may fail while node-c finds
    // the others again, and the next receive reads again.
    for (client, expected) in [(&mut bob, &sent[..]), (&mut carol, &sent[15..])] {
        let deadline = tokio::time::Instant::now() + CONVERGE;
        while messages(client, &group) != expected && tokio::time::Instant::now() < deadline {
            if let Err(e) = client.receive(Duration::from_millis(500)).await {
                eprintln!("a read after a push failed, trying again: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        assert_eq!(messages(client, &group), expected);
    }
}

/// Reads a number of a node's status of the log of `group`'s shard: `purged` (the last index
/// removed after a snapshot), `snapshot` (the last index of its latest snapshot) or
/// `last_applied`.
fn group_log_number(
    node: &NodeProcess,
    group: &atlas_protocol::GroupId,
    field: &str,
) -> Option<u64> {
    let body = node.admin_get("/admin/cluster").ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    let shards = status["shards"].as_array()?;
    let shard = atlas_cluster::shard_of(group.as_bytes(), u32::try_from(shards.len()).ok()?);
    shards.get(shard.0 as usize)?["log"][field].as_u64()
}

/// Reads the raft id that `node` reports for the member named `name`.
fn member_raft_id(node: &NodeProcess, name: &str) -> Option<u64> {
    let body = node.admin_get("/admin/cluster").ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    status["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)?["raft_id"]
        .as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impostor_under_taken_name_loses_nothing() {
    let fixture = fixture();
    let (specs, nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    let original = member_raft_id(&nodes["node-a"], "node-b").unwrap();
    let mut alice = atlas_client::Client::open(&fixture.path("alice-state"), "alice").unwrap();
    // The impostor may take node-b's place on node-a's links for as long as it runs (see
    // docs/cluster.md), which can leave node-a without a leader for some logs. Like any client
    // of a node that cannot serve, alice then sends through another node of her list.
    let list = [
        address(&nodes["node-a"]),
        address(&nodes["node-c"]),
        address(&nodes["node-b"]),
    ];
    alice.connect_any(&list).await.unwrap();
    let mut carol = client_on(&fixture, "carol", &nodes["node-c"]).await;
    carol.publish_key_packages(2).await.unwrap();
    let group = alice.create_group("impostor").await.unwrap();
    alice.add_members(&group, &["carol"]).await.unwrap();

    // A second node-b, with node-b's certificate and an empty data directory, joins while
    // alice sends. It has its own id in the replicated logs, so it never votes as node-b.
    let impostor = NodeSpec {
        port: free_port(),
        ..specs[1].clone()
    };
    let args = fixture.cluster_flags(&impostor);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let impostor = NodeProcess::start_logged(
        Path::new(BIN),
        &fixture.path("impostor"),
        &args,
        &fixture.path("impostor.log"),
    )
    .unwrap();
    let mut sent = Vec::new();
    for i in 0..30 {
        let text = format!("with an impostor around {i}");
        alice.send_reliably(&group, &text).await.unwrap();
        sent.push(text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    impostor.kill9().unwrap();

    // NOTE: while the impostor disturbs ractor_cluster's links, the others may count the real
    // node-b as dead for a moment and take the impostor as node-b's new incarnation, which
    // then joins as a learner, catches up and replaces node-b among the voters. Nothing is
    // lost either way, and the real node-b is taken back once the impostor is gone.
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let all = ["node-a", "node-b", "node-c"];
    let healed = wait_until(CONVERGE, || {
        agreed_leader(&everyone, &all).is_some()
            && member_raft_id(&nodes["node-a"], "node-b") == Some(original)
    })
    .await;
    assert!(
        healed,
        "node-b was not taken back after the impostor stopped"
    );
    carol.sync().await.unwrap();
    assert_eq!(messages(&carol, &group), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_wiped_data_rejoins_as_new_member() {
    let fixture = fixture();
    let (specs, mut nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    let mut alice = client_on(&fixture, "alice", &nodes["node-a"]).await;
    let group = alice.create_group("wiped").await.unwrap();
    for i in 0..5 {
        let text = format!("before the wipe {i}");
        alice.send_reliably(&group, &text).await.unwrap();
    }
    let old_id = member_raft_id(&nodes["node-a"], "node-c").unwrap();

    // node-c loses its data directory and starts again under its name.
    nodes.remove("node-c").unwrap().kill9().unwrap();
    std::fs::remove_dir_all(fixture.path("node-c")).unwrap();
    nodes.insert("node-c".into(), fixture.start(&specs[2]).unwrap());

    // The leader replaces the old incarnation with the new one among the voters, and the new
    // one catches up.
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let all = ["node-a", "node-b", "node-c"];
    let replaced = wait_until(CONVERGE, || {
        member_raft_id(&nodes["node-a"], "node-c").is_some_and(|id| id != old_id)
            && agreed_leader(&everyone, &all).is_some()
    })
    .await;
    let views: Vec<_> = everyone.iter().map(|n| log_view(n)).collect();
    assert!(
        replaced,
        "node-c was not replaced among the voters: {views:?}"
    );
    for i in 0..5 {
        let text = format!("after the wipe {i}");
        alice.send_reliably(&group, &text).await.unwrap();
    }
    let mut bob = client_on(&fixture, "bob", &nodes["node-c"]).await;
    bob.publish_key_packages(1).await.unwrap();
    alice.add_members(&group, &["bob"]).await.unwrap();
    let text = "bob joined through node-c".to_owned();
    alice.send_reliably(&group, &text).await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(messages(&bob, &group), [text]);
    assert_eq!(
        member_raft_id(&nodes["node-b"], "node-c"),
        member_raft_id(&nodes["node-a"], "node-c")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seedless_node_with_wiped_data_rejoins() {
    let fixture = fixture();
    let (specs, mut nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    let mut alice = client_on(&fixture, "alice", &nodes["node-b"]).await;

    // node-a, started without seeds, loses its data directory. Started again, it must not
    // start a cluster of its own: the writes it accepted there would be lost, and its key
    // transparency log would fork.
    nodes.remove("node-a").unwrap().kill9().unwrap();
    std::fs::remove_dir_all(fixture.path("node-a")).unwrap();
    nodes.insert("node-a".into(), fixture.start(&specs[0]).unwrap());
    let all = ["node-a", "node-b", "node-c"];
    let mut alone = None;
    let rejoined = wait_until(CONVERGE, || {
        let view = log_view(&nodes["node-a"]);
        if view.as_ref().is_some_and(|v| v.voters == ["node-a"]) {
            alone = view;
        }
        let everyone: Vec<&NodeProcess> = nodes.values().collect();
        alone.is_some() || agreed_leaders(&everyone, &all).is_some()
    })
    .await;
    assert_eq!(alone, None, "node-a started a directory log of its own");
    assert!(rejoined, "node-a did not rejoin the logs");

    // A device registered through node-a is in the cluster's directory: alice, on node-b,
    // claims its KeyPackage with a valid inclusion proof and adds it.
    let mut zed = client_on(&fixture, "zed", &nodes["node-a"]).await;
    zed.publish_key_packages(1).await.unwrap();
    let group = alice.create_group("after-wipe").await.unwrap();
    alice.add_members(&group, &["zed"]).await.unwrap();
    alice.send_reliably(&group, "hello zed").await.unwrap();
    zed.sync().await.unwrap();
    assert_eq!(messages(&zed, &group), ["hello zed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_name_must_match_certificate() {
    let fixture = fixture();
    let spec = fixture.spec("node-a", &[]).unwrap();
    let mut flags = fixture.cluster_flags(&spec);
    let name = flags.iter().position(|f| f == "--node-name").unwrap() + 1;
    flags[name] = "node-1".into();
    let output = run_until_exit(&fixture.path("mismatch"), &flags)
        .await
        .expect("a node with another name than its certificate kept running");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("does not match the common name \"node-a\""),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_of_another_certificate_is_named() {
    let fixture = fixture();
    let spec = fixture.spec("node-a", &[]).unwrap();
    // node-b's certificate is made too, so that its key exists.
    fixture.spec("node-b", &[]).unwrap();
    let mut flags = fixture.cluster_flags(&spec);
    let key = flags.iter().position(|f| f == "--cluster-key").unwrap() + 1;
    flags[key] = flags[key].replace("node-a-key", "node-b-key");
    let output = run_until_exit(&fixture.path("other-key"), &flags)
        .await
        .expect("a node whose key belongs to another certificate kept running");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    for part in [
        "node-a.pem",
        "node-b-key.pem",
        "do not form a valid TLS identity",
        "the key's public key is not the one in the certificate",
    ] {
        assert!(stderr.contains(part), "{part}: {stderr}");
    }

    // A certificate given as the key names the file to give instead.
    flags[key] = flags[key].replace("node-b-key", "node-a");
    let output = run_until_exit(&fixture.path("certificate-as-key"), &flags)
        .await
        .expect("a node with a certificate as its key kept running");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("no private key in the cluster key"),
        "{stderr}"
    );
    assert!(stderr.contains("NAME-key.pem"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_seeds_are_warned_about() {
    let fixture = fixture().with_timing(100, 500);
    // Nothing listens on the seed's port.
    let a = fixture.spec("node-a", &[free_port()]).unwrap();
    let _node_a = fixture.start(&a).unwrap();
    let line = logged_line(&fixture, "node-a", "no cluster member reachable yet").await;
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains(&format!("seeds={}", a.seeds[0])), "{line}");
}

/// Waits up to [`CONVERGE`] for a line of the log of `node` that contains `needle`, and
/// returns it; panics with the log if none appears.
async fn logged_line(fixture: &ClusterFixture, node: &str, needle: &str) -> String {
    let find = || {
        fixture
            .log(node)
            .lines()
            .find(|line| line.contains(needle))
            .map(str::to_owned)
    };
    let logged = wait_until(CONVERGE, || find().is_some()).await;
    assert!(logged, "no line with {needle:?}: {}", fixture.log(node));
    find().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_all_have_seeds_are_warned() {
    let fixture = fixture();
    // Each node names the other as its seed, so neither starts a cluster.
    let mut b = fixture.spec("node-b", &[]).unwrap();
    let a = fixture.spec("node-a", &[b.port]).unwrap();
    b.seeds = loopback(&[a.port]);
    let _node_a = fixture.start(&a).unwrap();
    let _node_b = fixture.start(&b).unwrap();
    let line = logged_line(&fixture, "node-a", "all were started with --seeds").await;
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains("members=node-b"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliable_send_and_read_leave_a_paused_node() {
    let fixture = fixture();
    let (_, nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    let (mut alice, mut bob, group) =
        alice_and_bob(&fixture, &nodes["node-a"], &nodes["node-c"], "paused").await;
    let other = alice.create_group("other").await.unwrap();
    alice.add_members(&other, &["bob"]).await.unwrap();
    bob.sync().await.unwrap();
    let list: Vec<_> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| address(&nodes[*n]))
        .collect();
    assert_eq!(alice.connect_any(&list).await.unwrap(), 0);
    bob.send(&other, "elsewhere").await.unwrap();

    // node-a, which alice uses, accepts connections but never replies. Each request there
    // would wait out the SDK's request timeout, as long as the whole send may take.
    nodes["node-a"].signal("STOP").unwrap();
    let sent = alice.send_reliably(&group, "while paused").await;
    nodes["node-a"].signal("CONT").unwrap();
    sent.unwrap();
    assert_ne!(alice.current_node().unwrap().url, list[0].url);
    bob.sync().await.unwrap();
    assert_eq!(messages(&bob, &group), vec!["while paused".to_owned()]);

    // The failover read bob's message in the other group and moved alice's cursor past it.
    // The client returns it once.
    let missed: Vec<_> = alice
        .take_missed()
        .into_iter()
        .filter(|r| r.group == other)
        .map(|r| r.event)
        .collect();
    assert_eq!(
        missed,
        vec![atlas_client::Event::Message("elsewhere".into())]
    );
    assert!(alice.take_missed().is_empty());
    assert!(alice.sync().await.unwrap().is_empty());

    // A read of the group leaves a paused node the same way. It returns the group's entries
    // that the failover read.
    bob.send(&group, "reply").await.unwrap();
    let current = alice.current_node().unwrap().url.clone();
    let paused = list.iter().position(|n| n.url == current).unwrap();
    let name = ["node-a", "node-b", "node-c"][paused];
    nodes[name].signal("STOP").unwrap();
    let read = alice.sync_group_reliably(&group).await;
    nodes[name].signal("CONT").unwrap();
    let read: Vec<_> = read.unwrap().into_iter().map(|r| r.event).collect();
    assert_eq!(read, vec![atlas_client::Event::Message("reply".into())]);
    assert_ne!(alice.current_node().unwrap().url, current);
    assert_eq!(
        messages(&alice, &group),
        vec!["while paused".to_owned(), "reply".to_owned()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_certificate_leaves_no_data_dir() {
    let fixture = fixture();
    let spec = fixture.spec("node-a", &[]).unwrap();
    let missing = fixture.path("missing.pem").display().to_string();
    let key = fixture.path("certs").join("node-a-key.pem");
    for certificate in ["--cluster-cert", "--tls-cert"] {
        let mut flags = fixture.cluster_flags(&spec);
        set_flag(&mut flags, certificate, &missing);
        if certificate == "--tls-cert" {
            set_flag(&mut flags, "--tls-key", &key.display().to_string());
        }
        let stderr = exit_without_data_dir(&fixture, certificate, &flags).await;
        assert!(stderr.contains("missing.pem"), "{certificate}: {stderr}");
    }
}

/// Sets `flag` to `value` in `flags`, appended if it is not there.
fn set_flag(flags: &mut Vec<String>, flag: &str, value: &str) {
    match flags.iter().position(|f| f == flag) {
        Some(at) => flags[at + 1] = value.to_owned(),
        None => flags.extend([flag.to_owned(), value.to_owned()]),
    }
}

/// Runs a node with `flags` that must fail at start, checks that it made no data directory,
/// and returns its standard error. `case` names the run in messages.
async fn exit_without_data_dir(fixture: &ClusterFixture, case: &str, flags: &[String]) -> String {
    let data = fixture.path(&format!("never-made{case}"));
    let output = run_until_exit(&data, flags)
        .await
        .unwrap_or_else(|| panic!("{case}: the node kept running"));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{case}: {stderr}");
    assert!(!data.exists(), "{case}: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_port_leaves_no_data_dir() {
    let fixture = fixture();
    let spec = fixture.spec("node-a", &[]).unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = holder.local_addr().unwrap().to_string();
    for listener in ["--listen", "--metrics-listen", "--cluster-listen"] {
        let mut flags = fixture.cluster_flags(&spec);
        set_flag(&mut flags, listener, &taken_addr);
        let stderr = exit_without_data_dir(&fixture, listener, &flags).await;
        assert!(stderr.contains(&taken_addr), "{listener}: {stderr}");
        assert!(
            stderr.contains(&format!("pick another {listener}")),
            "{listener}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_of_another_node_is_refused() {
    let fixture = fixture();
    let a = fixture.spec("node-a", &[]).unwrap();
    let node_a = fixture.start(&a).unwrap();
    let status = node_a.terminate(CONVERGE).unwrap();
    assert!(status.success(), "{status}");

    // node-b, with its own name and certificate, on node-a's data directory.
    let b = fixture.spec("node-b", &[]).unwrap();
    let output = run_until_exit(&fixture.path("node-a"), &fixture.cluster_flags(&b))
        .await
        .expect("a node on another node's data directory kept running");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("this data directory belongs to node \"node-a\""),
        "{stderr}"
    );
    assert!(stderr.contains("--node-name node-a"), "{stderr}");

    // node-a itself still starts on it.
    let node_a = fixture.start(&a).unwrap();
    assert!(wait_until(CONVERGE, || alive(&node_a, &["node-a"])).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_other_layout_stops() {
    let fixture = fixture();
    let (specs, nodes) = fixture.start_cluster(2, CONVERGE).await.unwrap();
    let cases = [
        (
            "node-c",
            "--shards",
            "8",
            "runs 8 shards with replication 3, but node-",
        ),
        (
            "node-d",
            "--replication",
            "2",
            "runs 16 shards with replication 2, but node-",
        ),
    ];
    for (name, flag, value, message) in cases {
        let spec = fixture.spec(name, &[specs[0].port]).unwrap();
        let mut flags = fixture.cluster_flags(&spec);
        flags.extend([flag.to_owned(), value.to_owned()]);
        let output = run_until_exit(&fixture.path(name), &flags)
            .await
            .unwrap_or_else(|| panic!("a node with {flag} {value} kept running"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains(message), "{flag}: {stderr}");
        assert!(
            stderr.contains("restart it with --shards 16 --replication 3"),
            "{flag}: {stderr}"
        );
        // It stopped before any log took it in.
        let views = log_views(&nodes["node-a"]).unwrap();
        for view in &views {
            assert!(!view.voters.iter().any(|v| v == name), "{flag}: {view:?}");
            assert!(!view.learners.iter().any(|v| v == name), "{flag}: {view:?}");
        }
    }

    // The member lists may hold the stopped nodes, or not if no heartbeat of theirs
    // arrived. Once they count as dead, `atlas remove-node` drops them everywhere.
    let stopped = ["node-c", "node-d"];
    let dead = wait_until(CONVERGE, || {
        nodes.values().all(|node| {
            let states = states(node);
            stopped
                .iter()
                .all(|name| states.get(*name).is_none_or(|state| state != "alive"))
        })
    })
    .await;
    assert!(dead, "{:?}", states(&nodes["node-a"]));
    let listed = states(&nodes["node-a"]);
    for (name, _, _, _) in cases {
        let answer = remove_node(&nodes["node-b"], name);
        let stdout = String::from_utf8_lossy(&answer.stdout);
        let stderr = String::from_utf8_lossy(&answer.stderr);
        if listed.contains_key(name) {
            assert!(answer.status.success(), "{name}: {stdout} {stderr}");
            let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(answer["removed_from"], serde_json::json!([]), "{answer}");
        } else {
            assert!(!answer.status.success(), "{name}: {stdout}");
            assert!(stderr.contains("no log has a member named"), "{stderr}");
        }
    }
    let forgotten = wait_until(CONVERGE, || {
        nodes.values().all(|node| {
            let states = states(node);
            stopped.iter().all(|name| !states.contains_key(*name))
        })
    })
    .await;
    let now: Vec<_> = nodes.values().map(states).collect();
    assert!(forgotten, "listed before: {listed:?}; now: {now:?}");
}

/// Runs `atlas node` with its data in `data` and `flags`, and returns its output once it
/// exits, or `None` if it still runs after [`CONVERGE`].
async fn run_until_exit(data: &Path, flags: &[String]) -> Option<std::process::Output> {
    let mut child = tokio::process::Command::new(BIN);
    child.arg("node").arg("--data-dir").arg(data);
    for listener in ["--listen", "--metrics-listen"] {
        if !flags.iter().any(|flag| flag == listener) {
            child.args([listener, "127.0.0.1:0"]);
        }
    }
    let child = child
        .args(flags)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(CONVERGE, child.wait_with_output())
        .await
        .ok()
        .map(Result::unwrap)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_keep_three_voters_per_shard() {
    let fixture = fixture();
    let (specs, mut nodes) = fixture.start_cluster(5, 2 * CONVERGE).await.unwrap();
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let views = log_views(everyone[0]).unwrap();
    let (directory, shards) = views.split_first().unwrap();
    assert_eq!(directory.voters.len(), 5, "{directory:?}");
    for shard in shards {
        assert_eq!(shard.voters.len(), 3, "{shard:?}");
    }
    let mut led: BTreeMap<String, usize> = BTreeMap::new();
    for shard in shards {
        *led.entry(shard.leader.clone().unwrap_or_default())
            .or_default() += 1;
    }
    println!("shard logs led, by node: {led:?}");

    // Two members on two nodes chat.
    let (mut alice, mut bob, group) =
        alice_and_bob(&fixture, &nodes["node-a"], &nodes["node-e"], "five").await;
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let text = format!("before {i}");
        alice.send_reliably(&group, &text).await.unwrap();
        acknowledged.push(text);
    }

    // SIGKILL of a node of the group's replica set other than the members'. Each shard it
    // served gets a new voter among the survivors, which catches up; the other shards keep
    // theirs. No log keeps the dead node, as voter or as learner.
    let replicas = views[1 + shard_index(&group, shards.len())].voters.clone();
    let victim = replicas
        .iter()
        .find(|n| *n != "node-a" && *n != "node-e")
        .unwrap()
        .clone();
    nodes.remove(&victim).unwrap().kill9().unwrap();
    for i in 0..5 {
        let text = format!("after {i}");
        alice.send_reliably(&group, &text).await.unwrap();
        acknowledged.push(text);
    }
    let survivors: Vec<&NodeProcess> = nodes.values().collect();
    let moved = wait_until(2 * CONVERGE, || {
        log_views(survivors[0]).is_some_and(|views| {
            views.iter().skip(1).all(|v| {
                v.voters.len() == 3 && !v.voters.contains(&victim) && !v.learners.contains(&victim)
            })
        })
    })
    .await;
    let after = log_views(survivors[0]).unwrap();
    assert!(moved, "{victim} is still a voter of a shard log: {after:?}");
    for (before, now) in shards.iter().zip(&after[1..]) {
        if !before.voters.contains(&victim) {
            assert_eq!(before.voters, now.voters, "a shard without {victim} moved");
        }
    }
    assert_eq!(after[0].voters.len(), 5, "the directory keeps its voters");
    let caught_up = wait_until(CONVERGE, || logs_caught_up(&survivors)).await;
    assert!(caught_up, "the survivors did not apply the same entries");

    // bob reads every acknowledged message once, in order, through node-e.
    bob.sync().await.unwrap();
    assert_eq!(messages(&bob, &group), acknowledged);

    // The victim restarts: its shards move back to it once it caught up, and the nodes that
    // stood in for it step down to learners.
    let spec = specs.iter().find(|s| s.name == victim).unwrap();
    nodes.insert(victim.clone(), fixture.start(spec).unwrap());
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let names: Vec<&str> = nodes.keys().map(String::as_str).collect();
    let back = wait_until(2 * CONVERGE, || {
        agreed_leaders(&everyone, &names).is_some()
            && log_views(everyone[0]).is_some_and(|now| {
                now.iter()
                    .map(|v| &v.voters)
                    .eq(views.iter().map(|v| &v.voters))
            })
    })
    .await;
    assert!(
        back,
        "the shards did not move back: {:?}",
        log_views(everyone[0])
    );
    let learners_back = wait_until(CONVERGE, || {
        log_views(everyone[0]).is_some_and(|now| now.iter().skip(1).all(|v| v.learners.len() == 2))
    })
    .await;
    assert!(
        learners_back,
        "{victim} is not a learner of every other shard log again"
    );
    let caught_up = wait_until(CONVERGE, || logs_caught_up(&everyone)).await;
    assert!(caught_up, "{victim} did not catch up with every log");
    // Leadership follows placement too: each shard log's leader hands over to the first node
    // of the shard's replica set, so the victim leads its shards again.
    let preferred_lead = wait_until(2 * CONVERGE, || {
        agreed_leaders(&everyone, &names).is_some()
            && log_views(everyone[0]).is_some_and(|now| {
                now.iter()
                    .skip(1)
                    .all(|v| v.preferred.is_some() && v.leader == v.preferred)
            })
    })
    .await;
    assert!(
        preferred_lead,
        "some shard log is not led by its preferred leader: {:?}",
        log_views(everyone[0])
    );
    alice.send_reliably(&group, "back").await.unwrap();
    acknowledged.push("back".to_owned());
    bob.sync().await.unwrap();
    assert_eq!(messages(&bob, &group), acknowledged);

    // SIGTERM of the victim: each shard log it votes in takes the next node of the shard's
    // order in the change that removes it, so none is seen with fewer than three voters.
    let leaver = nodes.remove(&victim).unwrap();
    let stopped = tokio::task::spawn_blocking(move || leaver.terminate(Duration::from_secs(30)));
    let mut fewest = usize::MAX;
    while !stopped.is_finished() {
        if let Some(now) = log_views(&nodes["node-a"]) {
            let smallest = now.iter().skip(1).map(|v| v.voters.len()).min();
            fewest = fewest.min(smallest.unwrap_or(usize::MAX));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = stopped.await.unwrap().unwrap();
    assert!(status.success(), "{victim} exited with {status}");
    assert_eq!(
        fewest, 3,
        "a shard log had {fewest} voters while {victim} left"
    );
    let after_leave = log_views(&nodes["node-a"]).unwrap();
    for view in &after_leave[1..] {
        assert_eq!(view.voters.len(), 3, "{view:?}");
        assert!(!view.voters.contains(&victim), "{view:?}");
    }
    alice.send_reliably(&group, "left").await.unwrap();
    acknowledged.push("left".to_owned());
    bob.sync().await.unwrap();
    assert_eq!(messages(&bob, &group), acknowledged);

    // The victim restarts at once, holding the memberships from before it left. It starts
    // no elections in the logs it left, so when the leaders add it back (15 s after it left)
    // they meet no higher term: the directory log, which no handover moves, keeps its term.
    let directory_term = log_views(&nodes["node-a"]).unwrap()[0].term;
    nodes.insert(victim.clone(), fixture.start(spec).unwrap());
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let names: Vec<&str> = nodes.keys().map(String::as_str).collect();
    let rejoined = wait_until(2 * CONVERGE, || {
        agreed_leaders(&everyone, &names).is_some()
            && log_views(everyone[0]).is_some_and(|now| now[0].voters.len() == 5)
    })
    .await;
    assert!(rejoined, "{victim} did not vote in the directory log again");
    let now = log_views(&nodes["node-a"]).unwrap();
    assert_eq!(now[0].term, directory_term, "{:?}", now[0]);
    alice.send_reliably(&group, "rejoined").await.unwrap();
    acknowledged.push("rejoined".to_owned());
    bob.sync().await.unwrap();
    assert_eq!(messages(&bob, &group), acknowledged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restarts_without_one_nodes_data() {
    let fixture = fixture();
    let (specs, mut nodes) = fixture.start_cluster(5, 2 * CONVERGE).await.unwrap();
    let (mut alice, mut bob, group) =
        alice_and_bob(&fixture, &nodes["node-a"], &nodes["node-e"], "restart").await;
    alice.send_reliably(&group, "before").await.unwrap();

    // Every node stops at once (SIGTERM). Leaving keeps at least three voters in every log,
    // so losing node-c's data afterwards still leaves each log a majority.
    stop_all(&mut nodes).await;
    std::fs::remove_dir_all(fixture.path("node-c")).unwrap();
    for spec in &specs {
        nodes.insert(spec.name.clone(), fixture.start(spec).unwrap());
    }
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let names: Vec<&str> = nodes.keys().map(String::as_str).collect();
    let formed = wait_until(2 * CONVERGE, || agreed_leaders(&everyone, &names).is_some()).await;
    let views: Vec<_> = everyone.iter().map(|n| log_views(n)).collect();
    assert!(formed, "the logs did not recover: {views:?}");

    alice.disconnect();
    let home = address(&nodes["node-a"]);
    alice.connect(&home.url, &home.trust).await.unwrap();
    alice.send_reliably(&group, "after").await.unwrap();
    bob.disconnect();
    let home = address(&nodes["node-e"]);
    bob.connect(&home.url, &home.trust).await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(messages(&bob, &group), ["before", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_with_two_histories_stay_apart() {
    let fixture = fixture();
    let (specs, mut nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    let mut alice = client_on(&fixture, "alice", &nodes["node-b"]).await;
    let group = alice.create_group("apart").await.unwrap();
    alice.send_reliably(&group, "before").await.unwrap();

    // Every node stops. node-a, started without seeds, loses its data and starts while the
    // others are down, so it starts a new cluster with a history of its own.
    stop_all(&mut nodes).await;
    std::fs::remove_dir_all(fixture.path("node-a")).unwrap();
    nodes.insert("node-a".into(), fixture.start(&specs[0]).unwrap());
    let alone = wait_until(CONVERGE, || {
        log_views(&nodes["node-a"]).is_some_and(|views| {
            views.len() > 1 && views.iter().all(|v| v.leader.as_deref() == Some("node-a"))
        })
    })
    .await;
    assert!(
        alone,
        "node-a did not start alone: {:?}",
        log_views(&nodes["node-a"])
    );

    // The others return, with each other as seeds too. Each side ignores the other: the logs
    // of node-b and node-c keep their history, and node-a does not take the place of its
    // earlier incarnation.
    let ports: Vec<u16> = specs.iter().map(|s| s.port).collect();
    for spec in &specs[1..] {
        let mut spec = spec.clone();
        let others: Vec<u16> = ports.iter().copied().filter(|p| *p != spec.port).collect();
        spec.seeds = loopback(&others);
        nodes.insert(spec.name.clone(), fixture.start(&spec).unwrap());
    }
    let pair = [&nodes["node-b"], &nodes["node-c"]];
    let all = ["node-a", "node-b", "node-c"];
    let formed = wait_until(CONVERGE, || {
        agreed_leaders(&pair, &all)
            .is_some_and(|leaders| leaders.iter().all(|l| l == "node-b" || l == "node-c"))
    })
    .await;
    assert!(
        formed,
        "node-b and node-c did not lead: {:?}",
        log_views(pair[0])
    );
    alice.disconnect();
    let home = address(&nodes["node-b"]);
    // A login reads the key transparency head, which waits until node-b counts a majority
    // of the directory's voters alive again.
    let mut connected = Err(atlas_client::ClientError::NotConnected);
    let deadline = std::time::Instant::now() + CONVERGE;
    while connected.is_err() && std::time::Instant::now() < deadline {
        connected = alice.connect(&home.url, &home.trust).await;
        if connected.is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if let Err(e) = connected {
        panic!("alice could not log in on node-b: {e}");
    }
    alice.send_reliably(&group, "after").await.unwrap();
    assert_eq!(messages(&alice, &group), ["before", "after"]);
    assert!(
        !alive(&nodes["node-b"], &["node-a"]),
        "{:?}",
        states(&nodes["node-b"])
    );
    let node_a = log_views(&nodes["node-a"]).unwrap();
    assert!(node_a.iter().all(|v| v.voters == ["node-a"]), "{node_a:?}");
    let log_b = fixture.log("node-b");
    assert!(
        log_b.contains("a node of another cluster reached this one"),
        "{log_b}"
    );
    assert!(!log_b.contains("panicked"), "{log_b}");
}

/// Sends SIGTERM to every node at once and checks that each exits with success.
async fn stop_all(nodes: &mut BTreeMap<String, NodeProcess>) {
    let stopping: Vec<_> = std::mem::take(nodes)
        .into_iter()
        .map(|(name, node)| {
            let stopped =
                tokio::task::spawn_blocking(move || node.terminate(Duration::from_secs(30)));
            (name, stopped)
        })
        .collect();
    for (name, stopped) in stopping {
        let status = stopped.await.unwrap().unwrap();
        assert!(status.success(), "{name} exited with {status}");
    }
}

/// Returns the shard of `group` among `shards` shards.
fn shard_index(group: &atlas_protocol::GroupId, shards: usize) -> usize {
    atlas_cluster::shard_of(group.as_bytes(), u32::try_from(shards).unwrap()).0 as usize
}

/// Runs the `atlas` command `args` against a node's admin listener.
fn atlas_admin(node: &NodeProcess, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .args(["--admin", &node.metrics_addr.to_string()])
        .output()
        .unwrap()
}

/// Runs `atlas remove-node NAME` against a node's admin listener.
fn remove_node(node: &NodeProcess, name: &str) -> std::process::Output {
    atlas_admin(node, &["remove-node", name])
}

/// Kills node-c with SIGKILL, waits until node-b marks it dead, and removes it through
/// node-b with `atlas remove-node`. Returns the command's JSON output.
async fn lose_and_remove_node_c(nodes: &mut BTreeMap<String, NodeProcess>) -> serde_json::Value {
    nodes.remove("node-c").unwrap().kill9().unwrap();
    let dead = wait_until(CONVERGE, || {
        states(&nodes["node-b"]).get("node-c").map(String::as_str) == Some("dead")
    })
    .await;
    assert!(dead, "{:?}", states(&nodes["node-b"]));
    let removed = remove_node(&nodes["node-b"], "node-c");
    let stdout = String::from_utf8_lossy(&removed.stdout);
    assert!(
        removed.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&removed.stderr)
    );
    serde_json::from_str(&stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_removes_a_lost_node() {
    let fixture = fixture();
    let (specs, mut nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    let (mut alice, mut bob, group) =
        alice_and_bob(&fixture, &nodes["node-a"], &nodes["node-b"], "lost").await;
    alice.send_reliably(&group, "before").await.unwrap();

    // A live node is not removed.
    let refused = remove_node(&nodes["node-a"], "node-c");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("node-c is alive"), "{stderr}");
    let views = log_views(&nodes["node-a"]).unwrap();
    assert!(
        views
            .iter()
            .all(|v| v.voters.contains(&"node-c".to_owned()))
    );
    // A name that is in no log, a typo for instance, is an error too.
    let unknown = remove_node(&nodes["node-a"], "node-x");
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("no log has a member named node-x"),
        "{stderr}"
    );
    // The endpoint itself refuses a name with characters that no node name has, such as a
    // line break that would start a line of its own in the log.
    let forged = nodes["node-a"]
        .admin_post("/admin/cluster/remove/x%0Aforged")
        .unwrap_err()
        .to_string();
    assert!(forged.contains("400"), "{forged}");
    assert!(forged.contains("invalid node name"), "{forged}");
    assert!(!fixture.log("node-a").contains("forged"));
    // An empty name never reaches the node.
    let empty = remove_node(&nodes["node-a"], "");
    assert!(!empty.status.success());
    let stderr = String::from_utf8_lossy(&empty.stderr);
    assert!(
        stderr.contains("a node name has 1 to 64 characters"),
        "{stderr}"
    );

    // node-c is lost for good. The directory log would keep it as a voter; the operator
    // removes it through node-b, which may or may not lead the logs.
    let answer = lose_and_remove_node_c(&mut nodes).await;
    let logs = answer["removed_from"].as_array().unwrap();
    assert!(logs.iter().any(|l| l == "cluster"), "{answer}");
    let gone = wait_until(CONVERGE, || {
        log_views(&nodes["node-a"]).is_some_and(|views| {
            views.iter().all(|v| {
                !v.voters.contains(&"node-c".to_owned())
                    && !v.learners.contains(&"node-c".to_owned())
            })
        })
    })
    .await;
    assert!(
        gone,
        "node-c is still a member: {:?}",
        log_views(&nodes["node-a"])
    );
    let forgotten = wait_until(CONVERGE, || {
        nodes
            .values()
            .all(|node| !states(node).contains_key("node-c"))
    })
    .await;
    let now: Vec<_> = nodes.values().map(states).collect();
    assert!(forgotten, "node-c is still listed: {now:?}");

    // A new node takes its place: every log has three voters again, none of them node-c.
    let spec = fixture.spec("node-d", &[specs[0].port]).unwrap();
    nodes.insert("node-d".into(), fixture.start(&spec).unwrap());
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let names = ["node-a", "node-b", "node-d"];
    let formed = wait_until(2 * CONVERGE, || agreed_leaders(&everyone, &names).is_some()).await;
    assert!(formed, "{:?}", log_views(everyone[0]));
    let views = log_views(everyone[0]).unwrap();
    assert!(views.iter().all(|v| v.voters == names), "{views:?}");

    alice.send_reliably(&group, "after").await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(messages(&bob, &group), ["before", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_removed_node_keeps_terms() {
    let fixture = fixture();
    let (specs, mut nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    lose_and_remove_node_c(&mut nodes).await;
    let pair = [&nodes["node-a"], &nodes["node-b"]];
    let settled = wait_until(CONVERGE, || {
        agreed_leaders(&pair, &["node-a", "node-b"]).is_some()
    })
    .await;
    assert!(settled, "{:?}", log_views(pair[0]));
    let before = log_views(pair[0]).unwrap();

    // node-c returns with its data: every log it kept lists it as a voter. The others no
    // longer do, and they add it back as a new member.
    nodes.insert("node-c".into(), fixture.start(&specs[2]).unwrap());
    let logged = wait_until(CONVERGE, || {
        fixture
            .log("node-c")
            .contains("voters do not list this node as a member of the log")
    })
    .await;
    assert!(logged, "{}", fixture.log("node-c"));
    // Until a leader adds it back, it rejects reads at once rather than wait for entries
    // that do not come. A leader may have added it back already, and then the read passes.
    let trust = atlas_client::ServerTrust::fingerprint(&nodes["node-c"].fingerprint).unwrap();
    let (conn, _) = atlas_client::RawConnection::open(&nodes["node-c"].url(), &trust)
        .await
        .unwrap();
    let reply = conn.request(atlas_protocol::ClientBody::KtHead).await;
    if !matches!(reply, Ok(atlas_protocol::ServerBody::KtHead(_))) {
        let reply = format!("{reply:?}");
        assert!(
            reply.contains("waits for a leader to add it back"),
            "{reply}"
        );
    }
    drop(conn);
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let names = ["node-a", "node-b", "node-c"];
    let back = wait_until(3 * CONVERGE, || agreed_leaders(&everyone, &names).is_some()).await;
    assert!(back, "{:?}", log_views(everyone[0]));
    let after = log_views(everyone[0]).unwrap();
    // A log may hand its leadership to node-c, as placement prefers. A log that kept its
    // leader kept its term: node-c raised none while it was not a member.
    let same_leader: Vec<usize> = (0..before.len())
        .filter(|i| before[*i].leader == after[*i].leader)
        .collect();
    assert!(
        !same_leader.is_empty(),
        "every log changed its leader: {after:?}"
    );
    for i in same_leader {
        assert_eq!(
            before[i].term, after[i].term,
            "log {i} changed its term after node-c returned"
        );
    }
    stop_all(&mut nodes).await;
}

/// Returns the key id that a receipt's signature names.
fn receipt_kid(receipt: &atlas_protocol::receipts::SignedReceipt) -> String {
    let input = &receipt.receipt.signature_input;
    input
        .split("keyid=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the receipt names its key")
        .to_owned()
}

/// Fetches the JWKS of `node` until it lists every key of `kids`, for at most [`CONVERGE`].
/// Returns the last JWKS fetched.
async fn jwks_listing(node: &NodeProcess, kids: &[&str]) -> atlas_protocol::transparency::Jwks {
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let jwks = fetch_jwks(node).await;
        if kids.iter().all(|kid| jwks.find(kid).is_some()) || std::time::Instant::now() > deadline {
            return jwks;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Fetches a node's JWKS once, over a client connection.
async fn fetch_jwks(node: &NodeProcess) -> atlas_protocol::transparency::Jwks {
    let trust = atlas_client::ServerTrust::fingerprint(&node.fingerprint).unwrap();
    let (conn, _) = atlas_client::RawConnection::open(&node.url(), &trust)
        .await
        .unwrap();
    match conn
        .request(atlas_protocol::ClientBody::Jwks)
        .await
        .unwrap()
    {
        atlas_protocol::ServerBody::Jwks(jwks) => jwks,
        other => panic!("expected the JWKS, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_verify_against_every_nodes_jwks() {
    let fixture = fixture();
    let (_specs, nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    let (mut alice, _bob, group) =
        alice_and_bob(&fixture, &nodes["node-a"], &nodes["node-b"], "receipts").await;
    let first = alice.send(&group, "signed by node-a").await.unwrap();
    let first_kid = receipt_kid(alice.receipt(&group, first).unwrap());

    // node-a rotates its key: the next receipt names the new key, and the old one stays
    // published for its grace period.
    let body = nodes["node-a"].admin_post("/admin/keys/rotate").unwrap();
    assert!(body.contains("kid"), "{body}");
    let second = alice
        .send(&group, "signed after the rotation")
        .await
        .unwrap();
    let second_kid = receipt_kid(alice.receipt(&group, second).unwrap());
    assert_ne!(first_kid, second_kid);

    // The rotation published the new key before it signed: the first JWKS each node serves
    // afterwards lists it.
    for name in ["node-b", "node-c"] {
        let jwks = fetch_jwks(&nodes[name]).await;
        assert!(
            jwks.find(&second_kid).is_some(),
            "{name} does not list the new key of node-a: {jwks:?}"
        );
    }

    for name in ["node-a", "node-b", "node-c"] {
        let jwks = jwks_listing(&nodes[name], &[&first_kid, &second_kid]).await;
        for seq in [first, second] {
            let receipt = alice.receipt(&group, seq).unwrap();
            assert_eq!(
                receipt.verify(&jwks),
                Ok(()),
                "receipt of entry {seq} against the JWKS of {name}"
            );
        }
    }

    // Each node lists the keys of the others too.
    let own: Vec<String> = ["node-b", "node-c"]
        .iter()
        .map(|name| {
            let body = nodes[*name].admin_get("/admin/jwks").unwrap();
            let jwks: atlas_protocol::transparency::Jwks = serde_json::from_str(&body).unwrap();
            assert_eq!(jwks.keys.len(), 1, "{name}: {body}");
            jwks.keys[0].kid.clone()
        })
        .collect();
    let own: Vec<&str> = own.iter().map(String::as_str).collect();
    for name in ["node-a", "node-b", "node-c"] {
        let jwks = jwks_listing(&nodes[name], &own).await;
        for kid in &own {
            assert!(jwks.find(kid).is_some(), "{name} does not list {kid}");
        }
    }
}

/// Runs `atlas status --group GROUP` against a node's admin listener.
fn group_status(node: &NodeProcess, group: &str) -> std::process::Output {
    atlas_admin(node, &["status", "--group", group])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_shard_of_a_group() {
    let fixture = fixture();
    let (_specs, nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    let mut alice = client_on(&fixture, "alice", &nodes["node-a"]).await;
    let group = alice.create_group("placed").await.unwrap();
    let full: serde_json::Value =
        serde_json::from_str(&nodes["node-b"].admin_get("/admin/cluster").unwrap()).unwrap();
    let shards = full["shards"].as_array().unwrap().len();

    let output = group_status(&nodes["node-b"], &group.to_string());
    assert!(output.status.success(), "{output:?}");
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["group"], group.to_string());
    let shard = &status["shard"];
    assert_eq!(shard["shard"], shard_index(&group, shards));
    assert_eq!(shard["replicas"].as_array().unwrap().len(), 3, "{shard}");
    // The shard's log leader is the node that owns the group's actor.
    let leader = shard["log"]["leader"].as_str().unwrap_or_default();
    assert!(
        ["node-a", "node-b", "node-c"].contains(&leader),
        "no leader in {shard}"
    );

    // The command rejects an id that is not hexadecimal before any request, and the node's
    // endpoint rejects one too.
    let bad = group_status(&nodes["node-b"], "not-hex");
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("invalid group id \"not-hex\""), "{stderr}");
    let rejected = nodes["node-b"].admin_get("/admin/cluster/group/zz");
    let message = format!("{rejected:?}");
    assert!(message.contains("400 Bad Request"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivor_recovers_logs_after_losing_the_majority() {
    let fixture = fixture();
    let (specs, mut nodes) = fixture.start_cluster(3, CONVERGE).await.unwrap();
    let (mut alice, bob, group) =
        alice_and_bob(&fixture, &nodes["node-a"], &nodes["node-b"], "recovered").await;
    drop(bob);
    let before: Vec<String> = (0..5).map(|i| format!("before the loss {i}")).collect();
    for text in &before {
        alice.send_reliably(&group, text).await.unwrap();
    }
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    assert!(wait_until(CONVERGE, || logs_caught_up(&everyone)).await);
    let logs = log_views(&nodes["node-a"]).unwrap().len();
    drop(alice);

    let data = fixture.path("node-a");
    let recover = |dir: &Path, force: bool| {
        let mut command = std::process::Command::new(BIN);
        command.args(["recover", "--node-name", "node-a", "--data-dir"]);
        command.arg(dir);
        if force {
            command.arg("--force");
        }
        command.output().unwrap()
    };

    // While its peers still run, the command rejects the recovery and changes nothing.
    nodes.remove("node-a").unwrap().kill9().unwrap();
    let premature = recover(&data, true);
    assert!(!premature.status.success(), "{premature:?}");
    let stderr = String::from_utf8_lossy(&premature.stderr);
    for peer in [
        "node-b at 127.0.0.1:",
        "node-c at 127.0.0.1:",
        "recovery rejected",
    ] {
        assert!(stderr.contains(peer), "{stderr}");
    }
    let warned = recover(&data, false);
    let warning = String::from_utf8_lossy(&warned.stdout);
    assert!(warning.contains("--force would reject"), "{warning}");
    assert!(!warning.contains("the only voter already"), "{warning}");

    // node-b and node-c are lost with their disks; node-a alone has no majority in any log.
    for name in ["node-b", "node-c"] {
        nodes.remove(name).unwrap().kill9().unwrap();
        std::fs::remove_dir_all(fixture.path(name)).unwrap();
    }
    let wiped = fixture.path("node-b");
    let missing = recover(&wiped, true);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("does not exist"), "{stderr}");
    std::fs::create_dir(&wiped).unwrap();
    let empty = recover(&wiped, true);
    assert!(!empty.status.success());
    let stderr = String::from_utf8_lossy(&empty.stderr);
    assert!(stderr.contains("contains no node database"), "{stderr}");
    std::fs::remove_dir(&wiped).unwrap();
    // A wrong name is reported before any peer is dialled.
    let renamed = std::process::Command::new(BIN)
        .args(["recover", "--node-name", "node-c", "--force", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&renamed.stderr);
    assert!(stderr.contains("belongs to node \"node-a\""), "{stderr}");
    assert!(renamed.stdout.is_empty(), "{renamed:?}");

    // Without --force the command only reports what it would do, then does exactly that.
    let dry = recover(&data, false);
    assert!(dry.status.success(), "{dry:?}");
    let planned = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(planned.contains("nothing changed"), "{planned}");
    let forced = recover(&data, true);
    assert!(forced.status.success(), "{forced:?}");
    let done = String::from_utf8_lossy(&forced.stdout).into_owned();
    let log_lines = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|line| line.starts_with("log "))
            .map(|line| line.replace("would be", "is now"))
            .collect()
    };
    assert_eq!(log_lines(&planned), log_lines(&done));
    assert!(
        done.contains("dialled 2 peer(s) at their cluster addresses: 0 accepted"),
        "{done}"
    );
    let changed = done.matches("is now the only voter").count();
    assert_eq!(changed, logs, "{done}");
    // A second run finds nothing to change.
    let again = recover(&data, true);
    assert!(again.status.success(), "{again:?}");
    let unchanged = String::from_utf8_lossy(&again.stdout).into_owned();
    assert_eq!(
        unchanged.matches("the only voter already").count(),
        logs,
        "{unchanged}"
    );

    // node-a leads every log alone, and the nodes that return with empty disks become
    // voters again.
    nodes.insert("node-a".into(), fixture.start(&specs[0]).unwrap());
    nodes.insert("node-b".into(), fixture.start(&specs[1]).unwrap());
    nodes.insert("node-c".into(), fixture.start(&specs[2]).unwrap());
    let everyone: Vec<&NodeProcess> = nodes.values().collect();
    let all = ["node-a", "node-b", "node-c"];
    let formed = wait_until(2 * CONVERGE, || agreed_leaders(&everyone, &all).is_some()).await;
    let views: Vec<_> = everyone.iter().map(|n| log_views(n)).collect();
    assert!(
        formed,
        "the logs did not take the returning nodes back: {views:?}"
    );
    let running = recover(&data, true);
    assert!(!running.status.success());
    let stderr = String::from_utf8_lossy(&running.stderr);
    assert!(stderr.contains("stop the node first"), "{stderr}");

    // Every acknowledged message is still there, read through a node that lost its disk, and
    // the group takes new messages.
    let mut alice = client_on(&fixture, "alice", &nodes["node-a"]).await;
    let mut bob = client_on(&fixture, "bob", &nodes["node-c"]).await;
    alice
        .send_reliably(&group, "after the recovery")
        .await
        .unwrap();
    bob.sync().await.unwrap();
    let mut expected = before.clone();
    expected.push("after the recovery".to_owned());
    assert_eq!(messages(&bob, &group), expected);
}
