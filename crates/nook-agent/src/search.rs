//! Find by name, search by content, find-and-replace, in the sandbox.
//!
//! Patterns come from clients, so they are compiled with the `regex` crate (linear-time matching: no pathological
//! backtracking) under a size limit, and every walk is bounded by a result limit and, for content search, a time
//! limit. Walks never follow symlinks, skip binary files (a NUL in the first 8 KiB) and files over 64 MiB, and cut
//! reported lines at 4 KiB. A replacement rewrites each file beside itself and renames it over, keeping its mode.

use std::io::{BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nook_agent_proto::{FindResult, Replaced, SearchMatch, SearchResult};
use regex::{Regex, RegexBuilder};

use crate::files::{self, FileError};

/// Largest compiled pattern.
const MAX_REGEX_SIZE: usize = 1 << 20;
/// Files larger than this are not searched or rewritten.
const MAX_FILE: u64 = 64 << 20;
/// Longest line reported by a search.
const MAX_LINE: usize = 4096;
/// Most results any call returns, whatever the client asks.
const MAX_RESULTS: u32 = 100_000;

fn compile(pattern: &str) -> Result<Regex, FileError> {
    RegexBuilder::new(pattern)
        .size_limit(MAX_REGEX_SIZE)
        .build()
        .map_err(|error| FileError {
            code: "invalid_pattern",
            message: format!("invalid regular expression: {error}"),
        })
}

/// Compiles a file-name glob (`*`, `?`, `[...]`) into an anchored regular expression.
pub fn glob(pattern: &str) -> Result<Regex, FileError> {
    let mut regex = String::from("^");
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => regex.push_str(".*"),
            '?' => regex.push('.'),
            '[' => {
                regex.push('[');
                if chars.peek() == Some(&'!') {
                    chars.next();
                    regex.push('^');
                }
                for c in chars.by_ref() {
                    if c == ']' {
                        break;
                    }
                    if c == '\\' || c == '[' || c == '^' {
                        regex.push('\\');
                    }
                    regex.push(c);
                }
                regex.push(']');
            }
            other => regex.push_str(&regex::escape(&other.to_string())),
        }
    }
    regex.push('$');
    compile(&regex).map_err(|_| FileError {
        code: "invalid_pattern",
        message: format!("invalid glob {pattern:?}"),
    })
}

/// Visits every non-symlink entry under `root` (depth-first, sorted), until `visit` returns false.
fn walk(root: &Path, visit: &mut dyn FnMut(&Path, &std::fs::Metadata) -> bool) -> Result<(), FileError> {
    let metadata = std::fs::symlink_metadata(root).map_err(|e| files::io_error("reading", root, e))?;
    if !metadata.is_dir() {
        visit(root, &metadata);
        return Ok(());
    }
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut entries: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        entries.sort();
        let mut subdirs = Vec::new();
        for path in entries {
            let Ok(metadata) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if !visit(&path, &metadata) {
                return Ok(());
            }
            if metadata.is_dir() {
                subdirs.push(path);
            }
        }
        pending.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

/// Paths under `root` whose name matches `pattern`.
pub fn find(root: &Path, pattern: &str, max_results: u32) -> Result<FindResult, FileError> {
    let matcher = glob(pattern)?;
    let limit = max_results.clamp(1, MAX_RESULTS) as usize;
    let mut matches = Vec::new();
    let mut truncated = false;
    walk(root, &mut |path, _| {
        let name = path.file_name().map(|name| name.to_string_lossy()).unwrap_or_default();
        if matcher.is_match(&name) && path != root {
            if matches.len() == limit {
                truncated = true;
                return false;
            }
            if let Ok(stat) = files::stat(path) {
                matches.push(stat);
            }
        }
        true
    })?;
    matches.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(FindResult { matches, truncated })
}

/// Lines matching `pattern` in the files under `root`.
pub fn search(
    root: &Path,
    pattern: &str,
    include: Option<&str>,
    max_results: u32,
    timeout: Duration,
) -> Result<SearchResult, FileError> {
    let matcher = compile(pattern)?;
    let include = include.map(glob).transpose()?;
    let limit = max_results.clamp(1, MAX_RESULTS) as usize;
    let deadline = Instant::now() + timeout;
    let mut result = SearchResult {
        matches: Vec::new(),
        truncated: false,
        files_searched: 0,
    };
    walk(root, &mut |path, metadata| {
        if Instant::now() > deadline {
            result.truncated = true;
            return false;
        }
        if !metadata.is_file() || metadata.len() > MAX_FILE {
            return true;
        }
        if let Some(include) = &include {
            let name = path.file_name().map(|name| name.to_string_lossy()).unwrap_or_default();
            if !include.is_match(&name) {
                return true;
            }
        }
        let Ok(file) = std::fs::File::open(path) else {
            return true;
        };
        let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
        if reader
            .fill_buf()
            .map(|head| head[..head.len().min(8192)].contains(&0))
            .unwrap_or(true)
        {
            return true;
        }
        result.files_searched += 1;
        let mut line = Vec::new();
        let mut number = 0u64;
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            number += 1;
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            if matcher.is_match(text) {
                if result.matches.len() == limit {
                    result.truncated = true;
                    return false;
                }
                let mut shown = text.to_string();
                if shown.len() > MAX_LINE {
                    let mut cut = MAX_LINE;
                    while !shown.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    shown.truncate(cut);
                }
                result.matches.push(SearchMatch {
                    path: path.to_string_lossy().into_owned(),
                    line_number: number,
                    line: shown,
                });
            }
        }
        true
    })?;
    Ok(result)
}

/// Replaces every match in each file; each file is rewritten atomically and keeps its mode.
pub fn replace(paths: &[PathBuf], pattern: &str, replacement: &str) -> Result<Vec<Replaced>, FileError> {
    let matcher = compile(pattern)?;
    let mut out = Vec::new();
    for path in paths {
        let metadata = std::fs::symlink_metadata(path).map_err(|e| files::io_error("reading", path, e))?;
        if !metadata.is_file() {
            return Err(FileError {
                code: "not_a_file",
                message: format!("{} is not a regular file", path.display()),
            });
        }
        if metadata.len() > MAX_FILE {
            return Err(FileError {
                code: "too_large",
                message: format!("{} is larger than {} MiB", path.display(), MAX_FILE >> 20),
            });
        }
        let bytes = std::fs::read(path).map_err(|e| files::io_error("reading", path, e))?;
        let Ok(text) = String::from_utf8(bytes) else {
            return Err(FileError {
                code: "not_text",
                message: format!("{} is not UTF-8 text", path.display()),
            });
        };
        let count = matcher.find_iter(&text).count() as u64;
        if count > 0 {
            let replaced = matcher.replace_all(&text, replacement);
            let temporary = path.with_file_name(format!(
                ".{}.nook-replace",
                path.file_name().map(|name| name.to_string_lossy()).unwrap_or_default()
            ));
            let written = (|| {
                let mut file = std::fs::File::create(&temporary)?;
                file.write_all(replaced.as_bytes())?;
                std::fs::set_permissions(
                    &temporary,
                    std::fs::Permissions::from_mode(metadata.permissions().mode()),
                )?;
                std::os::unix::fs::chown(&temporary, Some(metadata_uid(&metadata)), Some(metadata_gid(&metadata)))?;
                std::fs::rename(&temporary, path)
            })();
            if let Err(error) = written {
                let _ = std::fs::remove_file(&temporary);
                return Err(files::io_error("rewriting", path, error));
            }
        }
        out.push(Replaced {
            path: path.to_string_lossy().into_owned(),
            replacements: count,
        });
    }
    Ok(out)
}

fn metadata_uid(metadata: &std::fs::Metadata) -> u32 {
    std::os::unix::fs::MetadataExt::uid(metadata)
}

fn metadata_gid(metadata: &std::fs::Metadata) -> u32 {
    std::os::unix::fs::MetadataExt::gid(metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_names() {
        let g = glob("*.rs").unwrap();
        assert!(g.is_match("main.rs") && !g.is_match("main.rs.bak"));
        assert!(glob("file?.[ch]").unwrap().is_match("file1.c"));
        assert!(!glob("file?.[!ch]").unwrap().is_match("file1.c"));
        assert!(glob("a+b(c)").unwrap().is_match("a+b(c)"));
    }

    #[test]
    fn search_find_and_replace_work_on_a_tree() {
        let dir = std::env::temp_dir().join(format!("nook-search-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("src/deep")).unwrap();
        std::fs::write(dir.join("src/a.rs"), "fn main() {}\n// TODO one\n").unwrap();
        std::fs::write(dir.join("src/deep/b.rs"), "// TODO two\nlet x = 1;\n").unwrap();
        std::fs::write(dir.join("src/bin.dat"), b"TODO\0binary").unwrap();
        std::fs::write(dir.join("notes.txt"), "TODO three\n").unwrap();

        let found = search(&dir, "TODO \\w+", Some("*.rs"), 100, Duration::from_secs(5)).unwrap();
        let lines: Vec<(String, u64)> = found
            .matches
            .iter()
            .map(|m| (m.path.trim_start_matches(dir.to_str().unwrap()).into(), m.line_number))
            .collect();
        assert_eq!(lines, [("/src/a.rs".to_string(), 2), ("/src/deep/b.rs".to_string(), 1)]);
        let all = search(&dir, "TODO", None, 100, Duration::from_secs(5)).unwrap();
        assert_eq!(all.matches.len(), 3, "the binary file must be skipped");
        let capped = search(&dir, "TODO", None, 1, Duration::from_secs(5)).unwrap();
        assert!(capped.truncated && capped.matches.len() == 1);

        let names: Vec<String> = find(&dir, "*.rs", 10)
            .unwrap()
            .matches
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["a.rs", "b.rs"]);

        let replaced = replace(
            &[dir.join("src/a.rs"), dir.join("src/deep/b.rs")],
            "TODO (\\w+)",
            "DONE $1",
        )
        .unwrap();
        assert_eq!(replaced.iter().map(|r| r.replacements).sum::<u64>(), 2);
        assert_eq!(
            std::fs::read_to_string(dir.join("src/deep/b.rs")).unwrap(),
            "// DONE two\nlet x = 1;\n"
        );
        assert!(compile("(unclosed").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
