//! `.dockerignore` rules and the path wildcards that `COPY` sources use.
//!
//! A `.dockerignore` holds one pattern a line (`#` starts a comment). Patterns are paths relative to the context's
//! root, whose components are wildcards: `*` (any run of characters but `/`), `?` (one character), `[a-z]` and
//! `[!a-z]` (a class), `\` escaping the next character, and the component `**`, which matches any number of
//! directories, none included. A pattern that starts with `!` re-includes what an earlier one excluded; the last
//! pattern that matches a path decides. A path is also excluded when one of its parent directories is, as in
//! Docker, unless a later exception names it.

/// The rules of one `.dockerignore`.
#[derive(Debug, Clone, Default)]
pub struct IgnoreRules {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    components: Vec<String>,
    exception: bool,
}

impl IgnoreRules {
    /// Parses the text of a `.dockerignore`.
    pub fn parse(text: &str) -> Self {
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .filter_map(|line| {
                let (exception, pattern) = match line.strip_prefix('!') {
                    Some(rest) => (true, rest.trim()),
                    None => (false, line),
                };
                let components = clean(pattern);
                (!components.is_empty()).then_some(Rule { components, exception })
            })
            .collect();
        Self { rules }
    }

    /// Whether the context path `path` (relative, `/`-separated) is left out of the context.
    pub fn excludes(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let mut excluded = false;
        for rule in &self.rules {
            // A rule matches the path itself or, for exclusions, one of its parents.
            let matched = if rule.exception {
                match_components(&rule.components, &parts)
            } else {
                (1..=parts.len()).any(|len| match_components(&rule.components, &parts[..len]))
            };
            if matched {
                excluded = !rule.exception;
            }
        }
        excluded
    }

    /// Whether some exception could re-include a path inside the excluded directory `dir` (so the walk must still
    /// look inside it).
    pub fn may_reinclude_below(&self, dir: &str) -> bool {
        let parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
        self.rules.iter().filter(|rule| rule.exception).any(|rule| {
            // The exception's leading components must be able to match the directory's path.
            let mut prefix_ok = true;
            for (index, part) in parts.iter().enumerate() {
                match rule.components.get(index) {
                    Some(component) if component == "**" => return true,
                    Some(component) if component_matches(component, part) => {}
                    _ => {
                        prefix_ok = false;
                        break;
                    }
                }
            }
            prefix_ok && rule.components.len() > parts.len()
        })
    }
}

/// A pattern's components, with `.`, empty components and a leading `/` dropped and `..` applied.
fn clean(pattern: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in pattern.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            part => out.push(part.to_string()),
        }
    }
    out
}

/// Whether the wildcard components match exactly the path components.
pub fn match_components(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => (0..=path.len()).any(|skip| match_components(rest, &path[skip..])),
        Some((first, rest)) => match path.split_first() {
            Some((head, tail)) => component_matches(first, head) && match_components(rest, tail),
            None => false,
        },
    }
}

/// Whether one path component matches one wildcard component (`*`, `?`, `[...]`, `\`).
pub fn component_matches(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    glob(&pattern, &name)
}

fn glob(pattern: &[char], name: &[char]) -> bool {
    match pattern.first() {
        None => name.is_empty(),
        Some('*') => (0..=name.len()).any(|skip| glob(&pattern[1..], &name[skip..])),
        Some('?') => !name.is_empty() && glob(&pattern[1..], &name[1..]),
        Some('[') => match (name.first(), class(&pattern[1..])) {
            (Some(&c), Some((matches, used))) => matches(c) && glob(&pattern[1 + used..], &name[1..]),
            // An unterminated class is a literal `[`.
            (Some('['), None) => glob(&pattern[1..], &name[1..]),
            _ => false,
        },
        Some('\\') if pattern.len() > 1 => name.first() == Some(&pattern[1]) && glob(&pattern[2..], &name[1..]),
        Some(&literal) => name.first() == Some(&literal) && glob(&pattern[1..], &name[1..]),
    }
}

type ClassMatcher = Box<dyn Fn(char) -> bool>;

/// A `[...]` class after its `[`: a matcher and how many characters it used (the closing `]` included).
fn class(pattern: &[char]) -> Option<(ClassMatcher, usize)> {
    let mut index = 0;
    let negated = matches!(pattern.first(), Some('!') | Some('^'));
    if negated {
        index += 1;
    }
    let mut ranges: Vec<(char, char)> = Vec::new();
    let mut first = true;
    while index < pattern.len() {
        let c = pattern[index];
        if c == ']' && !first {
            let matcher = move |ch: char| ranges.iter().any(|(lo, hi)| *lo <= ch && ch <= *hi) != negated;
            return Some((Box::new(matcher), index + 1));
        }
        first = false;
        let lo = if c == '\\' && index + 1 < pattern.len() {
            index += 1;
            pattern[index]
        } else {
            c
        };
        if index + 2 < pattern.len() && pattern[index + 1] == '-' && pattern[index + 2] != ']' {
            ranges.push((lo, pattern[index + 2]));
            index += 3;
        } else {
            ranges.push((lo, lo));
            index += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_one_component() {
        assert!(component_matches("*.txt", "notes.txt"));
        assert!(!component_matches("*.txt", "notes.txt.bak"));
        assert!(component_matches("file?.rs", "file1.rs"));
        assert!(component_matches("[a-c]x", "bx"));
        assert!(!component_matches("[!a-c]x", "bx"));
        assert!(component_matches(r"\*", "*"));
        assert!(!component_matches(r"\*", "a"));
        assert!(component_matches("[", "["));
    }

    #[test]
    fn dockerignore_rules_as_docker_applies_them() {
        let rules = IgnoreRules::parse(
            "# build output\n/target\n*.log\n**/secret*\nnode_modules\ndocs/*.md\n!docs/README.md\n\n",
        );
        for (path, excluded) in [
            ("target", true),
            ("target/debug/app", true),
            ("src/target", false),
            ("build.log", true),
            ("src/build.log", false),
            ("secret.txt", true),
            ("a/b/secrets/key", true),
            ("node_modules/x/index.js", true),
            ("docs/guide.md", true),
            ("docs/README.md", false),
            ("docs/img/a.png", false),
            ("src/main.rs", false),
        ] {
            assert_eq!(rules.excludes(path), excluded, "{path}");
        }
    }

    #[test]
    fn exceptions_inside_excluded_directories() {
        let rules = IgnoreRules::parse("vendor\n!vendor/keep/**\n");
        assert!(rules.excludes("vendor/drop/x"));
        assert!(!rules.excludes("vendor/keep/x"));
        assert!(rules.may_reinclude_below("vendor"));
        assert!(!IgnoreRules::parse("vendor\n").may_reinclude_below("vendor"));
    }
}
