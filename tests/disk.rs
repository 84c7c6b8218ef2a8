//! Disk hygiene on a build host whose Docker disk is short of space: after a
//! build the builder prunes unreferenced images, then evicts kept build
//! caches, least recently used first, and says so in its log.
//!
//! "Short" is made by asking for more free space than any disk has
//! (BUILD_CACHE_MIN_FREE_GB), so the budget is never met and everything
//! evictable goes. That reaches every build cache and dangling image of the
//! Engine, which is why this is a test binary of its own: cargo runs test
//! binaries one after another, so no other test's images are in use.

mod common;

use std::process::Command;

use common::Testbed;

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn image_exists(reference: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", reference])
        .output()
        .unwrap()
        .status
        .success()
}

/// An image no tag points at any more: built under a tag that a second
/// build then takes over.
fn dangling_image(bed: &Testbed) -> String {
    let tag = format!("deployra-test/{}:dangling", bed.unique("disk"));
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for round in ["first", "second"] {
        std::fs::write(
            dir.path().join("Dockerfile"),
            format!("FROM local/busybox:latest\nRUN echo {round} >/round\n"),
        )
        .unwrap();
        docker(&["build", "-q", "-t", &tag, dir.path().to_str().unwrap()]);
        ids.push(docker(&["image", "inspect", "-f", "{{.Id}}", &tag]));
    }
    docker(&["rmi", &tag]);
    assert_ne!(ids[0], ids[1]);
    ids.swap_remove(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_disk_prunes_unreferenced_images_and_evicts_kept_caches() {
    let bed = Testbed::load();
    let dangling = dangling_image(&bed);
    assert!(image_exists(&dangling));
    // Another service's kept cache, older than the one this build keeps.
    let other_cache = format!("deployra-cache/{}:latest", bed.unique("svc-other"));
    docker(&["tag", "local/busybox:latest", &other_cache]);

    // Two builds at once: the quick one ends, and checks the disk, while
    // the slow one is still building.
    let slow_repo = bed.new_repo("disk-slow");
    slow_repo.write(
        "Dockerfile",
        "FROM local/busybox:latest\nRUN echo slow-build-started\nRUN sleep 8\nRUN echo done >/done\n",
    );
    slow_repo.commit("slow app");
    let slow = bed.job(&slow_repo, serde_json::json!({}));
    let repo = bed.new_repo("disk");
    repo.write("Dockerfile", "FROM local/busybox:latest\nRUN echo layer >/layer\n");
    repo.commit("app");
    let job = bed.job(&repo, serde_json::json!({}));
    let mut daemon = bed.start_daemon(&[("BUILD_CACHE_MIN_FREE_GB", "100000"), ("BUILD_CONCURRENCY", "2")]);
    bed.rpush(&daemon.queue, &slow.payload()).await;
    bed.wait_log(&slow.deployment_id, "slow-build-started", 1, &mut daemon)
        .await;
    bed.rpush(&daemon.queue, &job.payload()).await;
    let dash = bed.wait_final(&job.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{}", dash.everything());
    let dash = bed.wait_final(&slow.deployment_id, &mut daemon).await;
    assert_eq!(dash.statuses(), ["BUILDING", "BUILDED"], "{}", dash.everything());

    // The budget is checked once the build is over.
    daemon.wait_output(&format!("what=\"{other_cache}\"")).await;
    let own_cache = format!("deployra-cache/{}:latest", job.service_id);
    // The classic builder keeps the build's image as its cache, and it is
    // evicted; BuildKit keeps no image (its cache is pruned instead).
    if bed.classic() {
        daemon.wait_output(&format!("what=\"{own_cache}\"")).await;
    }
    let log = daemon.output();
    assert!(log.contains("Docker's disk is short of space; pruning"), "{log}");
    assert!(log.contains("what=\"unreferenced images\""), "{log}");
    // BuildKit's cache is no image: it is pruned on its own, oldest first.
    assert!(log.contains("what=\"build cache unused for 168h\""), "{log}");
    assert!(log.contains("what=\"build cache\" freed_bytes="), "{log}");
    assert!(!image_exists(&dangling), "the dangling image is still there:\n{log}");
    assert!(!image_exists(&other_cache), "{other_cache} was not evicted:\n{log}");
    assert!(!image_exists(&own_cache), "{own_cache} was not evicted:\n{log}");
    // What is not ours to remove stays.
    assert!(image_exists("local/busybox:latest"));

    // Nothing was pruned while the slow build was making its image: the
    // classic builder's step images are untagged until the next step uses
    // them.
    let lines: Vec<&str> = log.lines().collect();
    let position = |what: &str, needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(what) && l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {what} and {needle}:\n{log}"))
    };
    let slow_build_ended = position(&slow.deployment_id, "step finished step=\"build\"");
    let first_prune = position("", "Docker's disk is short of space; pruning");
    assert!(
        first_prune > slow_build_ended,
        "pruned while a build was running:\n{log}"
    );
}
