//! The supervisor's decisions, as functions from facts to a decision: no
//! I/O, unit-tested without root. The supervisor gathers the facts (run
//! records, the cache, back-off files) and carries the decisions out.
//!
//! The others live beside the facts they need: restore or cold
//! ([`crate::restore::plan`], from the image and the data), eager or lazy and
//! never slower than cold ([`crate::restore::choose`]), and not retrying
//! what keeps failing ([`super::backoff::Failures::skip`]).

use crate::manifest::Mode;
use crate::restore::Failure;
use crate::supervisor::record::ServiceState;

/// What a ready service's checkpoint decision rests on.
#[derive(Debug, Clone, Default)]
pub struct ReadyFacts {
    pub mode: Mode,
    pub checkpoint_enabled: bool,
    /// `warmer run --cold` (a baseline): never checkpoints.
    pub cold_run: bool,
    pub state: Option<ServiceState>,
    /// A usable (current, not stale) image of this digest exists.
    pub have_image: bool,
    /// Why checkpoints of this digest are held back, if they are (failed
    /// checkpoints, or images that could not be restored).
    pub backoff: Option<String>,
}

/// The checkpoint at ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AtReady {
    /// Nothing to do: persist mode, checkpoints off, a baseline run, an
    /// image that is already there, or a service not ready.
    Nothing,
    /// Not now, for this reason (shown in `status`).
    Skip(String),
    /// Settle, then take it.
    Take,
}

/// Warm mode takes one checkpoint when a cold-started service is ready,
/// unless its digest has a usable image or its checkpoints are held back.
pub fn checkpoint_at_ready(f: &ReadyFacts) -> AtReady {
    if f.mode != Mode::Warm
        || !f.checkpoint_enabled
        || f.cold_run
        || !f.state.is_some_and(ServiceState::can_checkpoint)
        || f.have_image
    {
        return AtReady::Nothing;
    }
    match &f.backoff {
        Some(why) => AtReady::Skip(why.clone()),
        None => AtReady::Take,
    }
}

/// Whether a failed restore counts toward holding the digest's checkpoints
/// back. Only what says this state cannot be brought back counts (CRIU
/// failing, the restored service failing or never ready, its
/// `after_restore` hook failing: each would fail the same way with the next
/// image of it); a damaged file (the disk's fault, not the state's), an
/// operator's signal or a stop request say nothing about the next checkpoint.
pub fn counts_against_state(failure: &Failure) -> bool {
    matches!(
        failure,
        Failure::Criu(_) | Failure::Exited(_) | Failure::NotReady(_) | Failure::AfterRestore(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> ReadyFacts {
        ReadyFacts {
            mode: Mode::Warm,
            checkpoint_enabled: true,
            state: Some(ServiceState::Ready),
            ..ReadyFacts::default()
        }
    }

    #[test]
    fn a_ready_warm_service_without_an_image_is_checkpointed() {
        assert_eq!(checkpoint_at_ready(&ready()), AtReady::Take);
    }

    #[test]
    fn nothing_is_taken_when_it_is_not_warm_ready_and_missing() {
        for f in [
            ReadyFacts {
                mode: Mode::Persist,
                ..ready()
            },
            ReadyFacts {
                checkpoint_enabled: false,
                ..ready()
            },
            ReadyFacts {
                cold_run: true,
                ..ready()
            },
            ReadyFacts {
                have_image: true,
                ..ready()
            },
            ReadyFacts {
                state: Some(ServiceState::Stopping),
                ..ready()
            },
        ] {
            assert_eq!(checkpoint_at_ready(&f), AtReady::Nothing, "{f:?}");
        }
    }

    #[test]
    fn held_back_checkpoints_are_skipped_with_the_reason() {
        let f = ReadyFacts {
            backoff: Some("it failed 3 times".into()),
            ..ready()
        };
        assert_eq!(
            checkpoint_at_ready(&f),
            AtReady::Skip("it failed 3 times".into())
        );
    }

    #[test]
    fn only_criu_and_the_restored_service_count_against_the_state() {
        let damaged = Failure::Damaged(cache::Problem::Checksum {
            path: "pages-1.img".into(),
        });
        assert!(!counts_against_state(&damaged));
        assert!(!counts_against_state(&Failure::Stopped));
        assert!(!counts_against_state(&Failure::EndedBySignal(143)));
        assert!(counts_against_state(&Failure::Exited(1)));
        assert!(counts_against_state(&Failure::AfterRestore("hook".into())));
        assert!(counts_against_state(&Failure::NotReady(
            std::time::Duration::from_secs(1)
        )));
    }
}
