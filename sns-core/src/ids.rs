//! Typed identifiers, parsed once at the edge.
//!
//! A username on the wire is the decimal form of a [`UserId`] in `1..=2^31-1`; [`UserId::parse`]
//! is the one place that decides what is a valid username.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Whether a server may accept client writes: the master of its cluster does, a slave
/// mirrors the master and refuses clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves clients.
    Master,
    /// Mirrors the master; refuses clients with [`Error::NotMaster`].
    Slave,
}

impl Role {
    /// The role's name, as the course's wire fields and the logs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Master => "master",
            Self::Slave => "slave",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A user, identified by a positive integer in `1..=2^31-1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserId(u32);

impl UserId {
    /// The largest valid user id, `2^31 - 1` (the course stores ids in `int32`).
    pub const MAX: u32 = i32::MAX as u32;

    /// Makes a user id from a number, if it is in `1..=2^31-1`.
    pub fn new(id: u32) -> Option<Self> {
        (1..=Self::MAX).contains(&id).then_some(Self(id))
    }

    /// Parses a username: plain ASCII decimal digits, no sign, no leading zero, no whitespace,
    /// value in `1..=2^31-1`. Everything else is [`Error::InvalidUsername`].
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = || Error::InvalidUsername(text.chars().take(64).collect());
        if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        if text.starts_with('0') {
            return Err(invalid());
        }
        let value: u64 = text.parse().map_err(|_| invalid())?;
        u32::try_from(value)
            .ok()
            .and_then(Self::new)
            .ok_or_else(invalid)
    }

    /// The numeric id.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl FromStr for UserId {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        Self::parse(text)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A cluster, numbered from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterId(u32);

impl ClusterId {
    /// Makes a cluster id; `0` is not a cluster.
    pub fn new(id: u32) -> Option<Self> {
        (id >= 1).then_some(Self(id))
    }

    /// The numeric id.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The cluster that owns `user` when there are `clusters` clusters: `((u - 1) % N) + 1`.
    pub fn of_user(user: UserId, clusters: u32) -> Self {
        let n = clusters.max(1);
        Self((user.get() - 1) % n + 1)
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A server within its cluster, numbered from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerId(u32);

impl ServerId {
    /// Makes a server id; `0` is not a server.
    pub fn new(id: u32) -> Option<Self> {
        (id >= 1).then_some(Self(id))
    }

    /// The numeric id.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A cluster's leadership term. Promotion of a slave increments it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The identity of an event: the cluster that originated it and its gap-free sequence number
/// there (the first event of an origin has sequence 1). A post's id is its event's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    /// The cluster whose master originated the event.
    pub origin: ClusterId,
    /// Position in the origin's own sequence, from 1, without gaps.
    pub seq: u64,
}

/// A post is identified by the event that created it.
pub type PostId = EventId;

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.origin, self.seq)
    }
}

/// A post's idempotency key: chosen by the posting client, unique among that user's recent
/// posts. A post re-sent with the key of one already stored is not stored again (the server
/// answers with the stored post's id). `0` is "no key" on the wire and is not a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PostKey(std::num::NonZeroU64);

impl PostKey {
    /// Makes a key from its wire form; `0` (no key) gives `None`.
    pub fn new(key: u64) -> Option<Self> {
        std::num::NonZeroU64::new(key).map(Self)
    }

    /// The wire form (never 0).
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for PostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Position of an entry in one server's log, from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogIndex(pub u64);

impl LogIndex {
    /// The position after this one.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for LogIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Microseconds since the Unix epoch, as assigned by the server that accepted the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self(i64::try_from(now.as_micros()).unwrap_or(i64::MAX))
    }

    /// Seconds and nanoseconds, as `google.protobuf.Timestamp` wants them.
    pub fn to_proto(self) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: self.0.div_euclid(1_000_000),
            nanos: (self.0.rem_euclid(1_000_000) * 1000) as i32,
        }
    }

    /// From a `google.protobuf.Timestamp` (out-of-range values saturate).
    pub fn from_proto(ts: &prost_types::Timestamp) -> Self {
        let micros = i128::from(ts.seconds) * 1_000_000 + i128::from(ts.nanos / 1000);
        Self(i64::try_from(micros).unwrap_or(if micros < 0 { i64::MIN } else { i64::MAX }))
    }

    /// The course client's time format, `Www Mmm dd hh:mm:ss yyyy`, exactly as C's `ctime`
    /// prints it (day padded with a space), in UTC.
    pub fn ctime(self) -> String {
        const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let secs = self.0.div_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        format!(
            "{} {} {:>2} {:02}:{:02}:{:02} {}",
            DAYS[days.rem_euclid(7) as usize],
            MONTHS[(month - 1) as usize],
            day,
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            year
        )
    }
}

/// Converts days since 1970-01-01 to a (year, month, day) civil date (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_usernames_parse() {
        assert_eq!(UserId::parse("1").map(UserId::get).ok(), Some(1));
        assert_eq!(UserId::parse("42").map(UserId::get).ok(), Some(42));
        assert_eq!(
            UserId::parse("2147483647").map(UserId::get).ok(),
            Some(2_147_483_647)
        );
    }

    #[test]
    fn malformed_usernames_are_rejected() {
        for bad in [
            "",
            "0",
            "-3",
            "abc",
            "1.5",
            "+1",
            "2147483648",
            "99999999999999999999",
            " 1",
            "1 ",
            "1\n",
            "\t",
            "007",
            "1e3",
            "١",
        ] {
            assert!(
                matches!(UserId::parse(bad), Err(Error::InvalidUsername(_))),
                "{bad:?} must be an invalid username"
            );
        }
    }

    #[test]
    fn users_map_to_clusters_round_robin() {
        let cluster = |u: u32, n: u32| ClusterId::of_user(UserId(u), n).get();
        assert_eq!(
            (1..=7).map(|u| cluster(u, 3)).collect::<Vec<_>>(),
            [1, 2, 3, 1, 2, 3, 1]
        );
        assert_eq!(cluster(9, 1), 1);
        assert_eq!(cluster(5, 5), 5);
        assert_eq!(cluster(6, 5), 1);
    }

    #[test]
    fn ctime_formats_like_the_course() {
        assert_eq!(Timestamp(0).ctime(), "Thu Jan  1 00:00:00 1970");
        // 2026-11-21 05:47:38 UTC, a Saturday.
        assert_eq!(
            Timestamp(1_795_240_058 * 1_000_000).ctime(),
            "Sat Nov 21 05:47:38 2026"
        );
        assert_eq!(
            Timestamp(951_782_400 * 1_000_000).ctime(),
            "Tue Feb 29 00:00:00 2000"
        );
    }

    #[test]
    fn timestamps_round_trip_through_proto() {
        for micros in [0, 1, 1_700_000_000_123_456, -1] {
            let ts = Timestamp(micros);
            assert_eq!(Timestamp::from_proto(&ts.to_proto()), ts);
        }
    }
}

/// A hasher for maps keyed by [`UserId`] (and other small integer ids): one multiply-xorshift
/// mix of the 32-bit id instead of SipHash, which costs more than the rest of a fan-out step.
/// Every bit of the id reaches the bits the table uses, so ids that share their low or high
/// bits do not pile into one bucket. Not meant for data an attacker picks to collide: ids are
/// at most 2^31 - 1 and a user needs an account to have one.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z ^= z >> 32;
        z.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ (z >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x100_0000_01B3);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 << 32) ^ u64::from(n);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = self.0.rotate_left(29) ^ n;
    }
}

/// A hash map keyed by [`UserId`], hashed with [`IdHasher`].
pub type UserMap<V> = std::collections::HashMap<UserId, V, std::hash::BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod hasher_tests {
    use std::hash::{BuildHasher, BuildHasherDefault};

    use super::*;

    #[test]
    fn ids_spread_over_the_low_bits_whatever_bits_they_share() {
        let build = BuildHasherDefault::<IdHasher>::default();
        // Ids that differ only in high bits, or only in steps of 1024: the 10 low bits of
        // their hashes must still take (nearly) every value.
        for ids in [
            (0..1024u32).map(|k| (k << 20) | 7).collect::<Vec<_>>(),
            (0..1024u32).map(|k| k * 1024 + 1).collect(),
            (1..=1024u32).collect(),
        ] {
            let mut buckets = std::collections::HashSet::new();
            for id in ids {
                let user = UserId::new(id).expect("a valid id");
                buckets.insert(build.hash_one(user) & 1023);
            }
            assert!(buckets.len() > 600, "{} buckets of 1024", buckets.len());
        }
    }
}
