//! Files in sandboxes: streaming upload and download, metadata operations, clear errors, and paths that cannot
//! leave the sandbox whatever `..`, symlinks or /proc tricks they use.

mod common;

use std::time::Instant;

use common::{create, sh, shared_server};
use futures::StreamExt;
use nook_api::{FileKind, ReplaceRequest, SearchRequest};

/// A deterministic pseudo-random byte sequence, generated in chunks so that nothing holds the whole file.
fn chunk(seed: u64, index: u64, len: usize) -> Vec<u8> {
    let mut state = (seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

const CHUNK: usize = 1 << 20;

#[tokio::test]
async fn large_files_stream_both_ways_byte_identical() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "files-big").await;
    let chunks = 2048u64; // 2 GiB
    let body = futures::stream::iter(0..chunks).map(|index| Ok::<_, std::io::Error>(chunk(7, index, CHUNK)));
    let started = Instant::now();
    let info = client
        .upload_file(
            &sandbox.id,
            "/data/big.bin",
            reqwest::Body::wrap_stream(body),
            None,
            true,
        )
        .await
        .unwrap();
    let upload_s = started.elapsed().as_secs_f64();
    assert_eq!(
        (info.size, info.kind, info.mode),
        (chunks * CHUNK as u64, FileKind::File, 0o644)
    );

    let started = Instant::now();
    let mut stream = client.download_file(&sandbox.id, "/data/big.bin").await.unwrap();
    let mut expected = Vec::new();
    let mut index = 0;
    let mut total = 0u64;
    while let Some(piece) = stream.next().await {
        let mut piece = &piece.unwrap()[..];
        total += piece.len() as u64;
        while !piece.is_empty() {
            if expected.is_empty() {
                expected = chunk(7, index, CHUNK);
                index += 1;
            }
            let n = piece.len().min(expected.len());
            assert!(
                piece[..n] == expected[..n],
                "downloaded bytes differ near offset {total}"
            );
            piece = &piece[n..];
            expected.drain(..n);
        }
    }
    let download_s = started.elapsed().as_secs_f64();
    assert_eq!(total, chunks * CHUNK as u64);
    let mib = (chunks * CHUNK as u64) as f64 / (1 << 20) as f64;
    eprintln!(
        "upload {:.0} MiB/s, download {:.0} MiB/s (debug build)",
        mib / upload_s,
        mib / download_s
    );
    // Nothing along the way held the file: the server's and the agent's peak memory stay small.
    let server_mib = common::peak_rss_mib(server.pid());
    let agent_mib = common::peak_rss_mib(server.agent_pid(&sandbox.id));
    eprintln!("peak RSS after 2 GiB each way: server {server_mib} MiB, agent {agent_mib} MiB");
    assert!(server_mib < 256, "the server's peak RSS reached {server_mib} MiB");
    assert!(agent_mib < 64, "the agent's peak RSS reached {agent_mib} MiB");
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn metadata_operations_work_and_fail_clearly() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "files-ops").await;
    let id = sandbox.id.as_str();
    let script = client
        .upload_file(
            id,
            "/work/bin/run.sh",
            "#!/bin/sh\necho ran\n".into(),
            Some(0o755),
            true,
        )
        .await;
    assert_eq!(script.unwrap().mode, 0o755);
    assert_eq!(sh(&client, id, "/work/bin/run.sh").await.stdout, "ran\n");

    let dir = client.make_dir(id, "/work/a/b/c").await.unwrap();
    assert_eq!(dir.kind, FileKind::Dir);
    client
        .upload_file(id, "/work/a/b/c/note.txt", "hi".into(), None, false)
        .await
        .unwrap();
    let shallow: Vec<String> = client
        .list_files(id, "/work", 1)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(shallow, ["/work/a", "/work/bin"]);
    let deep = client.list_files(id, "/work", 4).await.unwrap();
    assert!(deep
        .iter()
        .any(|entry| entry.path == "/work/a/b/c/note.txt" && entry.size == 2));

    let moved = client
        .move_file(id, "/work/a/b/c/note.txt", "/work/note.txt")
        .await
        .unwrap();
    assert_eq!((moved.path.as_str(), moved.size), ("/work/note.txt", 2));
    sh(&client, id, "ln -s /work/note.txt /work/link").await;
    let link = client.stat_file(id, "/work/link").await.unwrap();
    assert_eq!(
        (link.kind, link.symlink_target.as_deref()),
        (FileKind::Symlink, Some("/work/note.txt"))
    );

    for (what, error, code) in [
        (
            "stat of a missing path",
            client.stat_file(id, "/nope").await.unwrap_err(),
            "not_found",
        ),
        (
            "relative path",
            client.stat_file(id, "work/note.txt").await.unwrap_err(),
            "invalid_path",
        ),
        (
            "listing a file",
            client.list_files(id, "/work/note.txt", 1).await.unwrap_err(),
            "not_a_directory",
        ),
        (
            "non-empty dir",
            client.remove_file(id, "/work/a", false).await.unwrap_err(),
            "not_empty",
        ),
        (
            "missing parent",
            client
                .upload_file(id, "/x/y/z", "1".into(), None, false)
                .await
                .unwrap_err(),
            "not_found",
        ),
        (
            "root",
            client.remove_file(id, "/", true).await.unwrap_err(),
            "invalid_path",
        ),
    ] {
        assert_eq!(error.code(), Some(code), "{what}: {error}");
    }
    client.remove_file(id, "/work/a", true).await.unwrap();
    assert_eq!(
        client.stat_file(id, "/work/a").await.unwrap_err().code(),
        Some("not_found")
    );
    client.delete_sandbox(id).await.unwrap();
}

#[tokio::test]
async fn paths_never_leave_the_sandbox() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "files-escape").await;
    let id = sandbox.id.as_str();
    let marker = format!("nook-escape-{}", &common::rand_suffix()[..8]);
    sh(
        &client,
        id,
        "ln -s / /tmp/root; ln -s ../../../../../../etc /tmp/up; ln -s /proc/1/root /tmp/proc-root",
    )
    .await;
    let own_passwd = sh(&client, id, "cat /etc/passwd").await.stdout;

    for path in [
        "/../../../etc/passwd",
        "/tmp/root/etc/passwd",
        "/tmp/up/passwd",
        "/tmp/proc-root/etc/passwd",
        "/proc/1/root/etc/passwd",
    ] {
        let mut stream = client
            .download_file(id, path)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut text = Vec::new();
        while let Some(piece) = stream.next().await {
            text.extend_from_slice(&piece.unwrap());
        }
        assert_eq!(
            String::from_utf8(text).unwrap(),
            own_passwd,
            "{path} did not read the sandbox's own file"
        );
    }
    for path in [
        format!("/../../tmp/{marker}"),
        format!("/tmp/root/tmp/{marker}"),
        format!("/tmp/up/../../tmp/{marker}"),
    ] {
        client
            .upload_file(id, &path, "x".into(), None, false)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    assert!(
        !std::path::Path::new("/tmp").join(&marker).exists(),
        "an upload reached the host's /tmp"
    );
    assert_eq!(sh(&client, id, &format!("cat /tmp/{marker}")).await.stdout, "x");
    client.delete_sandbox(id).await.unwrap();
}

#[tokio::test]
async fn an_interrupted_upload_leaves_nothing() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "files-cut").await;
    let body = futures::stream::iter(0..4u64).map(|index| {
        if index < 3 {
            Ok(chunk(1, index, CHUNK))
        } else {
            Err(std::io::Error::other("the client's source failed"))
        }
    });
    let result = client
        .upload_file(
            &sandbox.id,
            "/tmp/partial.bin",
            reqwest::Body::wrap_stream(body),
            None,
            false,
        )
        .await;
    assert!(result.is_err(), "an interrupted upload reported success");
    assert_eq!(
        client
            .stat_file(&sandbox.id, "/tmp/partial.bin")
            .await
            .unwrap_err()
            .code(),
        Some("not_found")
    );
    common::eventually(
        "the partial upload's temporary file is gone",
        std::time::Duration::from_secs(5),
        || async {
            client
                .list_files(&sandbox.id, "/tmp", 1)
                .await
                .unwrap()
                .iter()
                .all(|entry| !entry.name.contains("partial"))
        },
    )
    .await;
    client.delete_sandbox(&sandbox.id).await.unwrap();
}

#[tokio::test]
async fn search_find_replace_and_permissions() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "files-search").await;
    let id = sandbox.id.as_str();
    sh(
        &client,
        id,
        "mkdir -p /src/pkg && printf 'import os\\n# TODO: fix\\n' > /src/main.py && \\
         printf '# TODO: test\\nx = 1\\n' > /src/pkg/util.py && printf 'TODO in notes\\n' > /src/notes.md && \\
         ln -s /etc /src/etc-link",
    )
    .await;

    let found = client
        .search_files(
            id,
            &SearchRequest {
                path: "/src".into(),
                regex: r"TODO: (\w+)".into(),
                include: Some("*.py".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let hits: Vec<(String, u64)> = found.matches.iter().map(|m| (m.path.clone(), m.line_number)).collect();
    assert_eq!(
        hits,
        [("/src/main.py".to_string(), 2), ("/src/pkg/util.py".to_string(), 1)]
    );
    assert!(!found.truncated);
    let bad = client
        .search_files(
            id,
            &SearchRequest {
                path: "/src".into(),
                regex: "(".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(bad.unwrap_err().code(), Some("invalid_pattern"));

    let py: Vec<String> = client
        .find_files(id, "/src", "*.py")
        .await
        .unwrap()
        .matches
        .into_iter()
        .map(|m| m.path)
        .collect();
    assert_eq!(
        py,
        ["/src/main.py", "/src/pkg/util.py"],
        "symlinked directories must not be followed"
    );

    let replaced = client
        .replace_in_files(
            id,
            &ReplaceRequest {
                paths: vec!["/src/main.py".into(), "/src/pkg/util.py".into()],
                regex: r"TODO: (\w+)".into(),
                replacement: "DONE: $1".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(replaced.files.iter().map(|f| f.replacements).sum::<u64>(), 2);
    assert_eq!(
        sh(&client, id, "cat /src/pkg/util.py").await.stdout,
        "# DONE: test\nx = 1\n"
    );

    assert_eq!(client.chmod_file(id, "/src/main.py", 0o600).await.unwrap().mode, 0o600);
    let owned = client.chown_file(id, "/src/main.py", 1000, 1000).await.unwrap();
    assert_eq!((owned.uid, owned.gid), (1000, 1000));
    assert_eq!(
        sh(&client, id, "stat -c '%a %U' /src/main.py").await.stdout,
        "600 user\n"
    );
    client.delete_sandbox(id).await.unwrap();
}

#[tokio::test]
async fn watching_a_directory_reports_changes_recursively() {
    use nook_api::{WatchEvent, WatchEventKind};
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "files-watch").await;
    let id = sandbox.id.as_str();
    client.make_dir(id, "/w").await.unwrap();
    let mut events = client.watch_files(id, "/w", true).await.unwrap();
    let event = |kind, path: &str, is_dir| WatchEvent {
        kind,
        path: path.into(),
        is_dir,
    };

    sh(&client, id, "mkdir /w/sub").await;
    assert_eq!(
        next_change(&mut events).await,
        event(WatchEventKind::Create, "/w/sub", true)
    );
    // The new subdirectory is watched too.
    sh(
        &client,
        id,
        "echo hi > /w/sub/a.txt && mv /w/sub/a.txt /w/b.txt && chmod 600 /w/b.txt && rm /w/b.txt",
    )
    .await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(next_change(&mut events).await);
    }
    assert_eq!(
        seen,
        [
            event(WatchEventKind::Create, "/w/sub/a.txt", false),
            event(WatchEventKind::Write, "/w/sub/a.txt", false),
            event(WatchEventKind::RenameFrom, "/w/sub/a.txt", false),
            event(WatchEventKind::RenameTo, "/w/b.txt", false),
            event(WatchEventKind::Metadata, "/w/b.txt", false),
            event(WatchEventKind::Remove, "/w/b.txt", false),
        ]
    );
    // What a new directory holds before its watch exists is not lost: it is reported as created. (A tree moved in
    // is the sure way to get there first; `mkdir -p d/e && touch d/e/f` races the watcher the same way.)
    sh(
        &client,
        id,
        "mkdir -p /staging/deep/er && echo z > /staging/deep/er/z.txt && mv /staging/deep /w/deep",
    )
    .await;
    assert_eq!(
        next_change(&mut events).await,
        event(WatchEventKind::RenameTo, "/w/deep", true)
    );
    let mut created = std::collections::BTreeSet::new();
    for _ in 0..2 {
        let change = next_change(&mut events).await;
        assert_eq!(change.kind, WatchEventKind::Create, "{change:?}");
        created.insert(change.path);
    }
    assert_eq!(
        created.into_iter().collect::<Vec<_>>(),
        ["/w/deep/er", "/w/deep/er/z.txt"]
    );
    drop(events);
    let not_dir = client
        .watch_files(id, "/etc/passwd", false)
        .await
        .err()
        .expect("watching a file must fail");
    assert_eq!(not_dir.code(), Some("not_a_directory"));
    client.delete_sandbox(id).await.unwrap();
}

/// The next watch event that is not a keepalive, within 20 s.
async fn next_change(
    events: &mut (impl futures::Stream<Item = Result<nook_api::WatchEvent, nook_client::ClientError>> + Unpin),
) -> nook_api::WatchEvent {
    loop {
        let event = tokio::time::timeout(std::time::Duration::from_secs(20), events.next())
            .await
            .expect("no watch event within 20 s")
            .expect("the watch stream ended")
            .unwrap();
        if event.kind != nook_api::WatchEventKind::Keepalive {
            return event;
        }
    }
}

/// A tar entry with a name the `tar` crate would refuse to write (`..`, absolute): hostile archives are built by
/// hand.
fn raw_entry(archive: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    let bytes = name.as_bytes();
    header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    if let Some(link) = link {
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    header.set_cksum();
    archive.extend_from_slice(header.as_bytes());
    archive.extend_from_slice(data);
    archive.resize(archive.len().div_ceil(512) * 512, 0);
}

#[tokio::test]
async fn directory_trees_move_as_tar_streams() {
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "files-tar").await;
    let id = sandbox.id.as_str();
    sh(
        &client,
        id,
        "mkdir -p /srv/tree/sub/deep && echo one > /srv/tree/a.txt && head -c 3000000 /dev/urandom > /srv/tree/sub/big \
         && ln -s ../a.txt /srv/tree/sub/link && chmod 750 /srv/tree/sub && mkfifo /srv/tree/fifo",
    )
    .await;
    let digest = sh(&client, id, "sha256sum /srv/tree/sub/big | cut -c1-64").await.stdout;

    // Out: a tar of the tree named from its last component, links kept as links.
    let (kind, mut stream) = client.download_archive(id, "/srv/tree").await.unwrap();
    assert_eq!(kind, FileKind::Dir);
    let mut archive = Vec::new();
    while let Some(piece) = stream.next().await {
        archive.extend_from_slice(&piece.unwrap());
    }
    let mut names = Vec::new();
    for entry in tar::Archive::new(archive.as_slice()).entries().unwrap() {
        let entry = entry.unwrap();
        let name = entry.path().unwrap().display().to_string();
        if name == "tree/sub/link" {
            assert_eq!(entry.header().entry_type(), tar::EntryType::Symlink);
            assert_eq!(entry.link_name().unwrap().unwrap().to_str(), Some("../a.txt"));
        }
        if name == "tree/sub" {
            assert_eq!(entry.header().mode().unwrap() & 0o777, 0o750);
        }
        names.push(name);
    }
    for expected in [
        "tree",
        "tree/a.txt",
        "tree/fifo",
        "tree/sub",
        "tree/sub/big",
        "tree/sub/deep",
        "tree/sub/link",
    ] {
        assert!(
            names.iter().any(|n| n.trim_end_matches('/') == expected),
            "{expected} missing from {names:?}"
        );
    }

    // In: the same archive unpacked elsewhere, owned as asked, byte-identical.
    let result = client
        .upload_archive(id, "/copy/here", archive.clone().into(), true, Some((1000, 1000)))
        .await
        .unwrap();
    assert_eq!(result.entries, names.len() as u64);
    assert!(result.bytes >= 3_000_004, "{result:?}");
    let check = sh(
        &client,
        id,
        "sha256sum /copy/here/tree/sub/big | cut -c1-64; readlink /copy/here/tree/sub/link; \
         stat -c %u:%g /copy/here/tree/sub/big /copy/here/tree/sub/link; cat /copy/here/tree/sub/link",
    )
    .await
    .stdout;
    assert_eq!(check, format!("{digest}../a.txt\n1000:1000\n1000:1000\none\n"));

    // A single file archives as one entry.
    let (kind, _) = client.download_archive(id, "/srv/tree/a.txt").await.unwrap();
    assert_eq!(kind, FileKind::File);
    let Err(error) = client.download_archive(id, "/no/such").await else {
        panic!("an archive of a missing path")
    };
    assert_eq!(error.code(), Some("not_found"), "{error}");

    // Hostile archives: `..`, absolute names and a path through a planted symlink are refused; nothing lands outside.
    let marker = format!("nook-tar-{}", &common::rand_suffix()[..8]);
    let mut dotdot = Vec::new();
    raw_entry(
        &mut dotdot,
        &format!("../../{marker}"),
        tar::EntryType::Regular,
        None,
        b"x",
    );
    let mut through_link = Vec::new();
    raw_entry(&mut through_link, "out", tar::EntryType::Symlink, Some("/etc"), b"");
    raw_entry(
        &mut through_link,
        &format!("out/{marker}"),
        tar::EntryType::Regular,
        None,
        b"x",
    );
    for (what, archive) in [("dotdot", dotdot), ("symlink", through_link)] {
        let error = client
            .upload_archive(id, "/dest", archive.into(), true, None)
            .await
            .unwrap_err();
        assert_eq!(error.code(), Some("invalid_archive"), "{what}: {error}");
    }
    let mut absolute = Vec::new();
    raw_entry(
        &mut absolute,
        &format!("/etc/{marker}"),
        tar::EntryType::Regular,
        None,
        b"x",
    );
    client
        .upload_archive(id, "/dest2", absolute.into(), true, None)
        .await
        .unwrap();
    let found = sh(&client, id, &format!("find / -xdev -name '{marker}' 2>/dev/null"))
        .await
        .stdout;
    assert_eq!(
        found,
        format!("/dest2/etc/{marker}\n"),
        "an absolute name is kept under the destination"
    );
    assert!(!std::path::Path::new("/etc").join(&marker).exists());
    let error = client
        .upload_archive(id, "/copy/here/tree/a.txt", Vec::new().into(), false, None)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("not_a_directory"), "{error}");
    let error = client
        .upload_archive(id, "/dest3", b"this is not a tar archive".repeat(40).into(), true, None)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("invalid_archive"), "{error}");
    client.delete_sandbox(id).await.unwrap();
}

#[tokio::test]
async fn multipart_uploads_stream_each_file() {
    use reqwest::multipart::{Form, Part};
    let server = shared_server();
    let client = server.client();
    let sandbox = create(&client, "files-multipart").await;
    let id = sandbox.id.as_str();
    let big = chunk(9, 0, 8 * CHUNK);

    // Into a directory, by file name (only the name's last component counts).
    let form = Form::new()
        .text("comment", "plain fields are ignored")
        .part("file", Part::bytes(b"hello".to_vec()).file_name("a.txt"))
        .part("file", Part::bytes(big.clone()).file_name("../../etc/big.bin"));
    let written = client.upload_multipart(id, "/up/", form, true).await.unwrap();
    let paths: Vec<&str> = written.iter().map(|file| file.path.as_str()).collect();
    assert_eq!(paths, ["/up/a.txt", "/up/big.bin"]);
    assert_eq!(written[1].size, big.len() as u64);
    let mut stream = client.download_file(id, "/up/big.bin").await.unwrap();
    let mut back = Vec::new();
    while let Some(piece) = stream.next().await {
        back.extend_from_slice(&piece.unwrap());
    }
    assert!(back == big, "the multipart file came back different");

    // One file to a path that is not a directory.
    let form = Form::new().part("upload", Part::bytes(b"solo".to_vec()).file_name("whatever"));
    let written = client.upload_multipart(id, "/single/x.txt", form, true).await.unwrap();
    assert_eq!(written[0].path, "/single/x.txt");
    assert_eq!(sh(&client, id, "cat /single/x.txt").await.stdout, "solo");

    // Clear errors: two files to a file path, a name that is no name, a form without files.
    let two = Form::new()
        .part("a", Part::bytes(b"1".to_vec()).file_name("1"))
        .part("b", Part::bytes(b"2".to_vec()).file_name("2"));
    let error = client
        .upload_multipart(id, "/single/y.txt", two, true)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("only one file"), "{error}");
    let dots = Form::new().part("a", Part::bytes(b"1".to_vec()).file_name(".."));
    let error = client.upload_multipart(id, "/up", dots, false).await.unwrap_err();
    assert_eq!(error.code(), Some("invalid_request"), "{error}");
    let empty = Form::new().text("just", "text");
    let error = client.upload_multipart(id, "/up", empty, false).await.unwrap_err();
    assert!(error.to_string().contains("no file"), "{error}");
    client.delete_sandbox(id).await.unwrap();
}
