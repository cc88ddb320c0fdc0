//! Sends group requests to the group's actor, starting it through the supervisor when needed.

use atlas_actors::{GroupError, GroupMsg, SupervisorMsg};
use atlas_protocol::GroupId;
use ractor::concurrency::oneshot;
use ractor::{ActorRef, MessagingErr, RpcReplyPort};
use std::time::Duration;

/// Attempts to reach a group actor that stopped between lookup and send.
const SEND_ATTEMPTS: usize = 5;

/// Routes requests to group actors on this node.
#[derive(Clone)]
pub struct Router {
    supervisor: ActorRef<SupervisorMsg>,
}

impl Router {
    pub fn new(supervisor: ActorRef<SupervisorMsg>) -> Self {
        Self { supervisor }
    }

    /// Sends the message built by `build` to the group's actor and waits for its reply. An
    /// actor that stopped (idle or failed) is replaced by a fresh one loaded from storage.
    pub async fn request<T: Send + 'static>(
        &self,
        group: &GroupId,
        build: impl FnOnce(RpcReplyPort<Result<T, GroupError>>) -> GroupMsg,
    ) -> Result<T, GroupError> {
        let (tx, rx) = oneshot();
        let mut message = build(tx.into());
        for attempt in 0..SEND_ATTEMPTS {
            let actor = self.lookup(group).await?;
            match actor.send_message(message) {
                Ok(()) => return rx.await.unwrap_or(Err(GroupError::Unavailable)),
                Err(MessagingErr::SendErr(returned)) => {
                    message = returned;
                    tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
                }
                Err(_) => return Err(GroupError::Unavailable),
            }
        }
        Err(GroupError::Unavailable)
    }

    async fn lookup(&self, group: &GroupId) -> Result<ActorRef<GroupMsg>, GroupError> {
        let group = group.clone();
        ractor::call!(self.supervisor, |reply| SupervisorMsg::Lookup {
            group,
            reply
        })
        .map_err(|_| GroupError::Unavailable)?
    }

    /// Number of running group actors.
    pub async fn actors_alive(&self) -> usize {
        ractor::call!(self.supervisor, SupervisorMsg::Count).unwrap_or(0)
    }
}
