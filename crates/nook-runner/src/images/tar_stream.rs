//! A streaming reader of tar archives whose every header is bounded.
//!
//! Image layers and image archives come from registries and uploads, so they are hostile until checked. This reader
//! pulls one 512-byte header at a time, folds the extension records that describe the next member (POSIX pax `x`,
//! GNU long names `L`/`K`) into one [`TarEntry`], and hands the member's data out as a [`Read`] limited to its size.
//! Extension records are the only thing it buffers, and each is capped at [`MAX_EXTENSION_BYTES`], so a header that
//! claims gigabytes of "path" fails with a clear error instead of filling memory. Checksums are verified; members it
//! cannot represent faithfully (GNU sparse files, multi-volume continuations) are refused by name rather than
//! unpacked wrongly.
//!
//! Reading it never touches the file system: [`super::unpack`] decides what each entry may do.

use std::io::{self, Read};

/// Size of one tar block.
const BLOCK: usize = 512;

/// The most bytes one extension record (pax header, GNU long name or link) may carry.
pub const MAX_EXTENSION_BYTES: u64 = 1 << 20;

/// Why a tar stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The underlying stream failed.
    #[error("reading the archive failed")]
    Io(#[from] io::Error),
    /// The stream ended inside a header or inside a member's data.
    #[error("the archive is truncated: it ends inside {0}")]
    Truncated(&'static str),
    /// A header block is not a tar header.
    #[error("the header at byte {offset} is not a valid tar header: {reason}")]
    BadHeader {
        /// Offset of the header in the (uncompressed) stream.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// An extension record is larger than this reader accepts.
    #[error("the {kind} record at byte {offset} is {size} bytes long; at most {MAX_EXTENSION_BYTES} are accepted")]
    HeaderTooLarge {
        /// Which kind of record.
        kind: &'static str,
        /// Offset of its header.
        offset: u64,
        /// Its claimed size.
        size: u64,
    },
    /// A member type that cannot be unpacked faithfully.
    #[error("the member {path:?} at byte {offset} is a {kind}, which image layers may not contain")]
    Unsupported {
        /// The member's path, as far as it is known.
        path: String,
        /// Offset of its header.
        offset: u64,
        /// What it is.
        kind: String,
    },
}

/// What kind of file a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file; its data follows.
    File,
    /// A directory.
    Directory,
    /// A symbolic link to `link_target`.
    Symlink,
    /// A hard link to the earlier member `link_target`.
    HardLink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
}

/// One member of the archive, with its extension records applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// The path as recorded (bytes; not yet checked or normalised).
    pub path: Vec<u8>,
    /// What it is.
    pub kind: EntryKind,
    /// Target of a symlink or hard link.
    pub link_target: Option<Vec<u8>>,
    /// Permission bits, including setuid, setgid and sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Size of the data that follows (regular files only; zero otherwise).
    pub size: u64,
    /// Device numbers of a character or block device.
    pub device: (u32, u32),
    /// Extended attributes recorded in pax `SCHILY.xattr.*` records.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Offset of the member's header in the stream (for error messages).
    pub offset: u64,
}

impl TarEntry {
    /// The path for messages (lossy UTF-8).
    pub fn display_path(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }
}

/// Extension records collected for the next member.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link_target: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u32>,
    gid: Option<u32>,
    mtime: Option<i64>,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Reads members one after another from `R`.
pub struct TarStream<R> {
    inner: R,
    /// Bytes read from `inner` so far.
    position: u64,
    /// Data bytes of the current member not yet read.
    remaining: u64,
    /// Padding after the current member's data.
    padding: u64,
    /// Whether the end-of-archive marker was read.
    ended: bool,
}

impl<R: Read> TarStream<R> {
    /// A reader over `inner`, positioned at the first header.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            position: 0,
            remaining: 0,
            padding: 0,
            ended: false,
        }
    }

    /// The next member, skipping whatever is left of the current one's data; `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<TarEntry>, TarError> {
        if self.ended {
            return Ok(None);
        }
        self.skip(self.remaining + self.padding, "a member's data")?;
        self.remaining = 0;
        self.padding = 0;
        let mut pending = Pending::default();
        loop {
            let offset = self.position;
            let mut block = [0u8; BLOCK];
            if !self.read_block(&mut block)? {
                // A stream that ends where a header would start: some writers omit the end marker.
                if has_pending(&pending) {
                    return Err(TarError::Truncated("the headers of a member"));
                }
                self.ended = true;
                return Ok(None);
            }
            if block.iter().all(|&byte| byte == 0) {
                if has_pending(&pending) {
                    return Err(bad(offset, "an end-of-archive block follows extension records"));
                }
                // The second zero block is optional in practice; whatever follows is the caller's to drain.
                self.ended = true;
                return Ok(None);
            }
            let header = Header::parse(&block, offset)?;
            let data_size = match header.typeflag {
                // Only these carry data whose length is the size field.
                b'0' | b'\0' | b'7' | b'x' | b'g' | b'L' | b'K' => header.size,
                _ => 0,
            };
            match header.typeflag {
                b'x' | b'g' | b'L' | b'K' => {
                    let kind = match header.typeflag {
                        b'x' => "pax extended header",
                        b'g' => "pax global header",
                        b'L' => "GNU long name",
                        _ => "GNU long link name",
                    };
                    if data_size > MAX_EXTENSION_BYTES {
                        return Err(TarError::HeaderTooLarge {
                            kind,
                            offset,
                            size: data_size,
                        });
                    }
                    let mut data = vec![0u8; data_size as usize];
                    read_exact_or_truncated(&mut self.inner, &mut data, kind)?;
                    self.position += data_size;
                    self.skip(padding_of(data_size), kind)?;
                    match header.typeflag {
                        b'x' => apply_pax(&mut pending, &data, offset)?,
                        // Global records (tar's own comments, mostly) do not change how members unpack.
                        b'g' => {}
                        b'L' => pending.path = Some(until_nul(&data).to_vec()),
                        _ => pending.link_target = Some(until_nul(&data).to_vec()),
                    }
                }
                typeflag => {
                    let path = pending.path.take().unwrap_or_else(|| header.path());
                    let kind = match typeflag {
                        b'0' | b'\0' | b'7' if path.ends_with(b"/") => EntryKind::Directory,
                        b'0' | b'\0' | b'7' => EntryKind::File,
                        b'1' => EntryKind::HardLink,
                        b'2' => EntryKind::Symlink,
                        b'3' => EntryKind::CharDevice,
                        b'4' => EntryKind::BlockDevice,
                        b'5' => EntryKind::Directory,
                        b'6' => EntryKind::Fifo,
                        other => {
                            return Err(TarError::Unsupported {
                                path: String::from_utf8_lossy(&path).into_owned(),
                                offset,
                                kind: unsupported_kind(other),
                            })
                        }
                    };
                    let size = match kind {
                        EntryKind::File => pending.size.unwrap_or(data_size),
                        _ => 0,
                    };
                    let link_target = match kind {
                        EntryKind::Symlink | EntryKind::HardLink => {
                            Some(pending.link_target.take().unwrap_or_else(|| header.link_name()))
                        }
                        _ => None,
                    };
                    // The data of a member is as long as the size it ends up with (a pax `size` overrides).
                    let stored = match typeflag {
                        b'0' | b'\0' | b'7' => pending.size.unwrap_or(data_size),
                        _ => 0,
                    };
                    self.remaining = stored;
                    self.padding = padding_of(stored);
                    return Ok(Some(TarEntry {
                        path,
                        kind,
                        link_target,
                        mode: header.mode & 0o7777,
                        uid: pending.uid.unwrap_or(header.uid),
                        gid: pending.gid.unwrap_or(header.gid),
                        mtime: pending.mtime.unwrap_or(header.mtime),
                        size,
                        device: header.device,
                        xattrs: std::mem::take(&mut pending.xattrs),
                        offset,
                    }));
                }
            }
        }
    }

    /// The data of the current member (what [`next_entry`](Self::next_entry) returned last).
    pub fn data(&mut self) -> EntryData<'_, R> {
        EntryData { stream: self }
    }

    /// Reads one block; `false` when the stream ends cleanly before it.
    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool, TarError> {
        let mut filled = 0;
        while filled < BLOCK {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(TarError::Truncated("a header block")),
                Ok(n) => filled += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(TarError::Io(error)),
            }
        }
        self.position += BLOCK as u64;
        Ok(true)
    }

    fn skip(&mut self, count: u64, inside: &'static str) -> Result<(), TarError> {
        if count == 0 {
            return Ok(());
        }
        let copied = io::copy(&mut (&mut self.inner).take(count), &mut io::sink())?;
        self.position += copied;
        if copied < count {
            return Err(TarError::Truncated(inside));
        }
        Ok(())
    }
}

/// The data of one member; reading past its size gives end of file.
pub struct EntryData<'a, R> {
    stream: &'a mut TarStream<R>,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let stream = &mut *self.stream;
        if stream.remaining == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(stream.remaining).unwrap_or(usize::MAX));
        let n = stream.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside a member's data",
            ));
        }
        stream.remaining -= n as u64;
        stream.position += n as u64;
        Ok(n)
    }
}

fn has_pending(pending: &Pending) -> bool {
    pending.path.is_some()
        || pending.link_target.is_some()
        || pending.size.is_some()
        || pending.uid.is_some()
        || pending.gid.is_some()
        || pending.mtime.is_some()
        || !pending.xattrs.is_empty()
}

fn padding_of(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn bad(offset: u64, reason: impl Into<String>) -> TarError {
    TarError::BadHeader {
        offset,
        reason: reason.into(),
    }
}

fn read_exact_or_truncated(reader: &mut impl Read, buf: &mut [u8], inside: &'static str) -> Result<(), TarError> {
    reader.read_exact(buf).map_err(|error| match error.kind() {
        io::ErrorKind::UnexpectedEof => TarError::Truncated(inside),
        _ => TarError::Io(error),
    })
}

fn until_nul(bytes: &[u8]) -> &[u8] {
    bytes.iter().position(|&b| b == 0).map_or(bytes, |end| &bytes[..end])
}

fn unsupported_kind(typeflag: u8) -> String {
    match typeflag {
        b'S' => "GNU sparse file".to_string(),
        b'M' => "GNU multi-volume continuation".to_string(),
        b'V' => "GNU volume label".to_string(),
        other if other.is_ascii_graphic() => format!("member of unknown type {:?}", other as char),
        other => format!("member of unknown type byte {other}"),
    }
}

/// The fields of one ustar/GNU header block.
struct Header {
    name: Vec<u8>,
    prefix: Vec<u8>,
    link_name: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    typeflag: u8,
    device: (u32, u32),
}

impl Header {
    fn parse(block: &[u8; BLOCK], offset: u64) -> Result<Self, TarError> {
        let stored =
            parse_number(&block[148..156]).map_err(|reason| bad(offset, format!("checksum field: {reason}")))?;
        let unsigned: u64 = block
            .iter()
            .enumerate()
            .map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) })
            .sum();
        let signed: i64 = block
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    i64::from(b as i8)
                }
            })
            .sum();
        if stored != i128::from(unsigned) && stored != i128::from(signed) {
            return Err(bad(offset, "its checksum does not match"));
        }
        let ustar = &block[257..263] == b"ustar\0";
        let field = |range: std::ops::Range<usize>, what: &str| -> Result<i128, TarError> {
            parse_number(&block[range]).map_err(|reason| bad(offset, format!("{what} field: {reason}")))
        };
        let in_range = |value: i128, what: &str| -> Result<u32, TarError> {
            u32::try_from(value).map_err(|_| bad(offset, format!("{what} {value} is out of range")))
        };
        let typeflag = block[156];
        let size = field(124..136, "size")?;
        let size = u64::try_from(size).map_err(|_| bad(offset, format!("size {size} is negative")))?;
        let is_device = matches!(typeflag, b'3' | b'4');
        Ok(Self {
            name: until_nul(&block[0..100]).to_vec(),
            prefix: if ustar {
                until_nul(&block[345..500]).to_vec()
            } else {
                Vec::new()
            },
            link_name: until_nul(&block[157..257]).to_vec(),
            mode: in_range(field(100..108, "mode")?, "mode")?,
            uid: in_range(field(108..116, "uid")?, "uid")?,
            gid: in_range(field(116..124, "gid")?, "gid")?,
            size,
            mtime: i64::try_from(field(136..148, "mtime")?).map_err(|_| bad(offset, "mtime is out of range"))?,
            typeflag,
            device: if is_device {
                (
                    in_range(field(329..337, "device major")?, "device major")?,
                    in_range(field(337..345, "device minor")?, "device minor")?,
                )
            } else {
                (0, 0)
            },
        })
    }

    fn path(&self) -> Vec<u8> {
        if self.prefix.is_empty() {
            return self.name.clone();
        }
        let mut path = self.prefix.clone();
        path.push(b'/');
        path.extend_from_slice(&self.name);
        path
    }

    fn link_name(&self) -> Vec<u8> {
        self.link_name.clone()
    }
}

/// Parses a numeric header field: octal digits padded with spaces or NULs, or GNU base-256 (first byte 0x80 or
/// 0xff). An empty field is zero.
fn parse_number(field: &[u8]) -> Result<i128, String> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            let negative = first == 0xff;
            if !negative && first != 0x80 {
                return Err(format!("unknown base-256 marker {first:#x}"));
            }
            if field.len() > 13 {
                return Err("base-256 number too long".into());
            }
            let mut value: i128 = 0;
            for &byte in &field[1..] {
                value = (value << 8) | i128::from(byte);
            }
            if negative {
                value -= 1i128 << (8 * (field.len() - 1));
            }
            return Ok(value);
        }
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if text.is_empty() {
        return Ok(0);
    }
    if text.len() > 22 || !text.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return Err(format!("{:?} is not an octal number", String::from_utf8_lossy(&text)));
    }
    Ok(text
        .iter()
        .fold(0i128, |value, &digit| value * 8 + i128::from(digit - b'0')))
}

/// Applies the records of one pax extended header (`"<len> <key>=<value>\n"`, repeated).
fn apply_pax(pending: &mut Pending, mut data: &[u8], offset: u64) -> Result<(), TarError> {
    let malformed = |what: &str| bad(offset, format!("malformed pax record: {what}"));
    while !data.is_empty() {
        let space = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| malformed("no length"))?;
        let length: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| malformed("the length is not a number"))?;
        if length <= space + 1 || length > data.len() || data[length - 1] != b'\n' {
            return Err(malformed("the length does not match the record"));
        }
        let record = &data[space + 1..length - 1];
        data = &data[length..];
        let equals = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| malformed("no '=' in a record"))?;
        let key = std::str::from_utf8(&record[..equals]).map_err(|_| malformed("a key is not UTF-8"))?;
        let value = &record[equals + 1..];
        let text = || std::str::from_utf8(value).map_err(|_| malformed("a numeric value is not UTF-8"));
        match key {
            "path" => pending.path = Some(value.to_vec()),
            "linkpath" => pending.link_target = Some(value.to_vec()),
            "size" => pending.size = Some(text()?.parse().map_err(|_| malformed("bad size"))?),
            "uid" => pending.uid = Some(text()?.parse().map_err(|_| malformed("bad uid"))?),
            "gid" => pending.gid = Some(text()?.parse().map_err(|_| malformed("bad gid"))?),
            "mtime" => {
                // Seconds with an optional fraction; the fraction is dropped.
                let seconds = text()?.split('.').next().unwrap_or_default();
                pending.mtime = Some(seconds.parse().map_err(|_| malformed("bad mtime"))?);
            }
            key if key.starts_with("GNU.sparse.") => {
                return Err(TarError::Unsupported {
                    path: pending
                        .path
                        .as_deref()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .unwrap_or_default(),
                    offset,
                    kind: "GNU sparse file (pax format)".into(),
                })
            }
            key => {
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    pending.xattrs.push((name.to_string(), value.to_vec()));
                }
                // Other keys (atime, ctime, uname, gname, comments, charset) do not change the unpacked file.
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &str, typeflag: u8, size: u64) -> [u8; BLOCK] {
        let mut header = tar::Header::new_ustar();
        header.set_path(path).unwrap();
        header.set_entry_type(tar::EntryType::new(typeflag));
        header.set_size(size);
        header.set_mode(0o4755);
        header.set_uid(1000);
        header.set_gid(100);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        *header.as_bytes()
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<(TarEntry, Vec<u8>)>, TarError> {
        let mut stream = TarStream::new(bytes);
        let mut out = Vec::new();
        while let Some(entry) = stream.next_entry()? {
            let mut data = Vec::new();
            stream.data().read_to_end(&mut data)?;
            out.push((entry, data));
        }
        Ok(out)
    }

    #[test]
    fn reads_what_the_tar_crate_writes() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut file = tar::Header::new_gnu();
        file.set_size(5);
        file.set_mode(0o4755);
        file.set_uid(7);
        file.set_gid(8);
        file.set_mtime(1234);
        file.set_cksum();
        let long = format!("{}/file", "d".repeat(300));
        builder.append_data(&mut file.clone(), &long, &b"hello"[..]).unwrap();
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_cksum();
        builder.append_link(&mut link, "sym", "l".repeat(200)).unwrap();
        let mut pax = tar::Builder::new(Vec::new());
        pax.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..]), ("uid", b"70000")])
            .unwrap();
        pax.append_data(&mut file, "x", &b"hello"[..]).unwrap();
        let mut bytes = builder.into_inner().unwrap();
        bytes.truncate(bytes.len() - 1024);
        bytes.extend(pax.into_inner().unwrap());

        let entries = read_all(&bytes).unwrap();
        assert_eq!(entries.len(), 3);
        let (first, data) = &entries[0];
        assert_eq!(first.path, long.as_bytes());
        assert_eq!(
            (first.kind, first.mode, first.uid, first.gid, first.mtime),
            (EntryKind::File, 0o4755, 7, 8, 1234)
        );
        assert_eq!(data, b"hello");
        assert_eq!(entries[1].0.kind, EntryKind::Symlink);
        assert_eq!(entries[1].0.link_target.as_deref(), Some("l".repeat(200).as_bytes()));
        assert_eq!(entries[2].0.uid, 70000);
        assert_eq!(entries[2].0.xattrs, vec![("user.k".to_string(), b"v".to_vec())]);
        assert_eq!(entries[2].1, b"hello");
    }

    #[test]
    fn unread_data_is_skipped() {
        let mut builder = tar::Builder::new(Vec::new());
        for name in ["a", "b"] {
            let mut h = tar::Header::new_gnu();
            h.set_size(1000);
            h.set_cksum();
            builder.append_data(&mut h, name, &[1u8; 1000][..]).unwrap();
        }
        let bytes = builder.into_inner().unwrap();
        let mut stream = TarStream::new(bytes.as_slice());
        assert_eq!(stream.next_entry().unwrap().unwrap().path, b"a");
        assert_eq!(stream.next_entry().unwrap().unwrap().path, b"b");
        assert!(stream.next_entry().unwrap().is_none());
    }

    #[test]
    fn a_huge_extension_header_is_refused_before_it_is_read() {
        let mut bytes = header("././@PaxHeader", b'x', 1 << 40).to_vec();
        bytes.extend([0u8; 1024]);
        match read_all(&bytes) {
            Err(TarError::HeaderTooLarge { size, .. }) => assert_eq!(size, 1 << 40),
            other => panic!("expected HeaderTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn a_bad_checksum_is_refused() {
        let mut block = header("a", b'0', 0);
        block[0] = b'b';
        let error = read_all(&block).unwrap_err();
        assert!(error.to_string().contains("checksum does not match"), "{error}");
    }

    #[test]
    fn truncation_is_reported() {
        let mut bytes = header("a", b'0', 100).to_vec();
        bytes.extend([1u8; 50]);
        let error = read_all(&bytes).unwrap_err();
        assert!(
            matches!(&error, TarError::Io(cause) if cause.kind() == io::ErrorKind::UnexpectedEof),
            "{error:?}"
        );
        let error = read_all(&bytes[..300]).unwrap_err();
        assert!(matches!(error, TarError::Truncated(_)), "{error}");
    }

    #[test]
    fn sparse_and_unknown_members_are_refused_by_name() {
        let error = read_all(&header("holes", b'S', 0)).unwrap_err();
        assert!(error.to_string().contains("GNU sparse file"), "{error}");
        let error = read_all(&header("odd", b'Z', 0)).unwrap_err();
        assert!(error.to_string().contains("unknown type 'Z'"), "{error}");
    }

    #[test]
    fn numbers_in_octal_and_base_256() {
        assert_eq!(parse_number(b"0000644\0"), Ok(0o644));
        assert_eq!(parse_number(b"  755 \0\0"), Ok(0o755));
        assert_eq!(parse_number(b"\0\0\0\0"), Ok(0));
        assert_eq!(parse_number(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0]), Ok(256));
        assert_eq!(parse_number(&[0xff; 8]), Ok(-1));
        assert!(parse_number(b"12x4").is_err());
    }

    #[test]
    fn directories_devices_and_the_end_marker() {
        let mut bytes = header("old/", b'0', 0).to_vec();
        let mut device = tar::Header::new_ustar();
        device.set_path("dev/null").unwrap();
        device.set_entry_type(tar::EntryType::Char);
        device.set_device_major(1).unwrap();
        device.set_device_minor(3).unwrap();
        device.set_size(0);
        device.set_cksum();
        bytes.extend(device.as_bytes());
        bytes.extend([0u8; 1024]);
        bytes.extend(b"trailing garbage after the end marker");
        let entries = read_all(&bytes).unwrap();
        assert_eq!(entries[0].0.kind, EntryKind::Directory);
        assert_eq!(
            (entries[1].0.kind, entries[1].0.device),
            (EntryKind::CharDevice, (1, 3))
        );
    }
}
