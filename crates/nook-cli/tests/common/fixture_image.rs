//! Small OCI images built by the tests themselves from host files (Debian's static busybox), so that image tests
//! need no registry and no download: tar layers with whiteouts and opaque directories, an image config, and the
//! OCI image layout archive that holds them.

use std::io::Write;

use sha2::{Digest, Sha256};

/// One member of a layer.
pub enum Member<'a> {
    /// A regular file with its mode.
    File(&'a str, &'a [u8], u32),
    /// A directory owned by `uid`.
    Dir(&'a str, u32),
    /// A symlink to a target.
    Symlink(&'a str, &'a str),
    /// A regular file whose name is written as is, unchecked (for hostile archives; at most 100 bytes).
    RawFile(&'a str, &'a [u8]),
}

/// A tar of `members`, owned by root unless a directory says otherwise.
pub fn layer(members: &[Member]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for member in members {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(1_700_000_000);
        match member {
            Member::File(path, data, mode) => {
                header.set_size(data.len() as u64);
                header.set_mode(*mode);
                header.set_cksum();
                builder.append_data(&mut header, path, *data).unwrap();
            }
            Member::Dir(path, uid) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                header.set_mode(0o755);
                header.set_uid(u64::from(*uid));
                header.set_gid(u64::from(*uid));
                header.set_cksum();
                builder.append_data(&mut header, path, std::io::empty()).unwrap();
            }
            Member::RawFile(path, data) => {
                header.set_size(data.len() as u64);
                header.set_mode(0o644);
                header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
                header.set_cksum();
                builder.append(&header, *data).unwrap();
            }
            Member::Symlink(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                header.set_mode(0o777);
                builder.append_link(&mut header, path, target).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

/// A base layer: the static busybox with the applets the tests use, and an `app` user (uid 1000).
pub fn busybox_layer() -> Vec<u8> {
    let busybox =
        std::fs::read("/bin/busybox").expect("/bin/busybox (Debian's busybox-static; scripts/setup.sh installs it)");
    let applets = [
        "sh", "cat", "ls", "id", "pwd", "env", "echo", "sleep", "test", "find", "sort",
    ];
    let links: Vec<String> = applets.iter().map(|applet| format!("bin/{applet}")).collect();
    let mut members = vec![
        Member::Dir("bin/", 0),
        Member::File("bin/busybox", &busybox, 0o755),
        Member::File(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
            0o644,
        ),
        Member::File("etc/group", b"root:x:0:\napp:x:1000:\n", 0o644),
        Member::Dir("home/app/", 1000),
        Member::Dir("root/", 0),
        Member::Dir("tmp/", 0),
    ];
    members.extend(links.iter().map(|link| Member::Symlink(link, "busybox")));
    layer(&members)
}

/// `sha256:<hex>` of bytes.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// An image: its layers (uncompressed tars) and the `config` object of its config.
pub struct FixtureImage {
    pub layers: Vec<Vec<u8>>,
    pub run_config: serde_json::Value,
}

/// The blobs of an image as a registry or a layout holds them.
pub struct Blobs {
    /// Gzip-compressed layers.
    pub layers: Vec<Vec<u8>>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl FixtureImage {
    /// Compresses the layers and writes the config and manifest.
    pub fn blobs(&self) -> Blobs {
        self.blobs_compressed(true)
    }

    /// The blobs, with gzip-compressed or plain tar layers.
    pub fn blobs_compressed(&self, compress: bool) -> Blobs {
        let layers: Vec<Vec<u8>> = self
            .layers
            .iter()
            .map(|layer| if compress { gzip(layer) } else { layer.clone() })
            .collect();
        let layer_type = if compress {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        let diff_ids: Vec<String> = self.layers.iter().map(|layer| digest(layer)).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": self.run_config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": digest(&config), "size": config.len()},
            "layers": layers.iter().map(|blob| serde_json::json!({
                "mediaType": layer_type,
                "digest": digest(blob), "size": blob.len()})).collect::<Vec<_>>(),
        }))
        .unwrap();
        Blobs {
            layers,
            config,
            manifest,
        }
    }

    /// The image as an OCI image layout archive (what `skopeo copy … oci-archive:` writes), and its manifest digest.
    pub fn oci_archive(&self) -> (Vec<u8>, String) {
        let blobs = self.blobs();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": digest(&blobs.manifest), "size": blobs.manifest.len(),
                           "platform": {"os": "linux", "architecture": "amd64"}}],
        }))
        .unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, path, data).unwrap();
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        add("index.json", &index);
        for blob in blobs.layers.iter().chain([&blobs.config, &blobs.manifest]) {
            add(&format!("blobs/sha256/{}", &digest(blob)[7..]), blob);
        }
        (builder.into_inner().unwrap(), digest(&blobs.manifest))
    }
}

/// The image the image tests use: busybox below, and an upper layer that deletes a file, makes a directory opaque
/// and adds files, with env, working directory, user, command, port and label in its config.
pub fn layered_image() -> FixtureImage {
    let lower = {
        let mut tar = busybox_layer();
        let extra = layer(&[
            Member::File("etc/motd", b"welcome\n", 0o644),
            Member::File("etc/deleted-later", b"x\n", 0o644),
            Member::File("var/cache/app/stale", b"old\n", 0o644),
        ]);
        // Append the extra members before the end marker.
        tar.truncate(tar.len() - 1024);
        tar.extend(extra);
        tar
    };
    let upper = layer(&[
        Member::File("etc/.wh.deleted-later", b"", 0o644),
        Member::File("var/cache/app/.wh..wh..opq", b"", 0o644),
        Member::File("var/cache/app/fresh", b"new\n", 0o644),
        Member::Dir("srv/", 1000),
        Member::File("srv/index.html", b"<h1>hi</h1>\n", 0o644),
    ]);
    FixtureImage {
        layers: vec![lower, upper],
        run_config: serde_json::json!({
            "Env": ["PATH=/bin", "GREETING=from-the-image"],
            "WorkingDir": "/srv",
            "User": "app:app",
            "Cmd": ["sh"],
            "ExposedPorts": {"8080/tcp": {}},
            "Labels": {"org.example.team": "agents"},
        }),
    }
}

/// A shell script that shows what a sandbox of [`layered_image`] sees, and what it must print.
pub const LAYERED_CHECK: (&str, &str) = (
    "echo $GREETING; pwd; id -u; id -g; test -e /etc/deleted-later || echo deleted; ls /var/cache/app; \
     cat /etc/motd /srv/index.html",
    "from-the-image\n/srv\n1000\n1000\ndeleted\nfresh\nwelcome\n<h1>hi</h1>\n",
);
