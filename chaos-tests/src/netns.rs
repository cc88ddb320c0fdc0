//! Network namespaces for partition tests. Each node runs in a namespace of its own, linked
//! by a veth pair to a bridge in a hub namespace, so a test can cut one node off the others
//! while every process keeps running. Everything lives in namespaces that the test creates
//! and deletes; the host's own network is not touched.
//!
//! Creating namespaces needs root (or `CAP_SYS_ADMIN` and `CAP_NET_ADMIN`) and the `ip`
//! program; [`Network::create`] fails without them, and tests then skip.

use std::net::IpAddr;
use std::process::Command;

/// The first three bytes of the nodes' addresses; node `i` (from 0) gets `.i+1`.
const SUBNET: [u8; 3] = [10, 213, 0];

/// Namespaces of a set of nodes and the hub that links them. Dropping it deletes them all,
/// which also removes their links.
pub struct Network {
    /// Prefix of every namespace name, unique to this process and network.
    prefix: String,
    /// Node names, in the order of their addresses.
    nodes: Vec<String>,
}

impl Network {
    /// Creates the hub and one namespace per node in `nodes`, each with its loopback up and
    /// an address on the hub's bridge.
    pub fn create(nodes: &[&str]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            nodes.len() < 250,
            "{} nodes: one subnet holds 249 at most",
            nodes.len()
        );
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let serial = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let network = Self {
            prefix: format!("atlas-{}-{serial}", std::process::id()),
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
        };
        // On failure, dropping `network` deletes what was created so far.
        let hub = network.hub();
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "add", "bridge", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "bridge", "up"])?;
        for (i, node) in nodes.iter().enumerate() {
            let namespace = network.namespace(node)?;
            let (inside, outside) = (format!("node{i}"), format!("port{i}"));
            ip(&["netns", "add", &namespace])?;
            ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
            // The pair is made in the hub, then one end moves into the node's namespace.
            ip(&[
                "-n", &hub, "link", "add", &inside, "type", "veth", "peer", "name", &outside,
            ])?;
            ip(&["-n", &hub, "link", "set", &inside, "netns", &namespace])?;
            ip(&["-n", &hub, "link", "set", &outside, "master", "bridge"])?;
            ip(&["-n", &hub, "link", "set", &outside, "up"])?;
            let address = format!("{}/24", network.address(node)?);
            ip(&["-n", &namespace, "addr", "add", &address, "dev", &inside])?;
            ip(&["-n", &namespace, "link", "set", &inside, "up"])?;
        }
        Ok(network)
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    fn index(&self, node: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n == node)
            .ok_or_else(|| anyhow::anyhow!("{node} is not a node of this network"))
    }

    /// Returns the name of the namespace of `node`.
    pub fn namespace(&self, node: &str) -> anyhow::Result<String> {
        Ok(format!("{}-{}", self.prefix, self.index(node)?))
    }

    /// Returns the address of `node` on the bridge.
    pub fn address(&self, node: &str) -> anyhow::Result<IpAddr> {
        let last = u8::try_from(self.index(node)? + 1)?;
        Ok(IpAddr::from([SUBNET[0], SUBNET[1], SUBNET[2], last]))
    }

    /// Cuts `node` off the bridge: its link goes down, so no packet passes either way, and
    /// connections stall as across a real partition.
    pub fn cut(&self, node: &str) -> anyhow::Result<()> {
        let port = format!("port{}", self.index(node)?);
        ip(&["-n", &self.hub(), "link", "set", &port, "down"])
    }

    /// Links `node` to the bridge again.
    pub fn heal(&self, node: &str) -> anyhow::Result<()> {
        let port = format!("port{}", self.index(node)?);
        ip(&["-n", &self.hub(), "link", "set", &port, "up"])
    }

    /// Returns a command that runs `program` inside the namespace of `node`.
    pub fn command(&self, node: &str, program: &std::path::Path) -> anyhow::Result<Command> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace(node)?])
            .arg(program);
        Ok(command)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace removes its links; processes still in it keep it alive until
        // they end, so stop the nodes first.
        for i in 0..self.nodes.len() {
            let _ = ip(&["netns", "del", &format!("{}-{i}", self.prefix)]);
        }
        let _ = ip(&["netns", "del", &self.hub()]);
    }
}

/// Runs `ip` with `args` and fails with its output when it fails.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run `ip` (install iproute2): {e}"))?;
    anyhow::ensure!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}
