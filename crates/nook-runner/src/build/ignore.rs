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

/// Whether the wildcard components match exactly the path components. `**` is to components what `*` is to
/// characters, so both levels use the same linear-time matcher ([`wildcard_match`]): no pattern, however many
/// wildcards it has, can make matching take more than (pattern length × path length) steps.
pub fn match_components(pattern: &[String], path: &[&str]) -> bool {
    wildcard_match(
        pattern,
        path,
        |component| component == "**",
        |component, name| component_matches(component, name),
    )
}

/// Whether one path component matches one wildcard component (`*`, `?`, `[...]`, `\`).
pub fn component_matches(pattern: &str, name: &str) -> bool {
    let tokens = tokens(pattern);
    let name: Vec<char> = name.chars().collect();
    wildcard_match(
        &tokens,
        &name,
        |token| matches!(token, Token::Star),
        |token, c| token.matches(*c),
    )
}

/// Matches `items` against `pattern`, in which `is_star` elements match any run of items (none included) and
/// every other element matches one item when `matches` says so. Greedy, going back only to the last star: each star
/// is retried from one item further at most once per item, so the work is bounded by the product of the lengths.
fn wildcard_match<P, I>(
    pattern: &[P],
    items: &[I],
    is_star: impl Fn(&P) -> bool,
    matches: impl Fn(&P, &I) -> bool,
) -> bool {
    let (mut p, mut i) = (0, 0);
    // Where the last star was, and the first item it has not taken yet.
    let mut resume: Option<(usize, usize)> = None;
    while i < items.len() {
        if p < pattern.len() && is_star(&pattern[p]) {
            resume = Some((p, i));
            p += 1;
        } else if p < pattern.len() && matches(&pattern[p], &items[i]) {
            p += 1;
            i += 1;
        } else if let Some((star, taken)) = resume {
            // Let the last star take one more item and try again after it.
            resume = Some((star, taken + 1));
            p = star + 1;
            i = taken + 1;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(is_star)
}

/// One element of a wildcard component.
enum Token {
    /// `*`: any run of characters.
    Star,
    /// `?`: one character.
    Any,
    /// A character as written (or escaped with `\`).
    Literal(char),
    /// `[...]`: one character in (or, negated, not in) the ranges.
    Class { negated: bool, ranges: Vec<(char, char)> },
}

impl Token {
    fn matches(&self, c: char) -> bool {
        match self {
            Token::Star | Token::Any => true,
            Token::Literal(literal) => *literal == c,
            Token::Class { negated, ranges } => ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *negated,
        }
    }
}

/// The tokens of a wildcard component; an unterminated `[` is a literal `[`.
fn tokens(pattern: &str) -> Vec<Token> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = Vec::with_capacity(chars.len());
    let mut at = 0;
    while at < chars.len() {
        match chars[at] {
            '*' => out.push(Token::Star),
            '?' => out.push(Token::Any),
            '\\' if at + 1 < chars.len() => {
                at += 1;
                out.push(Token::Literal(chars[at]));
            }
            '[' => match class(&chars[at + 1..]) {
                Some((token, used)) => {
                    out.push(token);
                    at += used;
                }
                None => out.push(Token::Literal('[')),
            },
            literal => out.push(Token::Literal(literal)),
        }
        at += 1;
    }
    out
}

/// A `[...]` class after its `[`: the token and how many characters it used (the closing `]` included).
fn class(pattern: &[char]) -> Option<(Token, usize)> {
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
            return Some((Token::Class { negated, ranges }, index + 1));
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
    fn hostile_patterns_match_in_linear_time() {
        let name = "a".repeat(255);
        let started = std::time::Instant::now();
        assert!(!component_matches(&"*a".repeat(40), &format!("{name}b")));
        assert!(!component_matches("*a*a*a*a*a*a*a*a*a*a*a*a*c", &name));
        let deep: Vec<&str> = vec!["d"; 200];
        let pattern: Vec<String> = std::iter::repeat_n("**".to_string(), 30)
            .chain(["x".to_string()])
            .collect();
        assert!(!match_components(&pattern, &deep));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(match_components(
            &["**".into(), "b".into(), "**".into()],
            &["a", "b", "c"]
        ));
        assert!(component_matches("*.tar.*", "x.tar.gz"));
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
