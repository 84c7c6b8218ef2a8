//! The build context: the tar the Engine API's build endpoint takes, made
//! from the checkout the way `docker build` makes it.
//!
//! What goes in is decided by [`DockerIgnore`]; everything else follows the
//! docker CLI and BuildKit's fsutil, except where noted:
//! - The Dockerfile and `.dockerignore` are always sent (the CLI re-includes
//!   them when a pattern excludes them; the daemon needs both).
//! - `.git` at the root is never sent, whatever `.dockerignore` says: the
//!   repository's history and configuration are never build input, and
//!   sending them costs time and risks leaking them into an image.
//! - Entries are written in name order, so the same tree gives the same tar.
//! - An excluded directory is written only if something below it is
//!   re-included, just before that entry (as fsutil does; the CLI's own tar
//!   leaves the directory out and lets the daemon create it).
//! - Symlinks are stored as symlinks and never followed, so nothing outside
//!   the checkout can enter the context. Sockets, fifos and devices are left
//!   out; a git checkout cannot hold them.
//! - Hard links are stored as separate files, which costs size, not
//!   correctness.
//! - Owner is uid/gid 0 without names, as the CLI sets it. Permission bits
//!   (executable, setuid, sticky) and mtimes, in whole seconds, are the
//!   files' own, as the CLI keeps them: `COPY` preserves both, so build
//!   steps that look at timestamps (make, for one) see what `docker build`
//!   would give them.

use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tar::{Builder, EntryType, Header};

use super::dockerignore::{DockerIgnore, MatchState, PatternError};

const IGNORE_FILE: &str = ".dockerignore";

/// What was sent: regular files and symlinks, and the bytes of the files'
/// contents (the tar's headers and padding come on top).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContextStats {
    pub files: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("cannot read {path}: {source}")]
    ReadIgnoreFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is a link that points outside the build context")]
    IgnoreFileEscapes { path: PathBuf },
    #[error("{path}: {source}")]
    InvalidIgnoreFile {
        path: PathBuf,
        #[source]
        source: PatternError,
    },
    #[error("cannot list {path}: {source}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot stat {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the link {path}: {source}")]
    ReadLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot add {path} to the build context: {source}")]
    Append {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot finish the build context of {path}: {source}")]
    Finish {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Writes the context of the checkout at `root` to `out` as an uncompressed
/// tar, one file at a time. `dockerfile` is the Dockerfile's `/`-separated
/// path inside `root`.
///
/// On error `out` has received a truncated tar without its end-of-archive
/// marker, so the engine cannot mistake it for a complete context.
pub fn write_context<W: Write>(root: &Path, dockerfile: &str, out: W) -> Result<ContextStats, ContextError> {
    let mut ignore = read_ignore_file(root)?;
    ignore.force_include(IGNORE_FILE);
    ignore.force_include(dockerfile);

    let mut walk = Walk {
        ignore,
        builder: Builder::new(Abandonable {
            inner: out,
            abandoned: false,
        }),
        stats: ContextStats::default(),
    };
    if let Err(e) = walk.run(root) {
        // Dropping the builder writes the end-of-archive marker otherwise.
        walk.builder.get_mut().abandoned = true;
        return Err(e);
    }
    let finish = |source| ContextError::Finish {
        path: root.to_owned(),
        source,
    };
    let mut out = walk.builder.into_inner().map_err(finish)?;
    out.flush().map_err(finish)?;
    Ok(walk.stats)
}

/// A missing `.dockerignore` (or a dangling link to one) means no rules, as
/// for the CLI. A link is followed only while it stays inside the checkout:
/// a parse error quotes the file, which must not leak a host file's lines.
fn read_ignore_file(root: &Path) -> Result<DockerIgnore, ContextError> {
    let path = root.join(IGNORE_FILE);
    let contents = match fs::symlink_metadata(&path).and_then(|meta| {
        if meta.file_type().is_symlink() {
            let target = fs::canonicalize(&path)?;
            let root = fs::canonicalize(root)?;
            if !target.starts_with(root) {
                return Ok(None);
            }
        }
        fs::read(&path).map(Some)
    }) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Err(ContextError::IgnoreFileEscapes { path }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DockerIgnore::default()),
        Err(source) => return Err(ContextError::ReadIgnoreFile { path, source }),
    };
    DockerIgnore::parse(&String::from_utf8_lossy(&contents))
        .map_err(|source| ContextError::InvalidIgnoreFile { path, source })
}

struct Walk<W: Write> {
    ignore: DockerIgnore,
    builder: Builder<Abandonable<W>>,
    stats: ContextStats,
}

/// A directory being walked, with the entries still to visit.
struct Dir {
    path: PathBuf,
    /// The directory's name in the archive; empty for the root.
    name: PathBuf,
    /// `name` as matched against patterns, which are text; a name that is
    /// not UTF-8 is matched with replacement characters.
    rel: String,
    state: MatchState,
    entries: std::vec::IntoIter<OsString>,
    /// Set while the directory is excluded and has not been written: it is,
    /// as soon as something below it is re-included.
    unwritten: Option<Metadata>,
}

impl<W: Write> Walk<W> {
    /// Depth first with an explicit stack, so a deep tree cannot overflow
    /// the thread's stack.
    fn run(&mut self, root: &Path) -> Result<(), ContextError> {
        let mut stack = vec![Dir {
            path: root.to_owned(),
            name: PathBuf::new(),
            rel: String::new(),
            state: MatchState::default(),
            entries: list(root).map_err(|source| ContextError::ReadDir {
                path: root.to_owned(),
                source,
            })?,
            unwritten: None,
        }];
        while let Some(dir) = stack.last_mut() {
            let Some(entry) = dir.entries.next() else {
                stack.pop();
                continue;
            };
            let path = dir.path.join(&entry);
            let name = dir.name.join(&entry);
            let rel = if dir.rel.is_empty() {
                entry.to_string_lossy().into_owned()
            } else {
                format!("{}/{}", dir.rel, entry.to_string_lossy())
            };
            if rel == ".git" {
                continue;
            }
            let (excluded, state) = self.ignore.match_entry(&rel, &dir.state);
            let meta = fs::symlink_metadata(&path).map_err(|source| ContextError::Stat {
                path: path.clone(),
                source,
            })?;
            let kind = meta.file_type();

            if excluded {
                if !kind.is_dir() || self.ignore.can_skip_excluded_dir(&rel) {
                    continue;
                }
                match list(&path) {
                    Ok(entries) => stack.push(Dir {
                        path,
                        name,
                        rel,
                        state,
                        entries,
                        unwritten: Some(meta),
                    }),
                    // fsutil too, since nothing in it may be re-included.
                    Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                        tracing::debug!(path = %path.display(), "excluded directory is unreadable; leaving it out");
                    }
                    Err(source) => return Err(ContextError::ReadDir { path, source }),
                }
                continue;
            }

            if kind.is_dir() {
                let entries = list(&path).map_err(|source| ContextError::ReadDir {
                    path: path.clone(),
                    source,
                })?;
                self.write_parents(&mut stack)?;
                self.write_dir(&name, &meta)?;
                stack.push(Dir {
                    path,
                    name,
                    rel,
                    state,
                    entries,
                    unwritten: None,
                });
            } else if kind.is_file() {
                self.write_parents(&mut stack)?;
                self.write_file(&path, &name, &meta)?;
            } else if kind.is_symlink() {
                self.write_parents(&mut stack)?;
                self.write_symlink(&path, &name, &meta)?;
            } else {
                tracing::debug!(path = %path.display(), "not a file, directory or symlink; leaving it out");
            }
        }
        Ok(())
    }

    fn write_parents(&mut self, stack: &mut [Dir]) -> Result<(), ContextError> {
        for dir in stack {
            if let Some(meta) = dir.unwritten.take() {
                self.write_dir(&dir.name, &meta)?;
            }
        }
        Ok(())
    }

    fn write_dir(&mut self, name: &Path, meta: &Metadata) -> Result<(), ContextError> {
        let mut with_slash = name.as_os_str().to_owned();
        with_slash.push("/");
        let mut header = header(meta, EntryType::Directory, 0);
        self.builder
            .append_data(&mut header, &with_slash, io::empty())
            .map_err(|source| append_error(name, source))
    }

    fn write_file(&mut self, path: &Path, name: &Path, meta: &Metadata) -> Result<(), ContextError> {
        let file = File::open(path).map_err(|source| ContextError::Open {
            path: path.to_owned(),
            source,
        })?;
        let size = meta.len();
        let mut header = header(meta, EntryType::Regular, size);
        let contents = ExactSize {
            inner: file,
            remaining: size,
        };
        self.builder
            .append_data(&mut header, name, contents)
            .map_err(|source| append_error(name, source))?;
        self.stats.files += 1;
        self.stats.bytes += size;
        Ok(())
    }

    fn write_symlink(&mut self, path: &Path, name: &Path, meta: &Metadata) -> Result<(), ContextError> {
        let target = fs::read_link(path).map_err(|source| ContextError::ReadLink {
            path: path.to_owned(),
            source,
        })?;
        let mut header = header(meta, EntryType::Symlink, 0);
        self.builder
            .append_link(&mut header, name, &target)
            .map_err(|source| append_error(name, source))?;
        self.stats.files += 1;
        Ok(())
    }
}

fn append_error(name: &Path, source: io::Error) -> ContextError {
    ContextError::Append {
        path: name.to_owned(),
        source,
    }
}

/// Entry names in byte order, Go's `filepath.Walk` order.
fn list(dir: &Path) -> io::Result<std::vec::IntoIter<OsString>> {
    let mut names = fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()?;
    names.sort_unstable();
    Ok(names.into_iter())
}

/// GNU format, whose long-name extension takes paths and link targets past
/// the 100 bytes of the basic header; Go's tar reader understands it.
fn header(meta: &Metadata, kind: EntryType, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(meta.mode() & 0o7777);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
    header
}

/// The file's contents up to the size its header announces. A file that
/// shrank since it was stat'ed fails rather than shifting every later entry
/// in the tar; one that grew is cut at the announced size.
struct ExactSize<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for ExactSize<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being archived",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Lets a failed walk stop `tar::Builder`'s drop from appending the
/// end-of-archive marker to a partial context.
struct Abandonable<W> {
    inner: W,
    abandoned: bool,
}

impl<W: Write> Write for Abandonable<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.abandoned {
            return Err(io::Error::other("the build context was abandoned"));
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::time::{Duration, SystemTime};

    use super::*;

    #[derive(Debug, PartialEq)]
    enum Entry {
        Dir,
        File(String),
        Link(String),
    }

    struct Tree(tempfile::TempDir);

    impl Tree {
        fn new() -> Tree {
            Tree(tempfile::tempdir().unwrap())
        }

        fn file(&self, rel: &str, contents: &str) -> &Self {
            let path = self.0.path().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
            self
        }

        fn dir(&self, rel: &str) -> &Self {
            fs::create_dir_all(self.0.path().join(rel)).unwrap();
            self
        }

        fn tar(&self, dockerfile: &str) -> Vec<u8> {
            let mut out = Vec::new();
            write_context(self.0.path(), dockerfile, &mut out).unwrap();
            out
        }

        fn entries(&self, dockerfile: &str) -> BTreeMap<String, Entry> {
            read_entries(&self.tar(dockerfile))
        }

        fn names(&self, dockerfile: &str) -> Vec<String> {
            self.entries(dockerfile).into_keys().collect()
        }
    }

    fn read_entries(tar: &[u8]) -> BTreeMap<String, Entry> {
        let mut archive = tar::Archive::new(tar);
        let mut entries = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
            let value = match entry.header().entry_type() {
                EntryType::Directory => Entry::Dir,
                EntryType::Regular => {
                    let mut contents = String::new();
                    entry.read_to_string(&mut contents).unwrap();
                    Entry::File(contents)
                }
                EntryType::Symlink => Entry::Link(entry.link_name().unwrap().unwrap().to_string_lossy().into_owned()),
                other => panic!("{name}: unexpected {other:?}"),
            };
            assert!(entries.insert(name, value).is_none());
        }
        entries
    }

    #[test]
    fn double_star_and_directory_patterns_exclude() {
        let tree = Tree::new();
        tree.file(".dockerignore", "**/*.pyc\ndocs\n/build/**\n")
            .file("Dockerfile", "FROM scratch\n")
            .file("README.md", "hi")
            .file("a.pyc", "")
            .file("src/main.py", "print()")
            .file("src/gen/x.pyc", "")
            .file("deep/er/still/y.pyc", "")
            .file("docs/guide.md", "")
            .file("docs/img/a.png", "")
            .file("build/out.bin", "")
            .dir("empty");
        assert_eq!(
            tree.names("Dockerfile"),
            [
                ".dockerignore",
                "Dockerfile",
                "README.md",
                "build/",
                "deep/",
                "deep/er/",
                "deep/er/still/",
                "empty/",
                "src/",
                "src/gen/",
                "src/main.py",
            ]
        );
    }

    #[test]
    fn exception_inside_excluded_directory_is_sent() {
        let tree = Tree::new();
        tree.file(".dockerignore", "node_modules\n!node_modules/keep.txt\n")
            .file("Dockerfile", "")
            .file("node_modules/keep.txt", "kept")
            .file("node_modules/left.js", "")
            .file("node_modules/sub/deep.js", "");
        let entries = tree.entries("Dockerfile");
        assert_eq!(
            entries.keys().collect::<Vec<_>>(),
            [".dockerignore", "Dockerfile", "node_modules/", "node_modules/keep.txt"]
        );
        assert_eq!(entries["node_modules/keep.txt"], Entry::File("kept".into()));
    }

    #[test]
    fn wildcard_exception_reaches_into_excluded_directories() {
        let tree = Tree::new();
        tree.file(".dockerignore", "*\n!**/*.go\n")
            .file("Dockerfile", "")
            .file("main.go", "")
            .file("cmd/tool/tool.go", "")
            .file("cmd/tool/README", "")
            .file("docs/README", "");
        assert_eq!(
            tree.names("Dockerfile"),
            [
                ".dockerignore",
                "Dockerfile",
                "cmd/",
                "cmd/tool/",
                "cmd/tool/tool.go",
                "main.go"
            ]
        );
    }

    #[test]
    fn git_directory_is_never_sent() {
        let tree = Tree::new();
        tree.file(".dockerignore", "!.git\n!.git/config\n")
            .file("Dockerfile", "")
            .file(".git/config", "[remote]")
            .file(".git/objects/ab/cdef", "")
            .file(".gitignore", "target")
            .file("sub/.git", "gitdir: ../.git/modules/sub");
        assert_eq!(
            tree.names("Dockerfile"),
            [".dockerignore", ".gitignore", "Dockerfile", "sub/", "sub/.git"]
        );

        let tree = Tree::new();
        tree.file("Dockerfile", "").file(".git/HEAD", "ref");
        assert_eq!(tree.names("Dockerfile"), ["Dockerfile"]);
    }

    #[test]
    fn dockerfile_and_dockerignore_survive_exclude_everything() {
        let tree = Tree::new();
        tree.file(".dockerignore", "*\n")
            .file("ci/docker/Dockerfile.prod", "FROM scratch")
            .file("ci/docker/other", "")
            .file("ci/script.sh", "")
            .file("app.py", "");
        assert_eq!(
            tree.names("./ci/docker/Dockerfile.prod"),
            [".dockerignore", "ci/", "ci/docker/", "ci/docker/Dockerfile.prod"]
        );
    }

    #[test]
    fn symlinks_are_stored_not_followed() {
        let tree = Tree::new();
        tree.file("Dockerfile", "").dir("lib");
        symlink("/etc/passwd", tree.0.path().join("passwd")).unwrap();
        symlink("/etc", tree.0.path().join("etc")).unwrap();
        symlink("../Dockerfile", tree.0.path().join("lib/df")).unwrap();
        let entries = tree.entries("Dockerfile");
        assert_eq!(entries["passwd"], Entry::Link("/etc/passwd".into()));
        assert_eq!(entries["etc"], Entry::Link("/etc".into()));
        assert_eq!(entries["lib/df"], Entry::Link("../Dockerfile".into()));
        assert_eq!(entries.len(), 5, "{:?}", entries.keys());
    }

    #[test]
    fn headers_keep_mode_and_mtime_and_drop_ownership() {
        let tree = Tree::new();
        tree.file("Dockerfile", "").file("run.sh", "#!/bin/sh\n").dir("bin");
        let root = tree.0.path();
        fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(root.join("Dockerfile"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::set_permissions(root.join("bin"), fs::Permissions::from_mode(0o700)).unwrap();
        let mtime = SystemTime::UNIX_EPOCH + Duration::new(1_600_000_000, 500_000_000);
        File::options()
            .write(true)
            .open(root.join("run.sh"))
            .unwrap()
            .set_modified(mtime)
            .unwrap();

        let tar = tree.tar("Dockerfile");
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut seen = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            seen.insert(name, (header.mode().unwrap(), header.mtime().unwrap()));
        }
        assert_eq!(seen["run.sh"], (0o755, 1_600_000_000));
        assert_eq!(seen["Dockerfile"].0, 0o640);
        assert_eq!(seen["bin/"].0, 0o700);
    }

    #[test]
    fn output_is_sorted_reproducible_and_counted() {
        let tree = Tree::new();
        tree.file("b", "22")
            .file("a/z", "1")
            .file("a.txt", "333")
            .file("Dockerfile", "FROM x");
        symlink("b", tree.0.path().join("c")).unwrap();
        let first = tree.tar("Dockerfile");
        assert_eq!(first, tree.tar("Dockerfile"));

        let mut archive = tar::Archive::new(first.as_slice());
        let order: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(order, ["Dockerfile", "a/", "a/z", "a.txt", "b", "c"]);

        let stats = write_context(tree.0.path(), "Dockerfile", io::sink()).unwrap();
        assert_eq!(stats, ContextStats { files: 5, bytes: 12 });
    }

    #[test]
    fn long_paths_and_link_targets_survive() {
        let tree = Tree::new();
        let long = format!("{}/{}", "d".repeat(80), "f".repeat(90));
        tree.file("Dockerfile", "").file(&long, "deep");
        let target = "t".repeat(150);
        symlink(&target, tree.0.path().join("link")).unwrap();
        let entries = tree.entries("Dockerfile");
        assert_eq!(entries[&long], Entry::File("deep".into()));
        assert_eq!(entries["link"], Entry::Link(target));
    }

    #[test]
    fn sockets_are_left_out() {
        let tree = Tree::new();
        tree.file("Dockerfile", "");
        let _listener = std::os::unix::net::UnixListener::bind(tree.0.path().join("sock")).unwrap();
        assert_eq!(tree.names("Dockerfile"), ["Dockerfile"]);
    }

    #[test]
    fn invalid_dockerignore_names_the_pattern() {
        let tree = Tree::new();
        tree.file(".dockerignore", "ok\nsrc/[oops\n").file("Dockerfile", "");
        let err = write_context(tree.0.path(), "Dockerfile", io::sink()).unwrap_err();
        assert!(matches!(err, ContextError::InvalidIgnoreFile { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("src/[oops") && message.contains("line 2"), "{message}");
    }

    #[test]
    fn dockerignore_link_leaving_the_checkout_is_refused() {
        let outside = Tree::new();
        outside.file("secret", "[not a pattern");
        let tree = Tree::new();
        tree.file("Dockerfile", "");
        symlink(outside.0.path().join("secret"), tree.0.path().join(".dockerignore")).unwrap();
        let err = write_context(tree.0.path(), "Dockerfile", io::sink()).unwrap_err();
        assert!(matches!(err, ContextError::IgnoreFileEscapes { .. }), "{err:?}");

        let tree = Tree::new();
        tree.file("Dockerfile", "")
            .file("docker/ignore", "secret\n")
            .file("secret", "");
        symlink("docker/ignore", tree.0.path().join(".dockerignore")).unwrap();
        assert_eq!(
            tree.names("Dockerfile"),
            [".dockerignore", "Dockerfile", "docker/", "docker/ignore"]
        );
    }

    #[test]
    fn failure_leaves_no_end_of_archive_marker() {
        /// Refuses only large writes, so the 1024-byte marker would get through.
        struct RefuseLarge(Vec<u8>);
        impl Write for RefuseLarge {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if buf.len() > 2048 {
                    return Err(io::Error::other("pipe closed"));
                }
                self.0.extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let tree = Tree::new();
        tree.file("Dockerfile", "").file("big", &"x".repeat(4096));
        let mut out = RefuseLarge(Vec::new());
        let err = write_context(tree.0.path(), "Dockerfile", &mut out).unwrap_err();
        assert!(
            matches!(&err, ContextError::Append { path, .. } if path == Path::new("big")),
            "{err:?}"
        );
        assert_eq!(out.0.len(), 1024, "two headers and nothing after them");
    }
}
