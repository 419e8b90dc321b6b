#!/usr/bin/env python3
"""The fleet workflow, measured: node A makes SVC's image, restores it once
(learning its working set) and pushes both to a
real registry (Debian's docker-registry on a free local port, its own
storage); node B (empty cache, same manifest, same run directory path as
every machine's /run/warmer) starts SVC: pull + restore. Beside it, in the
same run: B's cold start and B's restore once the image is local.

Every start is timed from the moment this script spawns `warmer run`
(WARMER_SPAWNED_AT_NS, CLOCK_MONOTONIC) to ready as warmer's probe saw it.

    benches/fleet.py SVC [ROUNDS] [--warmer target/release/warmer]
"""
import argparse, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("service")
ap.add_argument("rounds", type=int, nargs="?", default=3)
ap.add_argument("--warmer", default="target/release/warmer")
ap.add_argument("--manifests", default="manifests")
ap.add_argument("--json", action="store_true")
args = ap.parse_args()
W = os.path.abspath(args.warmer)
SVC = args.service

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

tmp = tempfile.mkdtemp(prefix="warmer-fleet-")
port = free_port()
reg_dir = os.path.join(tmp, "registry")
os.makedirs(reg_dir)
with open(os.path.join(reg_dir, "config.yml"), "w") as f:
    f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {reg_dir}/data\n"
            f"http:\n  addr: 127.0.0.1:{port}\n")
reg = subprocess.Popen(["docker-registry", "serve", os.path.join(reg_dir, "config.yml")],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(200):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.1).close(); break
    except OSError:
        time.sleep(0.05)

mdir = os.path.join(tmp, "manifests")
os.makedirs(mdir)
# Nodes pull only images signed by a key they trust: one pair for the fleet.
keys = os.path.join(tmp, "keys")
os.makedirs(keys, mode=0o700)
subprocess.run([W, "keygen", os.path.join(keys, "fleet")], check=True, capture_output=True)
src = open(os.path.join(args.manifests, f"{SVC}.yaml")).read()
with open(os.path.join(mdir, f"{SVC}.yaml"), "w") as f:
    f.write(src + f"\nremote:\n  repository: 127.0.0.1:{port}/warmer/{SVC}\n  insecure: true\n  timeout: 120s\n"
            f"  sign: {keys}/fleet.key\n  verify: [{keys}/fleet.pub]\n")
RUN = "/run/warmer-fleet"

def env(node):
    e = dict(os.environ)
    e.update(WARMER_MANIFEST_DIR=mdir, WARMER_CACHE_DIR=os.path.join(tmp, node), WARMER_RUN_DIR=RUN)
    return e

def start(node, *extra):
    """`warmer run` until ready; returns (ms from spawn to ready, last_start)."""
    e = env(node)
    e["WARMER_SPAWNED_AT_NS"] = str(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
    p = subprocess.Popen([W, "run", SVC, *extra], env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = os.path.join(RUN, SVC, "state.json")
    deadline = time.time() + 600
    while True:
        if p.poll() is not None:
            sys.exit(f"warmer run exited: {p.stderr.read().decode()}")
        try:
            s = json.load(open(state))
            if s.get("warmer_pid") == p.pid and s.get("state") in ("ready", "checkpointing"):
                break
        except (OSError, ValueError):
            pass
        if time.time() > deadline:
            sys.exit("not ready in 600 s")
        time.sleep(0.01)
    ms = s["ready_from_spawn_us"] / 1000.0
    kind = s["last_start"]
    return p, ms, kind

def stop(p):
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)

def warmer_json(node, *a):
    out = subprocess.run([W, *a, "--json"], env=env(node), capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"warmer {' '.join(a)}: {out.stderr}")
    return json.loads(out.stdout)

def fresh_node(node):
    shutil.rmtree(os.path.join(tmp, node), ignore_errors=True)
    shutil.rmtree(os.path.join(RUN, SVC), ignore_errors=True)

try:
    # Node A: make the image (cold start, checkpoint at ready), restore it
    # once (what that restore touches first becomes the image's working set),
    # then push: image and working set travel together.
    fresh_node("a")
    p, _, _ = start("a")
    while True:
        s = json.load(open(os.path.join(RUN, SVC, "state.json")))
        if s.get("image") and s.get("state") == "ready":
            break
        time.sleep(0.05)
    stop(p)
    p, _, kind = start("a")
    stop(p)
    assert kind == "restored", kind
    t = time.monotonic()
    pushed = warmer_json("a", "push", SVC)
    push_wall = (time.monotonic() - t) * 1000
    t = time.monotonic()
    again = warmer_json("a", "push", SVC)
    again_wall = (time.monotonic() - t) * 1000

    pull_restore, local_restore, cold = [], [], []
    kinds = set()
    for _ in range(args.rounds):
        fresh_node("b")
        p, ms, kind = start("b")
        stop(p)
        if kind != "restored":
            sys.exit(f"node B did not restore the pulled image ({kind})")
        pull_restore.append(ms)
        c = json.load(open(os.path.join(RUN, SVC, "state.json"))).get("restore_choice") or {}
        kinds.add("eager" if not c.get("lazy") else "working set first" if c.get("working_set") else "lazy")
        p, ms, kind = start("b")
        stop(p)
        assert kind == "restored", kind
        local_restore.append(ms)
        p, ms, kind = start("b", "--cold")
        stop(p)
        cold.append(ms)
    med = statistics.median
    result = {
        "service": SVC, "rounds": args.rounds,
        "image_bytes": pushed["raw_bytes"], "wire_bytes": pushed["wire_bytes"],
        "push_ms": round(push_wall), "push_again_ms": round(again_wall),
        "push_again_sent_bytes": again["sent_bytes"],
        "pull_restore_ms": round(med(pull_restore)), "local_restore_ms": round(med(local_restore)),
        "cold_ms": round(med(cold)), "fresh_node_kinds": sorted(kinds),
        "samples": {"pull_restore": pull_restore, "local_restore": local_restore, "cold": cold},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        mb = lambda b: f"{b / 1e6:.1f} MB"
        print("| service | image | on the wire (zstd) | push | push again | fresh node: pull + restore | restore (local) | cold start | cold / pull+restore |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {SVC} | {mb(result['image_bytes'])} | {mb(result['wire_bytes'])} | {result['push_ms']} ms | "
              f"{result['push_again_ms']} ms ({result['push_again_sent_bytes']} B sent) | {result['pull_restore_ms']} ms ({', '.join(sorted(kinds))}) | "
              f"{result['local_restore_ms']} ms | {result['cold_ms']} ms | "
              f"{result['cold_ms'] / result['pull_restore_ms']:.1f}x |")
finally:
    reg.terminate(); reg.wait()
    shutil.rmtree(os.path.join(RUN, SVC), ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
