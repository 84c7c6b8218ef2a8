//! Why a job did not produce an image. Each variant knows which step it
//! belongs to; [`JobError::kind`] is the stable label for reports and
//! metrics, and the `Display` form is the one-line `error` of FAILED.

use std::time::Duration;

use crate::dashboard::ReportError;
use crate::git::GitError;
use crate::image::docker::ImageError;
use crate::image::pack::PackError;
use crate::job::InvalidJob;
use crate::registry::ecr::RegistryError;
use crate::workspace::WorkspaceError;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("invalid job: {0}")]
    Invalid(#[from] InvalidJob),
    #[error("clone: {0}")]
    Git(#[from] GitError),
    #[error("prepare: {0}")]
    Workspace(#[from] WorkspaceError),
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("build: {0}")]
    Build(ImageError),
    #[error("build (buildpacks): {0}")]
    Pack(PackError),
    #[error("push: {0}")]
    Push(ImageError),
    #[error("dashboard: {0}")]
    Report(#[from] ReportError),
    #[error("cancelled")]
    Cancelled,
    #[error("timed out: the build ran longer than {}s (BUILD_TIMEOUT_SECS)", .0.as_secs())]
    TimedOut(Duration),
    #[error("internal error: {0}")]
    Internal(String),
}

impl JobError {
    pub fn kind(&self) -> &'static str {
        match self {
            JobError::Invalid(_) => "invalid_job",
            JobError::Git(GitError::AuthenticationFailed { .. } | GitError::CredentialsRequired { .. }) => "git_auth",
            JobError::Git(GitError::BranchNotFound { .. } | GitError::CommitNotFound { .. }) => "git_ref",
            JobError::Git(GitError::Cancelled) | JobError::Cancelled => "cancelled",
            JobError::Git(_) => "git",
            JobError::Workspace(_) => "prepare",
            JobError::Registry(_) => "registry",
            JobError::Build(ImageError::BuildFailed { .. }) => "build",
            JobError::Build(_) => "engine",
            JobError::Pack(PackError::NotInstalled { .. }) => "pack_missing",
            JobError::Pack(_) => "build",
            JobError::Push(_) => "push",
            JobError::Report(_) => "report",
            JobError::TimedOut(_) => "timeout",
            JobError::Internal(_) => "internal",
        }
    }

    pub fn is_cancelled(&self) -> bool {
        matches!(self, JobError::Cancelled | JobError::Git(GitError::Cancelled))
    }
}
