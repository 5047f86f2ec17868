//! Pushing a stored image to a registry, and exporting one as an OCI image layout: each layer directory is written
//! back out as an OCI layer blob (a gzip tar, with overlayfs whiteouts and opaque directories turned back into `.wh.`
//! members), the config is rebuilt from the image's config and the new diff ids ([`image_blobs`]), and blobs, config
//! and manifest are uploaded over the distribution API or written into a layout tar ([`ImageStore::export_layout`],
//! one layer's scratch file at a time, `oci-layout` first so that an import recognises the archive at once).
//!
//! Export streams the tree through tar, gzip and two hashers into a scratch file (the registry needs the digest
//! before the blob), never holding a file in memory. What an export produced is remembered per layer
//! (`layers/exports/<diff id>.json`), so pushing a layer the registry already has costs one HEAD request and no
//! re-packing. A layer written back out is a faithful copy of the files, but not the byte-identical tar it came
//! from, so its digests are its own.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nook_api::{Image, TransferEvent, TransferLayer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::registry::{Access, Reference, Registries, RegistryError};
use super::unpack::{get_xattr, user_xattrs};
use super::{oci, random_suffix, write_atomically, ImageError, ImageStore};

/// How often upload progress is reported per layer, at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// A layer written out as a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedLayer {
    /// Digest of the gzip blob.
    pub blob_digest: String,
    /// Size of the blob.
    pub blob_size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn finish(self) -> (W, String, u64) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (self.inner, digest, self.count)
    }
}

/// The diff id (the sha256 of the tar [`export_layer`] writes, uncompressed) of the layer directory `dir`, and the
/// size of its regular files' data; nothing is written anywhere.
pub fn layer_digest(dir: &Path) -> io::Result<(String, u64)> {
    let mut hashing = HashingWriter::new(io::sink());
    let size = write_layer_tar(dir, &mut hashing)?;
    let (_, diff_id, _) = hashing.finish();
    Ok((diff_id, size))
}

/// Writes the layer directory `dir` (a layer or a writable layer, in overlayfs form) as a tar in OCI form into `out`;
/// returns the size of its regular files' data.
pub(crate) fn write_layer_tar(dir: &Path, out: impl Write) -> io::Result<u64> {
    let mut builder = tar::Builder::new(out);
    let mut hard_links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let size = append_tree(&mut builder, dir, Path::new(""), &mut hard_links)?;
    builder.into_inner()?.flush()?;
    Ok(size)
}

/// Writes the layer directory `dir` as a gzip tar blob into `out`.
pub fn export_layer(dir: &Path, out: &Path) -> io::Result<ExportedLayer> {
    let file = io::BufWriter::with_capacity(1 << 20, std::fs::File::create(out)?);
    let compressed = HashingWriter::new(file);
    let mut tar = HashingWriter::new(flate2::write::GzEncoder::new(compressed, flate2::Compression::fast()));
    write_layer_tar(dir, &mut tar)?;
    let (gzip, diff_id, _) = tar.finish();
    let (mut file, blob_digest, blob_size) = gzip.finish()?.finish();
    file.flush()?;
    file.into_inner().map_err(|error| error.into_error())?.sync_all()?;
    Ok(ExportedLayer {
        blob_digest,
        blob_size,
        diff_id,
    })
}

/// Writes the pax records of the next entry's extended attributes, if it has any: its file capability and its
/// `user.` metadata (E2B's `user.e2b.*` among it), on files and directories alike.
fn append_xattrs<W: Write>(builder: &mut tar::Builder<W>, path: &Path) -> io::Result<()> {
    let mut extensions: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(capability) = get_xattr(path, "security.capability")? {
        extensions.push(("SCHILY.xattr.security.capability".into(), capability));
    }
    for name in user_xattrs(path)? {
        if let Some(value) = get_xattr(path, &name)? {
            extensions.push((format!("SCHILY.xattr.{name}"), value));
        }
    }
    if !extensions.is_empty() {
        builder.append_pax_extensions(extensions.iter().map(|(key, value)| (key.as_str(), value.as_slice())))?;
    }
    Ok(())
}

fn header_for(meta: &std::fs::Metadata, kind: tar::EntryType) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(meta.mode() & 0o7777);
    header.set_uid(u64::from(meta.uid()));
    header.set_gid(u64::from(meta.gid()));
    header.set_mtime(meta.mtime().max(0) as u64);
    header.set_size(0);
    header
}

/// Appends the children of `dir` (which is `relative` inside the layer), sorted, so the same tree gives the same tar;
/// returns the size of the regular files' data appended.
fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &Path,
    relative: &Path,
    hard_links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<u64> {
    let mut size = 0;
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        let name = relative.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&path)?;
        let kind = meta.file_type();
        if kind.is_dir() {
            append_xattrs(builder, &path)?;
            let mut header = header_for(&meta, tar::EntryType::Directory);
            builder.append_data(&mut header, &name, io::empty())?;
            if get_xattr(&path, "trusted.overlay.opaque")?.as_deref() == Some(b"y") {
                let mut marker = header_for(&meta, tar::EntryType::Regular);
                marker.set_mode(0o644);
                builder.append_data(&mut marker, name.join(".wh..wh..opq"), io::empty())?;
            }
            size += append_tree(builder, &path, &name, hard_links)?;
        } else if kind.is_char_device() && meta.rdev() == 0 {
            // An overlayfs whiteout: the OCI form is an empty `.wh.<name>` file.
            let mut header = header_for(&meta, tar::EntryType::Regular);
            header.set_mode(0o644);
            let mut whiteout = std::ffi::OsString::from(".wh.");
            whiteout.push(entry.file_name());
            builder.append_data(&mut header, relative.join(whiteout), io::empty())?;
        } else if kind.is_symlink() {
            let mut header = header_for(&meta, tar::EntryType::Symlink);
            builder.append_link(&mut header, &name, std::fs::read_link(&path)?)?;
        } else if kind.is_file() {
            if meta.nlink() > 1 {
                let inode = (meta.dev(), meta.ino());
                if let Some(first) = hard_links.get(&inode) {
                    let mut header = header_for(&meta, tar::EntryType::Link);
                    builder.append_link(&mut header, &name, first)?;
                    continue;
                }
                hard_links.insert(inode, name.clone());
            }
            append_xattrs(builder, &path)?;
            let mut header = header_for(&meta, tar::EntryType::Regular);
            header.set_size(meta.len());
            builder.append_data(&mut header, &name, std::fs::File::open(&path)?)?;
            size += meta.len();
        } else if kind.is_char_device() || kind.is_block_device() || kind.is_fifo() {
            let entry_type = if kind.is_fifo() {
                tar::EntryType::Fifo
            } else if kind.is_char_device() {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            };
            let mut header = header_for(&meta, entry_type);
            let device = meta.rdev();
            header.set_device_major(nix::sys::stat::major(device) as u32)?;
            header.set_device_minor(nix::sys::stat::minor(device) as u32)?;
            builder.append_data(&mut header, &name, io::empty())?;
        }
        // Sockets cannot be archived and mean nothing in an image.
    }
    Ok(size)
}

impl ImageStore {
    fn export_record_path(&self, diff_id: &str) -> PathBuf {
        self.root
            .join("layers/exports")
            .join(format!("{}.json", super::hex_of(diff_id)))
    }

    /// What an earlier export of this layer produced, if any.
    fn earlier_export(&self, diff_id: &str) -> Option<ExportedLayer> {
        let bytes = std::fs::read(self.export_record_path(diff_id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Exports a stored layer into a scratch file, remembering the digests for later pushes.
    fn export(&self, diff_id: &str) -> Result<(ExportedLayer, ScratchFile), ImageError> {
        let scratch = ScratchFile(self.root.join("layers/tmp").join(format!("export-{}", random_suffix())));
        let exported = export_layer(&self.layer_dir(diff_id), &scratch.0).map_err(|source| ImageError::Io {
            action: "exporting layer",
            path: self.layer_dir(diff_id),
            source,
        })?;
        std::fs::create_dir_all(self.root.join("layers/exports")).map_err(|source| ImageError::Io {
            action: "creating",
            path: self.root.join("layers/exports"),
            source,
        })?;
        write_atomically(
            &self.export_record_path(diff_id),
            &serde_json::to_vec(&exported).expect("serializable"),
        )?;
        Ok((exported, scratch))
    }
}

/// The config and manifest blobs of an image whose layers were exported as `exported`.
struct ImageBlobs {
    config: Vec<u8>,
    config_digest: String,
    manifest: Vec<u8>,
}

fn image_blobs(image: &Image, exported: &[ExportedLayer]) -> ImageBlobs {
    let config = oci::config_file(
        &image.config,
        exported.iter().map(|layer| layer.diff_id.clone()).collect(),
    );
    let config_bytes = serde_json::to_vec(&config).expect("serializable");
    let config_digest = oci::sha256_digest(&config_bytes);
    let manifest = oci::Manifest {
        schema_version: 2,
        media_type: Some(oci::MEDIA_OCI_MANIFEST.into()),
        config: oci::Descriptor {
            media_type: oci::MEDIA_OCI_CONFIG.into(),
            digest: config_digest.clone(),
            size: config_bytes.len() as u64,
            platform: None,
            annotations: Default::default(),
        },
        layers: exported
            .iter()
            .map(|layer| oci::Descriptor {
                media_type: oci::MEDIA_OCI_LAYER_GZIP.into(),
                digest: layer.blob_digest.clone(),
                size: layer.blob_size,
                platform: None,
                annotations: Default::default(),
            })
            .collect(),
    };
    ImageBlobs {
        config: config_bytes,
        config_digest,
        manifest: serde_json::to_vec(&manifest).expect("serializable"),
    }
}

impl ImageStore {
    /// Writes `image` into `out` as the tar of an OCI image layout: `oci-layout`, the layer blobs (each exported to a
    /// scratch file and copied in, one at a time), the config and manifest blobs, and `index.json` naming the
    /// manifest with the image's name. The caller keeps the layers pinned while this runs.
    pub fn export_layout(&self, image: &Image, out: impl Write) -> Result<(), ImageError> {
        let failed = |source: io::Error| ImageError::Io {
            action: "writing the image layout for",
            path: PathBuf::from(&image.name),
            source,
        };
        let mut builder = tar::Builder::new(out);
        let append = |builder: &mut tar::Builder<_>, path: &str, size: u64, data: &mut dyn io::Read| {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o644);
            header.set_size(size);
            header.set_mtime(0);
            builder.append_data(&mut header, path, data)
        };
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
        append(&mut builder, "oci-layout", layout.len() as u64, &mut &layout[..]).map_err(failed)?;
        let mut exported = Vec::with_capacity(image.layers.len());
        for diff_id in &image.layers {
            let (layer, scratch) = self.export(diff_id)?;
            let mut file = std::fs::File::open(&scratch.0).map_err(failed)?;
            let path = format!("blobs/sha256/{}", super::hex_of(&layer.blob_digest));
            append(&mut builder, &path, layer.blob_size, &mut file).map_err(failed)?;
            exported.push(layer);
        }
        let blobs = image_blobs(image, &exported);
        let manifest_digest = oci::sha256_digest(&blobs.manifest);
        for (digest, bytes) in [
            (&blobs.config_digest, &blobs.config),
            (&manifest_digest, &blobs.manifest),
        ] {
            let path = format!("blobs/sha256/{}", super::hex_of(digest));
            append(&mut builder, &path, bytes.len() as u64, &mut bytes.as_slice()).map_err(failed)?;
        }
        let index = oci::Index {
            schema_version: 2,
            media_type: Some(oci::MEDIA_OCI_INDEX.into()),
            manifests: vec![oci::Descriptor {
                media_type: oci::MEDIA_OCI_MANIFEST.into(),
                digest: manifest_digest,
                size: blobs.manifest.len() as u64,
                platform: None,
                annotations: [("org.opencontainers.image.ref.name".to_string(), image.name.clone())].into(),
            }],
        };
        let index = serde_json::to_vec(&index).expect("serializable");
        append(&mut builder, "index.json", index.len() as u64, &mut index.as_slice()).map_err(failed)?;
        builder.into_inner().and_then(|mut out| out.flush()).map_err(failed)
    }
}

/// A scratch file removed when dropped.
struct ScratchFile(PathBuf);

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Registries {
    /// Pushes `image` to `reference` (which must carry a tag), reporting progress on `events`.
    pub async fn push(
        self: &Arc<Self>,
        store: &Arc<ImageStore>,
        image: &Image,
        reference: &Reference,
        events: &mpsc::Sender<TransferEvent>,
    ) -> Result<(), ImageError> {
        let Some(tag) = reference.tag.clone().filter(|_| reference.digest.is_none()) else {
            return Err(RegistryError::InvalidReference(format!(
                "push to {reference} needs a tag and no digest (the registry computes the digest)"
            ))
            .into());
        };
        // Layers, one after another: reuse an earlier export when the registry already has its blob, else export
        // and upload; each is reported done as it lands. The manifest (and its digest) exists only after them.
        let mut exported = Vec::with_capacity(image.layers.len());
        let mut present = Vec::with_capacity(image.layers.len());
        for diff_id in &image.layers {
            match store.earlier_export(diff_id) {
                Some(earlier) if self.blob_exists(reference, &earlier.blob_digest).await? => {
                    exported.push(earlier);
                    present.push(true);
                }
                _ => {
                    let store = store.clone();
                    let diff_id = diff_id.clone();
                    let (layer, scratch) = tokio::task::spawn_blocking(move || store.export(&diff_id))
                        .await
                        .expect("exporting a layer does not panic")?;
                    let already = self.blob_exists(reference, &layer.blob_digest).await?;
                    if !already {
                        self.upload_file(reference, &layer.blob_digest, &scratch.0, layer.blob_size, events)
                            .await?;
                    }
                    exported.push(layer);
                    present.push(already);
                }
            }
            let layer = &exported[exported.len() - 1];
            let _ = events
                .send(TransferEvent::LayerDone {
                    layer: layer.blob_digest.clone(),
                })
                .await;
        }
        let ImageBlobs {
            config: config_bytes,
            config_digest,
            manifest: manifest_bytes,
        } = image_blobs(image, &exported);
        let _ = events
            .send(TransferEvent::Resolved {
                reference: reference.to_string(),
                digest: oci::sha256_digest(&manifest_bytes),
                layers: exported
                    .iter()
                    .zip(&present)
                    .map(|(layer, present)| TransferLayer {
                        digest: layer.blob_digest.clone(),
                        size: layer.blob_size,
                        present: *present,
                    })
                    .collect(),
            })
            .await;
        if !self.blob_exists(reference, &config_digest).await? {
            self.upload_bytes(reference, &config_digest, config_bytes).await?;
        }
        let url = format!(
            "{}/{}/manifests/{tag}",
            self.base_url(&reference.registry).await,
            reference.repository
        );
        self.send(reference, Access::Push, "manifest", |http| {
            http.put(&url)
                .header(reqwest::header::CONTENT_TYPE, oci::MEDIA_OCI_MANIFEST)
                .body(manifest_bytes.clone())
        })
        .await?;
        Ok(())
    }

    async fn blob_exists(&self, reference: &Reference, digest: &str) -> Result<bool, RegistryError> {
        let url = format!(
            "{}/{}/blobs/{digest}",
            self.base_url(&reference.registry).await,
            reference.repository
        );
        match self
            .send(reference, Access::Push, &format!("blob {digest}"), |http| {
                http.head(&url)
            })
            .await
        {
            Ok(_) => Ok(true),
            Err(RegistryError::NotFound { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Starts an upload session; returns the URL to finish it at.
    async fn start_upload(&self, reference: &Reference) -> Result<String, RegistryError> {
        let url = format!(
            "{}/{}/blobs/uploads/",
            self.base_url(&reference.registry).await,
            reference.repository
        );
        let response = self
            .send(reference, Access::Push, "a blob upload", |http| http.post(&url))
            .await?;
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| RegistryError::Status {
                registry: reference.registry.clone(),
                what: "a blob upload".into(),
                status: response.status(),
                message: ": the answer has no Location".into(),
            })?;
        // The location may be relative to the registry.
        let base = reqwest::Url::parse(&url).expect("registry URLs parse");
        Ok(base
            .join(location)
            .map_err(|_| RegistryError::Status {
                registry: reference.registry.clone(),
                what: "a blob upload".into(),
                status: response.status(),
                message: format!(": the Location {location:?} is not a URL"),
            })?
            .to_string())
    }

    fn finish_url(location: &str, digest: &str) -> String {
        let separator = if location.contains('?') { '&' } else { '?' };
        format!("{location}{separator}digest={digest}")
    }

    async fn upload_bytes(&self, reference: &Reference, digest: &str, bytes: Vec<u8>) -> Result<(), RegistryError> {
        let location = self.start_upload(reference).await?;
        let url = Self::finish_url(&location, digest);
        self.send(reference, Access::Push, &format!("blob {digest}"), |http| {
            http.put(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(bytes.clone())
        })
        .await?;
        Ok(())
    }

    /// Uploads a file as one blob, streamed, with progress.
    async fn upload_file(
        &self,
        reference: &Reference,
        digest: &str,
        path: &Path,
        size: u64,
        events: &mpsc::Sender<TransferEvent>,
    ) -> Result<(), ImageError> {
        let location = self.start_upload(reference).await?;
        let url = Self::finish_url(&location, digest);
        let file = std::fs::File::open(path).map_err(|source| ImageError::Io {
            action: "opening",
            path: path.to_path_buf(),
            source,
        })?;
        let mut sent = 0u64;
        let mut last_report = Instant::now();
        let events = events.clone();
        let layer = digest.to_string();
        let body =
            tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 1 << 20).map(move |chunk| {
                if let Ok(chunk) = &chunk {
                    sent += chunk.len() as u64;
                    if last_report.elapsed() >= PROGRESS_EVERY {
                        last_report = Instant::now();
                        let _ = events.try_send(TransferEvent::Progress {
                            layer: layer.clone(),
                            transferred: sent,
                            size,
                        });
                    }
                }
                chunk
            });
        // The upload session already carries the push authorization, so the body is sent once.
        let body = std::sync::Mutex::new(Some(reqwest::Body::wrap_stream(body)));
        self.send(reference, Access::Push, &format!("blob {digest}"), |http| {
            let request = http
                .put(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .header(reqwest::header::CONTENT_LENGTH, size);
            match body.lock().expect("body").take() {
                Some(body) => request.body(body),
                None => request,
            }
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::unpack::unpack_layer;

    #[test]
    fn an_exported_layer_unpacks_to_the_same_tree_with_whiteouts_and_opaque_directories() {
        let source = tempfile::tempdir().unwrap();
        let root = source.path();
        std::fs::create_dir_all(root.join("etc/opaque")).unwrap();
        std::fs::write(root.join("etc/motd"), b"hello").unwrap();
        std::fs::hard_link(root.join("etc/motd"), root.join("etc/motd-link")).unwrap();
        std::os::unix::fs::symlink("motd", root.join("etc/alias")).unwrap();
        nix::sys::stat::mknod(
            &root.join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        super::super::unpack::set_xattr(&root.join("etc/opaque"), "trusted.overlay.opaque", b"y").unwrap();
        super::super::unpack::set_xattr(&root.join("etc"), "user.e2b.note", b"a directory's metadata").unwrap();
        let out = tempfile::tempdir().unwrap();
        let blob = out.path().join("blob");
        let exported = export_layer(root, &blob).unwrap();
        let bytes = std::fs::read(&blob).unwrap();
        assert_eq!(exported.blob_digest, oci::sha256_digest(&bytes));
        assert_eq!(exported.blob_size, bytes.len() as u64);

        let copy = out.path().join("copy");
        std::fs::create_dir(&copy).unwrap();
        let unpacked = unpack_layer(bytes.as_slice(), &copy).unwrap();
        assert_eq!(unpacked.diff_id, exported.diff_id);
        assert_eq!(std::fs::read(copy.join("etc/motd")).unwrap(), b"hello");
        assert_eq!(std::fs::metadata(copy.join("etc/motd-link")).unwrap().nlink(), 2);
        assert_eq!(std::fs::read_link(copy.join("etc/alias")).unwrap(), Path::new("motd"));
        let gone = std::fs::symlink_metadata(copy.join("etc/gone")).unwrap();
        assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
        assert_eq!(
            get_xattr(&copy.join("etc/opaque"), "trusted.overlay.opaque").unwrap(),
            Some(b"y".to_vec())
        );
        assert_eq!(
            get_xattr(&copy.join("etc"), "user.e2b.note").unwrap(),
            Some(b"a directory's metadata".to_vec())
        );
        // The same tree exports to the same bytes.
        let again = export_layer(root, &out.path().join("again")).unwrap();
        assert_eq!(again.diff_id, exported.diff_id);
    }
}
