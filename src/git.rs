//! Fetches exactly the commit to build with libgit2, and checks it out.
//!
//! libgit2 has no partial clone that fetches missing objects on demand, so
//! the commit is fetched explicitly: by its id with depth 1 when the job
//! names a full commit id (servers that allow any SHA in `want` answer that),
//! else the branch tip with depth 1. A server that refuses fetch-by-id, or an
//! abbreviated id, falls back to fetching the branch deeper until the commit
//! is there. Credentials are handed over in the credential callback; the URL
//! never contains them.

use std::cell::Cell;
use std::path::Path;

use git2::{AutotagOption, Cred, CredentialType, FetchOptions, Oid, RemoteCallbacks, Repository};
use tokio_util::sync::CancellationToken;

use crate::job::GitSource;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("authentication to {url} failed (check the provider's username and token/password)")]
    AuthenticationFailed { url: String },
    #[error("{url} needs credentials and the job has none")]
    CredentialsRequired { url: String },
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
    #[error("cancelled")]
    Cancelled,
}

/// What to fetch.
pub struct FetchRequest<'a> {
    pub source: &'a GitSource,
    pub branch: &'a str,
    pub commit: Option<&'a str>,
}

/// Depths tried, in order, when the commit is not reachable by id. Zero is
/// libgit2's "everything".
const DEEPENING: [i32; 3] = [50, 1000, 0];

/// Fetches into a new repository at `dest` and checks out the commit;
/// returns its full id. Blocking: call from `spawn_blocking`. Returns
/// [`GitError::Cancelled`] soon after `cancel` fires (libgit2 checks the
/// progress callbacks many times a second during a transfer).
pub fn checkout(req: &FetchRequest<'_>, dest: &Path, cancel: &CancellationToken) -> Result<String, GitError> {
    let url = req.source.url.clone();
    let repo = Repository::init(dest).map_err(|e| GitError::Fetch {
        url: url.clone(),
        message: format!("cannot create a repository in {}: {}", dest.display(), e.message()),
    })?;
    let fetcher = Fetcher {
        repo: &repo,
        req,
        cancel,
    };
    let branch_ref = format!("refs/remotes/origin/{}", req.branch);
    let branch_spec = format!("+refs/heads/{}:{branch_ref}", req.branch);

    let oid = match req.commit {
        Some(commit) => {
            let by_id = if commit.len() == 40 || commit.len() == 64 {
                match fetcher.fetch(&[commit], 1) {
                    Ok(()) => find_commit(&repo, commit),
                    // Authentication and cancellation will not get better
                    // with another refspec; a refused want will.
                    Err(
                        e @ (GitError::AuthenticationFailed { .. }
                        | GitError::CredentialsRequired { .. }
                        | GitError::Cancelled),
                    ) => return Err(e),
                    Err(_) => None,
                }
            } else {
                None
            };
            match by_id {
                Some(oid) => oid,
                None => deepen_until_found(&fetcher, &branch_spec, &branch_ref, commit)?,
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
    Ok(oid.to_string())
}

fn deepen_until_found(
    fetcher: &Fetcher<'_>,
    branch_spec: &str,
    branch_ref: &str,
    commit: &str,
) -> Result<Oid, GitError> {
    let url = &fetcher.req.source.url;
    for depth in DEEPENING {
        fetcher.fetch(&[branch_spec], depth)?;
        if resolve_branch(fetcher.repo, branch_ref).is_none() {
            return Err(GitError::BranchNotFound {
                url: url.clone(),
                branch: fetcher.req.branch.to_owned(),
            });
        }
        if let Some(oid) = find_commit(fetcher.repo, commit) {
            return Ok(oid);
        }
    }
    Err(GitError::CommitNotFound {
        url: url.clone(),
        branch: fetcher.req.branch.to_owned(),
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

struct Fetcher<'a> {
    repo: &'a Repository,
    req: &'a FetchRequest<'a>,
    cancel: &'a CancellationToken,
}

impl Fetcher<'_> {
    fn fetch(&self, refspecs: &[&str], depth: i32) -> Result<(), GitError> {
        let url = &self.req.source.url;
        let credential_calls = Cell::new(0u32);
        let mut callbacks = RemoteCallbacks::new();
        callbacks.credentials(|_url, _username_from_url, allowed| {
            credential_calls.set(credential_calls.get() + 1);
            // libgit2 asks again after every rejection; a second call means
            // the first answer was refused.
            if credential_calls.get() > 1 {
                return Err(git2::Error::from_str("credentials rejected"));
            }
            match &self.req.source.credentials {
                Some((user, password)) if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) => {
                    Cred::userpass_plaintext(user, password.expose())
                }
                _ => Err(git2::Error::from_str("no credentials for this remote")),
            }
        });
        callbacks.transfer_progress(|_| !self.cancel.is_cancelled());
        callbacks.sideband_progress(|_| !self.cancel.is_cancelled());
        let mut options = FetchOptions::new();
        options
            .remote_callbacks(callbacks)
            .download_tags(AutotagOption::None)
            .depth(depth);
        let mut remote = self.repo.remote_anonymous(url).map_err(|e| GitError::Fetch {
            url: url.clone(),
            message: e.message().to_owned(),
        })?;
        let result = remote.fetch(refspecs, Some(&mut options), None);
        drop(remote);
        match result {
            Ok(()) => Ok(()),
            Err(_) if self.cancel.is_cancelled() => Err(GitError::Cancelled),
            Err(_) if credential_calls.get() > 1 => Err(GitError::AuthenticationFailed { url: url.clone() }),
            Err(e)
                if e.code() == git2::ErrorCode::Auth
                    || credential_calls.get() == 1 && self.req.source.credentials.is_none() =>
            {
                if self.req.source.credentials.is_none() {
                    Err(GitError::CredentialsRequired { url: url.clone() })
                } else {
                    Err(GitError::AuthenticationFailed { url: url.clone() })
                }
            }
            Err(e) => Err(GitError::Fetch {
                url: url.clone(),
                message: e.message().to_owned(),
            }),
        }
    }
}
