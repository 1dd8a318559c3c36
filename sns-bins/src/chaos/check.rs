//! The checker: judges a recorded history ([`super::history`]) after the run.
//!
//! What it holds the system to:
//! - **Nothing acknowledged is lost**: every post the server acknowledged reaches every standing
//!   follower of its author (they read their timelines for the whole run).
//! - **All or nothing**: a post that was never acknowledged (its answer lost to a fault) may be
//!   stored or not, but if one follower got it, every follower did.
//! - **Exactly once, in order**: no reader gets a post twice, and each author's posts reach a
//!   reader in the order they were posted; no reader gets a post that was never made or whose
//!   author it does not follow.
//! - **One history per cluster**: a post id (origin cluster, sequence there) names one post, and
//!   a post has one id (two posts under one id: two masters sequenced the same place, a split
//!   brain; one post under two ids: it was stored twice); the coordinator's epochs never go back
//!   and one epoch has one master.
//! - **Convergence after healing**: in every cluster one live master and every other server a
//!   live, in-sync slave at the master's durable and committed index; every cluster lists the
//!   same users; every user's followers are the standing ones plus, for each churning user,
//!   what its acknowledged FOLLOWs and UNFOLLOWs leave (either way where an answer was lost).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

use super::history::{Event, Outcome, Standing};

/// Details kept per kind of violation (all are counted).
const DETAILS_PER_KIND: usize = 5;

/// The kinds of violation, in the order a report lists them.
pub const KINDS: [&str; 8] = [
    "lost",
    "partial",
    "duplicate",
    "out_of_order",
    "unexpected",
    "split_brain",
    "not_converged",
    "follows",
];

/// What the checker found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Findings {
    /// Posts handed to a session.
    pub posts: u64,
    /// Posts the servers acknowledged.
    pub stored: u64,
    /// FOLLOW and UNFOLLOW calls made during the run, and how many were acknowledged (applied
    /// or answered "nothing to do").
    pub follow_calls: u64,
    /// See `follow_calls`.
    pub follows_acknowledged: u64,
    /// Deliveries received.
    pub deliveries: u64,
    /// Role changes the coordinator reported after the population was set up.
    pub role_changes: u64,
    /// Violations by kind (every kind of [`KINDS`] present, 0 when clean).
    pub violations: BTreeMap<String, u64>,
    /// The first few violations of each kind, in words.
    pub details: Vec<String>,
    /// Why part of the history could not be judged (the load client's own trouble).
    pub trouble: Vec<String>,
}

impl Findings {
    /// Whether nothing was violated and everything could be judged.
    pub fn ok(&self) -> bool {
        self.violations.values().all(|&n| n == 0) && self.trouble.is_empty()
    }

    /// Violations of `kind`.
    pub fn count(&self, kind: &str) -> u64 {
        self.violations.get(kind).copied().unwrap_or(0)
    }

    fn violation(&mut self, kind: &'static str, detail: String) {
        let count = self.violations.entry(kind.to_string()).or_default();
        *count += 1;
        if *count as usize <= DETAILS_PER_KIND {
            self.details.push(format!("{kind}: {detail}"));
        }
    }
}

/// A post: author and the author's count.
type Post = (u32, u64);

/// Judges `history`.
pub fn check(history: &[Event]) -> Findings {
    let mut findings = Findings::default();
    for kind in KINDS {
        findings.violations.insert(kind.to_string(), 0);
    }
    let Some((clusters, servers, users, follows, churners)) =
        history.iter().find_map(|e| match e {
            Event::Population {
                clusters,
                servers,
                users,
                follows,
                churners,
            } => Some((*clusters, *servers, users, follows, churners)),
            _ => None,
        })
    else {
        findings
            .trouble
            .push("the load client never set up its population".to_string());
        return findings;
    };
    let mut followers: HashMap<u32, BTreeSet<u32>> = HashMap::new();
    for &(follower, author) in follows {
        followers.entry(author).or_default().insert(follower);
    }
    let mut posted: HashMap<u32, BTreeSet<u64>> = HashMap::new();
    let mut stored: HashMap<u32, u64> = HashMap::new();
    for event in history {
        match event {
            Event::Posted { author, seq, .. } => {
                findings.posts += 1;
                posted.entry(*author).or_default().insert(*seq);
            }
            Event::Stored { author, seq, .. } => {
                let last = stored.entry(*author).or_default();
                *last = (*last).max(*seq);
            }
            Event::Trouble { what, .. } => findings.trouble.push(what.clone()),
            _ => {}
        }
    }
    findings.stored = stored.values().sum();
    check_deliveries(history, &followers, &posted, &stored, &mut findings);
    check_roles(history, &mut findings);
    check_servers(history, clusters, servers, &mut findings);
    let everyone: Vec<u32> = users.iter().chain(churners).copied().collect();
    check_users(history, clusters, &everyone, &mut findings);
    check_follows(history, &followers, churners, &mut findings);
    findings
}

fn check_deliveries(
    history: &[Event],
    followers: &HashMap<u32, BTreeSet<u32>>,
    posted: &HashMap<u32, BTreeSet<u64>>,
    stored: &HashMap<u32, u64>,
    findings: &mut Findings,
) {
    let mut received: HashMap<Post, BTreeSet<u32>> = HashMap::new();
    let mut last_from: HashMap<(u32, u32), u64> = HashMap::new();
    let mut post_of_id: HashMap<(u32, u64), Post> = HashMap::new();
    let mut id_of_post: HashMap<Post, (u32, u64)> = HashMap::new();
    for event in history {
        let Event::Delivered {
            reader,
            author,
            seq,
            id,
            ..
        } = *event
        else {
            continue;
        };
        findings.deliveries += 1;
        if !posted.get(&author).is_some_and(|made| made.contains(&seq)) {
            findings.violation(
                "unexpected",
                format!("user {reader} got a post of user {author} that was never made"),
            );
            continue;
        }
        if !followers.get(&author).is_some_and(|f| f.contains(&reader)) {
            findings.violation(
                "unexpected",
                format!("user {reader} got post {seq} of user {author}, whom it does not follow"),
            );
            continue;
        }
        if let Some(id) = id {
            match post_of_id.get(&id) {
                Some(&other) if other != (author, seq) => findings.violation(
                    "split_brain",
                    format!(
                        "id {}:{} names post {} of user {author} and post {} of user {}",
                        id.0, id.1, seq, other.1, other.0
                    ),
                ),
                Some(_) => {}
                None => {
                    post_of_id.insert(id, (author, seq));
                }
            }
            match id_of_post.get(&(author, seq)) {
                Some(&other) if other != id => findings.violation(
                    "duplicate",
                    format!(
                        "post {seq} of user {author} was stored twice, as {}:{} and {}:{}",
                        other.0, other.1, id.0, id.1
                    ),
                ),
                Some(_) => {}
                None => {
                    id_of_post.insert((author, seq), id);
                }
            }
        }
        if !received.entry((author, seq)).or_default().insert(reader) {
            findings.violation(
                "duplicate",
                format!("user {reader} got post {seq} of user {author} twice"),
            );
            continue;
        }
        let last = last_from.entry((reader, author)).or_default();
        if seq < *last {
            findings.violation(
                "out_of_order",
                format!(
                    "user {reader} got post {seq} of user {author} after its post {}",
                    *last
                ),
            );
        }
        *last = (*last).max(seq);
    }
    let mut authors: Vec<_> = posted.keys().copied().collect();
    authors.sort_unstable();
    let nobody = BTreeSet::new();
    for author in authors {
        let wanted = followers.get(&author).unwrap_or(&nobody);
        let acknowledged = stored.get(&author).copied().unwrap_or(0);
        for &seq in &posted[&author] {
            let got = received.get(&(author, seq)).unwrap_or(&nobody);
            let missing: Vec<_> = wanted.difference(got).collect();
            if missing.is_empty() {
                continue;
            }
            if seq <= acknowledged {
                for reader in missing {
                    findings.violation(
                        "lost",
                        format!(
                            "post {seq} of user {author} was acknowledged and never reached user {reader}"
                        ),
                    );
                }
            } else if !got.is_empty() {
                findings.violation(
                    "partial",
                    format!(
                        "post {seq} of user {author} reached {} of its {} followers (missing {missing:?})",
                        got.len(),
                        wanted.len()
                    ),
                );
            }
        }
    }
}

fn check_roles(history: &[Event], findings: &mut Findings) {
    let mut seen: HashMap<u32, (u64, Option<u32>)> = HashMap::new();
    let mut masters: HashMap<(u32, u64), u32> = HashMap::new();
    let started = history
        .iter()
        .position(|e| matches!(e, Event::Population { .. }))
        .unwrap_or(0);
    for (index, event) in history.iter().enumerate() {
        let Event::Roles {
            cluster,
            epoch,
            master,
            ..
        } = *event
        else {
            continue;
        };
        if index > started && seen.contains_key(&cluster) {
            findings.role_changes += 1;
        }
        if let Some(&(last, _)) = seen.get(&cluster)
            && epoch < last
        {
            findings.violation(
                "split_brain",
                format!("cluster {cluster}'s epoch went back from {last} to {epoch}"),
            );
        }
        seen.insert(cluster, (epoch, master));
        if let Some(master) = master {
            match masters.get(&(cluster, epoch)) {
                Some(&other) if other != master => findings.violation(
                    "split_brain",
                    format!(
                        "cluster {cluster}'s epoch {epoch} had two masters, servers {other} and {master}"
                    ),
                ),
                _ => {
                    masters.insert((cluster, epoch), master);
                }
            }
        }
    }
}

fn check_servers(
    history: &[Event],
    clusters: u32,
    servers_per_cluster: u32,
    findings: &mut Findings,
) {
    let Some(servers) = history.iter().rev().find_map(|e| match e {
        Event::Servers { servers } => Some(servers),
        _ => None,
    }) else {
        findings
            .trouble
            .push("no final view of the servers was recorded".to_string());
        return;
    };
    for cluster in 1..=clusters {
        let members: Vec<&Standing> = servers.iter().filter(|s| s.cluster == cluster).collect();
        if members.len() != servers_per_cluster as usize {
            findings.violation(
                "not_converged",
                format!(
                    "cluster {cluster} ended with {} of its {servers_per_cluster} servers known to the coordinator",
                    members.len()
                ),
            );
            continue;
        }
        let live_masters: Vec<&&Standing> = members
            .iter()
            .filter(|s| s.role == "master" && s.alive)
            .collect();
        let [master] = live_masters[..] else {
            findings.violation(
                "not_converged",
                format!(
                    "cluster {cluster} ended with {} live masters",
                    live_masters.len()
                ),
            );
            continue;
        };
        for slave in members.iter().filter(|s| s.server != master.server) {
            let behind = slave.durable != master.durable || slave.commit != master.commit;
            if !slave.alive || !slave.in_sync || slave.role != "slave" || behind {
                findings.violation(
                    "not_converged",
                    format!(
                        "cluster {cluster}: server {} ended {} {}{} at durable {} commit {}, master {} at durable {} commit {}",
                        slave.server,
                        if slave.alive { "live" } else { "dead" },
                        slave.role,
                        if slave.in_sync { " in sync" } else { " not in sync" },
                        slave.durable,
                        slave.commit,
                        master.server,
                        master.durable,
                        master.commit
                    ),
                );
            }
        }
    }
}

fn check_users(history: &[Event], clusters: u32, users: &[u32], findings: &mut Findings) {
    let everyone: BTreeSet<u32> = users.iter().copied().collect();
    let mut listed: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for event in history {
        if let Event::Users { cluster, users } = event {
            listed.insert(*cluster, users.iter().copied().collect());
        }
    }
    for cluster in 1..=clusters {
        let Some(list) = listed.get(&cluster) else {
            findings
                .trouble
                .push(format!("cluster {cluster}'s users were never listed"));
            continue;
        };
        let missing: Vec<_> = everyone.difference(list).collect();
        let extra: Vec<_> = list.difference(&everyone).collect();
        if !missing.is_empty() || !extra.is_empty() {
            findings.violation(
                "not_converged",
                format!("cluster {cluster} lists users without {missing:?} and with {extra:?}"),
            );
        }
    }
}

/// The follow states a sequence of answers leaves possible: (not following, following).
pub(super) fn possible_after(calls: &[(bool, Outcome)]) -> (bool, bool) {
    let (mut not_following, mut following) = (true, false);
    for &(follow, outcome) in calls {
        match outcome {
            Outcome::Applied | Outcome::AlreadyThere => {
                not_following = !follow;
                following = follow;
            }
            Outcome::Unknown if follow => following = true,
            Outcome::Unknown => not_following = true,
        }
    }
    (not_following, following)
}

fn check_follows(
    history: &[Event],
    standing: &HashMap<u32, BTreeSet<u32>>,
    churners: &[u32],
    findings: &mut Findings,
) {
    let churners: HashSet<u32> = churners.iter().copied().collect();
    let mut calls: BTreeMap<(u32, u32), Vec<(bool, Outcome)>> = BTreeMap::new();
    let mut listed: HashMap<u32, BTreeSet<u32>> = HashMap::new();
    for event in history {
        match event {
            Event::Follow {
                user,
                target,
                follow,
                outcome,
                ..
            } if churners.contains(user) => {
                findings.follow_calls += 1;
                if *outcome != Outcome::Unknown {
                    findings.follows_acknowledged += 1;
                }
                calls
                    .entry((*user, *target))
                    .or_default()
                    .push((*follow, *outcome));
            }
            Event::Followers { user, followers } => {
                listed.insert(*user, followers.iter().copied().collect());
            }
            _ => {}
        }
    }
    let mut authors: BTreeSet<u32> = standing.keys().copied().collect();
    authors.extend(calls.keys().map(|&(_, target)| target));
    for author in authors {
        let Some(list) = listed.get(&author) else {
            findings
                .trouble
                .push(format!("user {author}'s followers were never listed"));
            continue;
        };
        for follower in standing.get(&author).into_iter().flatten() {
            if !list.contains(follower) {
                findings.violation(
                    "follows",
                    format!("user {author}'s cluster lost its follower {follower}"),
                );
            }
        }
        for follower in list {
            let standing = standing.get(&author).is_some_and(|s| s.contains(follower));
            if !standing && !calls.contains_key(&(*follower, author)) {
                findings.violation(
                    "follows",
                    format!("user {author}'s cluster lists {follower}, who never followed it"),
                );
            }
        }
    }
    for ((user, target), calls) in &calls {
        let Some(list) = listed.get(target) else {
            continue;
        };
        let (may_not, may) = possible_after(calls);
        let follows = list.contains(user);
        if (follows && !may) || (!follows && !may_not) {
            findings.violation(
                "follows",
                format!(
                    "user {target}'s cluster {} user {user} after {} answered calls ending in {}",
                    if follows { "lists" } else { "does not list" },
                    calls.len(),
                    if calls.last().is_some_and(|c| c.0) {
                        "FOLLOW"
                    } else {
                        "UNFOLLOW"
                    }
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two clusters; users 1 (cluster 1) and 2 (cluster 2) follow each other; user 3 churns.
    fn population() -> Event {
        Event::Population {
            clusters: 2,
            servers: 2,
            users: vec![1, 2],
            follows: vec![(1, 2), (2, 1)],
            churners: vec![3],
        }
    }

    fn posted(author: u32, seq: u64) -> Event {
        Event::Posted { at: 0, author, seq }
    }

    fn stored(author: u32, seq: u64) -> Event {
        Event::Stored { at: 0, author, seq }
    }

    fn delivered(reader: u32, author: u32, seq: u64, id: u64) -> Event {
        Event::Delivered {
            at: 0,
            reader,
            author,
            seq,
            id: Some(((author - 1) % 2 + 1, id)),
        }
    }

    fn standing(cluster: u32, server: u32, role: &str, durable: u64) -> Standing {
        Standing {
            cluster,
            server,
            role: role.to_string(),
            alive: true,
            in_sync: role == "slave",
            durable,
            commit: durable,
        }
    }

    /// The end of a clean run: converged servers, every list as it should be.
    fn converged() -> Vec<Event> {
        vec![
            Event::Servers {
                servers: vec![
                    standing(1, 1, "master", 9),
                    standing(1, 2, "slave", 9),
                    standing(2, 1, "slave", 7),
                    standing(2, 2, "master", 7),
                ],
            },
            Event::Users {
                cluster: 1,
                users: vec![1, 2, 3],
            },
            Event::Users {
                cluster: 2,
                users: vec![1, 2, 3],
            },
            Event::Followers {
                user: 1,
                followers: vec![2],
            },
            Event::Followers {
                user: 2,
                followers: vec![1, 3],
            },
        ]
    }

    fn follow(follow: bool, outcome: Outcome) -> Event {
        Event::Follow {
            at: 0,
            user: 3,
            target: 2,
            follow,
            outcome,
        }
    }

    fn run(middle: Vec<Event>) -> Findings {
        let mut history = vec![population()];
        history.extend(middle);
        history.extend(converged());
        check(&history)
    }

    #[test]
    fn a_clean_history_passes() {
        let findings = run(vec![
            posted(1, 1),
            posted(1, 2),
            stored(1, 2),
            delivered(2, 1, 1, 1),
            delivered(2, 1, 2, 2),
            follow(true, Outcome::Applied),
        ]);
        assert!(findings.ok(), "{findings:?}");
        assert_eq!(
            (findings.posts, findings.stored, findings.deliveries),
            (2, 2, 2)
        );
    }

    #[test]
    fn an_acknowledged_post_that_never_arrives_is_lost() {
        let findings = run(vec![
            posted(1, 1),
            stored(1, 1),
            follow(true, Outcome::Applied),
        ]);
        assert_eq!(findings.count("lost"), 1, "{findings:?}");
        assert!(!findings.ok());
    }

    #[test]
    fn an_unacknowledged_post_may_be_missing_everywhere_but_not_somewhere() {
        let nowhere = run(vec![posted(1, 1), follow(true, Outcome::Applied)]);
        assert!(nowhere.ok(), "{nowhere:?}");
        let mut history = vec![Event::Population {
            clusters: 2,
            servers: 2,
            users: vec![1, 2, 3],
            follows: vec![(2, 1), (3, 1)],
            churners: vec![],
        }];
        history.extend([posted(1, 1), delivered(2, 1, 1, 1)]);
        let findings = check(&history);
        assert_eq!(findings.count("partial"), 1, "{findings:?}");
    }

    #[test]
    fn a_repeated_or_reordered_delivery_is_caught() {
        let twice = run(vec![
            posted(1, 1),
            stored(1, 1),
            delivered(2, 1, 1, 1),
            delivered(2, 1, 1, 1),
            follow(true, Outcome::Applied),
        ]);
        assert_eq!(twice.count("duplicate"), 1, "{twice:?}");
        let reordered = run(vec![
            posted(1, 1),
            posted(1, 2),
            stored(1, 2),
            delivered(2, 1, 2, 2),
            delivered(2, 1, 1, 1),
            follow(true, Outcome::Applied),
        ]);
        assert_eq!(reordered.count("out_of_order"), 1, "{reordered:?}");
        let stored_twice = run(vec![
            posted(1, 1),
            stored(1, 1),
            delivered(2, 1, 1, 5),
            delivered(2, 1, 1, 6),
            follow(true, Outcome::Applied),
        ]);
        assert!(stored_twice.count("duplicate") >= 1, "{stored_twice:?}");
    }

    #[test]
    fn a_post_never_made_or_to_a_stranger_is_unexpected() {
        let findings = run(vec![
            posted(1, 1),
            stored(1, 1),
            delivered(2, 1, 1, 1),
            delivered(2, 1, 7, 2),
            delivered(3, 1, 1, 1),
            follow(true, Outcome::Applied),
        ]);
        assert_eq!(findings.count("unexpected"), 2, "{findings:?}");
    }

    #[test]
    fn two_posts_under_one_id_or_two_masters_in_one_epoch_are_a_split_brain() {
        let ids = run(vec![
            posted(1, 1),
            posted(1, 2),
            stored(1, 2),
            delivered(2, 1, 1, 4),
            delivered(2, 1, 2, 4),
            follow(true, Outcome::Applied),
        ]);
        assert_eq!(ids.count("split_brain"), 1, "{ids:?}");
        let roles = |epoch, master| Event::Roles {
            at: 0,
            cluster: 1,
            epoch,
            master: Some(master),
        };
        let epochs = run(vec![
            roles(1, 1),
            roles(2, 2),
            roles(2, 1),
            roles(1, 1),
            follow(true, Outcome::Applied),
        ]);
        assert_eq!(epochs.count("split_brain"), 2, "{epochs:?}");
    }

    #[test]
    fn a_slave_behind_its_master_or_a_missing_user_is_not_converged() {
        let mut history = vec![population(), follow(true, Outcome::Applied)];
        history.extend(converged());
        history.push(Event::Servers {
            servers: vec![
                standing(1, 1, "master", 9),
                standing(1, 2, "slave", 8),
                standing(2, 2, "master", 7),
                standing(2, 1, "slave", 7),
            ],
        });
        history.push(Event::Users {
            cluster: 2,
            users: vec![1, 2],
        });
        let findings = check(&history);
        assert_eq!(findings.count("not_converged"), 2, "{findings:?}");
        // A server the coordinator no longer lists has not converged either.
        history.push(Event::Servers {
            servers: vec![
                standing(1, 1, "master", 9),
                standing(2, 2, "master", 7),
                standing(2, 1, "slave", 7),
            ],
        });
        let findings = check(&history);
        assert_eq!(findings.count("not_converged"), 2, "{findings:?}");
        assert!(
            findings
                .details
                .iter()
                .any(|d| d.contains("1 of its 2 servers")),
            "{findings:?}"
        );
    }

    #[test]
    fn follows_must_end_where_the_answers_leave_them() {
        // Listed as following after an acknowledged UNFOLLOW: wrong.
        let wrong = run(vec![
            follow(true, Outcome::Applied),
            follow(false, Outcome::Applied),
        ]);
        assert_eq!(wrong.count("follows"), 1, "{wrong:?}");
        // An UNFOLLOW whose answer was lost may or may not have happened.
        let either = run(vec![
            follow(true, Outcome::Applied),
            follow(false, Outcome::Unknown),
        ]);
        assert!(either.ok(), "{either:?}");
        // A follower nobody made is wrong too.
        let mut history = vec![population(), follow(true, Outcome::Applied)];
        history.extend(converged());
        history.push(Event::Followers {
            user: 1,
            followers: vec![2, 9],
        });
        assert_eq!(check(&history).count("follows"), 1);
        // A standing follower missing from the list is lost.
        let mut history = vec![population(), follow(true, Outcome::Applied)];
        history.extend(converged());
        history.push(Event::Followers {
            user: 1,
            followers: vec![],
        });
        assert_eq!(check(&history).count("follows"), 1);
    }

    #[test]
    fn a_history_without_its_end_cannot_pass() {
        let findings = check(&[population()]);
        assert!(!findings.ok());
        assert!(!findings.trouble.is_empty());
        assert!(!check(&[]).ok());
    }
}
