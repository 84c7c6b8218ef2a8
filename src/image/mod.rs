//! Turning a checkout into an image: the build context ([`context`], with
//! Docker's `.dockerignore` rules in [`dockerignore`]), the Docker Engine
//! ([`docker`], with BuildKit's progress read by [`buildkit`] and the
//! session BuildKit calls back, [`session`] over [`engine_conn`]) or Cloud
//! Native Buildpacks ([`pack`]), and the output lines of all of them
//! ([`lines`]).

pub mod buildkit;
pub mod cache;
pub mod context;
pub mod docker;
pub mod dockerignore;
pub mod engine_conn;
pub mod lines;
pub mod pack;
pub mod session;
