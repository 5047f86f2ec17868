//! Unpacking one image layer into its own, empty directory of the layer store, as overlayfs expects it.
//!
//! The layer arrives as a tar stream, plain, gzip or zstd (detected from its first bytes). It is decompressed,
//! hashed (the sha256 of the uncompressed stream is the layer's OCI "diff id") and unpacked in one pass, with a
//! bounded buffer: nothing is held in memory but the current block.
//!
//! Every member is hostile until checked. Its path must stay inside the layer: absolute paths and `..` are refused,
//! and so is a path that passes through a symlink (the "symlink, then a file through it" escape) — the unpacker
//! knows every directory it made, so it never follows a link while writing. Hard links may only point at an earlier
//! non-directory member of the same layer. Owners, modes (setuid and setgid included), modification times, device
//! nodes and named pipes are kept as recorded: the layer is only ever mounted `nodev` under a sandbox's overlay.
//! Extended attributes are kept for the `user.` namespace, file capabilities and ACLs; the `trusted.` namespace
//! (where overlayfs keeps its own metadata) and security labels are never taken from an archive.
//!
//! OCI whiteouts become overlayfs whiteouts: `.wh.<name>` turns into a 0/0 character device `<name>`, and
//! `.wh..wh..opq` marks its directory opaque (`trusted.overlay.opaque=y`), so lower layers' files disappear exactly
//! as the image's author deleted them.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use sha2::{Digest, Sha256};

use super::tar_stream::{EntryKind, TarEntry, TarError, TarStream};

/// The longest member path accepted (Linux's PATH_MAX).
const MAX_PATH_BYTES: usize = 4096;

/// The overlayfs attribute that makes a directory hide the lower layers' contents.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The stream is not a readable tar archive (or its compression is broken).
    #[error("the layer is not a valid tar archive")]
    Tar(#[from] TarError),
    /// A member tried to do something a layer may not do.
    #[error("the layer's member {path:?} (at byte {offset}) was refused: {reason}")]
    Refused {
        /// The member's path as recorded.
        path: String,
        /// Offset of its header in the uncompressed stream.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// Writing into the layer directory failed.
    #[error("{action} {path} failed")]
    Write {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
}

/// What unpacking produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackedLayer {
    /// `sha256:<hex>` of the uncompressed tar stream.
    pub diff_id: String,
    /// Total size of the regular files' data.
    pub size_bytes: u64,
}

/// How a stream is compressed, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// Recognises the compression from the magic number at the start of a stream.
    pub fn sniff(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::None
        }
    }
}

/// A reader that hashes everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R> HashingReader<R> {
    /// Hashes what is read from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// `sha256:<hex>` of everything read so far.
    pub fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.finalize()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A decompressing reader over `reader`, chosen from its first bytes.
pub fn decompressed<'a>(reader: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    Ok(match Compression::sniff(reader.fill_buf()?) {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
        Compression::None => Box::new(reader),
    })
}

/// Unpacks the layer read from `reader` into `dest` (an existing, empty directory).
pub fn unpack_layer(reader: impl Read, dest: &Path) -> Result<UnpackedLayer, UnpackError> {
    let mut hashing = HashingReader::new(decompressed(reader).map_err(TarError::Io)?);
    let mut tar = TarStream::new(&mut hashing);
    let size_bytes = unpack_entries(&mut tar, None, dest)?;
    Ok(UnpackedLayer {
        diff_id: finish_digest(hashing)?,
        size_bytes,
    })
}

/// Unpacks `first` (a member already read from `tar`) and every member after it into `dest`, returning the size of
/// the regular files' data.
pub fn unpack_entries<R: Read>(
    tar: &mut TarStream<R>,
    first: Option<TarEntry>,
    dest: &Path,
) -> Result<u64, UnpackError> {
    let mut unpacker = Unpacker::new(dest);
    let mut next = first;
    if next.is_none() {
        next = tar.next_entry()?;
    }
    while let Some(entry) = next {
        unpacker.apply(&entry, &mut tar.data())?;
        next = tar.next_entry()?;
    }
    unpacker.finish()?;
    Ok(unpacker.size_bytes)
}

/// Drains what follows the end marker (the digest covers the whole uncompressed stream, padding included) and
/// returns the `sha256:` digest.
pub fn finish_digest<R: Read>(mut hashing: HashingReader<R>) -> Result<String, UnpackError> {
    io::copy(&mut hashing, &mut io::sink()).map_err(TarError::Io)?;
    Ok(hashing.finish())
}

/// Checks a member path and turns it into a relative path of normal components (empty for the layer's root).
pub fn normalise(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(format!(
            "its path is {} bytes long, more than {MAX_PATH_BYTES}",
            raw.len()
        ));
    }
    if raw.starts_with(b"/") {
        return Err("its path is absolute".into());
    }
    let mut path = PathBuf::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("its path contains '..' and would leave the layer".into()),
            Component::RootDir | Component::Prefix(_) => return Err("its path is absolute".into()),
        }
    }
    Ok(path)
}

/// Writes members into one layer directory, remembering which directories it made itself.
struct Unpacker {
    root: PathBuf,
    /// Relative paths known to be real directories of this layer (never symlinks).
    directories: HashSet<PathBuf>,
    /// Directories whose modification time is set last, after their contents stopped changing it.
    directory_times: Vec<(PathBuf, i64)>,
    size_bytes: u64,
}

impl Unpacker {
    fn new(root: &Path) -> Self {
        let mut directories = HashSet::new();
        directories.insert(PathBuf::new());
        Self {
            root: root.to_path_buf(),
            directories,
            directory_times: Vec::new(),
            size_bytes: 0,
        }
    }

    fn apply(&mut self, entry: &TarEntry, data: &mut impl Read) -> Result<(), UnpackError> {
        let refused = |reason: String| UnpackError::Refused {
            path: entry.display_path(),
            offset: entry.offset,
            reason,
        };
        let relative = normalise(&entry.path).map_err(refused)?;
        let Some(name) = relative.file_name().map(|name| name.as_bytes()) else {
            // The layer's root itself ("./"): only its metadata can be set.
            if entry.kind != EntryKind::Directory {
                return Err(refused("the layer's root must be a directory".into()));
            }
            return self.set_metadata(entry, &relative);
        };
        self.ensure_parents(&relative).map_err(|error| match error {
            Ensure::Refused(reason) => refused(reason),
            Ensure::Write(error) => error,
        })?;
        if let Some(whited_out) = name.strip_prefix(b".wh.") {
            return self.whiteout(entry, &relative, whited_out);
        }
        let path = self.root.join(&relative);
        let existing = std::fs::symlink_metadata(&path).ok();
        if let Some(existing) = existing {
            // A later member replaces an earlier one, as tar does; a directory stays a directory.
            if existing.is_dir() && entry.kind == EntryKind::Directory {
                self.directories.insert(relative.clone());
                return self.set_metadata(entry, &relative);
            }
            self.remove(&relative, existing.is_dir())?;
        }
        match entry.kind {
            EntryKind::File => {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(write_error("creating", &path))?;
                let copied = io::copy(data, &mut file).map_err(|source| match source.kind() {
                    io::ErrorKind::UnexpectedEof => UnpackError::Tar(TarError::Truncated("a member's data")),
                    _ => UnpackError::Write {
                        action: "writing",
                        path: path.clone(),
                        source,
                    },
                })?;
                file.flush().map_err(write_error("writing", &path))?;
                self.size_bytes += copied;
            }
            EntryKind::Directory => {
                std::fs::create_dir(&path).map_err(write_error("creating directory", &path))?;
                self.directories.insert(relative.clone());
            }
            EntryKind::Symlink => {
                let target = entry.link_target.as_deref().unwrap_or_default();
                if target.is_empty() {
                    return Err(refused("it is a symlink to an empty path".into()));
                }
                // Where it points is resolved inside the sandbox's root at run time, never here.
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &path)
                    .map_err(write_error("creating symlink", &path))?;
            }
            EntryKind::HardLink => {
                let raw_target = entry.link_target.as_deref().unwrap_or_default();
                let target = normalise(raw_target).map_err(|reason| refused(format!("its link target: {reason}")))?;
                self.check_link_target(&target).map_err(refused)?;
                std::fs::hard_link(self.root.join(&target), &path).map_err(write_error("creating hard link", &path))?;
                // The new name shares the target's inode, metadata included.
                return Ok(());
            }
            EntryKind::CharDevice | EntryKind::BlockDevice | EntryKind::Fifo => {
                let kind = match entry.kind {
                    EntryKind::CharDevice => SFlag::S_IFCHR,
                    EntryKind::BlockDevice => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let (major, minor) = entry.device;
                mknod(
                    &path,
                    kind,
                    Mode::from_bits_truncate(0o600),
                    makedev(major.into(), minor.into()),
                )
                .map_err(|errno| UnpackError::Write {
                    action: "creating device node",
                    path: path.clone(),
                    source: errno.into(),
                })?;
            }
        }
        self.set_metadata(entry, &relative)
    }

    /// Turns `.wh.<name>` into an overlayfs whiteout, or `.wh..wh..opq` into an opaque directory.
    fn whiteout(&mut self, entry: &TarEntry, relative: &Path, whited_out: &[u8]) -> Result<(), UnpackError> {
        let parent = relative.parent().unwrap_or(Path::new(""));
        if whited_out == b".wh..opq" {
            let dir = self.root.join(parent);
            return set_xattr(&dir, OPAQUE_XATTR, b"y").map_err(write_error("marking opaque", &dir));
        }
        if whited_out.starts_with(b".wh.") {
            // Other `.wh..wh.` names are aufs bookkeeping with no meaning for the files.
            return Ok(());
        }
        if whited_out.is_empty() || whited_out == b"." || whited_out == b".." {
            return Err(UnpackError::Refused {
                path: entry.display_path(),
                offset: entry.offset,
                reason: "it is a whiteout of no valid name".into(),
            });
        }
        let path = self.root.join(parent).join(OsStr::from_bytes(whited_out));
        if std::fs::symlink_metadata(&path).is_ok() {
            // A whiteout hides the lower layers' file; this layer's own file of that name stays.
            return Ok(());
        }
        mknod(&path, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).map_err(|errno| UnpackError::Write {
            action: "creating whiteout",
            path,
            source: errno.into(),
        })
    }

    /// Makes sure every ancestor of `relative` is a real directory of this layer, creating missing ones.
    fn ensure_parents(&mut self, relative: &Path) -> Result<(), Ensure> {
        let Some(parent) = relative.parent() else {
            return Ok(());
        };
        if self.directories.contains(parent) {
            return Ok(());
        }
        let mut prefix = PathBuf::new();
        for component in parent.components() {
            prefix.push(component);
            if self.directories.contains(&prefix) {
                continue;
            }
            let path = self.root.join(&prefix);
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(Ensure::Refused(format!(
                        "its path passes through the symlink {:?} earlier in the layer",
                        prefix.display().to_string()
                    )))
                }
                Ok(_) => {
                    return Err(Ensure::Refused(format!(
                        "its parent {:?} is not a directory",
                        prefix.display().to_string()
                    )))
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir(&path)
                        .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)))
                        .map_err(|source| {
                            Ensure::Write(UnpackError::Write {
                                action: "creating directory",
                                path: path.clone(),
                                source,
                            })
                        })?;
                }
                Err(source) => {
                    return Err(Ensure::Write(UnpackError::Write {
                        action: "inspecting",
                        path,
                        source,
                    }))
                }
            }
            self.directories.insert(prefix.clone());
        }
        Ok(())
    }

    /// A hard link's target must be an earlier, non-directory member reached through real directories.
    fn check_link_target(&self, target: &Path) -> Result<(), String> {
        if target.as_os_str().is_empty() {
            return Err("it is a hard link to the layer's root".into());
        }
        let mut prefix = PathBuf::new();
        if let Some(parent) = target.parent() {
            for component in parent.components() {
                prefix.push(component);
                if !self.directories.contains(&prefix) {
                    return Err(format!(
                        "its link target {:?} is not inside a directory of this layer",
                        target.display().to_string()
                    ));
                }
            }
        }
        match std::fs::symlink_metadata(self.root.join(target)) {
            Ok(meta) if meta.is_dir() => Err("it is a hard link to a directory".into()),
            Ok(_) => Ok(()),
            Err(_) => Err(format!(
                "its link target {:?} is not an earlier member of this layer",
                target.display().to_string()
            )),
        }
    }

    /// Removes what an earlier member put at `relative`, forgetting directories under it.
    fn remove(&mut self, relative: &Path, is_dir: bool) -> Result<(), UnpackError> {
        let path = self.root.join(relative);
        if is_dir {
            std::fs::remove_dir_all(&path).map_err(write_error("replacing", &path))?;
            self.directories.retain(|known| !known.starts_with(relative));
            self.directory_times.retain(|(known, _)| !known.starts_with(relative));
        } else {
            std::fs::remove_file(&path).map_err(write_error("replacing", &path))?;
        }
        Ok(())
    }

    /// Owner, then mode (a chown clears setuid bits), extended attributes and modification time.
    fn set_metadata(&mut self, entry: &TarEntry, relative: &Path) -> Result<(), UnpackError> {
        let path = self.root.join(relative);
        std::os::unix::fs::lchown(&path, Some(entry.uid), Some(entry.gid))
            .map_err(write_error("changing owner of", &path))?;
        if entry.kind != EntryKind::Symlink {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(entry.mode))
                .map_err(write_error("changing mode of", &path))?;
        }
        for (name, value) in &entry.xattrs {
            if xattr_allowed(name) {
                set_xattr(&path, name, value).map_err(write_error("setting extended attribute on", &path))?;
            }
        }
        if entry.kind == EntryKind::Directory {
            self.directory_times.push((relative.to_path_buf(), entry.mtime));
            return Ok(());
        }
        set_mtime(&path, entry.mtime)
    }

    /// Sets the directories' times, deepest first.
    fn finish(&mut self) -> Result<(), UnpackError> {
        let mut times = std::mem::take(&mut self.directory_times);
        times.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
        for (relative, mtime) in times {
            set_mtime(&self.root.join(relative), mtime)?;
        }
        Ok(())
    }
}

/// Why the ancestors of a member could not be made.
enum Ensure {
    Refused(String),
    Write(UnpackError),
}

fn write_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Write {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Extended attributes an archive may set: user attributes, file capabilities and ACLs.
fn xattr_allowed(name: &str) -> bool {
    name.starts_with("user.")
        || name == "security.capability"
        || name == "system.posix_acl_access"
        || name == "system.posix_acl_default"
}

fn set_mtime(path: &Path, mtime: i64) -> Result<(), UnpackError> {
    let time = TimeSpec::new(mtime, 0);
    utimensat(None, path, &time, &time, UtimensatFlags::NoFollowSymlink).map_err(|errno| UnpackError::Write {
        action: "setting the modification time of",
        path: path.to_path_buf(),
        source: errno.into(),
    })
}

/// Sets an extended attribute on `path` itself (never on a symlink's target).
pub(crate) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let name = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: both strings are NUL-terminated and outlive the call; `value` is a valid slice of the given length.
    let result = unsafe { libc::lsetxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads an extended attribute of `path` itself; `None` when it has none of that name.
pub(crate) fn get_xattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let name = CString::new(name).map_err(io::Error::other)?;
    let mut value = vec![0u8; 256];
    loop {
        // SAFETY: both strings are NUL-terminated and outlive the call; the buffer is valid for its length.
        let result = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if result >= 0 {
            value.truncate(result as usize);
            return Ok(Some(value));
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::ENODATA) => return Ok(None),
            // Larger than the buffer: values are at most 64 KiB (XATTR_SIZE_MAX).
            Some(libc::ERANGE) if value.len() < 64 * 1024 => value.resize(64 * 1024, 0),
            _ => return Err(error),
        }
    }
}

/// Names of the `user.` extended attributes of `path` itself.
pub(crate) fn user_xattrs(path: &Path) -> io::Result<Vec<String>> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    Ok(list_xattrs(&path)?
        .into_iter()
        .filter(|name| name.starts_with(b"user."))
        .filter_map(|name| String::from_utf8(name).ok())
        .collect())
}

/// Names of the extended attributes of `path` itself.
fn list_xattrs(path: &CString) -> io::Result<Vec<Vec<u8>>> {
    let mut buffer = vec![0u8; 1024];
    loop {
        // SAFETY: `path` is NUL-terminated and outlives the call; the buffer is valid for its length.
        let result = unsafe { libc::llistxattr(path.as_ptr(), buffer.as_mut_ptr().cast(), buffer.len()) };
        if result >= 0 {
            buffer.truncate(result as usize);
            return Ok(buffer
                .split(|byte| *byte == 0)
                .filter(|name| !name.is_empty())
                .map(<[u8]>::to_vec)
                .collect());
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::ERANGE) if buffer.len() < 1 << 20 => buffer.resize(buffer.len() * 4, 0),
            _ => return Err(error),
        }
    }
}

/// Attributes with which overlayfs makes an upper file stand for content elsewhere (a renamed directory, a file
/// whose data is still in a lower layer): a layer with them is not self-contained. Sandboxes mount overlayfs with
/// `redirect_dir=off,metacopy=off`, so none is ever written; finding one is refused rather than losing the data.
const CONTENT_ELSEWHERE_XATTRS: [&[u8]; 2] = [b"trusted.overlay.redirect", b"trusted.overlay.metacopy"];

/// Removes overlayfs's bookkeeping attributes (`trusted.overlay.*` other than the opaque marker: origin, impure and
/// the like, which describe the file system it was written on) from everything under `root`, `root` included.
pub fn strip_overlay_bookkeeping(root: &Path) -> io::Result<()> {
    let path = CString::new(root.as_os_str().as_bytes()).map_err(io::Error::other)?;
    for name in list_xattrs(&path)? {
        if CONTENT_ELSEWHERE_XATTRS.contains(&name.as_slice()) {
            return Err(io::Error::other(format!(
                "{} carries overlayfs's {} attribute: its content is not in this layer",
                root.display(),
                String::from_utf8_lossy(&name)
            )));
        }
        if name.starts_with(b"trusted.overlay.") && name != OPAQUE_XATTR.as_bytes() {
            let name = CString::new(name).map_err(io::Error::other)?;
            // SAFETY: both strings are NUL-terminated and outlive the call.
            if unsafe { libc::lremovexattr(path.as_ptr(), name.as_ptr()) } != 0 {
                let error = io::Error::last_os_error();
                if error.raw_os_error() != Some(libc::ENODATA) {
                    return Err(error);
                }
            }
        }
    }
    if std::fs::symlink_metadata(root)?.is_dir() {
        for entry in std::fs::read_dir(root)? {
            strip_overlay_bookkeeping(&entry?.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use super::*;

    /// Builds a tar from (path, kind, data or link target) with tar's own writer.
    fn layer(members: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(if *kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            header.set_uid(1000);
            header.set_gid(1000);
            header.set_mtime(1_600_000_000);
            if kind.is_symlink() || kind.is_hard_link() {
                header.set_size(0);
                builder
                    .append_link(&mut header, path, std::str::from_utf8(data).unwrap())
                    .unwrap();
            } else {
                header.set_size(data.len() as u64);
                header.set_cksum();
                // Write the raw name so hostile paths survive tar's own checks.
                let name = path.as_bytes();
                header.as_old_mut().name[..name.len()].copy_from_slice(name);
                header.set_cksum();
                builder.append(&header, *data).unwrap();
            }
        }
        builder.into_inner().unwrap()
    }

    use tar::EntryType as T;

    fn unpack(bytes: &[u8]) -> (tempfile::TempDir, Result<UnpackedLayer, UnpackError>) {
        let parent = tempfile::tempdir().unwrap();
        let dest = parent.path().join("layer");
        std::fs::create_dir(&dest).unwrap();
        let result = unpack_layer(bytes, &dest);
        (parent, result)
    }

    #[test]
    fn files_links_modes_owners_and_times_are_kept() {
        let bytes = layer(&[
            ("usr/", T::Directory, b""),
            ("usr/bin/tool", T::Regular, b"#!/bin/sh\n"),
            ("usr/bin/alias", T::Symlink, b"tool"),
            ("usr/bin/hard", T::Link, b"usr/bin/tool"),
            ("run/pipe", T::Fifo, b""),
        ]);
        let (dir, result) = unpack(&bytes);
        let unpacked = result.unwrap();
        let root = dir.path().join("layer");
        assert_eq!(unpacked.size_bytes, 10);
        assert_eq!(
            unpacked.diff_id,
            format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
        );
        let tool = std::fs::metadata(root.join("usr/bin/tool")).unwrap();
        assert_eq!((tool.uid(), tool.gid(), tool.mode() & 0o7777), (1000, 1000, 0o644));
        assert_eq!(tool.mtime(), 1_600_000_000);
        assert_eq!(tool.nlink(), 2);
        assert_eq!(
            std::fs::read_link(root.join("usr/bin/alias")).unwrap(),
            Path::new("tool")
        );
        assert!(std::fs::metadata(root.join("run/pipe")).unwrap().file_type().is_fifo());
        assert_eq!(std::fs::metadata(root.join("usr")).unwrap().mtime(), 1_600_000_000);
    }

    #[test]
    fn setuid_bits_survive_the_owner_change() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o4755);
        header.set_uid(0);
        header.set_size(1);
        header.set_cksum();
        builder.append_data(&mut header, "bin/su", &b"x"[..]).unwrap();
        let (dir, result) = unpack(&builder.into_inner().unwrap());
        result.unwrap();
        let meta = std::fs::metadata(dir.path().join("layer/bin/su")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o4755);
    }

    #[test]
    fn whiteouts_and_opaque_directories_become_overlayfs_markers() {
        let bytes = layer(&[
            ("etc/.wh.motd", T::Regular, b""),
            ("var/cache/.wh..wh..opq", T::Regular, b""),
            ("var/cache/kept", T::Regular, b"k"),
            ("tmp/.wh..wh.plnk", T::Regular, b""),
        ]);
        let (dir, result) = unpack(&bytes);
        result.unwrap();
        let root = dir.path().join("layer");
        let motd = std::fs::symlink_metadata(root.join("etc/motd")).unwrap();
        assert!(motd.file_type().is_char_device());
        assert_eq!(motd.rdev(), 0);
        assert!(!root.join("etc/.wh.motd").exists());
        assert_eq!(
            get_xattr(&root.join("var/cache"), OPAQUE_XATTR).unwrap(),
            Some(b"y".to_vec())
        );
        assert!(root.join("var/cache/kept").exists());
        assert!(!root.join("tmp/.wh..wh.plnk").exists());
    }

    fn refused(members: &[(&str, tar::EntryType, &[u8])], expected: &str) {
        let bytes = layer(members);
        let (dir, result) = unpack(&bytes);
        let error = result.expect_err("the hostile layer must be refused");
        assert!(matches!(error, UnpackError::Refused { .. }), "{error:?}");
        assert!(error.to_string().contains(expected), "{error}");
        // Nothing was written next to the layer directory, where `..` would land.
        let siblings: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(siblings, ["layer"]);
    }

    #[test]
    fn hostile_members_are_refused_with_a_reason() {
        refused(&[("../escape", T::Regular, b"x")], "'..'");
        refused(&[("a/../../escape", T::Regular, b"x")], "'..'");
        refused(&[("/etc/passwd", T::Regular, b"x")], "absolute");
        refused(
            &[("link", T::Symlink, b".."), ("link/escape", T::Regular, b"x")],
            "passes through the symlink",
        );
        refused(
            &[("link", T::Symlink, b"/etc"), ("link/passwd", T::Regular, b"x")],
            "passes through the symlink",
        );
        refused(&[("hard", T::Link, b"../../etc/passwd")], "'..'");
        refused(&[("hard", T::Link, b"/etc/passwd")], "absolute");
        refused(&[("hard", T::Link, b"missing")], "not an earlier member");
        refused(
            &[("d/", T::Directory, b""), ("hard", T::Link, b"d")],
            "hard link to a directory",
        );
        refused(
            &[("link", T::Symlink, b"/etc"), ("hard", T::Link, b"link/passwd")],
            "not inside a directory of this layer",
        );
        refused(
            &[("file", T::Regular, b"x"), ("file/child", T::Regular, b"x")],
            "not a directory",
        );
        refused(&[(".wh...", T::Regular, b"")], "whiteout of no valid name");
    }

    #[test]
    fn later_members_replace_earlier_ones() {
        let bytes = layer(&[
            ("x", T::Regular, b"old"),
            ("x", T::Regular, b"new"),
            ("d/", T::Directory, b""),
            ("d/inner", T::Regular, b"i"),
            ("d", T::Symlink, b"elsewhere"),
        ]);
        let (dir, result) = unpack(&bytes);
        result.unwrap();
        let root = dir.path().join("layer");
        assert_eq!(std::fs::read(root.join("x")).unwrap(), b"new");
        assert_eq!(std::fs::read_link(root.join("d")).unwrap(), Path::new("elsewhere"));
    }

    #[test]
    fn gzip_and_zstd_layers_have_the_diff_id_of_their_tar() {
        let bytes = layer(&[("a", T::Regular, b"x")]);
        let gz = crate::images::test_support::gzip(&bytes);
        let zst = zstd::stream::encode_all(bytes.as_slice(), 3).unwrap();
        let plain = unpack(&bytes).1.unwrap();
        assert_eq!(unpack(&gz).1.unwrap(), plain);
        assert_eq!(unpack(&zst).1.unwrap(), plain);
    }

    #[test]
    fn trusted_xattrs_from_an_archive_are_dropped() {
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_pax_extensions([
                ("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..]),
                ("SCHILY.xattr.user.note", b"kept"),
            ])
            .unwrap();
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(T::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_cksum();
        builder.append_data(&mut header, "d", io::empty()).unwrap();
        let (dir, result) = unpack(&builder.into_inner().unwrap());
        result.unwrap();
        let d = dir.path().join("layer/d");
        assert_eq!(get_xattr(&d, OPAQUE_XATTR).unwrap(), None);
        assert_eq!(get_xattr(&d, "user.note").unwrap(), Some(b"kept".to_vec()));
    }
}
