//! The supervisor of group session actors: starts one on demand from storage, drops its entry
//! when it stops (idle) or fails, and starts a fresh one from storage on the next request. State
//! acknowledged to clients is on disk, so a restart loses none of it.

use crate::group::{GroupArgs, GroupMsg, GroupSession, GroupSettings};
use crate::{ActorMetrics, Deliver, GroupError};
use atlas_protocol::{DeviceId, GroupId, LogEntry, WelcomeEntry};
use atlas_storage::Store;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::HashMap;
use std::sync::Arc;

/// Messages of the supervisor.
pub enum SupervisorMsg {
    /// Returns the running actor of a group, starting it if needed.
    Lookup {
        group: GroupId,
        reply: RpcReplyPort<Result<ActorRef<GroupMsg>, GroupError>>,
    },
    /// Returns the number of running group actors.
    Count(RpcReplyPort<usize>),
    /// Hands an entry that another node appended, now applied here, to the group's actor,
    /// starting it if needed, so that it pushes the entry to the members connected here.
    Replicated {
        group: GroupId,
        entry: LogEntry,
        welcomes: Vec<(DeviceId, WelcomeEntry)>,
    },
}

// The supervisor is reached on its own node only.
impl ractor::Message for SupervisorMsg {}

/// Arguments of the supervisor.
pub struct SupervisorArgs {
    pub store: Store,
    /// Signs the receipt of every accepted entry.
    pub keyring: Arc<crate::Keyring>,
    pub deliver: Arc<dyn Deliver>,
    pub settings: GroupSettings,
    pub metrics: ActorMetrics,
}

/// Supervisor of all group session actors on this node.
pub struct GroupSupervisor;

/// Running group actors, indexed both ways.
pub struct SupervisorState {
    args: SupervisorArgs,
    by_group: HashMap<GroupId, ActorRef<GroupMsg>>,
    by_actor: HashMap<ActorId, GroupId>,
}

impl Actor for GroupSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SupervisorState {
            args,
            by_group: HashMap::new(),
            by_actor: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Lookup { group, reply } => {
                let result = state.lookup(myself, group).await;
                let _ = reply.send(result);
            }
            SupervisorMsg::Count(reply) => {
                let _ = reply.send(state.by_group.len());
            }
            SupervisorMsg::Replicated {
                group,
                entry,
                welcomes,
            } => match state.lookup(myself, group.clone()).await {
                Ok(actor) => {
                    let seq = entry.seq;
                    if actor
                        .send_message(GroupMsg::Replicated { entry, welcomes })
                        .is_err()
                    {
                        // The actor stopped meanwhile; its successor loads the entry from
                        // storage, and members connected here get it when they sync.
                        tracing::debug!(group_id = %group, seq, "entry not pushed: group actor stopped");
                    }
                }
                Err(e) => {
                    tracing::warn!(group_id = %group, error = %e, "cannot start the actor of a replicated group");
                }
            },
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(group) = state.forget(cell.get_id()) {
                    tracing::debug!(group_id = %group, reason = ?reason, "group actor ended");
                }
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                if let Some(group) = state.forget(cell.get_id()) {
                    tracing::error!(group_id = %group, error = %error, "group actor failed; it restarts from storage on next use");
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl SupervisorState {
    async fn lookup(
        &mut self,
        myself: ActorRef<SupervisorMsg>,
        group: GroupId,
    ) -> Result<ActorRef<GroupMsg>, GroupError> {
        if let Some(actor) = self.by_group.get(&group) {
            return Ok(actor.clone());
        }
        let (meta, public_state) = self
            .args
            .store
            .load_group(&group)?
            .ok_or_else(|| GroupError::NotFound(group.to_string()))?;
        let args = GroupArgs {
            group: group.clone(),
            meta,
            public_state,
            store: self.args.store.clone(),
            keyring: Arc::clone(&self.args.keyring),
            deliver: Arc::clone(&self.args.deliver),
            settings: self.args.settings.clone(),
            metrics: self.args.metrics.clone(),
        };
        let (actor, _) = Actor::spawn_linked(None, GroupSession, args, myself.get_cell())
            .await
            .map_err(|e| {
                GroupError::Internal(format!("cannot start actor of group {group}: {e}"))
            })?;
        self.by_actor.insert(actor.get_id(), group.clone());
        self.by_group.insert(group, actor.clone());
        Ok(actor)
    }

    fn forget(&mut self, id: ActorId) -> Option<GroupId> {
        let group = self.by_actor.remove(&id)?;
        self.by_group.remove(&group);
        Some(group)
    }
}
