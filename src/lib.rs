//! deployra-builder: the build worker of the Deployra platform.
//!
//! A job's path through the program, module by module:
//!
//! 1. [`worker`] takes a job from the Redis list named by `REDIS_QUEUE_NAME`
//!    through [`queue`], which moves it atomically into this worker's
//!    processing list so that a crash never loses it. A payload that is not a
//!    job at all goes to the dead-letter list; everything else becomes a
//!    [`job::Job`] and is validated into a [`job::BuildSpec`].
//! 2. [`pipeline`] runs one job under its own cancellation token and root
//!    span: [`git`] fetches exactly the commit to build, [`workspace`] writes
//!    the job's `.env` and `.dockerignore`, [`image::context`] streams the
//!    build context as a tar honouring `.dockerignore`, [`image::docker`]
//!    builds (with the Engine's BuildKit, whose progress [`image::buildkit`]
//!    turns into log lines and which calls back [`image::session`] for the
//!    job's build secrets and the operator's registry logins, or with its
//!    classic builder) and pushes through the Docker Engine API, and
//!    [`registry::ecr`] provides the repository and the push credentials.
//! 3. Every status and every line of build output goes to the dashboard
//!    through [`dashboard`]: statuses are retried, output is batched by a
//!    [`dashboard::LogShipper`] so a chatty build is never slowed down by
//!    its own reporting. [`redact`] masks every secret of the job before any
//!    text leaves the process.
//! 4. When the final status is delivered the worker acknowledges the job,
//!    removing it from the processing list.
//!
//! Operators watch all this through [`metrics`] (counted along the way and
//! served with a health check by [`ops`] on `METRICS_ADDR`) and through
//! [`systemd`], which tells the service manager when the builder is ready,
//! what it builds, that it is alive, and that it is stopping.
//!
//! [`config`] turns the environment into a validated [`config::Config`]
//! before any of this starts; `main` only wires the pieces together.
#![forbid(unsafe_code)]

pub mod cancel;
pub mod config;
pub mod control;
pub mod dashboard;
pub mod envfile;
pub mod error;
pub mod git;
pub mod image;
pub mod job;
pub mod metrics;
pub mod ops;
pub mod pipeline;
pub mod queue;
pub mod redact;
pub mod registry;
pub mod systemd;
pub mod task;
pub mod worker;
pub mod workspace;
