//! Fetches exactly the commit to build with libgit2, and checks it out with
//! its submodules.
//!
//! libgit2 has no partial clone that fetches missing objects on demand, so
//! the commit is fetched explicitly: by its id with depth 1 when the job
//! names a full commit id (servers that allow any SHA in `want` answer that),
//! else the branch tip with depth 1. A server that refuses fetch-by-id, or an
//! abbreviated id, falls back to fetching the branch deeper until the commit
//! is there. Credentials are handed over in the credential callback; the URL
//! never contains them.
//!
//! Submodules are fetched the same way: the commit the parent pins, by id at
//! depth 1, else the submodule's branches and tags deeper and deeper. A
//! relative submodule URL (`../lib.git`) is resolved against the URL of the
//! repository that names it, as git resolves it against its remote. The
//! job's credentials were issued for its git provider and go nowhere else:
//! a submodule with the same scheme, host and port gets them, one elsewhere
//! is fetched anonymously and must be public. A submodule's objects live
//! under its parent's `.git/modules/`, and its files are checked out with no
//! `.git` of their own, so the build context (which leaves out only the root
//! `.git`) carries nothing of git's.

use std::cell::Cell;
use std::collections::HashSet;
use std::path::Path;

use git2::{
    AutotagOption, Config, Cred, CredentialType, FetchOptions, ObjectType, Oid, RemoteCallbacks, Repository, Tree,
};
use reqwest::Url;
use tokio_util::sync::CancellationToken;

use crate::job::{normalize_relative_path, GitSource};
use crate::redact::Secret;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("authentication to {url} failed (check the provider's username and token/password)")]
    AuthenticationFailed { url: String },
    #[error("{url} needs credentials and the job has none")]
    CredentialsRequired { url: String },
    #[error("{host} asked for credentials, but the job's credentials are only sent to its git provider {provider}")]
    CredentialsWithheld { host: String, provider: String },
    #[error("branch {branch:?} not found in {url}")]
    BranchNotFound { url: String, branch: String },
    #[error("commit {commit} not found in {url} (branch {branch:?})")]
    CommitNotFound {
        url: String,
        branch: String,
        commit: String,
    },
    #[error("fetching {url} failed: {message}")]
    Fetch { url: String, message: String },
    #[error("checking out {commit} failed: {message}")]
    Checkout { commit: String, message: String },
    #[error("{path}: {message}")]
    Gitmodules { path: String, message: String },
    #[error("submodule {path} ({url}): {message}")]
    Submodule { path: String, url: String, message: String },
    #[error("cancelled")]
    Cancelled,
}

/// What to fetch.
pub struct FetchRequest<'a> {
    pub source: &'a GitSource,
    pub branch: &'a str,
    pub commit: Option<&'a str>,
}

/// Depths tried, in order, when the commit is not reachable by id. The last
/// is libgit2's `GIT_FETCH_DEPTH_UNSHALLOW`, the whole history: after the
/// shallow fetches before it, depth 0 would keep their shallow boundary and
/// fetch nothing older.
const DEEPENING: [i32; 3] = [50, 1000, i32::MAX];

/// Where a submodule's pinned commit is looked for when its server refuses
/// it by id: usually on a branch, sometimes only on a tag.
const SUBMODULE_REFSPECS: [&str; 2] = ["+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"];

/// Submodules of submodules are followed this many levels down. A chain of
/// pinned commits cannot loop, but it can be long; past this depth the job
/// fails saying so, instead of fetching on until the build timeout.
const MAX_SUBMODULE_DEPTH: usize = 5;

/// Fetches into a new repository at `dest` and checks out the commit and its
/// submodules; returns the commit's full id. Blocking: call from
/// `spawn_blocking`. Returns [`GitError::Cancelled`] soon after `cancel`
/// fires (libgit2 checks the progress callbacks many times a second during a
/// transfer).
pub fn checkout(req: &FetchRequest<'_>, dest: &Path, cancel: &CancellationToken) -> Result<String, GitError> {
    let url = req.source.url.clone();
    let provider = Url::parse(&url).map_err(|e| GitError::Fetch {
        url: url.clone(),
        message: format!("not a valid URL: {e}"),
    })?;
    let access = Access {
        credentials: req.source.credentials.as_ref(),
        provider,
        cancel,
    };
    let repo = Repository::init(dest).map_err(|e| GitError::Fetch {
        url: url.clone(),
        message: format!("cannot create a repository in {}: {}", dest.display(), e.message()),
    })?;
    let fetcher = Fetcher {
        repo: &repo,
        url: &url,
        access: &access,
    };
    let branch_ref = format!("refs/remotes/origin/{}", req.branch);
    let branch_spec = format!("+refs/heads/{}:{branch_ref}", req.branch);

    let oid = match req.commit {
        Some(commit) => {
            let by_id = if commit.len() == 40 || commit.len() == 64 {
                match fetcher.fetch(&[commit], 1) {
                    Ok(()) => find_commit(&repo, commit),
                    Err(e) if e.is_final() => return Err(e),
                    Err(_) => None,
                }
            } else {
                None
            };
            match by_id {
                Some(oid) => oid,
                None => deepen_until_found(&fetcher, req.branch, &branch_spec, &branch_ref, commit)?,
            }
        }
        None => {
            fetcher.fetch(&[&branch_spec], 1)?;
            resolve_branch(&repo, &branch_ref).ok_or_else(|| GitError::BranchNotFound {
                url: url.clone(),
                branch: req.branch.to_owned(),
            })?
        }
    };

    let commit = repo.find_commit(oid).map_err(|e| checkout_error(oid, e))?;
    let mut options = git2::build::CheckoutBuilder::new();
    options.force();
    repo.checkout_tree(commit.as_object(), Some(&mut options))
        .map_err(|e| checkout_error(oid, e))?;
    repo.set_head_detached(oid).map_err(|e| checkout_error(oid, e))?;
    let tree = commit.tree().map_err(|e| checkout_error(oid, e))?;
    let parent = Parent {
        repo: &repo,
        tree: &tree,
        url: &access.provider,
        workdir: dest,
        prefix: String::new(),
        depth: 1,
    };
    checkout_submodules(&access, &parent)?;
    Ok(oid.to_string())
}

fn deepen_until_found(
    fetcher: &Fetcher<'_>,
    branch: &str,
    branch_spec: &str,
    branch_ref: &str,
    commit: &str,
) -> Result<Oid, GitError> {
    for depth in DEEPENING {
        fetcher.fetch(&[branch_spec], depth)?;
        if resolve_branch(fetcher.repo, branch_ref).is_none() {
            return Err(GitError::BranchNotFound {
                url: fetcher.url.to_owned(),
                branch: branch.to_owned(),
            });
        }
        if let Some(oid) = find_commit(fetcher.repo, commit) {
            return Ok(oid);
        }
    }
    Err(GitError::CommitNotFound {
        url: fetcher.url.to_owned(),
        branch: branch.to_owned(),
        commit: commit.to_owned(),
    })
}

fn find_commit(repo: &Repository, commit: &str) -> Option<Oid> {
    let object = repo.revparse_single(commit).ok()?;
    object.peel_to_commit().ok().map(|c| c.id())
}

fn resolve_branch(repo: &Repository, branch_ref: &str) -> Option<Oid> {
    repo.find_reference(branch_ref)
        .ok()?
        .peel_to_commit()
        .ok()
        .map(|c| c.id())
}

fn checkout_error(oid: Oid, e: git2::Error) -> GitError {
    GitError::Checkout {
        commit: oid.to_string(),
        message: e.message().to_owned(),
    }
}

impl GitError {
    /// Errors that another refspec or depth cannot cure.
    fn is_final(&self) -> bool {
        matches!(
            self,
            GitError::AuthenticationFailed { .. }
                | GitError::CredentialsRequired { .. }
                | GitError::CredentialsWithheld { .. }
                | GitError::Cancelled
        )
    }
}

/// A checked-out repository whose submodules are next.
struct Parent<'a> {
    repo: &'a Repository,
    tree: &'a Tree<'a>,
    /// Where `repo` was fetched from: the base of relative submodule URLs.
    url: &'a Url,
    workdir: &'a Path,
    /// `workdir` inside the job's checkout (`""` or `vendor/lib/`), so that
    /// errors name a nested submodule by its full path.
    prefix: String,
    depth: usize,
}

/// A submodule as its parent's `.gitmodules` names it, at the commit the
/// parent's tree pins.
struct Submodule {
    /// Relative to the parent's working directory, normalised.
    path: String,
    /// As written in `.gitmodules`.
    url: String,
    commit: Oid,
}

fn checkout_submodules(access: &Access<'_>, parent: &Parent<'_>) -> Result<(), GitError> {
    for sub in pinned_submodules(parent)? {
        if access.cancel.is_cancelled() {
            return Err(GitError::Cancelled);
        }
        let path = format!("{}{}", parent.prefix, sub.path);
        let fail = |url: String, message: String| GitError::Submodule {
            path: path.clone(),
            url,
            message,
        };
        if parent.depth > MAX_SUBMODULE_DEPTH {
            return Err(fail(
                without_credentials(&sub.url),
                format!("submodules nested more than {MAX_SUBMODULE_DEPTH} levels deep are not fetched"),
            ));
        }
        let url = resolve_url(&sub.url, parent.url).ok_or_else(|| {
            fail(
                without_credentials(&sub.url),
                "only http(s) URLs and relative ones (../name.git) are supported".to_owned(),
            )
        })?;
        let gitdir = parent.repo.path().join("modules").join(&sub.path);
        let repo = Repository::init_bare(&gitdir).map_err(|e| {
            fail(
                url.to_string(),
                format!("cannot create its repository: {}", e.message()),
            )
        })?;
        let fetcher = Fetcher {
            repo: &repo,
            url: url.as_str(),
            access,
        };
        if !fetch_pinned(&fetcher, sub.commit).map_err(|e| in_submodule(e, &path, &url))? {
            return Err(fail(
                url.to_string(),
                format!("commit {} not found (was it pushed?)", sub.commit),
            ));
        }
        let checkout_failed = |e: git2::Error| fail(url.to_string(), checkout_error(sub.commit, e).to_string());
        let commit = repo.find_commit(sub.commit).map_err(checkout_failed)?;
        let workdir = parent.workdir.join(&sub.path);
        // The working directory is given to this handle only, not written
        // to disk as a `.git` file: the submodule's directory is build
        // context, and git's files have no business in the image.
        repo.set_workdir(&workdir, false).map_err(checkout_failed)?;
        let mut options = git2::build::CheckoutBuilder::new();
        options.force();
        repo.checkout_tree(commit.as_object(), Some(&mut options))
            .map_err(checkout_failed)?;
        let tree = commit.tree().map_err(checkout_failed)?;
        checkout_submodules(
            access,
            &Parent {
                repo: &repo,
                tree: &tree,
                url: &url,
                workdir: &workdir,
                prefix: format!("{path}/"),
                depth: parent.depth + 1,
            },
        )?;
    }
    Ok(())
}

/// The submodules the parent's tree pins: the `.gitmodules` entries whose
/// path is a gitlink in the tree. An entry without one (a submodule since
/// removed) or with `update = none` is skipped, as `git submodule update`
/// skips them. Requiring the gitlink also means every directory above the
/// submodule is a real directory of the checkout, never a symlink out of it.
fn pinned_submodules(parent: &Parent<'_>) -> Result<Vec<Submodule>, GitError> {
    let Ok(entry) = parent.tree.get_path(Path::new(".gitmodules")) else {
        return Ok(Vec::new());
    };
    let invalid = |message: String| GitError::Gitmodules {
        path: format!("{}.gitmodules", parent.prefix),
        message,
    };
    if entry.kind() != Some(ObjectType::Blob) || entry.filemode() == 0o120000 {
        return Err(invalid("is not a regular file".to_owned()));
    }
    let file = parent.workdir.join(".gitmodules");
    let text = std::fs::read(&file).map_err(|e| invalid(format!("cannot read it: {e}")))?;
    if has_include(&text) {
        return Err(invalid(
            "has an [include] section, which is not supported in .gitmodules".to_owned(),
        ));
    }
    let config = Config::open(&file).map_err(|e| invalid(e.message().to_owned()))?;
    let mut declared = Vec::new();
    config
        .entries(Some(r"^submodule\..+\.path$"))
        .and_then(|entries| {
            entries.for_each(|entry| {
                if let (Ok(key), Ok(path)) = (entry.name(), entry.value()) {
                    let name = &key["submodule.".len()..key.len() - ".path".len()];
                    declared.push((name.to_owned(), path.to_owned()));
                }
            })
        })
        .map_err(|e| invalid(e.message().to_owned()))?;

    let mut seen = HashSet::new();
    let mut submodules = Vec::new();
    for (name, declared_path) in declared {
        let path = normalize_relative_path(&declared_path)
            .filter(|p| !p.split('/').any(|seg| seg.eq_ignore_ascii_case(".git")))
            .ok_or_else(|| {
                invalid(format!(
                    "submodule {name:?} has the path {declared_path:?}, which is not inside the repository"
                ))
            })?;
        let Ok(gitlink) = parent.tree.get_path(Path::new(&path)) else {
            continue;
        };
        let skipped = config
            .get_string(&format!("submodule.{name}.update"))
            .is_ok_and(|update| update == "none");
        if gitlink.kind() != Some(ObjectType::Commit) || skipped || !seen.insert(path.clone()) {
            continue;
        }
        let url = config
            .get_string(&format!("submodule.{name}.url"))
            .map_err(|_| invalid(format!("submodule {name:?} ({path}) has no url")))?;
        submodules.push(Submodule {
            path,
            url,
            commit: gitlink.id(),
        });
    }
    Ok(submodules)
}

/// libgit2 follows `include.path` when it parses a config file, and
/// `.gitmodules` comes from the user: nothing from a file of the builder's
/// host may become a submodule URL, to be fetched or quoted in an error.
/// (git ignores includes in `.gitmodules`.)
fn has_include(text: &[u8]) -> bool {
    String::from_utf8_lossy(text).lines().any(|line| {
        line.trim_start()
            .strip_prefix('[')
            .is_some_and(|rest| rest.trim_start().to_ascii_lowercase().starts_with("include"))
    })
}

/// `./x` and `../x` are relative to `base`, the URL of the repository that
/// names the submodule, the way git resolves them against its remote. Only
/// http(s) is fetched: the builder has no SSH keys, and a `file://` URL or a
/// path would read repositories on the builder's own disk. Credentials
/// written into the URL are dropped: the job's own are the only ones used,
/// and the URL is shown in errors.
fn resolve_url(raw: &str, base: &Url) -> Option<Url> {
    let resolved = if raw.starts_with("./") || raw.starts_with("../") {
        let mut base = base.clone();
        let directory = format!("{}/", base.path().trim_end_matches('/'));
        base.set_path(&directory);
        base.join(raw)
    } else {
        Url::parse(raw)
    };
    let mut url = resolved.ok().filter(|url| matches!(url.scheme(), "http" | "https"))?;
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Some(url)
}

/// A `.gitmodules` URL fit for an error message.
fn without_credentials(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Err(_) => raw.to_owned(),
    }
}

/// Fetches a submodule's pinned commit; `false` when the server has no such
/// commit. By id at depth 1 first, which is all the build needs.
fn fetch_pinned(fetcher: &Fetcher<'_>, commit: Oid) -> Result<bool, GitError> {
    let present = || fetcher.repo.find_commit(commit).is_ok();
    match fetcher.fetch(&[&commit.to_string()], 1) {
        Ok(()) if present() => return Ok(true),
        Err(e) if e.is_final() => return Err(e),
        _ => {}
    }
    for depth in DEEPENING {
        fetcher.fetch(&SUBMODULE_REFSPECS, depth)?;
        if present() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Says which submodule a fetch error is about; the URL is in the
/// submodule error already.
fn in_submodule(e: GitError, path: &str, url: &Url) -> GitError {
    let message = match e {
        GitError::Cancelled => return e,
        GitError::CredentialsWithheld { .. } => format!("{e}; a submodule on another host must be public"),
        GitError::AuthenticationFailed { .. } => {
            "authentication failed (do the job's credentials give access to this repository?)".to_owned()
        }
        GitError::CredentialsRequired { .. } => "it needs credentials and the job has none".to_owned(),
        GitError::Fetch { message, .. } => format!("fetching failed: {message}"),
        other => other.to_string(),
    };
    GitError::Submodule {
        path: path.to_owned(),
        url: url.to_string(),
        message,
    }
}

/// What every fetch of one job shares.
struct Access<'a> {
    credentials: Option<&'a (String, Secret)>,
    /// The job's repository URL. Its credentials were issued for that
    /// provider and go to its scheme, host and port only, whoever asks: a
    /// submodule or a redirect elsewhere never sees them.
    provider: Url,
    cancel: &'a CancellationToken,
}

impl Access<'_> {
    fn is_provider(&self, url: &str) -> bool {
        Url::parse(url).is_ok_and(|url| url.origin() == self.provider.origin())
    }
}

/// `scheme://host:port` of a URL, without the path and any credentials.
fn origin_of(url: &str) -> String {
    Url::parse(url).map_or_else(|_| "another host".to_owned(), |url| url.origin().ascii_serialization())
}

struct Fetcher<'a> {
    repo: &'a Repository,
    url: &'a str,
    access: &'a Access<'a>,
}

impl Fetcher<'_> {
    fn fetch(&self, refspecs: &[&str], depth: i32) -> Result<(), GitError> {
        let url = self.url;
        let credentials = self.access.credentials;
        let credential_calls = Cell::new(0u32);
        let withheld_from = Cell::new(None);
        let mut callbacks = RemoteCallbacks::new();
        callbacks.credentials(|asking, _username_from_url, allowed| {
            credential_calls.set(credential_calls.get() + 1);
            // libgit2 asks again after every rejection; a second call means
            // the first answer was refused.
            if credential_calls.get() > 1 {
                return Err(git2::Error::from_str("credentials rejected"));
            }
            if credentials.is_some() && !self.access.is_provider(asking) {
                withheld_from.set(Some(origin_of(asking)));
                return Err(git2::Error::from_str(
                    "credentials are only sent to the job's git provider",
                ));
            }
            match credentials {
                Some((user, password)) if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) => {
                    Cred::userpass_plaintext(user, password.expose())
                }
                _ => Err(git2::Error::from_str("no credentials for this remote")),
            }
        });
        callbacks.transfer_progress(|_| !self.access.cancel.is_cancelled());
        callbacks.sideband_progress(|_| !self.access.cancel.is_cancelled());
        let mut options = FetchOptions::new();
        options
            .remote_callbacks(callbacks)
            .download_tags(AutotagOption::None)
            .depth(depth);
        let mut remote = self.repo.remote_anonymous(url).map_err(|e| GitError::Fetch {
            url: url.to_owned(),
            message: e.message().to_owned(),
        })?;
        let result = remote.fetch(refspecs, Some(&mut options), None);
        drop(remote);
        let withheld_from = withheld_from.take();
        match result {
            Ok(()) => Ok(()),
            Err(_) if self.access.cancel.is_cancelled() => Err(GitError::Cancelled),
            Err(_) if withheld_from.is_some() => Err(GitError::CredentialsWithheld {
                host: withheld_from.unwrap_or_default(),
                provider: origin_of(self.access.provider.as_str()),
            }),
            Err(_) if credential_calls.get() > 1 => Err(GitError::AuthenticationFailed { url: url.to_owned() }),
            Err(e) if e.code() == git2::ErrorCode::Auth || credential_calls.get() == 1 && credentials.is_none() => {
                if credentials.is_none() {
                    Err(GitError::CredentialsRequired { url: url.to_owned() })
                } else {
                    Err(GitError::AuthenticationFailed { url: url.to_owned() })
                }
            }
            Err(e) => Err(GitError::Fetch {
                url: url.to_owned(),
                message: e.message().to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(raw: &str, base: &str) -> Option<String> {
        resolve_url(raw, &Url::parse(base).unwrap()).map(String::from)
    }

    #[test]
    fn relative_urls_resolve_against_the_parent_like_git() {
        let base = "https://github.com/acme/web.git";
        assert_eq!(resolve("../lib.git", base).unwrap(), "https://github.com/acme/lib.git");
        assert_eq!(
            resolve("../../other/lib", base).unwrap(),
            "https://github.com/other/lib"
        );
        assert_eq!(
            resolve("./lib.git", base).unwrap(),
            "https://github.com/acme/web.git/lib.git"
        );
        assert_eq!(
            resolve("../lib.git", "http://git.local:8418/base/a/").unwrap(),
            "http://git.local:8418/base/lib.git"
        );
    }

    #[test]
    fn absolute_urls_must_be_http_and_lose_their_credentials() {
        let base = "https://github.com/acme/web.git";
        assert_eq!(
            resolve("https://bob:hunter22@git.example.com/x.git", base).unwrap(),
            "https://git.example.com/x.git"
        );
        for raw in [
            "git@github.com:acme/lib.git",
            "ssh://git@github.com/acme/lib.git",
            "file:///var/lib/deployra-builder/work/other",
            "/var/lib/deployra-builder/work/other",
            "lib.git",
        ] {
            assert_eq!(resolve(raw, base), None, "{raw}");
        }
        assert_eq!(
            without_credentials("https://bob:hunter22@git.example.com/x.git"),
            "https://git.example.com/x.git"
        );
        assert_eq!(
            without_credentials("git@github.com:acme/lib.git"),
            "git@github.com:acme/lib.git"
        );
    }

    #[test]
    fn includes_in_gitmodules_are_spotted() {
        assert!(has_include(
            b"[submodule \"a\"]\n\tpath = a\n[include]\n\tpath = /etc/x\n"
        ));
        assert!(has_include(b"  [ IncludeIf \"gitdir:/\"]\n"));
        assert!(!has_include(
            b"[submodule \"include\"]\n\tpath = include\n\turl = ../include.git\n"
        ));
    }

    #[test]
    fn credentials_go_to_the_provider_s_origin_only() {
        let cancel = CancellationToken::new();
        let access = Access {
            credentials: None,
            provider: Url::parse("https://github.com/acme/web.git").unwrap(),
            cancel: &cancel,
        };
        assert!(access.is_provider("https://github.com/acme/lib.git"));
        assert!(access.is_provider("https://GitHub.com:443/other/lib"));
        for other in [
            "http://github.com/acme/lib.git",
            "https://github.com:8443/acme/lib.git",
            "https://gitlab.com/acme/lib.git",
            "https://github.com.evil.example/acme/lib.git",
            "not a url",
        ] {
            assert!(!access.is_provider(other), "{other}");
        }
        assert_eq!(
            origin_of("http://127.0.0.2:8418/tests/lib.git"),
            "http://127.0.0.2:8418"
        );
    }
}
