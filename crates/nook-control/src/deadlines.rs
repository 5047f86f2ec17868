//! Sandbox deadlines: an index of when each sandbox's deadline passes, and a task that sleeps until the nearest one.
//!
//! The store holds the truth (`Sandbox::deadline`, so deadlines outlive restarts); this index only tells the timer
//! task what to wake up for. Setting, moving or clearing a deadline updates the index and wakes the task, which then
//! sleeps until the new nearest deadline: no polling, one task however many sandboxes there are. What a passed
//! deadline does is [`crate::control::Control::deadline_passed`], which re-reads the sandbox first, so a deadline
//! moved while the timer was firing is honoured.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

/// When each sandbox's deadline passes.
#[derive(Debug, Default)]
pub struct DeadlineTimer {
    index: Mutex<Index>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct Index {
    by_time: BTreeSet<(DateTime<Utc>, String)>,
    by_id: HashMap<String, DateTime<Utc>>,
}

impl DeadlineTimer {
    /// Sets (or with `None` forgets) when a sandbox's deadline passes. The timer task is woken only when this
    /// changes something: creating and deleting sandboxes without deadlines costs it nothing.
    pub fn schedule(&self, id: &str, at: Option<DateTime<Utc>>) {
        let mut index = self.index.lock().expect("deadline index lock");
        let old = index.by_id.get(id).copied();
        if old == at {
            return;
        }
        if let Some(old) = old {
            index.by_id.remove(id);
            index.by_time.remove(&(old, id.to_string()));
        }
        if let Some(at) = at {
            index.by_id.insert(id.to_string(), at);
            index.by_time.insert((at, id.to_string()));
        }
        drop(index);
        self.changed.notify_one();
    }

    /// When the nearest deadline passes.
    fn next(&self) -> Option<DateTime<Utc>> {
        let index = self.index.lock().expect("deadline index lock");
        index.by_time.first().map(|(at, _)| *at)
    }

    /// Removes and returns the sandboxes whose deadline is at or before `now`.
    fn take_due(&self, now: DateTime<Utc>) -> Vec<String> {
        let mut index = self.index.lock().expect("deadline index lock");
        let mut due = Vec::new();
        while let Some((at, id)) = index.by_time.first().cloned() {
            if at > now {
                break;
            }
            index.by_time.pop_first();
            index.by_id.remove(&id);
            due.push(id);
        }
        due
    }

    /// Runs forever: calls `passed(id)` for each deadline as it passes.
    pub async fn run<F, Fut>(&self, mut passed: F)
    where
        F: FnMut(String) -> Fut,
        Fut: Future<Output = ()>,
    {
        loop {
            for id in self.take_due(Utc::now()) {
                passed(id).await;
            }
            // A change made from here on leaves a permit in `changed`, so it is never missed.
            let changed = self.changed.notified();
            match self.next() {
                Some(at) => {
                    let wait = (at - Utc::now()).to_std().unwrap_or_default();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn deadlines_fire_in_order_and_follow_moves_and_removals() {
        let timer = Arc::new(DeadlineTimer::default());
        let (sender, mut fired) = tokio::sync::mpsc::unbounded_channel();
        let running = timer.clone();
        tokio::spawn(async move {
            running
                .run(|id| {
                    let sender = sender.clone();
                    async move {
                        let _ = sender.send((id, Utc::now()));
                    }
                })
                .await
        });
        let now = Utc::now();
        let ms = chrono::Duration::milliseconds;
        timer.schedule("late", Some(now + ms(400)));
        timer.schedule("early", Some(now + ms(100)));
        timer.schedule("removed", Some(now + ms(200)));
        timer.schedule("removed", None);
        timer.schedule("moved", Some(now + ms(50)));
        timer.schedule("moved", Some(now + ms(250)));
        timer.schedule("past", Some(now - ms(1000)));

        let mut order = Vec::new();
        for _ in 0..4 {
            let (id, at) = tokio::time::timeout(Duration::from_secs(5), fired.recv())
                .await
                .unwrap()
                .unwrap();
            let expected = match id.as_str() {
                "past" => now,
                "early" => now + ms(100),
                "moved" => now + ms(250),
                "late" => now + ms(400),
                other => panic!("{other} fired"),
            };
            assert!(at >= expected, "{id} fired early: {at} < {expected}");
            order.push(id);
        }
        assert_eq!(order, ["past", "early", "moved", "late"]);
        // Nothing else fires: the removed deadline is gone.
        assert!(tokio::time::timeout(Duration::from_millis(300), fired.recv())
            .await
            .is_err());
        assert_eq!(timer.next(), None);
    }
}
