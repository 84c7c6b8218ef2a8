//! Secrets of a job (git credentials, registry password, environment
//! values) must never leave the process in clear text, whichever tool echoes
//! them back. Every line shipped to the dashboard and every error message
//! goes through a [`Redactor`] built from the job.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;

use crate::envfile;

/// Text shorter than this is not masked: masking `1` or `true` everywhere in
/// a build log would destroy the log and protect nothing.
const MIN_SECRET_LEN: usize = 4;

const MASK: &str = "***";

/// A string that must not be printed: `Debug` and `Display` show `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

/// Replaces every known secret in a text by `***`, in one pass over the
/// text whatever the number of secrets (Aho-Corasick, longest match first,
/// so a secret containing another is masked whole). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    matcher: Option<Arc<AhoCorasick>>,
}

impl Redactor {
    /// Masks each secret as it is and in the forms tools echo it back in:
    /// percent-encoded (inside a URL), escaped as the builder writes it to
    /// `.env`, base64-encoded, and each of its lines.
    pub fn new<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut forms = HashSet::new();
        for secret in secrets {
            let secret = secret.as_ref();
            if secret.len() < MIN_SECRET_LEN {
                continue;
            }
            forms.insert(secret.to_owned());
            forms.insert(percent_encode(secret));
            forms.insert(envfile::escaped(secret));
            forms.insert(base64::engine::general_purpose::STANDARD.encode(secret));
            forms.extend(secret.lines().filter(|l| l.len() >= MIN_SECRET_LEN).map(str::to_owned));
        }
        if forms.is_empty() {
            return Redactor::default();
        }
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(forms)
            .expect("an automaton of plain strings is always built");
        Redactor {
            matcher: Some(Arc::new(matcher)),
        }
    }

    pub fn redact(&self, text: &str) -> String {
        match &self.matcher {
            None => text.to_owned(),
            Some(matcher) => {
                let mut out = String::with_capacity(text.len());
                matcher.replace_all_with(text, &mut out, |_, _, out| {
                    out.push_str(MASK);
                    true
                });
                out
            }
        }
    }
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_occurrence_and_encoded_forms() {
        let r = Redactor::new(["s3cr3t/pass", "gho_abcdef"]);
        assert_eq!(
            r.redact("https://u:s3cr3t%2Fpass@host gho_abcdef and gho_abcdef s3cr3t/pass"),
            "https://u:***@host *** and *** ***"
        );
    }

    #[test]
    fn short_values_are_left_alone() {
        let r = Redactor::new(["1", "abc"]);
        assert_eq!(r.redact("1 abc"), "1 abc");
    }

    #[test]
    fn multi_line_secret_is_masked_line_by_line_too() {
        let r = Redactor::new(["-----BEGIN KEY-----\nMIIEvQIBADANBg\n-----END KEY-----"]);
        assert_eq!(r.redact("line MIIEvQIBADANBg here"), "line *** here");
    }

    #[test]
    fn the_forms_the_builder_and_tools_write_are_masked() {
        let r = Redactor::new(["pa'ss$w0rd"]);
        // As the builder writes it to .env, and as `base64` prints it.
        assert_eq!(r.redact(r#"DB="pa'ss\$w0rd""#), r#"DB="***""#);
        assert_eq!(r.redact("cGEnc3MkdzByZA=="), "***");
    }

    #[test]
    fn a_hundred_thousand_secrets_are_one_pass() {
        let secrets: Vec<String> = (0..100_000).map(|i| format!("value-{i:06}-of-a-secret")).collect();
        let r = Redactor::new(&secrets);
        assert_eq!(
            r.redact("a value-099999-of-a-secret and value-000000-of-a-secret"),
            "a *** and ***"
        );
    }

    #[test]
    fn secret_debug_is_masked() {
        assert_eq!(format!("{:?} {}", Secret::new("x"), Secret::new("y")), "*** ***");
    }
}
