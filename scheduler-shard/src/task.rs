//! The task state machine: the one place that decides which state change is allowed.
//!
//! ```text
//! READY -> IN_PROGRESS -> DONE | ERROR
//! READY | IN_PROGRESS -> CANCELLED
//! IN_PROGRESS -> READY        (lease expired, or a retryable failure with attempts left)
//! ```

use pm_proto::v1::TaskState;

/// What happens to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Leased to an agent.
    Dispatch,
    /// The lease ran out, or the agent handed the task back.
    Requeue,
    /// The agent reported a final result.
    Finish { succeeded: bool },
    /// A client cancelled it.
    Cancel,
    /// It can never run (e.g. redelivered too often).
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {} task cannot take {event:?}", from.as_str_name())]
pub struct InvalidTransition {
    pub from: TaskState,
    pub event: Event,
}

/// The state after `event`, or why it cannot happen.
pub fn transition(from: TaskState, event: Event) -> Result<TaskState, InvalidTransition> {
    use TaskState::*;
    let to = match (from, event) {
        (Ready, Event::Dispatch) => InProgress,
        (InProgress, Event::Requeue) => Ready,
        (InProgress, Event::Finish { succeeded: true }) => Done,
        (InProgress, Event::Finish { succeeded: false }) => Error,
        (Ready | InProgress, Event::Cancel) => Cancelled,
        (Ready | InProgress, Event::Fail) => Error,
        _ => return Err(InvalidTransition { from, event }),
    };
    Ok(to)
}

/// Whether a state is final: nothing moves a task out of it.
pub fn is_final(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::Done | TaskState::Error | TaskState::Cancelled
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn any_state() -> impl Strategy<Value = TaskState> {
        prop_oneof![
            Just(TaskState::Ready),
            Just(TaskState::InProgress),
            Just(TaskState::Done),
            Just(TaskState::Error),
            Just(TaskState::Cancelled),
        ]
    }

    fn any_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Dispatch),
            Just(Event::Requeue),
            Just(Event::Finish { succeeded: true }),
            Just(Event::Finish { succeeded: false }),
            Just(Event::Cancel),
            Just(Event::Fail),
        ]
    }

    #[test]
    fn the_documented_edges() {
        use TaskState::*;
        let finals: Vec<bool> = [Ready, InProgress, Done, Error, Cancelled]
            .into_iter()
            .map(is_final)
            .collect();
        assert_eq!(finals, [false, false, true, true, true]);
        assert_eq!(transition(Ready, Event::Dispatch), Ok(InProgress));
        assert_eq!(transition(InProgress, Event::Requeue), Ok(Ready));
        assert_eq!(
            transition(InProgress, Event::Finish { succeeded: true }),
            Ok(Done)
        );
        assert_eq!(
            transition(InProgress, Event::Finish { succeeded: false }),
            Ok(Error)
        );
        assert_eq!(transition(Ready, Event::Cancel), Ok(Cancelled));
        assert_eq!(transition(InProgress, Event::Cancel), Ok(Cancelled));
        assert!(transition(Ready, Event::Finish { succeeded: true }).is_err());
        assert!(transition(Ready, Event::Requeue).is_err());
        assert!(transition(InProgress, Event::Dispatch).is_err());
    }

    proptest! {
        /// Final states are absorbing, and any run of events keeps the task in a known state.
        #[test]
        fn final_states_absorb(start in any_state(), events in prop::collection::vec(any_event(), 0..20)) {
            let mut state = start;
            for event in events {
                match transition(state, event) {
                    Ok(next) => {
                        prop_assert!(!is_final(state), "{state:?} moved to {next:?}");
                        state = next;
                    }
                    Err(e) => prop_assert_eq!(e.from, state),
                }
            }
            prop_assert!(state != TaskState::Unspecified);
        }
    }
}
