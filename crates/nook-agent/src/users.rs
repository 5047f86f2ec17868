//! Resolves the user a command runs as from the sandbox's own `/etc/passwd` and `/etc/group`.
//!
//! The agent is a static binary, so it cannot use glibc's NSS; like other container runtimes it reads the two files
//! directly. A user is given by name or numeric uid, optionally followed by `:group` (a group name or gid, as OCI
//! images' `User` may say); a uid missing from `/etc/passwd` is allowed (with gid = uid and home `/`), as Docker
//! allows it.

use std::path::Path;

/// A resolved account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    /// Supplementary groups, including the primary one.
    pub groups: Vec<u32>,
}

/// Why a user could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user {0:?} does not exist in the sandbox's /etc/passwd")]
    Unknown(String),
    #[error("group {0:?} does not exist in the sandbox's /etc/group")]
    UnknownGroup(String),
}

/// Resolves `user` (a name or a uid, optionally `:group`) against the files under `root` (`/` inside the sandbox).
pub fn resolve(root: &Path, user: &str) -> Result<Account, UserError> {
    let Some((user, group)) = user.split_once(':') else {
        return resolve_user(root, user);
    };
    let mut account = resolve_user(root, user)?;
    account.gid = resolve_group(root, group)?;
    account.groups = supplementary_groups(root, &account.name, account.gid);
    Ok(account)
}

/// A group name or gid, as a gid; a numeric gid need not exist in `/etc/group`.
fn resolve_group(root: &Path, group: &str) -> Result<u32, UserError> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    groups
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 3 && fields[0] == group).then(|| fields[2].parse().ok())?
        })
        .ok_or_else(|| UserError::UnknownGroup(group.to_string()))
}

fn resolve_user(root: &Path, user: &str) -> Result<Account, UserError> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    let numeric: Option<u32> = user.parse().ok();
    let entry = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 {
            return None;
        }
        let uid: u32 = fields[2].parse().ok()?;
        let matches = match numeric {
            Some(wanted) => uid == wanted,
            None => fields[0] == user,
        };
        matches.then(|| Account {
            name: fields[0].to_string(),
            uid,
            gid: fields[3].parse().unwrap_or(uid),
            home: if fields[5].is_empty() {
                "/".into()
            } else {
                fields[5].to_string()
            },
            groups: Vec::new(),
        })
    });
    // Images without /etc/passwd still run as root, as every container runtime allows.
    let numeric = numeric.or((user == "root").then_some(0));
    let mut account = match (entry, numeric) {
        (Some(account), _) => account,
        (None, Some(0)) => Account {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: "/root".into(),
            groups: Vec::new(),
        },
        (None, Some(uid)) => Account {
            name: uid.to_string(),
            uid,
            gid: uid,
            home: "/".into(),
            groups: Vec::new(),
        },
        (None, None) => return Err(UserError::Unknown(user.to_string())),
    };
    account.groups = supplementary_groups(root, &account.name, account.gid);
    Ok(account)
}

/// Names of the given uids and gids (ids without an entry are left out).
pub fn names(root: &Path, uids: &[u32], gids: &[u32]) -> nook_agent_proto::Names {
    let mut names = nook_agent_proto::Names::default();
    let lookup = |file: &str, wanted: &[u32], out: &mut std::collections::BTreeMap<u32, String>| {
        if wanted.is_empty() {
            return;
        }
        for line in std::fs::read_to_string(root.join(file)).unwrap_or_default().lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if let (Some(name), Some(Ok(id))) = (fields.first(), fields.get(2).map(|f| f.parse::<u32>())) {
                if wanted.contains(&id) {
                    out.entry(id).or_insert_with(|| name.to_string());
                }
            }
        }
    };
    lookup("etc/passwd", uids, &mut names.users);
    lookup("etc/group", gids, &mut names.groups);
    names
}

fn supplementary_groups(root: &Path, name: &str, primary: u32) -> Vec<u32> {
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    let mut groups = vec![primary];
    for line in group.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 {
            continue;
        }
        let Ok(gid) = fields[2].parse::<u32>() else { continue };
        if fields[3].split(',').any(|member| member == name) && !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with(passwd: &str, group: &str) -> tempdir::Dir {
        tempdir::Dir::new(passwd, group)
    }

    /// A tiny scratch directory helper, so the tests need no extra crates.
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new(passwd: &str, group: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "nook-users-test-{}-{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_nanos()
                ));
                std::fs::create_dir_all(path.join("etc")).unwrap();
                std::fs::write(path.join("etc/passwd"), passwd).unwrap();
                std::fs::write(path.join("etc/group"), group).unwrap();
                Self(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:user\nuser:x:1000:\n";

    #[test]
    fn resolves_names_uids_and_groups() {
        let dir = root_with(PASSWD, GROUP);
        let user = resolve(&dir.0, "user").unwrap();
        assert_eq!((user.uid, user.gid, user.home.as_str()), (1000, 1000, "/home/user"));
        assert_eq!(user.groups, vec![1000, 27]);
        assert_eq!(resolve(&dir.0, "0").unwrap().name, "root");
        let unknown_uid = resolve(&dir.0, "4242").unwrap();
        assert_eq!((unknown_uid.uid, unknown_uid.gid), (4242, 4242));
        assert!(resolve(&dir.0, "nobody-here").is_err());
        let empty = root_with("", "");
        assert_eq!(resolve(&empty.0, "root").unwrap().uid, 0);
    }

    #[test]
    fn user_colon_group_sets_the_primary_group() {
        let dir = root_with(PASSWD, GROUP);
        let named = resolve(&dir.0, "user:sudo").unwrap();
        assert_eq!((named.uid, named.gid), (1000, 27));
        let numeric = resolve(&dir.0, "1000:4000").unwrap();
        assert_eq!((numeric.uid, numeric.gid, numeric.groups[0]), (1000, 4000, 4000));
        let error = resolve(&dir.0, "user:nogroup").unwrap_err();
        assert_eq!(
            error.to_string(),
            "group \"nogroup\" does not exist in the sandbox's /etc/group"
        );
    }
}
