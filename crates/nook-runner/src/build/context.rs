//! A build's context on the host: unpacked once from the client's tar stream into a scratch directory, then read
//! by `COPY` and `ADD`.
//!
//! The context came from a client, so it is unpacked with the image store's safe unpacker (no `..`, no absolute
//! paths, nothing through symlinks), and every read from it refuses to pass through a symbolic link: a link in the
//! context is copied as a link, never followed on the host. `.dockerignore` applies to everything `COPY` sees.
//!
//! [`Context::select`] resolves a `COPY`'s sources (wildcards allowed) into [`Selected`] trees; [`hash_selection`]
//! gives the content hash that keys the build cache, and [`write_tar`] streams the selection as the tar that the
//! sandbox's agent unpacks at the destination.

use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::ignore::{component_matches, IgnoreRules};

/// The longest Dockerfile or `.dockerignore` read from a context.
const MAX_CONTROL_FILE_BYTES: u64 = 1 << 20;

/// An unpacked build context.
#[derive(Debug)]
pub struct Context {
    root: PathBuf,
    ignore: IgnoreRules,
}

/// One source of a `COPY` as found in the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// Path relative to the context root.
    pub path: String,
    /// Whether it is a directory (whose contents are copied) rather than a file or link.
    pub is_dir: bool,
}

impl Context {
    /// The context unpacked at `root`, with its `.dockerignore` (if any) read.
    pub fn open(root: &Path) -> Result<Self, String> {
        let ignore = match read_control_file(root, ".dockerignore")? {
            Some(text) => IgnoreRules::parse(&text),
            None => IgnoreRules::default(),
        };
        Ok(Self {
            root: root.to_path_buf(),
            ignore,
        })
    }

    /// The Dockerfile at the context path `path`.
    pub fn dockerfile(&self, path: &str) -> Result<String, String> {
        read_control_file(&self.root, path)?
            .ok_or_else(|| format!("the build context has no {path} (name another with the dockerfile parameter)"))
    }

    /// Files and bytes in the context that `.dockerignore` keeps.
    pub fn size(&self) -> io::Result<(u64, u64)> {
        let mut totals = (0, 0);
        self.walk(&self.root, "", &mut |_, meta| {
            if !meta.is_dir() {
                totals.0 += 1;
                totals.1 += if meta.is_file() { meta.len() } else { 0 };
            }
        })?;
        Ok(totals)
    }

    /// Resolves `COPY` sources: each is a context path whose components may be wildcards. A source that matches
    /// nothing (or only what `.dockerignore` leaves out) is an error.
    pub fn select(&self, sources: &[String]) -> Result<Vec<Selected>, String> {
        let mut selected = Vec::new();
        for source in sources {
            let components = clean_source(source)?;
            let before = selected.len();
            if components.is_empty() {
                selected.push(Selected {
                    path: String::new(),
                    is_dir: true,
                });
            } else {
                self.glob(&self.root, "", &components, &mut selected)
                    .map_err(|error| format!("reading the build context for {source:?} failed: {error}"))?;
            }
            if selected.len() == before {
                return Err(format!(
                    "{source:?} is not in the build context (or .dockerignore leaves it out)"
                ));
            }
        }
        Ok(selected)
    }

    fn glob(&self, dir: &Path, relative: &str, components: &[String], out: &mut Vec<Selected>) -> io::Result<()> {
        let Some((first, rest)) = components.split_first() else {
            return Ok(());
        };
        let mut names: Vec<_> = std::fs::read_dir(dir)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            let Some(name) = name.to_str() else { continue };
            if !component_matches(first, name) {
                continue;
            }
            let path = dir.join(name);
            let child = join(relative, name);
            let meta = std::fs::symlink_metadata(&path)?;
            if rest.is_empty() {
                if !self.ignore.excludes(&child) || (meta.is_dir() && self.ignore.may_reinclude_below(&child)) {
                    out.push(Selected {
                        path: child,
                        is_dir: meta.is_dir(),
                    });
                }
            } else if meta.is_dir() {
                // Never through a symbolic link: `meta` is the link's own metadata.
                self.glob(&path, &child, rest, out)?;
            }
        }
        Ok(())
    }

    /// Calls `visit` with every path under `dir` (context path `relative`) that `.dockerignore` keeps, parents
    /// before children, sorted by name; links are not followed.
    fn walk(&self, dir: &Path, relative: &str, visit: &mut dyn FnMut(&str, &std::fs::Metadata)) -> io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let child = join(relative, &name);
            let meta = std::fs::symlink_metadata(entry.path())?;
            let excluded = self.ignore.excludes(&child);
            if !excluded {
                visit(&child, &meta);
            }
            if meta.is_dir() && (!excluded || self.ignore.may_reinclude_below(&child)) {
                self.walk(&entry.path(), &child, visit)?;
            }
        }
        Ok(())
    }

    /// The members a selection gives: (name relative to the destination, host path, metadata), in order.
    pub fn members(&self, selected: &[Selected], file_name_override: Option<&str>) -> io::Result<Vec<Member>> {
        let mut members = Vec::new();
        for source in selected {
            let host = self.root.join(&source.path);
            if source.is_dir {
                self.walk(&host, &source.path, &mut |path, meta| {
                    let inside = path.strip_prefix(&source.path).unwrap_or(path).trim_start_matches('/');
                    members.push(Member {
                        name: PathBuf::from(inside),
                        host: self.root.join(path),
                        meta: meta.clone(),
                    });
                })?;
            } else {
                let file_name = Path::new(&source.path).file_name().unwrap_or_default();
                let name = file_name_override.map_or_else(|| PathBuf::from(file_name), PathBuf::from);
                members.push(Member {
                    name,
                    host,
                    meta: std::fs::symlink_metadata(self.root.join(&source.path))?,
                });
            }
        }
        Ok(members)
    }

    /// The host path of a selected file (for `ADD`'s archives).
    pub fn host_path(&self, selected: &Selected) -> PathBuf {
        self.root.join(&selected.path)
    }

    /// Whether a selected source is a regular file (not a link, whatever it points at).
    pub fn is_regular_file(&self, selected: &Selected) -> bool {
        std::fs::symlink_metadata(self.host_path(selected)).is_ok_and(|meta| meta.is_file())
    }
}

/// Opens a file of the context for reading, refusing a symbolic link in its last component (the unpacker made every
/// directory of the context itself, so none of them is a link).
pub fn open_no_follow(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The client's context stream, ended with an error as soon as the build is cancelled (so that a blocked read of a
/// slow upload wakes up).
pub struct Cancellable {
    inner: crate::ByteStream,
    cancelled: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Cancellable {
    /// `inner`, until `cancel` fires.
    pub fn new(inner: crate::ByteStream, cancel: tokio_util::sync::CancellationToken) -> Self {
        Self {
            inner,
            cancelled: Box::pin(cancel.cancelled_owned()),
        }
    }
}

impl tokio::io::AsyncRead for Cancellable {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if std::future::Future::poll(self.cancelled.as_mut(), cx).is_ready() {
            return std::task::Poll::Ready(Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the build was cancelled",
            )));
        }
        self.inner.as_mut().poll_read(cx, buf)
    }
}

/// A reader that fails once more than `limit` bytes were read from it (a context that unpacks to more than a
/// context should hold, such as a compressed bomb).
pub struct Limited<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R> Limited<R> {
    /// `inner`, up to `limit` bytes.
    pub fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            left: limit,
            limit,
        }
    }
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            io::Error::other(format!(
                "the build context is larger than {} GiB unpacked",
                self.limit >> 30
            ))
        })?;
        Ok(n)
    }
}

/// One file, directory or link to copy.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its name in the tar, relative to the destination directory.
    pub name: PathBuf,
    /// Where it is on the host.
    pub host: PathBuf,
    /// Its metadata (of the link itself for links).
    pub meta: std::fs::Metadata,
}

fn join(relative: &str, name: &str) -> String {
    if relative.is_empty() {
        name.to_string()
    } else {
        format!("{relative}/{name}")
    }
}

/// A source's components, relative to the context root; `..` may not leave it.
fn clean_source(source: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for component in Path::new(source).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if out.pop().is_none() {
                    return Err(format!("{source:?} leaves the build context"));
                }
            }
            Component::Normal(part) => out.push(
                part.to_str()
                    .ok_or_else(|| format!("{source:?} is not UTF-8"))?
                    .to_string(),
            ),
            Component::Prefix(_) => return Err(format!("{source:?} is not a context path")),
        }
    }
    Ok(out)
}

/// Reads a small regular file of the context (the Dockerfile, `.dockerignore`) without following any link; `None`
/// when it does not exist.
fn read_control_file(root: &Path, path: &str) -> Result<Option<String>, String> {
    let components = clean_source(path)?;
    let mut host = root.to_path_buf();
    for (index, component) in components.iter().enumerate() {
        host.push(component);
        let meta = match std::fs::symlink_metadata(&host) {
            Ok(meta) => meta,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(format!("reading {path} from the build context failed: {error}")),
        };
        let last = index + 1 == components.len();
        if meta.file_type().is_symlink() {
            return Err(format!("{path} in the build context passes through a symbolic link"));
        }
        if last && !meta.is_file() {
            return Err(format!("{path} in the build context is not a regular file"));
        }
        if last && meta.len() > MAX_CONTROL_FILE_BYTES {
            return Err(format!("{path} is larger than {MAX_CONTROL_FILE_BYTES} bytes"));
        }
    }
    if components.is_empty() {
        return Err(format!("{path:?} names no file"));
    }
    let text = std::fs::read(&host).map_err(|error| format!("reading {path} failed: {error}"))?;
    String::from_utf8(text)
        .map(Some)
        .map_err(|_| format!("{path} is not UTF-8 text"))
}

/// The mode a member gets: `--chmod` for files and directories when given, its own otherwise.
fn member_mode(member: &Member, chmod: Option<u32>) -> u32 {
    match chmod {
        Some(mode) if !member.meta.file_type().is_symlink() => mode,
        _ => member.meta.permissions().mode() & 0o7777,
    }
}

/// The content hash of what a `COPY` copies: names, kinds, modes, link targets and file contents, in order.
pub fn hash_selection(members: &[Member], chmod: Option<u32>) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    for member in members {
        let kind = member.meta.file_type();
        hasher.update(member.name.as_os_str().as_encoded_bytes());
        hasher.update([0]);
        hasher.update(member_mode(member, chmod).to_le_bytes());
        if kind.is_symlink() {
            hasher.update(b"l");
            hasher.update(std::fs::read_link(&member.host)?.as_os_str().as_encoded_bytes());
        } else if kind.is_dir() {
            hasher.update(b"d");
        } else if kind.is_file() {
            hasher.update(b"f");
            hasher.update(member.meta.len().to_le_bytes());
            let mut file = open_no_follow(&member.host)?;
            loop {
                let n = file.read(&mut buffer)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
            }
        }
        hasher.update([0]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Streams the members as a tar into `out`. Owners are left to the unpacking side; sockets, devices and pipes are
/// skipped (a context carries files, directories and links).
pub fn write_tar(members: &[Member], chmod: Option<u32>, out: impl Write) -> io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    for member in members {
        let kind = member.meta.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_mode(member_mode(member, chmod));
        header.set_mtime(member.meta.mtime().max(0) as u64);
        header.set_uid(0);
        header.set_gid(0);
        if kind.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, &member.name, io::empty())?;
        } else if kind.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder.append_link(&mut header, &member.name, std::fs::read_link(&member.host)?)?;
        } else if kind.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(member.meta.len());
            builder.append_data(&mut header, &member.name, open_no_follow(&member.host)?)?;
        }
    }
    builder.into_inner()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(files: &[(&str, &str)], ignore: &str) -> (tempfile::TempDir, Context) {
        let dir = tempfile::tempdir().unwrap();
        for (path, body) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        }
        std::fs::write(dir.path().join(".dockerignore"), ignore).unwrap();
        let context = Context::open(dir.path()).unwrap();
        (dir, context)
    }

    #[test]
    fn sources_match_wildcards_and_honour_dockerignore() {
        let (_dir, ctx) = context(
            &[
                ("app/main.py", "print(1)"),
                ("app/util.py", "x"),
                ("app/cache.pyc", "junk"),
                ("README.md", "r"),
                ("secret.env", "k"),
            ],
            "**/*.pyc\nsecret.env\n",
        );
        let picked = ctx.select(&["app/*.py".into(), "README.md".into()]).unwrap();
        let paths: Vec<_> = picked.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(paths, ["app/main.py", "app/util.py", "README.md"]);
        let dir = ctx.select(&["app".into()]).unwrap();
        let members = ctx.members(&dir, None).unwrap();
        let names: Vec<_> = members.iter().map(|m| m.name.to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["main.py", "util.py"]);
        let error = ctx.select(&["secret.env".into()]).unwrap_err();
        assert!(error.contains(".dockerignore"), "{error}");
        assert!(ctx.select(&["../outside".into()]).unwrap_err().contains("leaves"));
        assert!(ctx.select(&["*.nothing".into()]).is_err());
        // The whole context, less what is ignored (.dockerignore itself included).
        let (files, bytes) = ctx.size().unwrap();
        assert_eq!((files, bytes), (4, 8 + 1 + 1 + "**/*.pyc\nsecret.env\n".len() as u64));
    }

    #[test]
    fn control_files_are_never_read_through_links() {
        let (dir, ctx) = context(&[("Dockerfile", "FROM base\n")], "");
        assert_eq!(ctx.dockerfile("Dockerfile").unwrap(), "FROM base\n");
        std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("Linked")).unwrap();
        assert!(ctx.dockerfile("etc/hostname").unwrap_err().contains("symbolic link"));
        assert!(ctx.dockerfile("Linked").unwrap_err().contains("symbolic link"));
        assert!(ctx.dockerfile("Missing").unwrap_err().contains("has no Missing"));
        // A link is selected as itself, never as what it points at.
        let picked = ctx.select(&["etc".into()]).unwrap();
        assert!(!picked[0].is_dir);
    }

    #[test]
    fn the_hash_follows_contents_and_modes() {
        let (dir, ctx) = context(&[("a", "one")], "");
        let members = ctx.members(&ctx.select(&["a".into()]).unwrap(), None).unwrap();
        let first = hash_selection(&members, None).unwrap();
        assert_eq!(first, hash_selection(&members, None).unwrap());
        assert_ne!(first, hash_selection(&members, Some(0o755)).unwrap());
        std::fs::write(dir.path().join("a"), "two").unwrap();
        let members = ctx.members(&ctx.select(&["a".into()]).unwrap(), None).unwrap();
        assert_ne!(first, hash_selection(&members, None).unwrap());
        let mut tar = Vec::new();
        write_tar(&members, Some(0o600), &mut tar).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let entry = archive.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(entry.path().unwrap().to_str(), Some("a"));
        assert_eq!(entry.header().mode().unwrap(), 0o600);
    }
}
