//! Archive → start round trips: a stopped sandbox's writable layer goes to the archive store (here the default local
//! directory) and off local disk, and comes back byte-identical when it starts (contents, modes, owners, links,
//! device nodes, deletions of image files, replaced directories, user metadata); a corrupt archive is refused and
//! the sandbox stays archived.

mod common;

use common::{create, sh, shared_server};
use nook_api::SandboxState;

/// Makes a varied tree: data, small files, links, a fifo, a setuid program, a file of another owner, user metadata,
/// a deleted image file and a directory of the image replaced by a new one.
const MAKE_TREE: &str = "set -e
mkdir -p /data/sub /data/empty
head -c 20000000 /dev/urandom > /data/big
echo small > /data/sub/small
ln -s sub/small /data/link
ln /data/sub/small /data/hard
mkfifo /data/fifo
cp /bin/true /data/setuid && chmod 4755 /data/setuid
echo mine > /data/owned && chown 1000:1000 /data/owned
python3 -c \"import os; os.setxattr('/data/sub/small', 'user.e2b.note', b'kept')\"
rm /etc/motd
rm -rf /usr/share/doc/bash && mkdir /usr/share/doc/bash && echo new > /usr/share/doc/bash/only";

/// One digest of everything `MAKE_TREE` touched: names, modes, owners, link targets, contents, link counts and
/// extended attributes, and whether the deleted file is still gone.
const MANIFEST: &str = "python3 - <<'EOF'
import hashlib, json, os, stat
out = []
for top in ['/data', '/usr/share/doc/bash']:
    for path, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(path, name)
            st = os.lstat(p)
            entry = [p, oct(st.st_mode), st.st_uid, st.st_gid]
            if stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                entry.append(hashlib.sha256(open(p, 'rb').read()).hexdigest())
                entry.append(st.st_nlink)
                entry.append(sorted((k, os.getxattr(p, k).hex()) for k in os.listxattr(p)))
            out.append(entry)
out.append(os.path.exists('/etc/motd'))
print(hashlib.sha256(json.dumps(out).encode()).hexdigest(), len(out))
EOF";

#[tokio::test]
async fn archive_and_start_round_trip_byte_identical_and_free_local_disk() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "archived").await;
    let made = sh(&client, &sandbox.id, MAKE_TREE).await;
    assert_eq!(made.exit_code, Some(0), "{made:?}");
    let before = sh(&client, &sandbox.id, MANIFEST).await;
    assert_eq!(before.exit_code, Some(0), "{before:?}");

    // Only a stopped sandbox is archived.
    let refused = client.archive_sandbox(&sandbox.id).await.unwrap_err();
    assert_eq!(refused.code(), Some("conflict"), "{refused}");
    client.stop_sandbox(&sandbox.id).await.unwrap();
    let started = std::time::Instant::now();
    let archived = client.archive_sandbox(&sandbox.id).await.unwrap();
    eprintln!("archived in {:?}: {}", started.elapsed(), archived.state_message);
    assert_eq!(archived.state, SandboxState::Archived);
    assert!(archived.state_message.contains("sha256:"), "{}", archived.state_message);
    // Off local disk, into the store.
    assert!(!server.sandbox_dir(&sandbox.id).join("fs").exists());
    let objects: Vec<_> = std::fs::read_dir(server.data_dir.join("archive/sandboxes").join(&sandbox.id))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(objects.len(), 1);
    // Archiving again changes nothing; exec is refused until it starts.
    assert_eq!(
        client.archive_sandbox(&sandbox.id).await.unwrap().state,
        SandboxState::Archived
    );

    let started = std::time::Instant::now();
    let back = client.start_sandbox(&sandbox.id).await.unwrap();
    eprintln!("restored and started in {:?}", started.elapsed());
    assert_eq!(back.state, SandboxState::Running);
    let after = sh(&client, &sandbox.id, MANIFEST).await;
    assert_eq!(after.stdout, before.stdout, "the files came back different");
    // The archive is gone once the files are local again.
    assert!(!objects[0].path().exists());
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn a_corrupt_archive_is_refused_and_the_sandbox_stays_archived() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "corrupt").await;
    sh(&client, &sandbox.id, "head -c 3000000 /dev/urandom > /data.bin").await;
    client.stop_sandbox(&sandbox.id).await.unwrap();
    client.archive_sandbox(&sandbox.id).await.unwrap();
    let dir = server.data_dir.join("archive/sandboxes").join(&sandbox.id);
    let object = std::fs::read_dir(&dir).unwrap().flatten().next().unwrap().path();
    // One flipped byte in the middle.
    let mut bytes = std::fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&object, bytes).unwrap();

    let error = client.start_sandbox(&sandbox.id).await.unwrap_err();
    assert_eq!(error.code(), Some("archive_corrupt"), "{error}");
    assert!(error.to_string().contains("stays archived"), "{error}");
    let now = client.sandbox(&sandbox.id).await.unwrap();
    assert_eq!(now.state, SandboxState::Archived, "{now:?}");
    assert!(object.exists(), "the archive was removed");
    assert!(!server.sandbox_dir(&sandbox.id).join("fs").exists());
    // Deleting it removes the archive too.
    client.delete_sandbox(&sandbox.id).await.unwrap();
    assert!(!object.exists());
}

/// moto's S3 server (from `.venv-s3`, which `scripts/setup.sh` makes) on a loopback port of its own; stopped when
/// dropped.
struct S3Server {
    child: std::process::Child,
    url: String,
}

impl S3Server {
    async fn start() -> Self {
        // Set by scripts/test.sh; otherwise found from the package directory cargo runs tests in.
        let program = std::env::var("NOOK_MOTO_SERVER").unwrap_or_else(|_| {
            let dir = std::env::current_dir().expect("a working directory");
            dir.join("../../.venv-s3/bin/moto_server").display().to_string()
        });
        assert!(
            std::path::Path::new(&program).exists(),
            "{program} is missing: scripts/setup.sh installs moto's server into .venv-s3"
        );
        let port = common::free_port();
        let child = std::process::Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        common::eventually(
            "moto's S3 server answers",
            std::time::Duration::from_secs(30),
            || async { reqwest::get(&server.url).await.is_ok() },
        )
        .await;
        server
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn archives_go_to_s3_compatible_storage_and_come_back() {
    let s3 = S3Server::start().await;
    let http = reqwest::Client::new();
    let made = http.put(format!("{}/nook-archives", s3.url)).send().await.unwrap();
    assert!(made.status().is_success(), "{made:?}");
    let config = format!(
        "[archive_s3]\nendpoint = \"{}\"\nbucket = \"nook-archives\"\naccess_key_id = \"test\"\n\
         secret_access_key = \"test\"\n",
        s3.url
    );
    let server = common::TestServer::start_with_config("archive-s3", &config);
    let client = server.client();
    let sandbox = create(&client, "to-s3").await;
    assert_eq!(sh(&client, &sandbox.id, MAKE_TREE).await.exit_code, Some(0));
    let before = sh(&client, &sandbox.id, MANIFEST).await;
    client.stop_sandbox(&sandbox.id).await.unwrap();
    let archived = client.archive_sandbox(&sandbox.id).await.unwrap();
    assert_eq!(archived.state, SandboxState::Archived);
    assert!(!server.sandbox_dir(&sandbox.id).join("fs").exists());
    let listing = || async {
        http.get(format!("{}/nook-archives?list-type=2", s3.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let listed = listing().await;
    assert!(listed.contains(&format!("sandboxes/{}/", sandbox.id)), "{listed}");
    assert!(!server.data_dir.join("archive/sandboxes").join(&sandbox.id).exists());

    client.start_sandbox(&sandbox.id).await.unwrap();
    let after = sh(&client, &sandbox.id, MANIFEST).await;
    assert_eq!(after.stdout, before.stdout, "the files came back different from S3");
    let listed = listing().await;
    assert!(!listed.contains(&format!("sandboxes/{}/", sandbox.id)), "{listed}");
    client.delete_sandbox(&sandbox.id).await.unwrap();
}
