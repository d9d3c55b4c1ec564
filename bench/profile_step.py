"""Device time of a compiled JAX function by op: where a train or decode step spends its time.

    python bench/train_step.py --config=... --profile=/tmp/prof     # uses profile() below
    python bench/profile_step.py TRACE_DIR HLO.txt [--steps 3]      # a trace taken earlier

`profile(fn, hlo_text, out_dir, steps)` runs `fn(steps)` under `jax.profiler.trace` (with its
Perfetto JSON), then sums the device events by the HLO instruction each kernel ran for, and names
each by the JAX source op it came from (the `op_name` metadata of the optimized HLO: e.g.
`.../att/receptance/dot_general`). Prints the top instructions and the total per group
(`GROUPS`: the model part the op_name path names), in ms per step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

# First match wins: (group, regex on the op_name metadata, lower-cased).
GROUPS = (
    ("optimizer", r"/optimizer/|optax|adam|apply_updates"),  # train.step's named scopes
    ("WKV kernel", r"wkv7?_|pallas|triton|mosaic"),
    ("head + loss", r"/head/|/loss/|cross_entropy|log_softmax|logsumexp|/ln_out/"),
    ("embedding", r"/emb/|embed"),
    ("time-mix projections", r"/att/(?:receptance|key|value|output)/"),
    ("time-mix LoRA (w a v g)", r"/att/(?:dot_general|tanh|logistic|sigmoid)"),
    ("time-mix norm ln_x", r"/att/ln_x/"),
    ("time-mix elementwise", r"/att/"),
    ("channel-mix", r"/ffn/"),
    ("layer norms", r"/ln[012]/"),
    ("state / carry", r"carry|state"),
)


def _op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata (fusions take their root's)."""
    names = {}
    pat = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]+)\"")
    for line in hlo_text.splitlines():
        m = pat.match(line)
        if m:
            names[m.group(1)] = m.group(2)
    # A fusion instruction has no metadata of its own in some versions: its computation's root.
    calls = re.compile(r"^\s*%?([\w.\-]+)\s*=.*\bcalls=%?([\w.\-]+)")
    roots, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^\s*%?([\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            current = head.group(1)
        m = re.match(r"^\s*ROOT\s+%?([\w.\-]+)", line)
        if m and current:
            roots[current] = m.group(1)
    for line in hlo_text.splitlines():
        m = calls.match(line)
        if m and m.group(1) not in names and roots.get(m.group(2)) in names:
            names[m.group(1)] = names[roots[m.group(2)]]
    return names


def _device_events(trace_dir: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
                   + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                               recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no trace JSON under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in procs.items() if re.search(r"/device:(GPU|TPU)", name)}
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if device:
        # The kernels, on the stream lines (not the XLA op / module lines over them).
        streams = {(e["pid"], e["tid"]) for e in events if e.get("ph") == "M"
                   and e.get("name") == "thread_name" and e["pid"] in device
                   and str(e.get("args", {}).get("name", "")).startswith("Stream")}
        return [e for e in timed if e["pid"] in device
                and (not streams or (e["pid"], e.get("tid")) in streams)]
    # A CPU backend: its ops run on host threads, marked with the HLO op they ran.
    return [e for e in timed if "hlo_op" in e.get("args", {})]


def summarise(events: list[dict], names: dict[str, str], steps: int, top: int = 30) -> str:
    by_op, kernel_of = collections.Counter(), {}
    for e in events:
        args = e.get("args", {})
        op = args.get("hlo_op") or args.get("long_name") or e["name"]
        op = op.split(":")[-1].strip()
        by_op[op] += e["dur"] / 1e3 / steps  # us -> ms, per step
        kernel_of.setdefault(op, e["name"])
    total = sum(by_op.values())
    groups = collections.Counter()
    for op, ms in by_op.items():
        src = names.get(op, op).lower()
        group = next((g for g, rx in GROUPS if re.search(rx, src)), "other")
        groups[group] += ms
    lines = [f"device time {total:.2f} ms a step over {len(by_op)} HLO ops", "",
             "| group | ms/step | share |", "|---|---|---|"]
    lines += [f"| {g} | {ms:.2f} | {100 * ms / total:.1f}% |" for g, ms in groups.most_common()]
    lines += ["", "| HLO op | ms/step | kernel | source op |", "|---|---|---|---|"]
    for op, ms in by_op.most_common(top):
        src = names.get(op, "")
        lines.append(f"| {op} | {ms:.3f} | {kernel_of[op][:40]} | {src[-90:]} |")
    return "\n".join(lines)


def profile(fn, hlo_text: str, out_dir: str, steps: int = 3) -> str:
    import jax  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "step.hlo.txt"), "w") as f:
        f.write(hlo_text)
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        fn(steps)
    return summarise(_device_events(out_dir), _op_names(hlo_text), steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace_dir")
    p.add_argument("hlo")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=30)
    a = p.parse_args()
    with open(a.hlo) as f:
        names = _op_names(f.read())
    print(summarise(_device_events(a.trace_dir), names, a.steps, a.top))


if __name__ == "__main__":
    main()
