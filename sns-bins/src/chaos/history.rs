//! What a chaos run records: one event per line of JSON, written by the load client as things
//! happen and read by the run (which adds the faults it made). The checker ([`mod@super::check`])
//! judges the whole history afterwards.
//!
//! Users are identified by id, posts by their author and the author's own count (`seq`, from 1,
//! in posting order). A post's text is `x<author>.<seq>`, so a reader knows which post it got.

use serde::{Deserialize, Serialize};

/// Milliseconds since the load client started.
pub type Millis = u64;

/// What happened to a FOLLOW or UNFOLLOW.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The server said it was done.
    Applied,
    /// The server said there was nothing to do (already following, not following).
    AlreadyThere,
    /// No clear answer (the connection was lost, the session gave up): it may or may not have
    /// been applied.
    Unknown,
}

/// One server's standing at the end of a run, as the coordinator reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standing {
    /// Cluster.
    pub cluster: u32,
    /// Server within the cluster.
    pub server: u32,
    /// `master`, `slave`, or `none`.
    pub role: String,
    /// Whether the coordinator hears its heartbeats.
    pub alive: bool,
    /// Whether the coordinator counts this slave in sync.
    pub in_sync: bool,
    /// Its log's durable index.
    pub durable: u64,
    /// Its log's committed index.
    pub commit: u64,
}

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The population, once it is set up (every user logged in and known everywhere, every
    /// standing follow made and visible at its author's cluster, every timeline open).
    Population {
        /// Clusters of the deployment (a user's cluster is `(id - 1) % clusters + 1`).
        clusters: u32,
        /// Servers per cluster.
        servers: u32,
        /// Every user, all reading their timelines for the whole run.
        users: Vec<u32>,
        /// Standing follows, `(follower, author)`, made before the first fault and never undone.
        follows: Vec<(u32, u32)>,
        /// Users that follow and unfollow during the run (they read no timeline).
        churners: Vec<u32>,
    },
    /// A post handed to the author's session.
    Posted {
        /// When.
        at: Millis,
        /// Who.
        author: u32,
        /// The author's count of it.
        seq: u64,
    },
    /// The server acknowledged (stored) an author's posts up to `seq`.
    Stored {
        /// When the acknowledgement arrived.
        at: Millis,
        /// Who.
        author: u32,
        /// Every post of `author` up to this one is stored.
        seq: u64,
    },
    /// A reader's timeline delivered a post.
    Delivered {
        /// When.
        at: Millis,
        /// Who read it.
        reader: u32,
        /// Its author, as the server said.
        author: u32,
        /// Its number, from its text (0: the text is not one of the run's posts).
        seq: u64,
        /// Its id as the server gave it: origin cluster and sequence there.
        id: Option<(u32, u64)>,
    },
    /// A FOLLOW (`follow`: true) or UNFOLLOW finished.
    Follow {
        /// When it was sent.
        at: Millis,
        /// Who.
        user: u32,
        /// Whom.
        target: u32,
        /// FOLLOW or UNFOLLOW.
        follow: bool,
        /// The answer.
        outcome: Outcome,
    },
    /// The coordinator named a new master or epoch for a cluster.
    Roles {
        /// When it was seen.
        at: Millis,
        /// Which cluster.
        cluster: u32,
        /// Its epoch.
        epoch: u64,
        /// Its master (`None`: none).
        master: Option<u32>,
    },
    /// A fault began (written by the run, not the load client).
    Fault {
        /// When.
        at: Millis,
        /// Kind (`kill`, `pause`, `partition`, ...).
        kind: String,
        /// What it hit, in words.
        target: String,
    },
    /// Every fault was healed and every process runs again (written by the run).
    Healed {
        /// When.
        at: Millis,
    },
    /// After healing: the users a cluster lists (asked through one of its users).
    Users {
        /// Which cluster.
        cluster: u32,
        /// What it lists.
        users: Vec<u32>,
    },
    /// After healing: the followers a user's own cluster lists for it.
    Followers {
        /// Whose.
        user: u32,
        /// What its cluster lists.
        followers: Vec<u32>,
    },
    /// After healing: every server as the coordinator reports it.
    Servers {
        /// One per server.
        servers: Vec<Standing>,
    },
    /// Something the load client could not do; the run cannot be judged in full.
    Trouble {
        /// When.
        at: Millis,
        /// What.
        what: String,
    },
}

/// The text of post `seq` of `author`.
pub fn post_text(author: u32, seq: u64) -> String {
    format!("x{author}.{seq}")
}

/// The author and number a post's text names, if it is one of a run's posts.
pub fn parse_post_text(text: &str) -> Option<(u32, u64)> {
    let (author, seq) = text.strip_prefix('x')?.split_once('.')?;
    Some((author.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_post_text_names_its_author_and_number() {
        assert_eq!(parse_post_text(&post_text(17, 42)), Some((17, 42)));
        assert_eq!(parse_post_text("hello"), None);
        assert_eq!(parse_post_text("x1."), None);
        assert_eq!(parse_post_text("x.1"), None);
    }

    #[test]
    fn an_event_is_one_line_of_json_and_reads_back() {
        let event = Event::Delivered {
            at: 5,
            reader: 2,
            author: 3,
            seq: 4,
            id: Some((3, 9)),
        };
        let line = serde_json::to_string(&event).expect("serializes");
        assert!(!line.contains('\n'));
        assert!(line.contains(r#""event":"delivered""#), "{line}");
        assert_eq!(serde_json::from_str::<Event>(&line).expect("parses"), event);
    }
}
