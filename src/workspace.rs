//! Prepares a checkout for the build: the job's `.env`, a `.dockerignore`
//! that keeps `.git` out of the context, and the Dockerfile's location.

use std::io;
use std::path::{Path, PathBuf};

use crate::envfile;
use crate::redact::Secret;

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is a link that points outside the repository")]
    Escapes(String),
}

/// Writes `.env` at the repository root when the job has variables. A job
/// without variables leaves a committed `.env` alone.
pub fn write_env(root: &Path, vars: &[(String, Secret)]) -> Result<(), WorkspaceError> {
    if vars.is_empty() {
        return Ok(());
    }
    let path = root.join(".env");
    let text = envfile::render(vars.iter().map(|(k, v)| (k.as_str(), v.expose())));
    // A symlinked .env in the repository must not redirect the write.
    remove_if_symlink(&path)?;
    std::fs::write(&path, text).map_err(|source| WorkspaceError::Write { path, source })
}

/// Makes sure `.dockerignore` lists `.git`, keeping the user's own rules.
pub fn extend_dockerignore(root: &Path) -> Result<(), WorkspaceError> {
    let path = root.join(".dockerignore");
    let existing = read_dockerignore(root, &path)?;
    let listed = existing
        .lines()
        .map(str::trim)
        .any(|l| matches!(l, ".git" | "/.git" | ".git/" | "/.git/"));
    if listed {
        return Ok(());
    }
    let mut text = existing;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(".git\n");
    std::fs::write(&path, text).map_err(|source| WorkspaceError::Write { path, source })
}

/// Whether the Dockerfile exists as a regular file inside the checkout.
/// A Dockerfile reached through a symlink that leaves the checkout is an
/// error, not a missing file.
pub fn dockerfile_exists(root: &Path, relative: &str) -> Result<bool, WorkspaceError> {
    let path = root.join(relative);
    let resolved = match path.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(WorkspaceError::Read { path, source }),
    };
    let root = root.canonicalize().map_err(|source| WorkspaceError::Read {
        path: root.to_owned(),
        source,
    })?;
    if !resolved.starts_with(&root) {
        return Err(WorkspaceError::Escapes(relative.to_owned()));
    }
    Ok(resolved.is_file())
}

/// The rules of `.dockerignore`. A link to a file inside the repository is
/// followed, as `docker build` follows it, and replaced by a copy of that
/// file (the `.git` rule is then added to the copy, not to the file it
/// points at). A link that leaves the repository or leads nowhere reads
/// as no rules: nothing of the host is read.
fn read_dockerignore(root: &Path, path: &Path) -> Result<String, WorkspaceError> {
    let read = |path: &Path| match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(WorkspaceError::Read {
            path: path.to_owned(),
            source,
        }),
    };
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link {
        return read(path);
    }
    let inside = match (path.canonicalize(), root.canonicalize()) {
        (Ok(target), Ok(root)) => target.starts_with(&root) && target.is_file(),
        _ => false,
    };
    let text = if inside { read(path)? } else { String::new() };
    remove_if_symlink(path)?;
    Ok(text)
}

fn remove_if_symlink(path: &Path) -> Result<(), WorkspaceError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(path).map_err(|source| WorkspaceError::Write {
            path: path.to_owned(),
            source,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_is_created_or_extended_once() {
        let dir = tempfile::tempdir().unwrap();
        extend_dockerignore(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(".dockerignore")).unwrap(),
            ".git\n"
        );
        std::fs::write(dir.path().join(".dockerignore"), "node_modules").unwrap();
        extend_dockerignore(dir.path()).unwrap();
        extend_dockerignore(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(".dockerignore")).unwrap(),
            "node_modules\n.git\n"
        );
    }

    #[test]
    fn a_dockerignore_link_inside_the_repository_is_followed_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("config")).unwrap();
        std::fs::write(dir.path().join("config/ignore"), "secret.txt\n").unwrap();
        std::os::unix::fs::symlink("config/ignore", dir.path().join(".dockerignore")).unwrap();
        extend_dockerignore(dir.path()).unwrap();
        let written = dir.path().join(".dockerignore");
        assert!(!std::fs::symlink_metadata(&written).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&written).unwrap(), "secret.txt\n.git\n");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("config/ignore")).unwrap(),
            "secret.txt\n",
            "the file linked to is not written"
        );

        let host = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(host.path(), "host rules\n").unwrap();
        std::fs::remove_file(&written).unwrap();
        std::os::unix::fs::symlink(host.path(), &written).unwrap();
        extend_dockerignore(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&written).unwrap(), ".git\n");
    }

    #[test]
    fn env_is_written_only_with_variables() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".env"), "COMMITTED=1\n").unwrap();
        write_env(dir.path(), &[]).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(".env")).unwrap(),
            "COMMITTED=1\n"
        );
        write_env(dir.path(), &[("A".into(), Secret::new("x y"))]).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join(".env")).unwrap(), "A='x y'\n");
    }

    #[test]
    fn dockerfile_through_an_escaping_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("Dockerfile")).unwrap();
        assert!(matches!(
            dockerfile_exists(dir.path(), "Dockerfile"),
            Err(WorkspaceError::Escapes(_))
        ));
        assert!(!dockerfile_exists(dir.path(), "missing/Dockerfile").unwrap());
        std::fs::write(dir.path().join("Real"), "FROM x").unwrap();
        assert!(dockerfile_exists(dir.path(), "Real").unwrap());
    }
}
