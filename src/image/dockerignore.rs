//! `.dockerignore` rules as `docker build` applies them.
//!
//! The daemon hands the Engine API a ready-made context tar, so deciding
//! what goes into it is our job rather than the docker CLI's, and users
//! expect exactly what `docker build` would have sent. Reading follows
//! moby's `ignorefile.ReadAll`, matching follows moby's `patternmatcher`
//! (as walked by BuildKit's fsutil and the CLI's tar writer, which carry
//! each directory's results down to its children), and the decision to skip
//! an excluded directory follows BuildKit's fsutil, the sender behind
//! today's `docker build`.
//!
//! Where moby's translation to a regular expression is an accident rather
//! than a rule, this module follows `filepath.Match`, the syntax moby
//! validates patterns against:
//! - `\x` is the literal `x`; moby passes it to Go's regexp, where `\d` is
//!   a digit class and `\x` is a syntax error.
//! - Inside `[...]` every character is literal; moby also rewrites `*` and
//!   `?` there, producing a different class.
//! - A reversed range such as `[z-a]` is a parse error; moby accepts it and
//!   fails on the first path it matches, which fails the build anyway.
//!
//! Only `^` negates a class (`[!a]` is `!` or `a`), as in `filepath.Match`.

use regex::Regex;

/// A line of a `.dockerignore` that is not a valid pattern. Docker refuses
/// the whole build for one, so no line is skipped quietly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(".dockerignore line {line}: invalid pattern {pattern:?}: {reason}")]
pub struct PatternError {
    /// 1-based line number.
    pub line: usize,
    /// The line as written, without surrounding whitespace.
    pub pattern: String,
    pub reason: &'static str,
}

/// The parsed rules of one `.dockerignore`.
#[derive(Debug, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
    /// fsutil's `!onlyPrefixExcludeExceptions`: once an exception holds a
    /// wildcard it could re-include something under any excluded directory.
    wildcard_exception: bool,
}

/// Per-pattern results for a directory, handed to its entries so that a
/// pattern matching the directory also covers everything below it.
#[derive(Debug, Clone, Default)]
pub struct MatchState(Vec<bool>);

#[derive(Debug)]
struct Pattern {
    /// Cleaned, without the leading `!`.
    text: String,
    exclusion: bool,
    matcher: Matcher,
}

/// moby's four match types. They are not interchangeable with the regular
/// expression: `**file` as a suffix match also matches `xfile`.
#[derive(Debug)]
enum Matcher {
    Exact,
    Prefix(String),
    Suffix(String),
    Regex(Regex),
}

const UNTERMINATED_CLASS: &str = "`[` without a closing `]`";

impl DockerIgnore {
    /// Parses the contents of a `.dockerignore`.
    ///
    /// A pattern of `.` (or `./`) is accepted and, as in Docker, matches
    /// nothing: it could only match the context root, which is never
    /// excluded.
    pub fn parse(contents: &str) -> Result<DockerIgnore, PatternError> {
        let mut ignore = DockerIgnore::default();
        for (line, written, read) in read_lines(contents) {
            let error = |reason| PatternError {
                line,
                pattern: written.to_owned(),
                reason,
            };
            // patternmatcher.New cleans again, with the `!` still attached,
            // so `!../../x` really is the inclusion pattern `x` in Docker.
            let cleaned = clean(&read);
            let (exclusion, text) = match cleaned.strip_prefix('!') {
                Some("") => return Err(error("`!` must be followed by a pattern")),
                Some(rest) => (true, rest.to_owned()),
                None => (false, cleaned),
            };
            let matcher = compile(&text).map_err(error)?;
            if exclusion && trim_trailing_glob(&text).contains(['*', '[', ']', '?', '^', '\\']) {
                ignore.wildcard_exception = true;
            }
            ignore.patterns.push(Pattern {
                text,
                exclusion,
                matcher,
            });
        }
        Ok(ignore)
    }

    /// Re-includes one path literally, as the docker CLI does for the
    /// Dockerfile and the `.dockerignore`: the daemon needs both even when a
    /// pattern excludes them. Glob characters in `rel_path` are not special.
    pub fn force_include(&mut self, rel_path: &str) {
        self.patterns.push(Pattern {
            text: clean(rel_path),
            exclusion: true,
            matcher: Matcher::Exact,
        });
    }

    /// Whether `rel_path`, `/`-separated and relative to the context root,
    /// stays out of the context. The path is cleaned first; the root itself
    /// is never excluded.
    pub fn is_excluded(&self, rel_path: &str) -> bool {
        let path = clean(rel_path);
        if path == "." {
            return false;
        }
        let mut state = MatchState::default();
        if let Some(slash) = path.rfind('/') {
            let parent = clean(&path[..=slash]);
            let ends = parent.match_indices('/').map(|(i, _)| i).chain([parent.len()]);
            for end in ends {
                state = self.match_entry(&parent[..end], &state).1;
            }
        }
        self.match_entry(&path, &state).0
    }

    /// Matches one entry of a walk: `rel_path` is its clean path from the
    /// root, `parent` the state returned for its directory (the default for
    /// entries of the root). Returns whether the entry is excluded and the
    /// state to hand to its own entries if it is a directory.
    pub fn match_entry(&self, rel_path: &str, parent: &MatchState) -> (bool, MatchState) {
        let mut excluded = false;
        let mut state = vec![false; self.patterns.len()];
        for (i, pattern) in self.patterns.iter().enumerate() {
            let mut matched = parent.0.get(i).copied().unwrap_or(false);
            if !matched {
                // An inclusion cannot change an excluded path, nor an
                // exclusion an included one; moby does not even evaluate them,
                // which is observable through the state passed down.
                if pattern.exclusion != excluded {
                    continue;
                }
                matched = pattern.matches(rel_path);
            }
            state[i] = matched;
            if matched {
                excluded = !pattern.exclusion;
            }
        }
        (excluded, MatchState(state))
    }

    /// Whether a walker may leave out everything below the excluded
    /// directory `rel_dir` without listing it. As in BuildKit, it must
    /// descend when an exception could re-include something inside: any
    /// exception with a wildcard, or one naming a path under `rel_dir`.
    pub fn can_skip_excluded_dir(&self, rel_dir: &str) -> bool {
        if self.wildcard_exception {
            return false;
        }
        !self.patterns.iter().filter(|p| p.exclusion).any(|p| {
            trim_trailing_glob(&p.text)
                .strip_prefix(rel_dir)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        match &self.matcher {
            Matcher::Exact => path == self.text,
            Matcher::Prefix(prefix) => path.starts_with(prefix.as_str()),
            Matcher::Suffix(suffix) => path.ends_with(suffix.as_str()) || suffix.strip_prefix('/') == Some(path),
            Matcher::Regex(regex) => regex.is_match(path),
        }
    }
}

/// `ignorefile.ReadAll`: each pattern with its 1-based line number, the
/// line as written (for errors) and the pattern as moby hands it to the
/// matcher.
fn read_lines(contents: &str) -> impl Iterator<Item = (usize, &str, String)> {
    let contents = contents.strip_prefix('\u{feff}').unwrap_or(contents);
    contents.lines().enumerate().filter_map(|(i, line)| {
        // The comment test comes before trimming: `  # x` is a pattern.
        if line.starts_with('#') {
            return None;
        }
        let written = line.trim();
        if written.is_empty() {
            return None;
        }
        let (invert, rest) = match written.strip_prefix('!') {
            Some(rest) => (true, rest.trim()),
            None => (false, written),
        };
        let mut pattern = if rest.is_empty() { String::new() } else { clean(rest) };
        if pattern.len() > 1 && pattern.starts_with('/') {
            pattern.remove(0);
        }
        if invert {
            pattern.insert(0, '!');
        }
        Some((i + 1, written, pattern))
    })
}

/// Go's `path.Clean`, which moby applies to patterns: patterns are compared
/// textually, so `a//b/./c/..` has to become `a/b` the same way.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            _ => parts.push(part),
        }
    }
    let joined = parts.join("/");
    if rooted {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".to_owned()
    } else {
        joined
    }
}

/// fsutil's `patternWithoutTrailingGlob`: `dir/**` and `dir/*` re-include
/// things under `dir` without making every excluded directory suspect.
fn trim_trailing_glob(text: &str) -> &str {
    let text = text.strip_suffix("/**").unwrap_or(text);
    text.strip_suffix("/*").unwrap_or(text)
}

/// moby's `Pattern.compile`, validating with `filepath.Match`'s syntax on
/// the way. The match type is decided exactly as moby decides it, since it
/// changes what matches.
fn compile(pattern: &str) -> Result<Matcher, &'static str> {
    #[derive(PartialEq)]
    enum Kind {
        Exact,
        Prefix,
        Suffix,
        Regex,
    }

    let chars: Vec<char> = pattern.chars().collect();
    let mut regex = String::from("^");
    let mut kind = Kind::Exact;
    let mut i = 0;
    while i < chars.len() {
        let first = i == 0;
        let c = chars[i];
        i += 1;
        match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i < chars.len() {
                    regex.push_str("(.*/)?");
                    kind = Kind::Regex;
                } else if kind == Kind::Exact {
                    kind = Kind::Prefix;
                } else {
                    regex.push_str(".*");
                    kind = Kind::Regex;
                }
                if first {
                    kind = Kind::Suffix;
                }
            }
            '*' => {
                regex.push_str("[^/]*");
                kind = Kind::Regex;
            }
            '?' => {
                regex.push_str("[^/]");
                kind = Kind::Regex;
            }
            '\\' => {
                let escaped = *chars.get(i).ok_or("`\\` at the end of the pattern")?;
                i += 1;
                push_literal(&mut regex, escaped);
                kind = Kind::Regex;
            }
            '[' => {
                i = push_class(&mut regex, &chars, i)?;
                kind = Kind::Regex;
            }
            ']' => {
                push_literal(&mut regex, c);
                kind = Kind::Regex;
            }
            _ => push_literal(&mut regex, c),
        }
    }
    Ok(match kind {
        Kind::Exact => Matcher::Exact,
        // Cleaned patterns never end in `/`, so a prefix pattern ends in `**`
        // and a suffix pattern starts with it.
        Kind::Prefix => Matcher::Prefix(pattern[..pattern.len() - 2].to_owned()),
        Kind::Suffix => Matcher::Suffix(pattern[2..].to_owned()),
        Kind::Regex => {
            regex.push('$');
            Matcher::Regex(Regex::new(&regex).map_err(|_| "too complex to match")?)
        }
    })
}

fn push_literal(regex: &mut String, c: char) {
    regex.push_str(&regex::escape(c.encode_utf8(&mut [0; 4])));
}

/// Translates the class whose `[` precedes `chars[start]`, returning the
/// index after its `]`. The rules are `filepath.Match`'s: `-` and `]` must be
/// escaped except as a range's dash and the closing bracket, and a class is
/// never empty, so `[]a]` is an error rather than a class holding `]`.
fn push_class(regex: &mut String, chars: &[char], start: usize) -> Result<usize, &'static str> {
    let mut i = start;
    regex.push('[');
    if chars.get(i) == Some(&'^') {
        regex.push('^');
        i += 1;
    }
    let mut ranges = 0;
    loop {
        if chars.get(i) == Some(&']') && ranges > 0 {
            regex.push(']');
            return Ok(i + 1);
        }
        let lo = class_char(chars, &mut i)?;
        let mut hi = lo;
        if chars.get(i) == Some(&'-') {
            i += 1;
            hi = class_char(chars, &mut i)?;
        }
        if lo > hi {
            return Err("character range is out of order");
        }
        // Hex escapes keep Rust's class syntax (`&&`, `--`, nested `[`) out
        // of the way of characters that are plain in Go's.
        regex.push_str(&format!("\\x{{{:x}}}-\\x{{{:x}}}", lo as u32, hi as u32));
        ranges += 1;
    }
}

fn class_char(chars: &[char], i: &mut usize) -> Result<char, &'static str> {
    let c = match chars.get(*i) {
        None => return Err(UNTERMINATED_CLASS),
        Some('-' | ']') => return Err("`-` or `]` must be escaped inside `[...]`"),
        Some('\\') => {
            *i += 1;
            *chars.get(*i).ok_or(UNTERMINATED_CLASS)?
        }
        Some(&c) => c,
    };
    *i += 1;
    if *i == chars.len() {
        return Err(UNTERMINATED_CLASS);
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(pattern: &str) -> Pattern {
        let mut ignore = DockerIgnore::parse(pattern).unwrap_or_else(|e| panic!("{pattern:?}: {e}"));
        assert_eq!(ignore.patterns.len(), 1, "{pattern:?}");
        ignore.patterns.remove(0)
    }

    fn excluded(patterns: &[&str], path: &str) -> bool {
        DockerIgnore::parse(&patterns.join("\n")).unwrap().is_excluded(path)
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Want {
        Fail,
        /// Matches the path itself.
        Exact,
        /// Matches only through a parent directory.
        Inexact,
    }
    use Want::*;

    /// moby patternmatcher `TestMatches`.
    const MATCHES: &[(&str, &str, Want)] = &[
        ("**", "file", Exact),
        ("**", "file/", Exact),
        ("**/", "file", Exact),
        ("**/", "file/", Exact),
        ("**", "/", Exact),
        ("**/", "/", Exact),
        ("**", "dir/file", Exact),
        ("**/", "dir/file", Exact),
        ("**", "dir/file/", Exact),
        ("**/", "dir/file/", Exact),
        ("**/**", "dir/file", Exact),
        ("**/**", "dir/file/", Exact),
        ("dir/**", "dir/file", Exact),
        ("dir/**", "dir/file/", Exact),
        ("dir/**", "dir/dir2/file", Exact),
        ("dir/**", "dir/dir2/file/", Exact),
        ("**/dir", "dir", Exact),
        ("**/dir", "dir/file", Inexact),
        ("**/dir2/*", "dir/dir2/file", Exact),
        ("**/dir2/*", "dir/dir2/file/", Inexact),
        ("**/dir2/**", "dir/dir2/dir3/file", Exact),
        ("**/dir2/**", "dir/dir2/dir3/file/", Exact),
        ("**file", "file", Exact),
        ("**file", "dir/file", Exact),
        ("**/file", "dir/file", Exact),
        ("**file", "dir/dir/file", Exact),
        ("**/file", "dir/dir/file", Exact),
        ("**/file*", "dir/dir/file", Exact),
        ("**/file*", "dir/dir/file.txt", Exact),
        ("**/file*txt", "dir/dir/file.txt", Exact),
        ("**/file*.txt", "dir/dir/file.txt", Exact),
        ("**/file*.txt*", "dir/dir/file.txt", Exact),
        ("**/**/*.txt", "dir/dir/file.txt", Exact),
        ("**/**/*.txt2", "dir/dir/file.txt", Fail),
        ("**/*.txt", "file.txt", Exact),
        ("**/**/*.txt", "file.txt", Exact),
        ("a**/*.txt", "a/file.txt", Exact),
        ("a**/*.txt", "a/dir/file.txt", Exact),
        ("a**/*.txt", "a/dir/dir/file.txt", Exact),
        ("a/*.txt", "a/dir/file.txt", Fail),
        ("a/*.txt", "a/file.txt", Exact),
        ("a/*.txt**", "a/file.txt", Exact),
        ("a[b-d]e", "ae", Fail),
        ("a[b-d]e", "ace", Exact),
        ("a[b-d]e", "aae", Fail),
        ("a[^b-d]e", "aze", Exact),
        (".*", ".foo", Exact),
        (".*", "foo", Fail),
        ("abc.def", "abcdef", Fail),
        ("abc.def", "abc.def", Exact),
        ("abc.def", "abcZdef", Fail),
        ("abc?def", "abcZdef", Exact),
        ("abc?def", "abcdef", Fail),
        ("**/foo/bar", "foo/bar", Exact),
        ("**/foo/bar", "dir/foo/bar", Exact),
        ("**/foo/bar", "dir/dir2/foo/bar", Exact),
        ("abc/**", "abc", Fail),
        ("abc/**", "abc/def", Exact),
        ("abc/**", "abc/def/ghi", Exact),
        ("**/.foo", ".foo", Exact),
        ("**/.foo", "bar.foo", Fail),
        ("a(b)c/def", "a(b)c/def", Exact),
        ("a(b)c/def", "a(b)c/xyz", Fail),
        ("a.|)$(}+{bc", "a.|)$(}+{bc", Exact),
        (
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            Exact,
        ),
        (
            "dist/*.whl",
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            Exact,
        ),
        ("a\\\\", "a\\", Exact),
        ("a\\*b", "a*b", Exact),
    ];

    #[test]
    fn moby_matches_table() {
        for &(pattern, text, want) in MATCHES {
            assert_eq!(
                single(pattern).matches(text),
                want == Exact,
                "exact match of {pattern:?} against {text:?}"
            );
            assert_eq!(excluded(&[pattern], text), want != Fail, "{pattern:?} against {text:?}");
        }
    }

    /// moby patternmatcher `TestMatches`, several patterns at once.
    #[test]
    fn moby_multi_pattern_table() {
        let whl = "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl";
        let cases: &[(&[&str], &str, bool)] = &[
            (&["**", "!util/docker/web"], "util/docker/web/foo", false),
            (
                &["**", "!util/docker/web", "util/docker/web/foo"],
                "util/docker/web/foo",
                true,
            ),
            (&["**", &format!("!{whl}")], whl, false),
            (&["**", "!dist/*.whl"], whl, false),
        ];
        for &(patterns, text, want) in cases {
            assert_eq!(excluded(patterns, text), want, "{patterns:?} against {text:?}");
        }
    }

    /// moby patternmatcher `TestMatch`, itself taken from Go's
    /// `filepath.Match` tests; `None` is a pattern moby rejects.
    #[test]
    fn filepath_match_table() {
        let cases: &[(&str, &str, Option<bool>)] = &[
            ("abc", "abc", Some(true)),
            ("*", "abc", Some(true)),
            ("*c", "abc", Some(true)),
            ("a*", "a", Some(true)),
            ("a*", "abc", Some(true)),
            ("a*", "ab/c", Some(true)),
            ("a*/b", "abc/b", Some(true)),
            ("a*/b", "a/c/b", Some(false)),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", Some(true)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Some(true)),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Some(false)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Some(false)),
            ("a*b?c*x", "abxbbxdbxebxczzx", Some(true)),
            ("a*b?c*x", "abxbbxdbxebxczzy", Some(false)),
            ("ab[c]", "abc", Some(true)),
            ("ab[b-d]", "abc", Some(true)),
            ("ab[e-g]", "abc", Some(false)),
            ("ab[^c]", "abc", Some(false)),
            ("ab[^b-d]", "abc", Some(false)),
            ("ab[^e-g]", "abc", Some(true)),
            ("a\\*b", "a*b", Some(true)),
            ("a\\*b", "ab", Some(false)),
            ("a?b", "a☺b", Some(true)),
            ("a[^a]b", "a☺b", Some(true)),
            ("a???b", "a☺b", Some(false)),
            ("a[^a][^a][^a]b", "a☺b", Some(false)),
            ("[a-ζ]*", "α", Some(true)),
            ("*[a-ζ]", "A", Some(false)),
            ("a?b", "a/b", Some(false)),
            ("a*b", "a/b", Some(false)),
            ("[\\]a]", "]", Some(true)),
            ("[\\-]", "-", Some(true)),
            ("[x\\-]", "x", Some(true)),
            ("[x\\-]", "-", Some(true)),
            ("[x\\-]", "z", Some(false)),
            ("[\\-x]", "x", Some(true)),
            ("[\\-x]", "-", Some(true)),
            ("[\\-x]", "a", Some(false)),
            ("[]a]", "]", None),
            ("[-]", "-", None),
            ("[x-]", "x", None),
            ("[-x]", "x", None),
            ("\\", "a", None),
            ("[a-b-c]", "a", None),
            ("[", "a", None),
            ("[^", "a", None),
            ("[^bc", "a", None),
            ("a[", "a", None),
            ("*x", "xxx", Some(true)),
        ];
        for &(pattern, text, want) in cases {
            match (DockerIgnore::parse(pattern), want) {
                (Ok(ignore), Some(want)) => {
                    assert_eq!(ignore.is_excluded(text), want, "{pattern:?} against {text:?}")
                }
                (Err(e), None) => assert_eq!(e.pattern, pattern),
                (result, _) => panic!("{pattern:?}: unexpected {result:?}"),
            }
        }
    }

    /// moby patternmatcher `TestCompile`: the match type changes results
    /// (`**file` as a suffix also matches `xfile`), so it must agree.
    #[test]
    fn match_types_follow_moby() {
        let cases = [
            ("*", "regex"),
            ("file*", "regex"),
            ("a*/b", "regex"),
            ("**", "suffix"),
            ("**/**", "regex"),
            ("dir/**", "prefix"),
            ("**/dir", "suffix"),
            ("**/dir2/*", "regex"),
            ("**file", "suffix"),
            ("**/**/*.txt", "regex"),
            ("a[b-d]e", "regex"),
            (".*", "regex"),
            ("abc.def", "exact"),
            ("abc?def", "regex"),
            ("**/foo/bar", "suffix"),
            ("a(b)c/def", "exact"),
            ("a.|)$(}+{bc", "exact"),
        ];
        for (pattern, want) in cases {
            let kind = match single(pattern).matcher {
                Matcher::Exact => "exact",
                Matcher::Prefix(_) => "prefix",
                Matcher::Suffix(_) => "suffix",
                Matcher::Regex(_) => "regex",
            };
            assert_eq!(kind, want, "{pattern:?}");
        }
        assert!(single("**file").matches("xfile"));
        assert!(!single("**/file").matches("xfile"));
    }

    /// moby patternmatcher's single-test functions.
    #[test]
    fn moby_single_cases() {
        assert!(excluded(&["*"], "fileutils.go"), "TestWildcardMatches");
        assert!(excluded(&["*.go"], "fileutils.go"), "TestPatternMatches");
        assert!(
            excluded(&["!fileutils.go", "*.go"], "fileutils.go"),
            "TestExclusionPatternMatchesPatternBefore"
        );
        assert!(
            !excluded(&["docs", "!docs/README.md"], "docs/README.md"),
            "TestPatternMatchesFolderExclusions"
        );
        assert!(
            !excluded(&["docs/", "!docs/README.md"], "docs/README.md"),
            "TestPatternMatchesFolderWithSlashExclusions"
        );
        assert!(
            !excluded(&["docs/*", "!docs/README.md"], "docs/README.md"),
            "TestPatternMatchesFolderWildcardExclusions"
        );
        assert!(
            !excluded(&["*.go", "!fileutils.go"], "fileutils.go"),
            "TestExclusionPatternMatchesPatternAfter"
        );
        assert!(!excluded(&["*.go"], "."), "TestExclusionPatternMatchesWholeDirectory");
        assert!(!excluded(&[], "/any/path/there"), "TestMatchesWithNoPatterns");
        assert!(DockerIgnore::parse("[").is_err(), "TestMatchesWithMalformedPatterns");
        assert!(DockerIgnore::parse("!").is_err(), "TestSingleExclamationError");
        assert!(excluded(&["  !docs/README.md", "docs"], "docs/README.md"));
        assert!(!excluded(&["docs", "!docs/README.md  "], "docs/README.md"));
    }

    #[test]
    fn parent_directory_matches_cover_descendants() {
        assert!(excluded(&["foo"], "foo/bar/baz.txt"));
        assert!(excluded(&["*.d"], "conf.d/a/b"));
        assert!(excluded(&["a/b"], "a/b/c/d"));
        assert!(!excluded(&["a/b"], "a/bc"));
        assert!(!excluded(&["foo"], "x/foo/bar"));
        assert!(excluded(&["**/foo"], "x/foo/bar"));
        assert!(!excluded(&["foo", "!foo/bar"], "foo/bar/baz.txt"));
        assert!(excluded(&["foo", "!foo/bar", "foo/bar/*.txt"], "foo/bar/baz.txt"));
    }

    /// moby issue 52203: `[Local-Only]` holds the reversed range `l-O`.
    #[test]
    fn reversed_range_is_rejected_when_parsing() {
        let err = DockerIgnore::parse("ok\n[Local-Only]/\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert_eq!(err.pattern, "[Local-Only]/");
        assert!(err.to_string().contains("[Local-Only]/"), "{err}");
    }

    #[test]
    fn errors_name_the_line_and_pattern() {
        let err = DockerIgnore::parse("# c\n\nfoo\n  src/[abc  \n").unwrap_err();
        assert_eq!(
            err,
            PatternError {
                line: 4,
                pattern: "src/[abc".into(),
                reason: UNTERMINATED_CLASS,
            }
        );
        assert_eq!(DockerIgnore::parse("a\n ! \n").unwrap_err().line, 2);
    }

    /// Where this module follows `filepath.Match` rather than moby's regexp.
    #[test]
    fn escapes_and_classes_are_literal() {
        assert!(excluded(&["a\\d"], "ad"));
        assert!(!excluded(&["a\\d"], "a1"));
        assert!(excluded(&["x[*]"], "x*"));
        assert!(!excluded(&["x[*]"], "xa"));
        assert!(excluded(&["[!a]"], "!"));
        assert!(!excluded(&["[!a]"], "b"));
        assert!(excluded(&["[&&]"], "&"));
        assert!(
            excluded(&["a[^b]c"], "a/c"),
            "a class may match the separator, as in Go"
        );
    }

    /// moby ignorefile `TestReadAll`.
    #[test]
    fn reader_follows_ignorefile() {
        let content = "test1\n/test2\n/a/file/here\n\nlastfile\n# this is a comment\n! /inverted/abs/path\n!\n! ";
        let read: Vec<String> = read_lines(content).map(|(_, _, p)| p).collect();
        assert_eq!(
            read,
            [
                "test1",
                "test2",
                "a/file/here",
                "lastfile",
                "!inverted/abs/path",
                "!",
                "!"
            ]
        );
    }

    #[test]
    fn reader_cleans_and_strips() {
        let content = "\u{feff}# bom then comment\r\n./a//b/./c/..\r\n  # spaced\n!./keep/\n/\n!x/../../y\n\tdir/ \n";
        let read: Vec<(usize, String)> = read_lines(content).map(|(n, _, p)| (n, p)).collect();
        let want = [
            (2, "a/b"),
            (3, "# spaced"),
            (4, "!keep"),
            (5, "/"),
            (6, "!../y"),
            (7, "dir"),
        ];
        assert_eq!(read, want.map(|(n, p)| (n, p.to_owned())));
        assert!(excluded(&["  # spaced"], "# spaced"));
        assert!(!excluded(&["# comment"], "# comment"));
        assert!(excluded(&["/foo/bar"], "foo/bar"));
        assert!(excluded(&["\u{feff}/foo"], "foo"));
        assert!(!excluded(&["/"], "foo"));
    }

    /// `!../../x` is `!` glued to `../../x`; the second clean collapses it to
    /// the inclusion pattern `x`, in Docker as here.
    #[test]
    fn second_clean_is_bug_compatible() {
        let ignore = DockerIgnore::parse("!../../x").unwrap();
        assert!(!ignore.patterns[0].exclusion);
        assert!(ignore.is_excluded("x"));
    }

    #[test]
    fn dot_matches_nothing() {
        for pattern in [".", "./", "/."] {
            assert!(!excluded(&[pattern], "a"), "{pattern:?}");
            assert!(!excluded(&[pattern], "a/b"), "{pattern:?}");
            assert!(!excluded(&[pattern], "."), "{pattern:?}");
        }
    }

    #[test]
    fn force_include_wins_and_is_literal() {
        let mut ignore = DockerIgnore::parse("*\n").unwrap();
        ignore.force_include("./build/Docker[file]");
        assert!(ignore.is_excluded("build"));
        assert!(!ignore.is_excluded("build/Docker[file]"));
        assert!(ignore.is_excluded("build/Dockerf"));
        assert!(!ignore.can_skip_excluded_dir("build"));
        assert!(ignore.can_skip_excluded_dir("buil"));
        assert!(ignore.can_skip_excluded_dir("other"));
    }

    #[test]
    fn skipping_follows_fsutil() {
        let ignore = DockerIgnore::parse("node_modules\n").unwrap();
        assert!(ignore.can_skip_excluded_dir("node_modules"));

        let ignore = DockerIgnore::parse("node_modules\n!node_modules/a/keep.txt\n").unwrap();
        assert!(!ignore.can_skip_excluded_dir("node_modules"));
        assert!(!ignore.can_skip_excluded_dir("node_modules/a"));
        assert!(ignore.can_skip_excluded_dir("node_modules/b"));
        assert!(ignore.can_skip_excluded_dir("node_module"));

        let ignore = DockerIgnore::parse("vendor\n!vendor/keep/**\n").unwrap();
        assert!(!ignore.can_skip_excluded_dir("vendor/keep"));
        assert!(ignore.can_skip_excluded_dir("vendor/other"));

        let ignore = DockerIgnore::parse("*\n!**/*.go\n").unwrap();
        assert!(!ignore.can_skip_excluded_dir("anything"));
    }

    /// The walk state is moby's `MatchesUsingParentResults`: a pattern skipped
    /// for a directory is not re-checked against it for its entries, unlike
    /// the stateless `MatchesOrParentMatches`.
    #[test]
    fn parent_state_matches_the_walkers() {
        assert!(excluded(&["P/c", "!P"], "P/c"));
        let ignore = DockerIgnore::parse("P/c\n!P\n").unwrap();
        let (dir_excluded, state) = ignore.match_entry("P", &MatchState::default());
        assert!(!dir_excluded);
        assert!(ignore.match_entry("P/c", &state).0);
    }
}
