#!/usr/bin/env python3
"""Build-cache timings: first build, a source-only rebuild, the same rebuild
with BUILD_CACHE=off, and a rebuild on a "fresh host" (a new builder
process, with BuildKit's build cache pruned and the classic builder's kept
image removed, so the cache comes from the registry). Two fixtures: the slow
dependency step of tests/cache.rs, and a heavier one that writes 3,000
files and 64 MB in its dependency step.

    ./bench/cache.py [--binary target/release/deployra-builder] [--rounds 3] [--builder classic]

Needs the test bed (testbed/up). Prints seconds from RPUSH to BUILDED.
"""
import argparse, json, os, shutil, statistics, subprocess, tempfile, time, urllib.request, uuid

STATE = os.environ.get("TESTBED_STATE", "/var/lib/deployra-testbed")
ENV = dict(l.strip().split("=", 1) for l in open(f"{STATE}/env") if "=" in l)

FIXTURES = {
    "sleep-3s": "RUN echo installing && sleep 3 && cp /deps.txt /installed.txt",
    "3000-files-64MB": "RUN mkdir /deps && for i in $(seq 1 3000); do echo $i > /deps/$i; done"
    " && dd if=/dev/urandom of=/deps/blob bs=1M count=64 2>/dev/null",
}


def git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", *args], cwd=cwd, check=True,
                   capture_output=True)


def calls(dep):
    url = f"{ENV['TESTBED_DASHBOARD_URL']}/_testbed/calls?deploymentId={dep}"
    return json.load(urllib.request.urlopen(url))


def build(queue, repo, service, env_value):
    dep = f"dep-cache-{uuid.uuid4().hex[:10]}"
    job = {"deploymentId": dep, "serviceId": service, "commitSha": "", "branch": "main", "repositoryName": repo,
           "gitProvider": {"type": "CUSTOM", "url": ENV["TESTBED_GIT_URL"], "username": ENV["TESTBED_GIT_USERNAME"],
                           "password": ENV["TESTBED_GIT_PASSWORD"]},
           "environmentVariables": [{"key": "MODE", "value": env_value}]}
    start = time.time()
    subprocess.run(["redis-cli", "-p", ENV["REDIS_PORT"], "RPUSH", queue, json.dumps(job)], check=True,
                   capture_output=True)
    while time.time() - start < 600:
        for c in calls(dep):
            status = (c.get("body") or {}).get("status")
            if c["kind"] == "status" and status in ("BUILDED", "FAILED"):
                assert status == "BUILDED", c
                return c["receivedAt"] - start
        time.sleep(0.05)
    raise SystemExit(f"{dep} did not finish")


def daemon(binary, queue, cache, builder):
    env = {k: v for k, v in ENV.items() if not k.startswith("TESTBED_")}
    env.update(PATH=os.environ["PATH"], REDIS_QUEUE_NAME=queue, WORKER_ID=queue, BUILD_CACHE=cache,
               WORK_DIR=tempfile.mkdtemp(), LOG_LEVEL="warn", DOCKER_BUILDER=builder)
    return subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/deployra-builder")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--builder", choices=["buildkit", "classic"], default="buildkit")
    args = ap.parse_args()
    run = uuid.uuid4().hex[:8]
    on, off = f"bench-cache-on-{run}", f"bench-cache-off-{run}"
    daemons = [daemon(args.binary, on, "on", args.builder), daemon(args.binary, off, "off", args.builder)]
    time.sleep(1)
    results = {}
    try:
        for name, step in FIXTURES.items():
            for r in range(args.rounds):
                repo = f"bench/cache-{run}-{name}-{r}"
                bare = f"{ENV['TESTBED_GIT_ROOT']}/{repo}.git"
                work = tempfile.mkdtemp()
                subprocess.run(["git", "init", "-q", "--bare", "-b", "main", bare], check=True)
                git(work, "init", "-q", "-b", "main")
                open(f"{work}/Dockerfile", "w").write(
                    f"FROM local/busybox:latest\nCOPY deps.txt /deps.txt\n{step} # {run}-{r}\nCOPY src/ /app/src/\n")
                open(f"{work}/deps.txt", "w").write(f"{run}-{r}\n")
                os.makedirs(f"{work}/src")
                open(f"{work}/src/main.txt", "w").write("1\n")
                git(work, "add", "-A"); git(work, "commit", "-qm", "1"); git(work, "push", "-q", bare, "HEAD:main")
                svc = f"svc-cache-{run}-{r}-{len(results)}"
                t = {"first": build(on, repo, svc, "a")}
                open(f"{work}/src/main.txt", "w").write("2\n")
                git(work, "commit", "-qam", "2"); git(work, "push", "-q", bare, "HEAD:main")
                t["rebuild"] = build(on, repo, svc, "a")
                t["rebuild, BUILD_CACHE=off"] = build(off, repo, f"{svc}-off", "a")
                subprocess.run(["docker", "rmi", f"deployra-cache/{svc}:latest"], capture_output=True)
                subprocess.run(["docker", "image", "prune", "-f"], capture_output=True)
                subprocess.run(["docker", "builder", "prune", "--all", "--force"], capture_output=True)
                daemons[0].terminate(); daemons[0].wait()
                daemons[0] = daemon(args.binary, on, "on", args.builder)
                time.sleep(1)
                open(f"{work}/src/main.txt", "w").write("3\n")
                git(work, "commit", "-qam", "3"); git(work, "push", "-q", bare, "HEAD:main")
                t["fresh host (cache from registry)"] = build(on, repo, svc, "a")
                subprocess.run(["docker", "rmi", f"deployra-cache/{svc}:latest"], capture_output=True)
                shutil.rmtree(work); shutil.rmtree(bare)
                for k, v in t.items():
                    results.setdefault((name, k), []).append(v)
    finally:
        for d in daemons:
            d.terminate(); d.wait()
    print("| fixture | build | median s (min–max) |\n|---|---|---|")
    for (name, k), v in results.items():
        print(f"| {name} | {k} | {statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f}) |")


if __name__ == "__main__":
    main()
