//! Disk use of a sandbox's writable layer, measured from the host.
//!
//! The upper directory of a sandbox's overlayfs holds exactly what the sandbox changed in its image, so its size is
//! the disk the sandbox costs. Its contents belong to the sandbox and may change while they are read, so the walk
//! never follows a link: every directory is opened relative to its parent's descriptor with `O_NOFOLLOW`, and every
//! entry is measured with `fstatat(AT_SYMLINK_NOFOLLOW)`; a directory swapped for a symlink mid-walk is skipped, not
//! entered. The cost of one reading is bounded: at most [`MAX_ENTRIES`] entries and [`MAX_DEPTH`] levels (one open
//! descriptor per level); beyond that the figure counts what was seen and says it is incomplete.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};

/// Most entries one reading looks at.
pub const MAX_ENTRIES: usize = 100_000;
/// Deepest directory level one reading enters.
pub const MAX_DEPTH: usize = 128;

/// What one reading found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskUsage {
    /// Bytes allocated to the entries seen (`st_blocks` × 512, as `du` counts), hard links once.
    pub used_bytes: u64,
    /// Whether every entry was seen (false when a bound was reached or a directory could not be read).
    pub complete: bool,
    /// Size of the filesystem holding the directory.
    pub total_bytes: u64,
}

/// Measures the tree under `root`, within the bounds above. A missing `root` measures zero.
pub fn usage(root: &Path) -> std::io::Result<DiskUsage> {
    usage_bounded(root, MAX_ENTRIES, MAX_DEPTH)
}

fn usage_bounded(root: &Path, max_entries: usize, max_depth: usize) -> std::io::Result<DiskUsage> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir = match Dir::open(root, flags, Mode::empty()) {
        Ok(dir) => dir,
        Err(nix::errno::Errno::ENOENT) => return Ok(DiskUsage::default()),
        Err(errno) => return Err(errno.into()),
    };
    // `root` itself is the runner's directory; only what is under it belongs to the sandbox.
    let vfs = nix::sys::statvfs::statvfs(root)?;
    let total_bytes = (vfs.blocks() as u64).saturating_mul(vfs.fragment_size() as u64);
    let mut used_bytes = 0u64;
    let mut complete = true;
    let mut seen = 0usize;
    let mut linked: HashSet<(u64, u64)> = HashSet::new();
    // Depth-first, one open directory per level.
    let mut stack = vec![dir.into_iter()];
    while let Some(entries) = stack.last_mut() {
        let Some(entry) = entries.next() else {
            stack.pop();
            continue;
        };
        let Ok(entry) = entry else {
            complete = false;
            stack.pop();
            continue;
        };
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        if seen == max_entries {
            complete = false;
            break;
        }
        seen += 1;
        let parent: RawFd = entries.as_raw_fd();
        let Ok(stat) = fstatat(Some(parent), name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            // Removed since the directory was listed.
            continue;
        };
        let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
        if kind != SFlag::S_IFDIR && stat.st_nlink > 1 && !linked.insert((stat.st_dev, stat.st_ino)) {
            continue;
        }
        used_bytes = used_bytes.saturating_add((stat.st_blocks as u64).saturating_mul(512));
        if kind != SFlag::S_IFDIR {
            continue;
        }
        if stack.len() >= max_depth {
            complete = false;
            continue;
        }
        // Failing here means it is gone, or was replaced by something that is not a directory, since it was measured.
        if let Ok(child) = Dir::openat(Some(parent), name, flags, Mode::empty()) {
            stack.push(child.into_iter());
        }
    }
    Ok(DiskUsage {
        used_bytes,
        complete,
        total_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_files_once_and_never_follows_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("upper");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/big"), vec![7u8; 1 << 20]).unwrap();
        std::fs::hard_link(root.join("a/b/big"), root.join("a/again")).unwrap();
        // A link out of the tree to a large directory must not be walked.
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("huge"), vec![1u8; 4 << 20]).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        let usage = usage(&root).unwrap();
        assert!(usage.complete);
        assert!(usage.used_bytes >= 1 << 20, "{usage:?}");
        assert!(
            usage.used_bytes < 2 << 20,
            "the hard link or the symlink's target was counted: {usage:?}"
        );
        assert!(usage.total_bytes > usage.used_bytes);
    }

    #[test]
    fn bounds_make_the_figure_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        for n in 0..10 {
            std::fs::write(dir.path().join(n.to_string()), b"x").unwrap();
        }
        assert!(!usage_bounded(dir.path(), 5, 8).unwrap().complete);
        assert!(usage_bounded(dir.path(), 10, 8).unwrap().complete);
        std::fs::create_dir_all(dir.path().join("d1/d2/d3")).unwrap();
        assert!(!usage_bounded(dir.path(), 100, 2).unwrap().complete);
        assert!(usage_bounded(dir.path(), 100, 8).unwrap().complete);
        assert_eq!(usage(&dir.path().join("missing")).unwrap(), DiskUsage::default());
    }
}
