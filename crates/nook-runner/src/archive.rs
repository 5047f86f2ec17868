//! Archives: a stopped sandbox's writable layer moved to an object store, and brought back when it starts again.
//!
//! The object store is one seam ([`object_store::ObjectStore`]) with two implementations here: a local directory (the
//! default, under the data directory) and S3-compatible storage. Archiving packs the writable layer as a tar in its
//! OCI form (whiteouts as `.wh.` files, opaque directories marked, owners, modes, links, capabilities and user
//! metadata kept) on a blocking thread, compresses it with zstd and streams it to the store in parts of
//! [`PART_BYTES`] (a multipart upload; memory stays bounded whatever the size), hashing exactly what is stored. The
//! runner records the object's key, size and sha256 *before* it removes the local copy, so a crash in between leaves
//! both, never neither. Restoring streams the object back through the same hash and the store's safe unpacker into a
//! fresh volume; the volume replaces nothing until the hash matched, and the object is removed only after the record
//! says the sandbox is local again.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt as _;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::images::unpack::HashingReader;

/// Bytes per uploaded part (S3's parts must be at least 5 MiB, but the last).
const PART_BYTES: usize = 16 << 20;
/// Parts in flight at once.
const PARTS_IN_FLIGHT: usize = 4;
/// zstd level: fast, since archiving is bounded by reading the layer, not by the wire.
const ZSTD_LEVEL: i32 = 1;

/// Why an archive operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The object store refused or failed.
    #[error("the archive store failed ({store})")]
    Store {
        /// Which store.
        store: String,
        /// Its error.
        #[source]
        source: object_store::Error,
    },
    /// Packing or unpacking the layer failed.
    #[error("{action} the writable layer failed")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The archive read back is not what was stored.
    #[error(
        "the archive {key} is corrupt: its sha256 is {found}, but {expected} was stored; the sandbox stays archived"
    )]
    Corrupt {
        /// The object.
        key: String,
        /// What was recorded.
        expected: String,
        /// What was read.
        found: String,
    },
}

/// What the runner records of an archived writable layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedLayer {
    /// The object's key in the store.
    pub key: String,
    /// `sha256:<hex>` of the object.
    pub sha256: String,
    /// The object's size.
    pub bytes: u64,
    /// When it was archived.
    pub at: chrono::DateTime<chrono::Utc>,
}

/// An object store for archives, and how to name it in messages.
#[derive(Clone)]
pub struct ArchiveStore {
    store: Arc<dyn ObjectStore>,
    description: String,
}

impl std::fmt::Debug for ArchiveStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

/// Where S3-compatible storage is and how to sign for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL (`http://127.0.0.1:9000`, or the provider's).
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// Region (any for most S3-compatible servers).
    #[serde(default = "default_region")]
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key (read from the config file only, never logged).
    pub secret_access_key: String,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

impl ArchiveStore {
    /// Archives as files under `dir` (created when missing).
    pub fn local(dir: &Path) -> Result<Self, ArchiveError> {
        std::fs::create_dir_all(dir).map_err(|source| ArchiveError::Io {
            action: "creating the archive directory for",
            source,
        })?;
        let description = format!("directory {}", dir.display());
        let store =
            object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(|source| ArchiveError::Store {
                store: description.clone(),
                source,
            })?;
        Ok(Self {
            store: Arc::new(store),
            description,
        })
    }

    /// Archives as objects of an S3 bucket (path-style requests, so any S3-compatible server works).
    pub fn s3(config: &S3Config) -> Result<Self, ArchiveError> {
        let description = format!("s3 bucket {} at {}", config.bucket, config.endpoint);
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&config.endpoint)
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_allow_http(config.endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false)
            .build()
            .map_err(|source| ArchiveError::Store {
                store: description.clone(),
                source,
            })?;
        Ok(Self {
            store: Arc::new(store),
            description,
        })
    }

    fn failed(&self) -> impl FnOnce(object_store::Error) -> ArchiveError + '_ {
        move |source| ArchiveError::Store {
            store: self.description.clone(),
            source,
        }
    }

    /// Packs the layer directory `upper` and stores it as `key`; returns what to record.
    pub async fn upload(&self, upper: &Path, key: &str) -> Result<ArchivedLayer, ArchiveError> {
        let location = ObjectPath::from(key);
        let upload = self.store.put_multipart(&location).await.map_err(self.failed())?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        // Packed and compressed on a blocking thread, handed over in chunks; the hash covers exactly the bytes sent.
        let (sender, mut chunks) = tokio::sync::mpsc::channel::<Bytes>(4);
        let upper = upper.to_path_buf();
        let packer = tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
            let out = HashingChannel {
                sender: sender.clone(),
                hasher: Sha256::new(),
                count: 0,
                buffer: Vec::with_capacity(1 << 20),
            };
            let mut zstd = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?;
            crate::images::push::write_layer_tar(&upper, &mut zstd)?;
            let mut out = zstd.finish()?;
            out.flush()?;
            Ok((format!("sha256:{}", hex::encode(out.hasher.finalize())), out.count))
        });
        let mut failure = None;
        while let Some(chunk) = chunks.recv().await {
            if let Err(error) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                failure = Some(self.failed()(error));
                break;
            }
            writer.write(&chunk);
        }
        drop(chunks);
        let packed = match (failure, packer.await.expect("packing does not panic")) {
            (Some(error), _) => Err(error),
            (None, Err(source)) => Err(ArchiveError::Io {
                action: "packing",
                source,
            }),
            (None, Ok(packed)) => Ok(packed),
        };
        let (sha256, bytes) = match packed {
            Ok(packed) => packed,
            Err(error) => {
                let _ = writer.abort().await;
                return Err(error);
            }
        };
        writer.finish().await.map_err(self.failed())?;
        Ok(ArchivedLayer {
            key: key.to_string(),
            sha256,
            bytes,
            at: chrono::Utc::now(),
        })
    }

    /// Streams the archive back and unpacks it into the (empty) directory `upper`, checking its hash; on any failure
    /// the caller discards `upper`.
    pub async fn download(&self, archived: &ArchivedLayer, upper: &Path) -> Result<(), ArchiveError> {
        let location = ObjectPath::from(archived.key.as_str());
        let object = self.store.get(&location).await.map_err(self.failed())?;
        let stream = object
            .into_stream()
            .map(|chunk| chunk.map_err(|error| std::io::Error::other(error.to_string())));
        let reader = SyncIoBridge::new(StreamReader::new(stream));
        let upper = upper.to_path_buf();
        let (found, unpacked) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let mut hashing = HashingReader::new(reader);
            let unpacked = crate::images::unpack::unpack_layer(&mut hashing, &upper).map_err(std::io::Error::other);
            // Everything stored is hashed, also after a failure: a damaged archive is reported as such.
            std::io::copy(&mut hashing, &mut std::io::sink())?;
            Ok((hashing.finish(), unpacked))
        })
        .await
        .expect("unpacking does not panic")
        .map_err(|source| ArchiveError::Io {
            action: "reading back",
            source,
        })?;
        if found != archived.sha256 {
            return Err(ArchiveError::Corrupt {
                key: archived.key.clone(),
                expected: archived.sha256.clone(),
                found,
            });
        }
        unpacked.map_err(|source| ArchiveError::Io {
            action: "unpacking",
            source,
        })?;
        Ok(())
    }

    /// Removes an archive (one already gone is not an error).
    pub async fn remove(&self, key: &str) -> Result<(), ArchiveError> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(self.failed()(error)),
        }
    }
}

/// Hands what is written to an async reader in chunks of about a MiB, hashing it on the way.
struct HashingChannel {
    sender: tokio::sync::mpsc::Sender<Bytes>,
    hasher: Sha256,
    count: u64,
    buffer: Vec<u8>,
}

impl std::io::Write for HashingChannel {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(data);
        self.count += data.len() as u64;
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buffer, Vec::with_capacity(1 << 20)));
        self.sender
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}
