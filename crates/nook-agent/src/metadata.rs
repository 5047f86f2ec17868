//! User metadata of files: extended attributes in the [`METADATA_XATTR_PREFIX`] namespace (`user.e2b.<key>`, as
//! E2B's envd keeps them), read for every stat and written on new files before they are renamed into place.
//!
//! The kernel's xattr calls are the only unsafe code here; each is given a buffer with its true length. A file
//! system without user extended attributes (or a file type that refuses them, like a symlink) simply has no
//! metadata: reading yields an empty map, and writing fails with the kernel's reason.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nook_agent_proto::METADATA_XATTR_PREFIX;

/// Largest list of attribute names the kernel returns (`XATTR_LIST_MAX`).
const MAX_LIST: usize = 64 * 1024;
/// Largest attribute value kept (user metadata is bounded far below this; larger values set by other means are
/// skipped).
const MAX_VALUE: usize = 64 * 1024;

/// The metadata of `path` (a final symlink is not followed); empty when there is none or it cannot be read.
pub fn read(path: &Path) -> BTreeMap<String, String> {
    let mut metadata = BTreeMap::new();
    let Ok(path) = CString::new(path.as_os_str().as_bytes()) else {
        return metadata;
    };
    let Some(names) = list(&path) else {
        return metadata;
    };
    for name in names.split(|byte| *byte == 0).filter(|name| !name.is_empty()) {
        let Some(key) = name.strip_prefix(METADATA_XATTR_PREFIX.as_bytes()) else {
            continue;
        };
        let Ok(name) = CString::new(name) else { continue };
        if let Some(value) = get(&path, &name) {
            metadata.insert(
                String::from_utf8_lossy(key).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    metadata
}

/// Sets `metadata` on an open file (one just created, so it carries no other metadata to replace).
pub fn write(file: BorrowedFd<'_>, metadata: &BTreeMap<String, String>) -> std::io::Result<()> {
    for (key, value) in metadata {
        let name = CString::new(format!("{METADATA_XATTR_PREFIX}{key}"))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a metadata key contains NUL"))?;
        // SAFETY: `name` is NUL-terminated and `value` is valid for `value.len()` bytes for the whole call.
        let result = unsafe { libc::fsetxattr(file.as_raw_fd(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The NUL-separated attribute names of `path`, or `None` when they cannot be read.
fn list(path: &CStr) -> Option<Vec<u8>> {
    // Sized first, then read; a list that grew in between is read at the largest size the kernel allows.
    // SAFETY: a null buffer of length 0 asks only for the size.
    let size = unsafe { libc::llistxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    if size <= 0 {
        return None;
    }
    for capacity in [size as usize, MAX_LIST] {
        let mut buffer = vec![0u8; capacity];
        // SAFETY: `buffer` is valid for writes of `buffer.len()` bytes.
        let size = unsafe { libc::llistxattr(path.as_ptr(), buffer.as_mut_ptr().cast(), buffer.len()) };
        if size >= 0 {
            buffer.truncate(size as usize);
            return Some(buffer);
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            return None;
        }
    }
    None
}

/// The value of one attribute, or `None` when it vanished, is unreadable or is larger than [`MAX_VALUE`].
fn get(path: &CStr, name: &CStr) -> Option<Vec<u8>> {
    // SAFETY: both names are NUL-terminated; a null buffer of length 0 asks only for the size.
    let size = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 || size as usize > MAX_VALUE {
        return None;
    }
    let mut buffer = vec![0u8; size as usize];
    // SAFETY: both names are NUL-terminated; `buffer` is valid for writes of `buffer.len()` bytes.
    let size = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buffer.as_mut_ptr().cast(), buffer.len()) };
    if size < 0 {
        return None;
    }
    buffer.truncate(size as usize);
    Some(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_extended_attributes() {
        let dir = std::env::temp_dir().join(format!("nook-metadata-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("file");
        let file = std::fs::File::create(&path).unwrap();
        let metadata = BTreeMap::from([
            ("author".to_string(), "ada".to_string()),
            ("empty".to_string(), String::new()),
        ]);
        match write(std::os::fd::AsFd::as_fd(&file), &metadata) {
            Ok(()) => {
                assert_eq!(read(&path), metadata);
                // Attributes outside the namespace are not metadata.
                let other = CString::new("user.other").unwrap();
                // SAFETY: the name is NUL-terminated and the value is valid for its length.
                unsafe { libc::fsetxattr(file.as_raw_fd(), other.as_ptr(), b"x".as_ptr().cast(), 1, 0) };
                assert_eq!(read(&path), metadata);
            }
            // The test machine's temporary directory may lack user extended attributes (tmpfs before Linux 6.6).
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => assert!(read(&path).is_empty()),
            Err(error) => panic!("setting metadata failed: {error}"),
        }
        assert!(read(&dir.join("missing")).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
