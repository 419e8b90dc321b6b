#!/usr/bin/env python3
"""A boot storm: N warmed services started at once, as at boot.

N copies of examples/slowweb (each its own manifest and port; each a fixed
warm-up of --records records, ~2 CPU-seconds by default, and ~150 MB of
memory: started together they share the CPUs, as real services do) are measured three ways, in the same
run, every start timed from the moment this script spawns `warmer run`
(WARMER_SPAWNED_AT_NS) to ready as warmer's probe saw it; "all at once" is
from the first spawn to the last ready:

  cold, all at once      N `warmer run --cold` spawned together: until the last is ready
  first restore, all at once
                         N `warmer run` spawned together (images made first): each
                         image's first restore, which learns its working set
  restore, all at once   the same again (a third time: the second still learns
                         what the first could not see): what every later start
                         (a reboot) does, the working set first
  restore, one by one    the same N restores one after another: the sum

and checks that every restore restored (none fell back to cold). With
--drop-caches it also shows what the settled storm read from the disk until
the last service was ready, how long the disk was busy, and the disk's
sequential rate (an image's page file read after dropping the page cache):
whether the storm waited on the disk, and how close it came to it.

    benches/storm.py [N] [--warmup S] [--drop-caches] [--warmer target/release/warmer]
"""
import argparse, json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time

ap = argparse.ArgumentParser()
ap.add_argument("n", type=int, nargs="?", default=8)
ap.add_argument("--records", default="800000")
ap.add_argument("--drop-caches", action="store_true")
ap.add_argument("--warmer", default="target/release/warmer")
ap.add_argument("--json", action="store_true")
args = ap.parse_args()
W = os.path.abspath(args.warmer)
SERVER = os.path.abspath("examples/slowweb/server.py")

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

tmp = tempfile.mkdtemp(prefix="warmer-storm-")
mdir, cdir, rdir = (os.path.join(tmp, d) for d in ("manifests", "cache", "run"))
os.makedirs(mdir)
names = [f"storm{i}" for i in range(args.n)]
for name in names:
    with open(os.path.join(mdir, f"{name}.yaml"), "w") as f:
        f.write(f'exec: ["/usr/bin/python3", "{SERVER}", "--port", "{free_port()}", "--records", "{args.records}"]\n'
                f'ready:\n  http: "http://127.0.0.1:PORT/health"\n  timeout: 300s\ncheckpoint:\n  settle: 200ms\n')
    # the port, twice
    text = open(os.path.join(mdir, f"{name}.yaml")).read()
    port = text.split('"--port", "')[1].split('"')[0]
    open(os.path.join(mdir, f"{name}.yaml"), "w").write(text.replace("PORT", port))
ENV = dict(os.environ, WARMER_MANIFEST_DIR=mdir, WARMER_CACHE_DIR=cdir, WARMER_RUN_DIR=rdir)

def record(name):
    try:
        return json.load(open(os.path.join(rdir, name, "state.json")))
    except (OSError, ValueError):
        return {}

SPAWNED = {}

def spawn(name, *extra):
    SPAWNED[name] = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    e = dict(ENV, WARMER_SPAWNED_AT_NS=str(SPAWNED[name]))
    return subprocess.Popen([W, "run", name, *extra], env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def wait(procs, want=lambda r: r.get("state") in ("ready", "checkpointing")):
    deadline = time.time() + 900
    done = {}
    while len(done) < len(procs):
        for name, p in procs.items():
            if name in done:
                continue
            if p.poll() is not None:
                sys.exit(f"{name}: warmer exited")
            r = record(name)
            if r.get("warmer_pid") == p.pid and want(r):
                done[name] = r
        if time.time() > deadline:
            sys.exit("not ready in 900 s")
        time.sleep(0.01)
    return done

def stop(procs):
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for p in procs.values():
        p.wait(timeout=120)

def disk():
    """(MB read, ms busy) of whole disks so far: /proc/diskstats fields 6
    and 13 of devices with /sys/block/NAME/device (as `warmer bench`)."""
    mb = busy = 0
    for line in open("/proc/diskstats"):
        f = line.split()
        if len(f) >= 13 and os.path.exists(f"/sys/block/{f[2]}/device"):
            mb += int(f[5]) * 512 / 1e6
            busy += int(f[12])
    return mb, busy

def sequential_rate():
    """MB/s reading the largest page file of the cache, page cache dropped."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(cdir) for f in fs if f.startswith("pages-")]
    big = max(files, key=os.path.getsize)
    os.sync()
    open("/proc/sys/vm/drop_caches", "w").write("3")
    t0, n = time.monotonic(), 0
    with open(big, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            n += len(chunk)
    return n / 1e6 / (time.monotonic() - t0), n / 1e6

class DiskSampler:
    """disk() every 5 ms from a thread of its own, so that the disk's use
    can be read at the moment the last service was ready (this script
    notices it later: it polls, on CPUs the services and their lazy
    daemons are busy with)."""
    def __init__(self):
        self.samples, self.done = [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
    def run(self):
        while not self.done.is_set():
            self.samples.append((time.clock_gettime_ns(time.CLOCK_MONOTONIC), *disk()))
            time.sleep(0.005)
    def stop(self):
        self.done.set()
        self.thread.join()
    def between(self, t0_ns, t1_ns):
        """(MB read, ms busy) from the last sample at or before t0_ns to
        the last at or before t1_ns."""
        at = lambda t: [x for x in self.samples if x[0] <= t][-1]
        a, b = at(t0_ns), at(t1_ns)
        return b[1] - a[1], b[2] - a[2]

def first_spawn_to_last_ready(recs):
    """ms from the first `warmer run` spawned to the last one ready, each
    ready at its own spawn moment plus its own start-to-ready time."""
    first = min(SPAWNED[n] for n in recs) / 1000
    return (max(SPAWNED[n] / 1000 + r["ready_from_spawn_us"] for n, r in recs.items()) - first) / 1000

def drop():
    if args.drop_caches:
        os.sync()
        open("/proc/sys/vm/drop_caches", "w").write("3")

try:
    # Cold, all at once.
    drop()
    procs = {n: spawn(n, "--cold") for n in names}
    recs = wait(procs)
    stop(procs)
    cold_all = first_spawn_to_last_ready(recs)
    # Images, one by one (not measured).
    for n in names:
        p = {n: spawn(n)}
        wait(p, lambda r: r.get("image") and r.get("state") == "ready")
        stop(p)
    def kind(r):
        c = r.get("restore_choice") or {}
        return "eager" if not c.get("lazy") else "working set first" if c.get("working_set") else "lazy"
    used = {}
    def all_at_once():
        drop()
        sampler = DiskSampler()
        time.sleep(0.02)
        procs = {n: spawn(n) for n in names}
        recs = wait(procs)
        sampler.stop()
        first = min(SPAWNED[n] for n in recs)
        last_ready = max(SPAWNED[n] + r["ready_from_spawn_us"] * 1000 for n, r in recs.items())
        used["mb"], used["busy_ms"] = sampler.between(first, last_ready)
        used["window_ms"] = round((last_ready - first) / 1e6)
        stop(procs)
        kinds = {n: r["last_start"] for n, r in recs.items()}
        if any(k != "restored" for k in kinds.values()):
            sys.exit(f"not every service was restored: {kinds}")
        return (first_spawn_to_last_ready(recs),
                sorted({kind(r) for r in recs.values()}))
    # Restores, all at once: the first (lazy, learning), the second (the
    # working set first, still learning what the first could not see), then
    # a later one (settled).
    first_all, first_choices = all_at_once()
    second_all, _ = all_at_once()
    restore_all, choices = all_at_once()
    # Restores, one by one.
    drop()
    seq = 0.0
    for n in names:
        p = {n: spawn(n)}
        r = wait(p)[n]
        stop(p)
        assert r["last_start"] == "restored", r
        seq += r["ready_from_spawn_us"] / 1000
    if args.drop_caches:
        rate, measured = sequential_rate()
        used.update(sequential_mb_s=round(rate), measured_mb=round(measured),
                    sequential_ms=round(used["mb"] / rate * 1000), mb=round(used["mb"], 1))
    result = {"services": args.n, "cold_all_ms": round(cold_all),
              "first_restore_all_ms": round(first_all), "first_kinds": first_choices,
              "second_restore_all_ms": round(second_all),
              "restore_all_ms": round(restore_all),
              "restore_one_by_one_ms": round(seq), "ratio": round(cold_all / restore_all, 1),
              "drop_caches": args.drop_caches, "kinds": choices}
    if args.drop_caches:
        result["disk"] = used
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("| services | page cache | cold, all at once | first restore, all at once | restore, all at once | restore, one by one | cold / restore (all at once) |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {args.n} x slowweb | {'dropped' if args.drop_caches else 'warm'} | {cold_all / 1000:.2f} s | "
              f"{first_all:.0f} ms ({', '.join(first_choices)}) | {restore_all:.0f} ms ({', '.join(choices)}) | "
              f"{seq:.0f} ms | **{cold_all / restore_all:.1f}x** |")
        if args.drop_caches:
            print(f"\nThe restores all at once (the last row's): from the first spawn until the last was "
                  f"ready ({used['window_ms']} ms; the disk sampled every 5 ms) the disk read {used['mb']:.0f} MB and was busy {used['busy_ms']} ms "
                  f"({used['busy_ms'] / used['window_ms']:.0%}). It reads {used['sequential_mb_s']} MB/s "
                  f"sequentially (a page file, {used['measured_mb']} MB): those MB alone take "
                  f"{used['sequential_ms']} ms.")
finally:
    shutil.rmtree(tmp, ignore_errors=True)
