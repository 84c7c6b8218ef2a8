//! Secrets of a job (git credentials, registry password, environment
//! values) must never leave the process in clear text, whichever tool echoes
//! them back. Every line shipped to the dashboard and every error message
//! goes through a [`Redactor`] built from the job.

use std::fmt;

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

/// Replaces every known secret in a text by `***`.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    /// Longest first, so that a secret containing another is masked whole.
    secrets: Vec<Secret>,
}

impl Redactor {
    pub fn new<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut redactor = Redactor::default();
        for secret in secrets {
            redactor.add(secret.as_ref());
        }
        redactor
    }

    /// Adds a secret, and its percent-encoded form, which is how a password
    /// appears inside a URL that a tool echoes back.
    pub fn add(&mut self, secret: &str) {
        if secret.len() < MIN_SECRET_LEN {
            return;
        }
        for form in [secret.to_owned(), percent_encode(secret)] {
            if !self.secrets.iter().any(|s| s.expose() == form) {
                self.secrets.push(Secret(form));
            }
        }
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.expose().len()));
        for line in secret.lines().filter(|l| l.len() >= MIN_SECRET_LEN) {
            if line != secret && !self.secrets.iter().any(|s| s.expose() == line) {
                self.secrets.push(Secret(line.to_owned()));
            }
        }
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.expose().len()));
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in &self.secrets {
            if out.contains(secret.expose()) {
                out = out.replace(secret.expose(), MASK);
            }
        }
        out
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
    fn secret_debug_is_masked() {
        assert_eq!(format!("{:?} {}", Secret::new("x"), Secret::new("y")), "*** ***");
    }
}
