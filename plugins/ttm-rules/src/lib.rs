//! The time-to-merge rules as plain Rust: the feature layout of the input,
//! the five time buckets of the output, the checks on raw feature values and
//! version 1's rules. No SDK and no WIT here: the plugins wrap this in
//! tensors of the plugin interface, and the gateway's load benchmark calls
//! it natively to measure what the sandbox costs.

/// Input tensor name: one row of PR features per pull request.
pub const INPUT: &str = "pr_features";

/// The columns of `pr_features`, in order.
pub const FEATURES: [&str; 6] = [
    "files_changed",
    "additions",
    "deletions",
    "commits",
    "comments",
    "review_count",
];

/// The predicted classes, shortest time first.
pub const BUCKETS: [&str; 5] = [
    "within_hour",
    "within_day",
    "within_week",
    "within_month",
    "longer",
];

/// One pull request's features, named.
#[derive(Clone, Copy, Debug)]
pub struct PullRequest {
    pub files_changed: f32,
    pub additions: f32,
    pub deletions: f32,
    pub commits: f32,
    pub comments: f32,
    pub review_count: f32,
}

impl PullRequest {
    /// Row `r` of `pr_features`; negative or non-finite counts are refused
    /// with the row and feature named.
    pub fn from_row(r: usize, row: &[f32; 6]) -> Result<Self, String> {
        for (value, feature) in row.iter().zip(FEATURES) {
            if !value.is_finite() || *value < 0.0 {
                return Err(format!(
                    "{INPUT}[{r}] feature `{feature}` is {value}; counts must be finite and >= 0"
                ));
            }
        }
        Ok(PullRequest {
            files_changed: row[0],
            additions: row[1],
            deletions: row[2],
            commits: row[3],
            comments: row[4],
            review_count: row[5],
        })
    }
}

/// The bucket a pull request's size alone suggests (the size rules of
/// versions 1 and 3):
///
/// | lines changed | files | bucket       |
/// |---------------|-------|--------------|
/// | <= 20         | <= 2  | within_hour  |
/// | <= 200        |       | within_day   |
/// | <= 1000       |       | within_week  |
/// | <= 5000       |       | within_month |
/// | more          |       | longer       |
pub fn size_bucket(pr: &PullRequest) -> usize {
    let lines = pr.additions + pr.deletions;
    if lines <= 20.0 && pr.files_changed <= 2.0 {
        0
    } else if lines <= 200.0 {
        1
    } else if lines <= 1000.0 {
        2
    } else if lines <= 5000.0 {
        3
    } else {
        4
    }
}

/// The most probable bucket (the first of equals).
pub fn most_probable(p: &[f32; 5]) -> usize {
    (0..p.len())
        .reduce(|a, b| if p[b] > p[a] { b } else { a })
        .unwrap_or(0)
}

/// Version 1: size rules; a long discussion (20 comments or more) pushes the
/// bucket one later. The predicted bucket gets probability 0.7, every other
/// one 0.075.
pub mod v1 {
    use super::{PullRequest, size_bucket};

    pub fn bucket(pr: &PullRequest) -> usize {
        let by_size = size_bucket(pr);
        if pr.comments >= 20.0 {
            (by_size + 1).min(4)
        } else {
            by_size
        }
    }

    pub fn probabilities(pr: &PullRequest) -> [f32; 5] {
        let mut p = [0.075; 5];
        p[bucket(pr)] = 0.7;
        p
    }
}
