//! Recovery of replicated logs that lost a majority of their voters for good: the stopped
//! node's copy of each log gets a membership in which the node is the only voter.
//!
//! This is unsafe by nature, as in other raft systems: entries that the lost voters
//! committed without this node are gone, and entries that only this node had become
//! committed. The node must therefore be the most up to date survivor, and every other
//! voter must be gone for good or return with an empty data directory.

use super::log_store::{PURGED_KEY, VOTE_KEY, index_key};
use super::{RaftNodeId, TypeConfig, encode};
use openraft::{BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, Vote};
use std::collections::{BTreeMap, BTreeSet};

/// Tree of the cluster addresses this node heard its peers announce, by node name.
const PEERS_TREE: &str = "cluster-peers";

/// Records that the member `name` announced the cluster address `addr`, replacing the
/// address recorded before. [`known_peers`] reads them back while the node is stopped.
pub fn record_peer(db: &sled::Db, name: &str, addr: &str) -> sled::Result<()> {
    let peers = db.open_tree(PEERS_TREE)?;
    if peers.get(name)?.as_deref() != Some(addr.as_bytes()) {
        peers.insert(name, addr)?;
    }
    Ok(())
}

/// Returns every peer this node has heard from, with the cluster address it last announced,
/// sorted by name.
pub fn known_peers(db: &sled::Db) -> sled::Result<Vec<(String, String)>> {
    let peers = db.open_tree(PEERS_TREE)?;
    peers
        .iter()
        .map(|item| {
            let (name, addr) = item?;
            Ok((
                String::from_utf8_lossy(&name).into_owned(),
                String::from_utf8_lossy(&addr).into_owned(),
            ))
        })
        .collect()
}

/// The change that [`make_sole_voter`] made, or would make, to one log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredLog {
    /// Name of the log.
    pub log: String,
    /// Voters of the log before, by raft id.
    pub voters_before: BTreeSet<RaftNodeId>,
    /// Index of the membership entry appended.
    pub index: u64,
    /// Term of that entry; the node's first election after it starts is one term later.
    pub term: u64,
    /// False when the node was the only voter already: nothing was appended.
    pub changed: bool,
}

/// Appends to every replicated log in `db` (a stopped node's database) a membership in which
/// this node, named `name`, is the only voter, and clears its record of having left a log.
/// When the node starts, it elects itself in each log at once, and the leaders add the
/// nodes that join as voters again. Logs that never started are left alone. With `apply`
/// false, changes nothing and returns what it would do.
pub fn make_sole_voter(
    db: &sled::Db,
    name: &str,
    apply: bool,
) -> anyhow::Result<Vec<RecoveredLog>> {
    let me = recovery_identity(db, name)?;
    let mut logs: Vec<String> = db
        .tree_names()
        .iter()
        .filter_map(|tree| tree.strip_prefix(b"raft-meta-"))
        .map(|log| String::from_utf8_lossy(log).into_owned())
        .collect();
    logs.sort();
    let mut recovered = Vec::new();
    for log in logs {
        if let Some(done) = recover_log(db, &log, me, name, apply)? {
            recovered.push(done);
        }
    }
    db.flush()?;
    Ok(recovered)
}

/// Returns the raft id of the node whose database is `db`, after checking that the node
/// ran in a cluster and is named `name`.
pub fn recovery_identity(db: &sled::Db, name: &str) -> anyhow::Result<RaftNodeId> {
    let identity = db.open_tree(format!("raft-identity-{}", super::DIRECTORY_LOG))?;
    let me = match identity.get(b"id")? {
        Some(raw) => u64::from_be_bytes(<[u8; 8]>::try_from(raw.as_ref()).map_err(|_| {
            anyhow::anyhow!(
                "the stored raft id of this node is not 8 bytes; the data directory is damaged"
            )
        })?),
        None => anyhow::bail!(
            "this data directory has no raft id: the node never ran in a cluster, so there is \
             nothing to recover"
        ),
    };
    if let Some(stored) = identity.get(b"name")?
        && stored.as_ref() != name.as_bytes()
    {
        anyhow::bail!(
            "this data directory belongs to node {:?}, not {name:?}; pass --node-name {0}",
            String::from_utf8_lossy(&stored)
        );
    }
    Ok(me)
}

fn recover_log(
    db: &sled::Db,
    log: &str,
    me: RaftNodeId,
    name: &str,
    apply: bool,
) -> anyhow::Result<Option<RecoveredLog>> {
    let entries = db.open_tree(format!("raft-log-{log}"))?;
    let meta = db.open_tree(format!("raft-meta-{log}"))?;
    let damaged = |what: &str, e: rmp_serde::decode::Error| {
        anyhow::anyhow!(
            "the {what} of log {log} cannot be read ({e}); the data directory is damaged"
        )
    };
    let last: Option<LogId<RaftNodeId>> = match entries.last()? {
        Some((_, raw)) => {
            let entry: Entry<TypeConfig> =
                rmp_serde::from_slice(&raw).map_err(|e| damaged("last entry", e))?;
            Some(entry.log_id)
        }
        // Every entry is in a snapshot: the log goes on after the purge point.
        None => meta
            .get(PURGED_KEY)?
            .map(|raw| rmp_serde::from_slice(&raw))
            .transpose()
            .map_err(|e| damaged("purge point", e))?,
    };
    let Some(last) = last else {
        // The log never started on this node.
        return Ok(None);
    };
    let vote: Option<Vote<RaftNodeId>> = meta
        .get(VOTE_KEY)?
        .map(|raw| rmp_serde::from_slice(&raw))
        .transpose()
        .map_err(|e| damaged("vote", e))?;
    let voted_term = vote.map_or(0, |v| v.leader_id.term);
    let term = voted_term.max(last.leader_id.term) + 1;
    let index = last.index + 1;

    // The voters before are those of the newest membership entry still in the log (none when
    // a snapshot contains it).
    let mut voters_before = BTreeSet::new();
    for item in entries.iter().rev() {
        let (_, raw) = item?;
        let entry: Entry<TypeConfig> =
            rmp_serde::from_slice(&raw).map_err(|e| damaged("entry", e))?;
        if let EntryPayload::Membership(membership) = entry.payload {
            voters_before = membership.voter_ids().collect();
            break;
        }
    }

    let alone = voters_before.len() == 1 && voters_before.contains(&me);
    let recovered = RecoveredLog {
        log: log.to_owned(),
        voters_before,
        index,
        term,
        changed: !alone,
    };
    if !apply || alone {
        return Ok(Some(recovered));
    }
    let nodes = BTreeMap::from([(me, BasicNode::new(name))]);
    let membership = Membership::new(vec![BTreeSet::from([me])], nodes);
    let entry = Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(term, me), index),
        payload: EntryPayload::Membership(membership),
    };
    entries.insert(index_key(index), encode(&entry))?;
    meta.insert(VOTE_KEY, encode(&Vote::new(term, me)))?;
    db.open_tree(format!("raft-identity-{log}"))?
        .remove(super::replica::LEFT_KEY)?;
    Ok(Some(recovered))
}
