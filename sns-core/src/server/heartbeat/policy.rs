//! What a server decides from its heartbeats, as plain values: when the next beat goes out,
//! whether it claims mastership, when a master steps down, and how a coordinator's answer moves
//! its role and epochs. No sockets, no clock, no lock: the heartbeat loop passes the time (since
//! the link started) and the server's current role in, and carries the decisions out.
//!
//! Invariants:
//! - **An answer wins.** Every answer is taken as it comes: the role it assigns, whatever it was
//!   before and however long the previous answer took. A master the answer names slave steps
//!   down at once.
//! - **Stepping down.** A master steps down at a failed beat when strictly more than the failure
//!   timeout (`interval × missed heartbeats`, at least one interval) has passed since the last
//!   answer, or since the link started when none came yet; never at a beat that was answered,
//!   never at a failed beat before that. A server that holds no mastership at that moment (it
//!   may have stepped down on its own, on hearing of a newer epoch) has nothing to step down
//!   from.
//! - **Claiming.** A beat claims mastership only after an answer assigned it and until the next
//!   answer or the step-down: a master that stepped down comes back, if at all, under a new
//!   epoch.
//! - **Refusals.** A refusal no retry can change (a bad argument, a wrong token) ends the link:
//!   the server gives up.
//! - **Epochs only move forward.** The newest known epoch is the highest ever heard. The epoch a
//!   server writes under rises only when it is made master under a newer one; a slave keeps the
//!   epoch of its own log, so a coordinator that lost its state can tell whose log is newest.
//! - **Schedule.** The first beat goes out at once, then one per interval, four per interval
//!   while a slave has no stream to its master (so a promotion reaches it quickly).

use std::time::Duration;

use crate::ids::Epoch;
use crate::server::Role;

/// The heartbeat loop's state: when beats went out and were answered, and whether this server
/// claims mastership. Times are durations since the link started.
#[derive(Debug, Clone)]
pub(super) struct Heartbeats {
    interval: Duration,
    failure_timeout: Duration,
    /// When the last answer arrived (the link's start before the first).
    last_answer: Duration,
    /// When the last beat went out, if one did.
    last_beat: Option<Duration>,
    /// Whether the last beat was answered (the link starts out reachable).
    reachable: bool,
    /// Whether this server's beats claim mastership.
    claiming: bool,
}

/// What became of one heartbeat; `A` is the rest of an answer (epoch, master, slaves), which
/// the policy hands back untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer<A> {
    /// The coordinator answered and assigned `role`.
    Assigned(Role, A),
    /// No answer: the call failed or timed out; a later beat may get one.
    Failed(String),
    /// The coordinator refused this server in a way no retry can change.
    Refused(String),
}

/// What the heartbeat loop does about an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Decision<A> {
    /// Take the role, epoch, master and slaves the answer assigns; `regained` when the beats
    /// before it had failed.
    Assign {
        role: Role,
        answer: A,
        regained: bool,
    },
    /// Keep going; `first` when this is the first failure since an answer (worth a warning).
    Unanswered { why: String, first: bool },
    /// As [`Decision::Unanswered`], and the master steps down: no answer for longer than the
    /// failure timeout.
    StepDown { why: String, first: bool },
    /// Stop heartbeating: this server cannot go on.
    GiveUp(String),
}

impl Heartbeats {
    /// The state of a link that starts now (at zero), beating every `interval` and stepping a
    /// master down after `missed_heartbeats` intervals (at least one) without an answer.
    pub(super) fn new(interval: Duration, missed_heartbeats: u32) -> Self {
        Self {
            interval,
            failure_timeout: interval * missed_heartbeats.max(1),
            last_answer: Duration::ZERO,
            last_beat: None,
            reachable: true,
            claiming: false,
        }
    }

    /// When the next beat is due (at once for the first); `lost_master` when this server is a
    /// slave without a stream to its master. A beat may go out earlier when asked for.
    pub(super) fn next_beat(&self, lost_master: bool) -> Duration {
        let period = if lost_master {
            self.interval / 4
        } else {
            self.interval
        };
        self.last_beat.map_or(Duration::ZERO, |last| last + period)
    }

    /// A beat went out at `now`.
    pub(super) fn sent(&mut self, now: Duration) {
        self.last_beat = Some(now);
    }

    /// Whether the next beat claims mastership.
    pub(super) fn claiming(&self) -> bool {
        self.claiming
    }

    /// Steps the state with the fate of a beat, known at `now`; `held` is the role the server
    /// holds at that moment.
    pub(super) fn step<A>(&mut self, now: Duration, answer: Answer<A>, held: Role) -> Decision<A> {
        match answer {
            Answer::Assigned(role, answer) => {
                let regained = !self.reachable;
                self.reachable = true;
                self.last_answer = now;
                self.claiming = role == Role::Master;
                Decision::Assign {
                    role,
                    answer,
                    regained,
                }
            }
            Answer::Failed(why) => {
                let first = self.reachable;
                self.reachable = false;
                let silent = now.saturating_sub(self.last_answer);
                if held == Role::Master && silent > self.failure_timeout {
                    self.claiming = false;
                    Decision::StepDown { why, first }
                } else {
                    Decision::Unanswered { why, first }
                }
            }
            Answer::Refused(why) => Decision::GiveUp(why),
        }
    }
}

/// The role and epochs a server holds, as an answer from the coordinator finds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Held {
    pub(super) role: Role,
    /// The epoch the server writes under as master, or the epoch of its log's last entry.
    pub(super) epoch: Epoch,
    /// The newest cluster epoch the server has heard of.
    pub(super) known_epoch: Epoch,
}

impl Held {
    /// What the server holds once the coordinator assigned it `role` in the cluster's `epoch`.
    pub(super) fn assigned(self, role: Role, epoch: Epoch) -> Self {
        let writes_under = if role == Role::Master && epoch > self.epoch {
            epoch
        } else {
            self.epoch
        };
        Self {
            role,
            epoch: writes_under,
            known_epoch: self.known_epoch.max(epoch),
        }
    }

    /// Whether an answer in the cluster's `epoch` vouches for this server as master: only then
    /// does it confirm which slaves left (an answer of an older epoch says nothing about them).
    pub(super) fn vouched_by(self, epoch: Epoch) -> bool {
        self.role == Role::Master && self.epoch == epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(500);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn failed() -> Answer<()> {
        Answer::Failed("heartbeat timed out".to_string())
    }

    /// A link of 500 ms beats, two missed beats (a failure timeout of 1 s), made master at
    /// `at`.
    fn master_since(at: Duration) -> Heartbeats {
        let mut beats = Heartbeats::new(INTERVAL, 2);
        beats.step(at, Answer::Assigned(Role::Master, ()), Role::Slave);
        beats
    }

    fn steps_down(decision: &Decision<()>) -> bool {
        matches!(decision, Decision::StepDown { .. })
    }

    #[test]
    fn a_master_steps_down_at_the_first_failed_beat_past_the_failure_timeout() {
        let mut beats = master_since(ms(100));
        assert!(!steps_down(&beats.step(ms(1100), failed(), Role::Master)));
        assert!(steps_down(&beats.step(ms(1101), failed(), Role::Master)));
        assert!(!beats.claiming());
    }

    #[test]
    fn a_master_does_not_step_down_before_the_failure_timeout() {
        let mut beats = master_since(ms(0));
        for at in [100, 600, 999, 1000] {
            let decision = beats.step(ms(at), failed(), Role::Master);
            assert!(!steps_down(&decision), "stepped down after {at} ms");
            assert!(beats.claiming());
        }
    }

    #[test]
    fn an_answer_restarts_the_failure_timeout() {
        let mut beats = master_since(ms(0));
        beats.step(ms(900), failed(), Role::Master);
        beats.step(ms(1000), Answer::Assigned(Role::Master, ()), Role::Master);
        assert!(!steps_down(&beats.step(ms(1900), failed(), Role::Master)));
        assert!(!steps_down(&beats.step(ms(2000), failed(), Role::Master)));
        assert!(steps_down(&beats.step(ms(2001), failed(), Role::Master)));
    }

    #[test]
    fn an_answer_after_the_failure_timeout_keeps_the_master() {
        let mut beats = master_since(ms(0));
        let decision = beats.step(ms(5000), Answer::Assigned(Role::Master, ()), Role::Master);
        assert_eq!(
            decision,
            Decision::Assign {
                role: Role::Master,
                answer: (),
                regained: false
            }
        );
        assert!(beats.claiming());
    }

    #[test]
    fn the_failure_timeout_counts_from_the_link_start_before_any_answer() {
        let mut beats = Heartbeats::new(INTERVAL, 2);
        assert!(!steps_down(&beats.step(ms(1000), failed(), Role::Master)));
        assert!(steps_down(&beats.step(ms(1001), failed(), Role::Master)));
    }

    #[test]
    fn zero_missed_heartbeats_count_as_one_interval() {
        let mut beats = Heartbeats::new(INTERVAL, 0);
        beats.step(ms(0), Answer::Assigned(Role::Master, ()), Role::Slave);
        assert!(!steps_down(&beats.step(ms(500), failed(), Role::Master)));
        assert!(steps_down(&beats.step(ms(501), failed(), Role::Master)));
    }

    #[test]
    fn a_server_that_no_longer_holds_mastership_has_nothing_to_step_down_from() {
        let mut beats = master_since(ms(0));
        let decision = beats.step(ms(5000), failed(), Role::Slave);
        assert!(matches!(decision, Decision::Unanswered { .. }));
    }

    #[test]
    fn a_master_that_stepped_down_claims_nothing_until_made_master_again() {
        let mut beats = master_since(ms(0));
        assert!(beats.claiming());
        beats.step(ms(1500), failed(), Role::Master);
        assert!(!beats.claiming());
        beats.step(ms(2000), failed(), Role::Slave);
        assert!(!beats.claiming());
        beats.step(ms(2500), Answer::Assigned(Role::Master, ()), Role::Slave);
        assert!(beats.claiming());
    }

    #[test]
    fn an_answer_naming_the_master_slave_ends_its_claim_at_once() {
        let mut beats = master_since(ms(0));
        let decision = beats.step(ms(10), Answer::Assigned(Role::Slave, ()), Role::Master);
        assert_eq!(
            decision,
            Decision::Assign {
                role: Role::Slave,
                answer: (),
                regained: false
            }
        );
        assert!(!beats.claiming());
    }

    #[test]
    fn a_refusal_gives_up() {
        let mut beats = master_since(ms(0));
        let decision = beats.step(
            ms(10),
            Answer::<()>::Refused("bad token".into()),
            Role::Master,
        );
        assert_eq!(decision, Decision::GiveUp("bad token".into()));
    }

    #[test]
    fn only_the_first_failure_and_the_first_answer_after_failures_are_news() {
        let mut beats = Heartbeats::new(INTERVAL, 2);
        let first = beats.step(ms(100), failed(), Role::Slave);
        assert!(matches!(first, Decision::Unanswered { first: true, .. }));
        let second = beats.step(ms(200), failed(), Role::Slave);
        assert!(matches!(second, Decision::Unanswered { first: false, .. }));
        let back = beats.step(ms(300), Answer::Assigned(Role::Slave, ()), Role::Slave);
        assert!(matches!(back, Decision::Assign { regained: true, .. }));
        let again = beats.step(ms(400), Answer::Assigned(Role::Slave, ()), Role::Slave);
        assert!(matches!(
            again,
            Decision::Assign {
                regained: false,
                ..
            }
        ));
    }

    #[test]
    fn the_first_beat_goes_out_at_once_then_one_per_interval() {
        let mut beats = Heartbeats::new(INTERVAL, 2);
        assert_eq!(beats.next_beat(false), Duration::ZERO);
        beats.sent(ms(30));
        assert_eq!(beats.next_beat(false), ms(530));
    }

    #[test]
    fn a_slave_without_its_master_beats_four_times_as_often() {
        let mut beats = Heartbeats::new(INTERVAL, 2);
        beats.sent(ms(1000));
        assert_eq!(beats.next_beat(true), ms(1125));
    }

    const SLAVE: Held = Held {
        role: Role::Slave,
        epoch: Epoch(3),
        known_epoch: Epoch(4),
    };

    const MASTER: Held = Held {
        role: Role::Master,
        epoch: Epoch(5),
        known_epoch: Epoch(5),
    };

    #[test]
    fn promotion_adopts_the_clusters_epoch() {
        let promoted = SLAVE.assigned(Role::Master, Epoch(6));
        assert_eq!(
            promoted,
            Held {
                role: Role::Master,
                epoch: Epoch(6),
                known_epoch: Epoch(6)
            }
        );
        assert!(promoted.vouched_by(Epoch(6)));
    }

    #[test]
    fn a_slave_keeps_its_logs_epoch_and_learns_the_newest() {
        let slave = SLAVE.assigned(Role::Slave, Epoch(9));
        assert_eq!(slave.epoch, Epoch(3));
        assert_eq!(slave.known_epoch, Epoch(9));
        assert!(!slave.vouched_by(Epoch(9)));
    }

    #[test]
    fn an_older_epoch_moves_no_epoch_back() {
        let master = MASTER.assigned(Role::Master, Epoch(2));
        assert_eq!(master.epoch, Epoch(5));
        assert_eq!(master.known_epoch, Epoch(5));
        let slave = SLAVE.assigned(Role::Slave, Epoch(1));
        assert_eq!(slave, SLAVE);
    }

    #[test]
    fn an_answer_of_another_epoch_does_not_vouch_for_the_master() {
        let master = MASTER.assigned(Role::Master, Epoch(4));
        assert_eq!(master.role, Role::Master);
        assert!(!master.vouched_by(Epoch(4)));
        assert!(MASTER.assigned(Role::Master, Epoch(5)).vouched_by(Epoch(5)));
    }

    #[test]
    fn an_answer_naming_the_master_slave_steps_it_down_whatever_the_epoch() {
        for epoch in [Epoch(4), Epoch(5), Epoch(6)] {
            let held = MASTER.assigned(Role::Slave, epoch);
            assert_eq!(held.role, Role::Slave);
            assert_eq!(held.epoch, Epoch(5));
        }
    }
}
