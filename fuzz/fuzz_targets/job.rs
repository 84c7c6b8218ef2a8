//! Fuzzes the build-job parser (src/job.rs) the way the worker drives it:
//! `deployment_id(raw)` (routing), then `parse(raw)` + `Job::validate`.
//!
//! Contract checked: for any input both stages return Ok or a clean error
//! (no panic, hang or unbounded allocation; libFuzzer catches the last two
//! with its timeout and RSS limits), and a validated `BuildSpec` keeps the
//! invariants job.rs documents: valid routable id (the same one routing
//! extracted), lower-case hex commit of 4-64 chars, Dockerfile path relative
//! and never escaping the checkout, valid env names, an ECR-safe service id,
//! a clone URL without credentials, and a redactor masking every secret.
#![no_main]

use deployra_builder::job::{self, Job};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Redis hands the worker a String; lossy decoding still feeds every input.
    let raw = String::from_utf8_lossy(data);
    let routed = job::deployment_id(&raw);
    if let Ok(id) = &routed {
        assert!(!id.trim().is_empty() && !id.chars().any(char::is_control), "{id:?}");
    }
    let Ok(spec) = job::parse(&raw).and_then(Job::validate) else { return };

    // A job that validates is routable, to the same deployment. (serde also
    // reads a struct from a JSON array; routing rightly refuses that form.)
    if raw.trim_start().starts_with('{') {
        assert_eq!(routed.as_ref().ok(), Some(&spec.deployment_id), "{raw:?}");
    }
    if let Some(sha) = &spec.commit {
        assert!((4..=64).contains(&sha.len()), "{sha:?}");
        assert!(sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "{sha:?}");
    }
    // "Relative to the checkout, normalised, never escaping it."
    let d = &spec.dockerfile;
    assert!(!d.starts_with('/') && !d.contains(['\\', '\0']), "{d:?}");
    assert!(d.split('/').all(|s| !matches!(s, "" | "." | "..")), "{d:?}");
    for (key, _) in &spec.env {
        let mut c = key.chars();
        assert!(matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_'), "{key:?}");
        assert!(c.all(|c| c.is_ascii_alphanumeric() || c == '_'), "{key:?}");
    }
    // ECR: [a-z0-9]+(?:[._-][a-z0-9]+)*
    let svc = &spec.service_id;
    assert!(svc.split(['.', '_', '-']).all(|r| !r.is_empty()
        && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())), "{svc:?}");
    // "The URL never carries credentials."
    let url = url::Url::parse(&spec.source.url).expect("clone URL parses");
    assert!(url.username().is_empty() && url.password().is_none(), "{url}");
    // "Every value of this job that must never appear in a log."
    let redactor = spec.redactor();
    let password = spec.source.credentials.iter().map(|(_, p)| p);
    for secret in spec.env.iter().map(|(_, v)| v).chain(password) {
        if secret.expose().len() >= 4 {
            assert_eq!(redactor.redact(secret.expose()), "***");
        }
    }
    let _ = (spec.describe(), format!("{spec:?}"));
});
