//! The benchmark's population: who follows whom, drawn reproducibly from a seed.

use serde::Serialize;

/// A small seedable pseudo-random generator (SplitMix64): the same seed gives the same
/// population and the same sequence of authors on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0), without modulo bias worth mentioning.
    pub fn below(&mut self, n: u32) -> u32 {
        ((u64::from(self.next_u64() as u32) * u64::from(n)) >> 32) as u32
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How follow targets are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// Every other user is equally likely.
    Uniform,
    /// Zipf-like: the user of popularity rank k is chosen with weight 1/k, so a few users
    /// have many followers and most have few (ranks are shuffled over the user ids, so the
    /// popular users are spread over the clusters).
    PowerLaw,
}

/// The follow graph over users `0..n` (indexes into the population, not user ids).
#[derive(Debug, Clone)]
pub struct Graph {
    follows: Vec<Vec<u32>>,
}

impl Graph {
    /// Draws a graph in which each of `users` users follows `per_user` distinct other users.
    pub fn draw(users: u32, per_user: u32, shape: Shape, seed: u64) -> Result<Self, String> {
        if users < 2 {
            return Err("--users must be at least 2".to_string());
        }
        if per_user >= users {
            return Err(format!(
                "--follows-per-user must be below --users ({per_user} >= {users}): nobody can follow more users than there are others"
            ));
        }
        let mut rng = Rng::new(seed);
        let weights = match shape {
            Shape::Uniform => None,
            Shape::PowerLaw => Some(PowerLaw::new(users, &mut rng)),
        };
        let mut follows = Vec::with_capacity(users as usize);
        let mut chosen = vec![false; users as usize];
        for me in 0..users {
            let mut mine = Vec::with_capacity(per_user as usize);
            chosen[me as usize] = true;
            // Rejection sampling, with a bounded number of tries; what is still missing then
            // (only possible when nearly everyone is followed) is filled in id order.
            let mut tries = 0u64;
            while mine.len() < per_user as usize && tries < 64 * u64::from(per_user) + 64 {
                tries += 1;
                let target = match &weights {
                    None => rng.below(users),
                    Some(law) => law.draw(&mut rng),
                };
                if !chosen[target as usize] {
                    chosen[target as usize] = true;
                    mine.push(target);
                }
            }
            let mut next = 0;
            while mine.len() < per_user as usize {
                if !chosen[next as usize] {
                    chosen[next as usize] = true;
                    mine.push(next);
                }
                next += 1;
            }
            chosen[me as usize] = false;
            for target in &mine {
                chosen[*target as usize] = false;
            }
            follows.push(mine);
        }
        Ok(Self { follows })
    }

    /// The number of users.
    pub fn users(&self) -> u32 {
        self.follows.len() as u32
    }

    /// The users that user `index` follows.
    pub fn follows(&self, index: u32) -> &[u32] {
        &self.follows[index as usize]
    }

    /// How many followers each user has.
    pub fn follower_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.follows.len()];
        for targets in &self.follows {
            for target in targets {
                counts[*target as usize] += 1;
            }
        }
        counts
    }
}

/// Sampling by popularity rank with weight 1/rank.
struct PowerLaw {
    /// Cumulative weights, by rank.
    cumulative: Vec<f64>,
    /// The user of each rank.
    user_of_rank: Vec<u32>,
}

impl PowerLaw {
    fn new(users: u32, rng: &mut Rng) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=users)
            .map(|rank| {
                total += 1.0 / f64::from(rank);
                total
            })
            .collect();
        let mut user_of_rank: Vec<u32> = (0..users).collect();
        for i in (1..user_of_rank.len()).rev() {
            let j = rng.below(i as u32 + 1) as usize;
            user_of_rank.swap(i, j);
        }
        Self {
            cumulative,
            user_of_rank,
        }
    }

    fn draw(&self, rng: &mut Rng) -> u32 {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let point = rng.unit() * total;
        let rank = self
            .cumulative
            .partition_point(|c| *c <= point)
            .min(self.user_of_rank.len() - 1);
        self.user_of_rank[rank]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everyone_follows_the_asked_number_of_distinct_others() {
        for shape in [Shape::Uniform, Shape::PowerLaw] {
            for (users, per_user) in [(2, 1), (10, 9), (100, 10), (1000, 50)] {
                let graph = Graph::draw(users, per_user, shape, 7).expect("a graph");
                for me in 0..users {
                    let mut targets = graph.follows(me).to_vec();
                    assert_eq!(targets.len(), per_user as usize, "{shape:?} {users}");
                    assert!(!targets.contains(&me), "{shape:?}: {me} follows itself");
                    targets.sort_unstable();
                    targets.dedup();
                    assert_eq!(targets.len(), per_user as usize, "{shape:?}: a repeat");
                }
                let counts = graph.follower_counts();
                assert_eq!(
                    counts.iter().map(|c| u64::from(*c)).sum::<u64>(),
                    u64::from(users) * u64::from(per_user)
                );
            }
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_graph() {
        let a = Graph::draw(500, 20, Shape::PowerLaw, 42).expect("a graph");
        let b = Graph::draw(500, 20, Shape::PowerLaw, 42).expect("a graph");
        let c = Graph::draw(500, 20, Shape::PowerLaw, 43).expect("a graph");
        assert_eq!(a.follows, b.follows);
        assert_ne!(a.follows, c.follows);
    }

    #[test]
    fn a_power_law_concentrates_followers_and_uniform_does_not() {
        let top = |shape| {
            let mut counts = Graph::draw(10_000, 10, shape, 1)
                .expect("a graph")
                .follower_counts();
            counts.sort_unstable();
            counts.last().copied().unwrap_or(0)
        };
        // 100,000 follows: uniformly about 10 per user (a maximum near 25); by rank weight
        // 1/k, the top user gets about 1/H(10,000) ≈ 10% of the draws.
        assert!(
            top(Shape::Uniform) < 40,
            "uniform top {}",
            top(Shape::Uniform)
        );
        assert!(
            top(Shape::PowerLaw) > 5_000,
            "power-law top {}",
            top(Shape::PowerLaw)
        );
    }

    #[test]
    fn impossible_populations_are_refused_with_the_flag_to_change() {
        let error = Graph::draw(10, 10, Shape::Uniform, 0).expect_err("too many follows");
        assert!(error.contains("--follows-per-user"), "{error}");
        assert!(Graph::draw(1, 0, Shape::Uniform, 0).is_err());
    }
}
