//! Renders the job's environment variables as a `.env` file that standard
//! dotenv readers read back exactly.
//!
//! Single quotes are literal in every common reader (dotenv for Node,
//! python-dotenv, dotenvy, docker compose), including across newlines, so
//! they are used whenever the value holds no `'`. Otherwise the value is
//! double-quoted with `\\`, `\"`, `\$` and `\n` escaped, which dotenvy and
//! python-dotenv decode.

pub fn render<'a>(vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (key, value) in vars {
        out.push_str(key);
        out.push('=');
        out.push_str(&quote(value));
        out.push('\n');
    }
    out
}

fn quote(value: &str) -> String {
    if !value.contains('\'') && !value.contains('\\') {
        return format!("'{value}'");
    }
    format!("\"{}\"", escaped(value))
}

/// The value as `.env` holds it between its quotes: as it is in single
/// quotes, escaped in double quotes. The masker knows this form too.
pub fn escaped(value: &str) -> String {
    if !value.contains('\'') && !value.contains('\\') {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '$' => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_round_trips_through_dotenvy() {
        let values = [
            "production",
            "",
            "has spaces  inside ",
            "hash # not a comment",
            "#starts-with-hash",
            "dollar $HOME and ${PATH}",
            "single ' quote",
            "double \" quote",
            "both ' and \" quotes",
            "a=b=c",
            "multi\nline\nvalue",
            "multi\nline with ' quote",
            "back\\slash and \\n literal",
            "ünïcødé ✓ 日本",
            "  leading and trailing  ",
            "-----BEGIN KEY-----\nMIIE\n-----END KEY-----\n",
            "tab\tinside",
        ];
        let vars: Vec<(String, String)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("VAR_{i}"), v.to_string()))
            .collect();
        let text = render(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let parsed: Vec<(String, String)> = dotenvy::from_read_iter(text.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("dotenvy rejected:\n{text}\n{e}"));
        assert_eq!(parsed, vars, "rendered:\n{text}");
    }
}
