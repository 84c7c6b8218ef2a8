//! Turning a checkout into an image: the build context ([`context`], with
//! Docker's `.dockerignore` rules in [`dockerignore`]) and the Docker Engine
//! ([`docker`]).

pub mod cache;
pub mod context;
pub mod docker;
pub mod dockerignore;
pub mod pack;
