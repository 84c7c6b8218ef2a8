//! Reusing a service's layers across its builds, within a disk budget.
//!
//! After a build, the image is also tagged `deployra-cache/<serviceId>:latest`
//! and kept; the classic builder then finds that service's layers by itself
//! next time. A host without that tag (new, replaced, or another host of
//! the fleet) first pulls the service's last pushed image and names it as
//! the build's `cachefrom`. Kept tags are evicted least recently used first
//! when the disk holding Docker's data gets short of free space.

use std::path::Path;
use std::time::Duration;

use tokio::sync::RwLock;

use super::docker::{Engine, ImageError};

/// The local repository of kept images, one tag per service.
pub const CACHE_REPOSITORY: &str = "deployra-cache";

/// How long a build waits for the registry's copy of the last image. The
/// cache is an optimisation: a slow registry must not hold the build up.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(120);

/// The steps in which BuildKit's cache is pruned, oldest use first, until
/// the disk has room: a week, a day, an hour, then everything.
const BUILD_CACHE_AGES: [Option<&str>; 4] = [Some("168h"), Some("24h"), Some("1h"), None];

#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    /// `BUILD_CACHE`: off builds every layer anew.
    pub enabled: bool,
    /// `BUILD_CACHE_MIN_FREE_GB`: below this much free space on Docker's
    /// data disk, kept images are evicted.
    pub min_free_bytes: u64,
}

pub fn cache_tag(service_id: &str) -> String {
    format!("{CACHE_REPOSITORY}/{service_id}:latest")
}

/// Where the build takes its cache from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheSource {
    /// Build every layer (BUILD_CACHE off).
    Disabled,
    /// The engine's local images: this host has built the service before.
    Local,
    /// Images pulled from the registry (the classic builder then uses only
    /// these, so they must be the service's last image).
    From(Vec<String>),
}

/// A kept image and when it was last tagged, that is last built, in
/// nanoseconds since the epoch (0 when the engine does not say).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptImage {
    pub tag: String,
    pub last_used: i128,
}

/// Kept images in the order they are evicted: least recently used first.
pub fn eviction_order(mut kept: Vec<KeptImage>) -> Vec<KeptImage> {
    kept.sort_by_key(|k| k.last_used);
    kept
}

/// Free bytes on the filesystem holding `path`, when it can be read from
/// here (a remote `DOCKER_HOST`'s disk cannot).
pub fn free_bytes(path: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Frees disk when Docker's data disk is short of `min_free_bytes`: first
/// images nothing refers to, then BuildKit's build cache and kept caches,
/// each least recently used first,
/// until there is enough room. Logs what it removed; never fails a job.
/// Pruning waits for the running builds to finish their build step (`disk`).
pub async fn enforce_budget(engine: &Engine, config: &CacheConfig, disk: &RwLock<()>) {
    let root = match engine.data_root().await {
        Ok(Some(root)) => root,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(error = %e, "cannot ask the engine where its data is");
            return;
        }
    };
    let short = || free_bytes(&root).is_some_and(|free| free < config.min_free_bytes);
    if !short() {
        return;
    }
    // Alone: no build is between two steps, and no other check prunes.
    let _alone = disk.write().await;
    if !short() {
        return;
    }
    tracing::warn!(
        data_root = %root.display(),
        free_bytes = free_bytes(&root).unwrap_or(0),
        min_free_bytes = config.min_free_bytes,
        "Docker's disk is short of space; pruning"
    );
    prune(engine, "unreferenced images").await;
    // BuildKit's cache, least recently used first: the `until` filter is
    // what every Engine API version offers for that.
    for unused_for in BUILD_CACHE_AGES {
        if !short() {
            return;
        }
        let what = match unused_for {
            Some(age) => format!("build cache unused for {age}"),
            None => "build cache".to_owned(),
        };
        log_pruned(&what, engine.prune_build_cache(unused_for).await);
    }
    if !short() {
        return;
    }
    let kept = match engine.kept_images().await {
        Ok(kept) => kept,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list kept build caches");
            return;
        }
    };
    for image in eviction_order(kept) {
        if !short() {
            break;
        }
        match engine.remove_tag(&image.tag).await {
            Ok(()) => prune(engine, &image.tag).await,
            Err(e) => tracing::warn!(image = %image.tag, error = %e, "could not evict a kept build cache"),
        }
    }
}

async fn prune(engine: &Engine, what: &str) {
    log_pruned(what, engine.prune_dangling().await);
}

/// One journal line per prune: what, and how much it freed.
fn log_pruned(what: &str, result: Result<u64, ImageError>) {
    match result {
        Ok(bytes) => tracing::info!(what, freed_bytes = bytes, "pruned"),
        Err(e) => tracing::warn!(what, error = %e, "pruning failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_goes_first() {
        let kept = vec![
            KeptImage {
                tag: "deployra-cache/b:latest".into(),
                last_used: 1_795_000_003_500_000_000,
            },
            KeptImage {
                tag: "deployra-cache/a:latest".into(),
                last_used: 1_794_999_999_900_000_000,
            },
            KeptImage {
                tag: "deployra-cache/c:latest".into(),
                last_used: 1_795_000_003_250_000_000,
            },
        ];
        let order: Vec<_> = eviction_order(kept).into_iter().map(|k| k.tag).collect();
        assert_eq!(
            order,
            [
                "deployra-cache/a:latest",
                "deployra-cache/c:latest",
                "deployra-cache/b:latest"
            ]
        );
    }

    #[test]
    fn free_space_of_an_existing_path_is_known() {
        assert!(free_bytes(Path::new("/")).is_some());
        assert!(free_bytes(Path::new("/does/not/exist")).is_none());
    }
}
