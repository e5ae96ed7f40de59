//! A budget of log records: at most a burst per window, so that a peer that misbehaves on
//! purpose (or a flood of port probes) cannot fill the disk or the queue to the logger. What
//! is held back is counted and said with the next record that gets through.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::engine::lock::locked;

/// At most `burst` records per `window`.
pub struct LogBudget {
    burst: u32,
    window: Duration,
    spent: Mutex<Spent>,
}

/// Records let through (and held back) since `started`.
struct Spent {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

impl LogBudget {
    pub fn new(burst: u32, window: Duration) -> Self {
        LogBudget {
            burst,
            window,
            spent: Mutex::new(Spent {
                started: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// `message` as it should be logged (with how many were held back before it), or None if
    /// the budget of this window is spent.
    pub fn admit(&self, message: String) -> Option<String> {
        let suppressed = {
            let mut spent = locked(&self.spent);
            let now = Instant::now();
            if now.duration_since(spent.started) >= self.window {
                spent.started = now;
                spent.logged = 0;
            }
            if spent.logged >= self.burst {
                spent.suppressed += 1;
                return None;
            }
            spent.logged += 1;
            std::mem::take(&mut spent.suppressed)
        };
        Some(match suppressed {
            0 => message,
            n => format!("{message} ({n} similar messages suppressed)"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_budget_holds_records_back_and_counts_them_on_the_next() {
        let budget = LogBudget::new(2, Duration::from_millis(200));
        assert_eq!(budget.admit("a".into()).as_deref(), Some("a"));
        assert_eq!(budget.admit("b".into()).as_deref(), Some("b"));
        assert_eq!(budget.admit("c".into()), None);
        assert_eq!(budget.admit("d".into()), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            budget.admit("e".into()).as_deref(),
            Some("e (2 similar messages suppressed)")
        );
    }
}
