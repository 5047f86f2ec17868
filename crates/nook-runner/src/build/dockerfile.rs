//! Parsing a Dockerfile into instructions, and the word rules its arguments follow.
//!
//! [`parse`] turns the text into [`Instruction`]s with their line numbers: comments and blank lines are dropped,
//! lines ending in a backslash continue on the next line, the instruction name is case-insensitive, and the JSON
//! ("exec") form of `RUN`, `CMD`, `ENTRYPOINT` and `SHELL` is recognised. Arguments that may name variables are kept
//! as written: their values depend on the `ARG`s and `ENV`s that came before, so the builder expands them step by
//! step with [`words`], which applies Docker's rules (`$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME:+alternate}`,
//! single quotes literal, double quotes and backslashes as in a shell).
//!
//! Every mistake is reported with its line: an unknown instruction, a missing argument, a flag the instruction does
//! not take, a feature nook's builder does not have (multi-stage builds, `RUN --mount`, `ADD` of a URL).

use std::collections::BTreeMap;

/// Why a Dockerfile could not be parsed or an argument could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Dockerfile line {line}: {message}")]
pub struct DockerfileError {
    /// 1-based line of the instruction.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// The longest Dockerfile accepted.
pub const MAX_DOCKERFILE_BYTES: usize = 1 << 20;

/// A command as `RUN`, `CMD` and `ENTRYPOINT` take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Shell form: run by the image's shell (`SHELL`, `/bin/sh -c` by default).
    Shell(String),
    /// Exec form: a JSON array of strings, run as it is.
    Exec(Vec<String>),
}

/// What one instruction does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `FROM image` (the reference may name `ARG`s declared before it).
    From {
        /// The image, unexpanded.
        image: String,
    },
    /// `RUN` a command in a build sandbox.
    Run {
        /// The command.
        command: Command,
        /// The user to run it as instead of the image's (E2B's template steps name one; a Dockerfile never does).
        user: Option<String>,
    },
    /// `COPY` or `ADD` files from the build context.
    Copy {
        /// Sources relative to the context (wildcards allowed), unexpanded.
        sources: Vec<String>,
        /// Destination inside the image, unexpanded.
        dest: String,
        /// `--chown=user[:group]`, unexpanded.
        chown: Option<String>,
        /// `--chmod=octal`.
        chmod: Option<u32>,
        /// `ADD`: local tar archives are unpacked.
        add: bool,
    },
    /// `ENV`, unexpanded argument text.
    Env(String),
    /// `LABEL`, unexpanded argument text.
    Label(String),
    /// `ARG name[=default]`.
    Arg {
        /// The argument's name.
        name: String,
        /// Its default, unexpanded.
        default: Option<String>,
    },
    /// `WORKDIR path`, unexpanded.
    Workdir(String),
    /// `USER user[:group]`, unexpanded.
    User(String),
    /// `EXPOSE port[/protocol]...`, unexpanded.
    Expose(String),
    /// `CMD`.
    Cmd(Command),
    /// `ENTRYPOINT`.
    Entrypoint(Command),
    /// `SHELL ["executable", "parameters"]`.
    Shell(Vec<String>),
    /// An instruction that has no effect in nook (`VOLUME`, `STOPSIGNAL`, `HEALTHCHECK`, `MAINTAINER`): the build
    /// says so in its log.
    Ignored(&'static str),
}

/// One instruction with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based line where it starts.
    pub line: usize,
    /// The instruction as written, continuation lines joined (for logs and cache keys).
    pub text: String,
    /// What it does.
    pub step: Step,
}

/// Parses a whole Dockerfile.
pub fn parse(text: &str) -> Result<Vec<Instruction>, DockerfileError> {
    if text.len() > MAX_DOCKERFILE_BYTES {
        return Err(DockerfileError {
            line: 0,
            message: format!("the Dockerfile is larger than {MAX_DOCKERFILE_BYTES} bytes"),
        });
    }
    let mut instructions = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_some()) {
            continue; // comments, and blank lines inside a continued instruction
        }
        if trimmed.is_empty() {
            continue;
        }
        let (start, mut joined) = pending.take().unwrap_or((line, String::new()));
        match raw.trim_end().strip_suffix('\\') {
            Some(head) => {
                joined.push_str(head);
                pending = Some((start, joined));
            }
            None => {
                joined.push_str(raw);
                instructions.push(instruction(start, joined.trim())?);
            }
        }
    }
    if let Some((start, joined)) = pending {
        instructions.push(instruction(start, joined.trim())?);
    }
    check_order(&instructions)?;
    Ok(instructions)
}

/// FROM comes first (after ARGs) and only once.
fn check_order(instructions: &[Instruction]) -> Result<(), DockerfileError> {
    let mut from_seen = false;
    for instruction in instructions {
        match &instruction.step {
            Step::From { .. } if from_seen => {
                return Err(DockerfileError {
                    line: instruction.line,
                    message: "multi-stage builds (a second FROM) are not supported yet".into(),
                })
            }
            Step::From { .. } => from_seen = true,
            Step::Arg { .. } => {}
            _ if !from_seen => {
                return Err(DockerfileError {
                    line: instruction.line,
                    message: "the first instruction must be FROM (only ARG may come before it)".into(),
                })
            }
            _ => {}
        }
    }
    if !from_seen {
        return Err(DockerfileError {
            line: 0,
            message: "the Dockerfile has no FROM instruction".into(),
        });
    }
    Ok(())
}

fn instruction(line: usize, text: &str) -> Result<Instruction, DockerfileError> {
    let fail = |message: String| DockerfileError { line, message };
    let (name, rest) = text
        .split_once(char::is_whitespace)
        .map_or((text, ""), |(name, rest)| (name, rest.trim()));
    let name = name.to_ascii_uppercase();
    let needs_args = |what: &str| -> Result<(), DockerfileError> {
        if rest.is_empty() {
            Err(fail(format!("{what} needs an argument")))
        } else {
            Ok(())
        }
    };
    let (flags, args) = split_flags(rest);
    let allow_flags = |allowed: &[&str]| -> Result<(), DockerfileError> {
        match flags.iter().find(|(flag, _)| !allowed.contains(&flag.as_str())) {
            Some((flag, _)) if name == "RUN" && flag == "mount" => {
                Err(fail("RUN --mount is not supported by nook's builder".into()))
            }
            Some((flag, _)) => Err(fail(format!("{name} does not take the flag --{flag}"))),
            None => Ok(()),
        }
    };
    let step = match name.as_str() {
        "FROM" => {
            needs_args("FROM")?;
            allow_flags(&[])?;
            let parts: Vec<&str> = args.split_whitespace().collect();
            match parts.as_slice() {
                [image] => Step::From {
                    image: image.to_string(),
                },
                [image, as_word, _alias] if as_word.eq_ignore_ascii_case("as") => Step::From {
                    image: image.to_string(),
                },
                _ => {
                    return Err(fail(format!(
                        "FROM takes an image and an optional `AS name`, not {args:?}"
                    )))
                }
            }
        }
        "RUN" => {
            needs_args("RUN")?;
            allow_flags(&[])?;
            Step::Run {
                command: command(args).map_err(fail)?,
                user: None,
            }
        }
        "CMD" => {
            needs_args("CMD")?;
            Step::Cmd(command(args).map_err(fail)?)
        }
        "ENTRYPOINT" => {
            needs_args("ENTRYPOINT")?;
            Step::Entrypoint(command(args).map_err(fail)?)
        }
        "SHELL" => match command(rest).map_err(fail)? {
            Command::Exec(argv) if !argv.is_empty() => Step::Shell(argv),
            _ => return Err(fail("SHELL takes a JSON array, such as [\"/bin/bash\", \"-c\"]".into())),
        },
        "COPY" | "ADD" => {
            needs_args(&name)?;
            allow_flags(&["chown", "chmod", "from"])?;
            if flags.iter().any(|(flag, _)| flag == "from") {
                return Err(fail(format!(
                    "{name} --from needs multi-stage builds, which are not supported yet"
                )));
            }
            let mut paths = match command(args).map_err(fail)? {
                Command::Exec(paths) => paths,
                Command::Shell(text) => text.split_whitespace().map(str::to_string).collect(),
            };
            if paths.len() < 2 {
                return Err(fail(format!("{name} needs at least one source and a destination")));
            }
            let dest = paths.pop().expect("two or more");
            if name == "ADD" {
                if let Some(url) = paths.iter().find(|p| p.contains("://")) {
                    return Err(fail(format!(
                        "ADD of a URL ({url}) is not supported: build steps have no network; download it into \
                         the build context instead"
                    )));
                }
            }
            let chmod = match flags.iter().find(|(flag, _)| flag == "chmod") {
                Some((_, mode)) => Some(
                    u32::from_str_radix(mode, 8)
                        .ok()
                        .filter(|mode| *mode <= 0o7777)
                        .ok_or_else(|| fail(format!("--chmod={mode} is not an octal mode")))?,
                ),
                None => None,
            };
            Step::Copy {
                sources: paths,
                dest,
                chown: flags
                    .iter()
                    .find(|(flag, _)| flag == "chown")
                    .map(|(_, value)| value.clone()),
                chmod,
                add: name == "ADD",
            }
        }
        "ENV" => {
            needs_args("ENV")?;
            Step::Env(args.to_string())
        }
        "LABEL" => {
            needs_args("LABEL")?;
            Step::Label(args.to_string())
        }
        "ARG" => {
            needs_args("ARG")?;
            let (name, default) = match args.split_once('=') {
                Some((name, default)) => (name, Some(default.to_string())),
                None => (args, None),
            };
            if !is_variable_name(name) {
                return Err(fail(format!("ARG {name:?} is not a valid variable name")));
            }
            Step::Arg {
                name: name.to_string(),
                default,
            }
        }
        "WORKDIR" => {
            needs_args("WORKDIR")?;
            Step::Workdir(args.to_string())
        }
        "USER" => {
            needs_args("USER")?;
            Step::User(args.to_string())
        }
        "EXPOSE" => {
            needs_args("EXPOSE")?;
            Step::Expose(args.to_string())
        }
        "VOLUME" => Step::Ignored("VOLUME"),
        "STOPSIGNAL" => Step::Ignored("STOPSIGNAL"),
        "HEALTHCHECK" => Step::Ignored("HEALTHCHECK"),
        "MAINTAINER" => Step::Ignored("MAINTAINER"),
        "ONBUILD" => return Err(fail("ONBUILD is not supported".into())),
        _ => return Err(fail(format!("unknown instruction {name}"))),
    };
    Ok(Instruction {
        line,
        text: text.to_string(),
        step,
    })
}

/// Splits leading `--name=value` flags off an instruction's arguments.
fn split_flags(mut rest: &str) -> (Vec<(String, String)>, &str) {
    let mut flags = Vec::new();
    while let Some(flag) = rest.strip_prefix("--") {
        let (word, after) = flag
            .split_once(char::is_whitespace)
            .map_or((flag, ""), |(word, after)| (word, after.trim_start()));
        let (name, value) = word.split_once('=').unwrap_or((word, ""));
        flags.push((name.to_string(), value.to_string()));
        rest = after;
    }
    (flags, rest)
}

/// The exec form when the arguments are a JSON array of strings, the shell form otherwise (as Docker decides).
fn command(args: &str) -> Result<Command, String> {
    if args.starts_with('[') {
        if let Ok(argv) = serde_json::from_str::<Vec<String>>(args) {
            return Ok(Command::Exec(argv));
        }
    }
    if args.is_empty() {
        return Err("an empty command".into());
    }
    Ok(Command::Shell(args.to_string()))
}

/// Whether `name` can name an environment variable or build argument.
pub fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The variables visible to an instruction: build arguments and the image's environment, the environment winning.
pub type Variables = BTreeMap<String, String>;

/// Splits an argument text into words as Docker does for `ENV`, `LABEL`, `COPY` and the like: whitespace separates
/// words, quotes group them, variables are expanded (not inside single quotes), and a backslash escapes the next
/// character.
pub fn words(text: &str, vars: &Variables) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(format!("unterminated single quote in {text:?}")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(format!("unterminated double quote in {text:?}")),
                        },
                        Some('$') => word.push_str(&variable(&mut chars, vars)?),
                        Some(c) => word.push(c),
                        None => return Err(format!("unterminated double quote in {text:?}")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    word.push(c);
                }
            }
            '$' => {
                in_word = true;
                word.push_str(&variable(&mut chars, vars)?);
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        out.push(word);
    }
    Ok(out)
}

/// `text` as one word that [`words`] reads back unchanged: single-quoted, so no variable is expanded (for
/// instructions made by a program rather than written, such as E2B's template steps).
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Expands the variables of `text` and splits nothing: for arguments that are one value (`WORKDIR`, `USER`).
pub fn expand(text: &str, vars: &Variables) -> Result<String, String> {
    let joined = words(text, vars)?.join(" ");
    Ok(joined)
}

/// Reads a variable reference after a `$` and returns its value.
fn variable(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, vars: &Variables) -> Result<String, String> {
    if chars.peek() == Some(&'{') {
        chars.next();
        let mut inner = String::new();
        let mut depth = 1;
        for c in chars.by_ref() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            inner.push(c);
        }
        if depth != 0 {
            return Err(format!("unterminated ${{{inner}"));
        }
        let (name, modifier) = match inner.find(':') {
            Some(at) => (&inner[..at], Some(&inner[at + 1..])),
            None => (inner.as_str(), None),
        };
        if !is_variable_name(name) {
            return Err(format!("${{{inner}}} does not name a variable"));
        }
        let value = vars.get(name).filter(|v| !v.is_empty());
        return match modifier {
            None => Ok(vars.get(name).cloned().unwrap_or_default()),
            Some(word) if word.starts_with('-') => match value {
                Some(value) => Ok(value.clone()),
                None => Ok(words(&word[1..], vars)?.join(" ")),
            },
            Some(word) if word.starts_with('+') => match value {
                Some(_) => Ok(words(&word[1..], vars)?.join(" ")),
                None => Ok(String::new()),
            },
            Some(word) => Err(format!("${{{name}:{word}}}: only :- and :+ are supported")),
        };
    }
    let mut name = String::new();
    while let Some(&c) = chars.peek() {
        if c.is_ascii_alphanumeric() || c == '_' {
            name.push(c);
            chars.next();
        } else {
            break;
        }
    }
    if name.is_empty() {
        return Ok("$".into());
    }
    Ok(vars.get(&name).cloned().unwrap_or_default())
}

/// `KEY=value` pairs of `ENV` and `LABEL`, or the legacy `ENV KEY value with spaces`.
pub fn key_values(text: &str, vars: &Variables) -> Result<Vec<(String, String)>, String> {
    let parts = words(text, vars)?;
    if parts.first().is_some_and(|first| !first.contains('=')) {
        // Legacy form: the first word is the key, the rest of the text the value.
        let key = parts[0].clone();
        let value = parts[1..].join(" ");
        if parts.len() < 2 {
            return Err(format!("{key:?} has no value (write {key}=value)"));
        }
        return Ok(vec![(key, value)]);
    }
    parts
        .into_iter()
        .map(|part| {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not KEY=value"))?;
            if key.is_empty() {
                return Err(format!("{part:?} has an empty key"));
            }
            Ok((key.to_string(), value.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Variables {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn instructions_comments_and_continuations() {
        let parsed = parse(
            "# syntax is ignored\nARG BASE=base\nfrom ${BASE}\n\nRUN apt-get update && \\\n  # a comment inside\n  \
             echo done\nCMD [\"python3\", \"-m\", \"http.server\"]\nENTRYPOINT echo hi\nCOPY --chown=user:user \
             a b /dest/\nADD [\"x y\", \"/z\"]\nVOLUME /data\n",
        )
        .unwrap();
        let steps: Vec<_> = parsed.iter().map(|i| (i.line, i.step.clone())).collect();
        assert_eq!(
            steps,
            vec![
                (
                    2,
                    Step::Arg {
                        name: "BASE".into(),
                        default: Some("base".into())
                    }
                ),
                (
                    3,
                    Step::From {
                        image: "${BASE}".into()
                    }
                ),
                (
                    5,
                    Step::Run {
                        command: Command::Shell("apt-get update &&   echo done".into()),
                        user: None
                    }
                ),
                (
                    8,
                    Step::Cmd(Command::Exec(vec!["python3".into(), "-m".into(), "http.server".into()]))
                ),
                (9, Step::Entrypoint(Command::Shell("echo hi".into()))),
                (
                    10,
                    Step::Copy {
                        sources: vec!["a".into(), "b".into()],
                        dest: "/dest/".into(),
                        chown: Some("user:user".into()),
                        chmod: None,
                        add: false
                    }
                ),
                (
                    11,
                    Step::Copy {
                        sources: vec!["x y".into()],
                        dest: "/z".into(),
                        chown: None,
                        chmod: None,
                        add: true
                    }
                ),
                (12, Step::Ignored("VOLUME")),
            ]
        );
    }

    #[test]
    fn mistakes_name_their_line() {
        for (text, line, part) in [
            ("FROM a\nFRUM b\n", 2, "unknown instruction FRUM"),
            ("RUN x\n", 1, "first instruction must be FROM"),
            ("FROM a\nFROM b AS c\n", 2, "multi-stage"),
            ("FROM a\nRUN --mount=type=cache x\n", 2, "RUN --mount"),
            ("FROM a\nCOPY only\n", 2, "at least one source"),
            ("FROM a\nADD http://example.invalid/x /x\n", 2, "no network"),
            ("FROM a\nCOPY --chmod=9 a b\n", 2, "octal"),
            ("FROM a\nARG 1x\n", 2, "valid variable name"),
            ("FROM a\nCOPY --from=build a b\n", 2, "multi-stage"),
            ("FROM a\nRUN\n", 2, "needs an argument"),
            ("# nothing\n", 0, "no FROM"),
        ] {
            let error = parse(text).unwrap_err();
            assert_eq!(error.line, line, "{text:?}: {error}");
            assert!(error.to_string().contains(part), "{text:?}: {error}");
        }
    }

    #[test]
    fn words_expand_and_quote_like_docker() {
        let v = vars(&[("A", "one"), ("EMPTY", ""), ("SP", "a b")]);
        assert_eq!(
            words("$A ${A}x \"$SP\" '$A'", &v).unwrap(),
            ["one", "onex", "a b", "$A"]
        );
        assert_eq!(
            words("${MISSING:-fallback} ${EMPTY:-dflt} ${A:+alt} ${EMPTY:+alt}x", &v).unwrap(),
            ["fallback", "dflt", "alt", "x"]
        );
        assert_eq!(
            words(r#"a\ b "q\"uote" \$A cost$"#, &v).unwrap(),
            ["a b", "q\"uote", "$A", "cost$"]
        );
        assert!(words("'open", &v).is_err());
        assert!(words("${A", &v).is_err());
        assert!(words("${A:?err}", &v).is_err());
    }

    #[test]
    fn quoted_words_read_back_unchanged() {
        let v = vars(&[("A", "one")]);
        for text in ["plain", "with space", "it's $A and ${A}", "back\\slash \"dq\"", ""] {
            assert_eq!(words(&quote(text), &v).unwrap(), [text], "{text:?}");
        }
        let pair = format!("K={}", quote("a 'b' $A"));
        assert_eq!(
            key_values(&pair, &v).unwrap(),
            [("K".to_string(), "a 'b' $A".to_string())]
        );
    }

    #[test]
    fn env_and_label_pairs() {
        let v = vars(&[("HOME", "/root")]);
        assert_eq!(
            key_values("PATH=$HOME/bin:/usr/bin MSG=\"hello world\"", &v).unwrap(),
            [
                ("PATH".to_string(), "/root/bin:/usr/bin".to_string()),
                ("MSG".to_string(), "hello world".to_string())
            ]
        );
        assert_eq!(
            key_values("GREETING hello  there", &v).unwrap(),
            [("GREETING".to_string(), "hello there".to_string())]
        );
        assert!(key_values("ALONE", &v).is_err());
        assert!(key_values("A=1 =2", &v).is_err());
    }
}
