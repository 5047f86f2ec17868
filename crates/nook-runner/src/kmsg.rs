//! Which process the kernel OOM-killed, from the kernel log.
//!
//! A memory cgroup's counters say *that* the kernel killed a process, not *which*. The kernel says which in its log:
//! one `oom-kill:` record per kill, naming the cgroup whose limit was hit (`oom_memcg=`), the victim's cgroup
//! (`task_memcg=`), its command name (`task=`) and pid. [`OomVictims`] follows `/dev/kmsg` from the moment it starts
//! (older records are skipped) on one thread whose reads block until the kernel logs something, so nothing is
//! polled, and keeps the latest victim per sandbox until the runner's OOM monitor takes it.

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// A process the kernel OOM-killed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Victim {
    /// Its command name (at most 15 bytes, as the kernel keeps it).
    pub name: String,
    /// Its pid on the host.
    pub pid: u32,
}

/// The latest OOM victims per sandbox, as the kernel logs them.
#[derive(Debug, Default)]
pub struct OomVictims {
    victims: Mutex<HashMap<String, Victim>>,
    logged: Notify,
}

impl OomVictims {
    /// Starts following the kernel log of this host. Where it cannot be read (no `/dev/kmsg`, or no permission),
    /// victims are simply never known, and OOM kills are reported without a name.
    pub fn start() -> Arc<Self> {
        let victims = Arc::new(Self::default());
        let file = std::fs::File::open("/dev/kmsg").and_then(|file| {
            use std::os::fd::AsRawFd as _;
            // SAFETY: lseek on an open descriptor; SEEK_END on /dev/kmsg skips to the next new record.
            if unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(file)
        });
        match file {
            Ok(file) => {
                let following = victims.clone();
                let spawned = std::thread::Builder::new()
                    .name("nook-kmsg".into())
                    .spawn(move || following.follow(file));
                if let Err(error) = spawned {
                    tracing::warn!(%error, "cannot follow the kernel log; OOM kills will be reported without names");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read /dev/kmsg; OOM kills will be reported without names");
            }
        }
        victims
    }

    /// Reads one record per `read` (as /dev/kmsg hands them out) for as long as the process lives.
    fn follow(&self, mut file: std::fs::File) {
        let mut record = vec![0u8; 8192];
        loop {
            match file.read(&mut record) {
                Ok(0) => return,
                Ok(length) => {
                    if let Some((sandbox, victim)) = parse_record(&String::from_utf8_lossy(&record[..length])) {
                        self.victims.lock().expect("victims").insert(sandbox, victim);
                        self.logged.notify_waiters();
                    }
                }
                // Records were overwritten before they were read: go on with the next one.
                Err(error) if error.raw_os_error() == Some(libc::EPIPE) => {}
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::warn!(%error, "reading the kernel log failed; OOM kills will be reported without names");
                    return;
                }
            }
        }
    }

    /// Takes the latest victim logged for `sandbox_id`, waiting up to `wait` for the kernel to log it.
    pub async fn take(&self, sandbox_id: &str, wait: Duration) -> Option<Victim> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let logged = self.logged.notified();
            if let Some(victim) = self.victims.lock().expect("victims").remove(sandbox_id) {
                return Some(victim);
            }
            if tokio::time::timeout_at(deadline, logged).await.is_err() {
                return None;
            }
        }
    }
}

/// The sandbox and victim of an `oom-kill:` record of `/dev/kmsg` (`priority,sequence,time,flags;message`), when it
/// is one and the cgroup is a sandbox's (`/nook/<sandbox id>`).
fn parse_record(record: &str) -> Option<(String, Victim)> {
    let message = record.split_once(';')?.1.lines().next()?;
    let fields = message.strip_prefix("oom-kill:")?;
    let mut memcg = None;
    let mut name = None;
    let mut pid = None;
    for field in fields.split(',') {
        match field.split_once('=') {
            // The cgroup whose limit was hit: the sandbox's (the victim's own may be a child of it).
            Some(("oom_memcg", value)) => memcg = Some(value),
            Some(("task_memcg", value)) if memcg.is_none() => memcg = Some(value),
            Some(("task", value)) => name = Some(value),
            Some(("pid", value)) => pid = value.parse().ok(),
            _ => {}
        }
    }
    let sandbox = memcg?
        .strip_prefix(&format!("/{}/", crate::cgroups::PARENT))?
        .split('/')
        .next()?;
    if sandbox.is_empty() {
        return None;
    }
    Some((
        sandbox.to_string(),
        Victim {
            name: name?.to_string(),
            pid: pid?,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_records_name_the_sandbox_and_the_process() {
        let record = "3,5871,1234567,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,\
                      mems_allowed=0,oom_memcg=/nook/sb-abc,task_memcg=/nook/sb-abc,task=python3,pid=4242,uid=0\n";
        assert_eq!(
            parse_record(record),
            Some((
                "sb-abc".to_string(),
                Victim {
                    name: "python3".into(),
                    pid: 4242
                }
            ))
        );
        // Other records, and kills outside nook's cgroups, are not victims of a sandbox.
        assert_eq!(
            parse_record("6,1,2,-;Memory cgroup out of memory: Killed process 1 (x)"),
            None
        );
        let elsewhere = "3,1,2,-;oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/system.slice,task=x,pid=1,uid=0";
        assert_eq!(parse_record(elsewhere), None);
    }

    #[tokio::test]
    async fn a_victim_is_taken_once_and_waited_for() {
        let victims = Arc::new(OomVictims::default());
        let logger = victims.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            logger.victims.lock().unwrap().insert(
                "sb-x".into(),
                Victim {
                    name: "stress".into(),
                    pid: 7,
                },
            );
            logger.logged.notify_waiters();
        });
        let victim = victims.take("sb-x", Duration::from_secs(5)).await.unwrap();
        assert_eq!(victim.name, "stress");
        assert_eq!(victims.take("sb-x", Duration::from_millis(10)).await, None);
    }
}
