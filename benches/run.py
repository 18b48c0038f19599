#!/usr/bin/env python3
"""Benchmark stochflow side by side with a bare ONNX Runtime loop and the
Python reference pipeline (numpy + onnxruntime + pyarrow), on the same
models, records, batch sizes and thread counts.

Usage:
    python3 benches/run.py [--reference PATH/py_pipeline.py] [--rounds 3]
                           [--records-scale 1.0] [--work DIR] [--cases conv,noise]

Needs numpy, onnx, onnxruntime and pyarrow (target/test-venv after
`bash tests/run.sh` has them). Each case runs every side once per round,
round-robin, and reports medians, since the machine is shared and noisy.
Without --reference, the Python columns show a dash.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.exit(f"command failed ({result.returncode}): {' '.join(map(str, command))}\n{result.stdout}\n{result.stderr}")
    return result.stdout


def peak_rss_mb(command):
    """Runs `command` in a fresh Python child and returns its peak RSS in MiB."""
    probe = (
        "import resource, subprocess, sys; "
        "r = subprocess.run(sys.argv[1:], capture_output=True); "
        "assert r.returncode == 0, r.stderr; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    return float(run([sys.executable, "-c", probe, *map(str, command)]).strip())


def pipeline_yaml(case, work, input_path, records_note=""):
    stages = {
        "heavy": """
  - {name: input_noise, kind: add_noise, column: x, std: 0.1}
  - {name: model, kind: infer, model: %(model)s, inputs: {x: x}, batch_size: %(batch)d}
  - {name: output_noise, kind: add_noise, column: y, std: 0.1}""",
        "digits": """
  - {name: input_noise, kind: add_noise, column: x, std: 0.1}
  - {name: model, kind: infer, model: %(model)s, inputs: {pixels: x}, batch_size: %(batch)d}
  - {name: draw, kind: sample, column: logits}""",
        "conv": """
  - {name: input_noise, kind: add_noise, column: x, std: 0.1}
  - {name: model, kind: infer, model: %(model)s, inputs: {image: x}, batch_size: %(batch)d}
  - {name: draw, kind: sample, column: logits}""",
    }[case["kind"]] % {"model": json.dumps(str(case["model"])), "batch": case["batch"]}
    stages = stages.replace(f"batch_size: {case['batch']}}}", f"batch_size: {case['batch']}{case.get('infer_extra', '')}}}", 1)
    columns = "[ordinal, y]" if case["kind"] == "heavy" else "[ordinal, class]"
    if case.get("synthesized"):
        # Records drawn from N(0, 1), as the Python reference does without --input.
        source = (f"{{kind: latent, records: {case['synthesized']}, shape: [3, 64, 64], column: x, prior: normal, "
                  f"batch_size: {case['batch']}}}")
    else:
        source = f"{{kind: npy, path: {json.dumps(str(input_path))}, column: x, batch_size: {case['batch']}}}"
    text = (
        f"seed: 1\nsource: {source}\n"
        f"stages:{stages}\nsink: {{kind: arrow_file, path: {json.dumps(str(work / 'stochflow.arrow'))}, columns: {columns}}}\n"
    )
    path = work / f"{case['name']}.yaml"
    path.write_text(text)
    return path


# Writes a .npy of uniform float32 digits records, [RECORDS, 64], unless
# PATH already has that shape. It writes in chunks, so the peak memory stays small.
UNIFORM_RECORDS = """
import os, sys
import numpy as np
path, records = sys.argv[1], int(sys.argv[2])
if os.path.exists(path) and np.load(path, mmap_mode="r").shape == (records, 64):
    sys.exit(0)
array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(records, 64))
rng = np.random.default_rng(11)
for start in range(0, records, 100_000):
    stop = min(start + 100_000, records)
    array[start:stop] = rng.random((stop - start, 64), dtype=np.float32)
array.flush()
"""

# Runs shorter than this are timed too coarsely by the run summary's
# milliseconds to give a rate.
MIN_RUN_S = 0.1


def stochflow_rate(binary, pipeline):
    out = run([binary, "run", pipeline], env={**os.environ, "STOCHFLOW_LOG": "warn"})
    match = re.search(r"read (\d+) records?.* in ([0-9.]+) s", out)
    records, seconds = int(match.group(1)), float(match.group(2))
    if seconds < MIN_RUN_S:
        print(f"warning: {pipeline.name} ran for {seconds:.3f} s, too short for a reliable rate; "
              "raise --records-scale", file=sys.stderr)
    return records / max(seconds, 0.001)


def default_parallelism():
    """Returns the infer stage's default sessions and intra-op threads per session."""
    cores = os.cpu_count() or 1
    sessions = min(max(cores, 1), 4)
    return sessions, max(cores // sessions, 1)


def ort_rate(ort_loop, case, input_path, sessions, threads):
    out = run([ort_loop, case["model"], input_path, str(case["batch"]), str(threads), str(sessions)])
    return json.loads(out.strip().splitlines()[-1])["records_per_s"]


def python_rate(reference, case, input_path, work):
    mode = "noise" if case["kind"] == "heavy" else "sample"
    if case.get("synthesized"):
        records = ["--records", str(case["synthesized"])]
    else:
        records = ["--input", input_path, "--records", "100000000"]
    out = run([sys.executable, reference, "--model", case["model"], *records,
               "--batch", str(case["batch"]), "--mode", mode, "--no-spin", "--out", work / "python.arrow"])
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])["records_per_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="the Python reference pipeline script")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side per case; medians are reported (default 3)")
    parser.add_argument("--records-scale", type=float, default=1.0,
                        help="factor on the records per run: 2,000,000 digits, 20,000 conv, 60,000 heavy (default 1)")
    parser.add_argument("--work", type=Path, default=ROOT / "target" / "bench",
                        help="folder for the models, inputs and outputs (default target/bench)")
    parser.add_argument("--cases",
                        help="comma-separated case names or name prefixes to run, such as `conv_b256,noise`: the "
                             "table's cases and `noise` and `memory` (default: all)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not (args.records_scale > 0 and math.isfinite(args.records_scale)):
        parser.error(f"--records-scale must be a finite number above 0, got {args.records_scale}")
    missing = [name for name in ("numpy", "onnx", "onnxruntime", "pyarrow") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"{sys.executable} lacks the Python packages {', '.join(missing)}; run this script with "
                     "target/test-venv/bin/python (made by `bash tests/run.sh`), or install fixtures/requirements.txt")
    if args.reference and not args.reference.is_file():
        parser.error(f"--reference {args.reference} is not a file; give the path of the reference pipeline script")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    models = {"heavy": work / "mlp_heavy.onnx", "digits": ROOT / "fixtures/models/mlp_digits.onnx",
              "conv": ROOT / "fixtures/models/conv_photos.onnx"}
    inputs = {"heavy": work / "heavy.npy", "digits": work / "digits.npy", "conv": work / "conv.npy"}
    cases = [
        {"name": f"{kind}_b{batch}", "kind": kind, "batch": batch, "model": models[kind]}
        for kind in ("heavy", "digits", "conv") for batch in (64, 256)
    ]
    # The conv pipeline on records drawn from N(0, 1) instead of read from a
    # file: the Python reference's own default, where numpy draws every
    # record as well as its noise.
    for batch in (64, 256):
        cases.append({"name": f"conv_b{batch}_synthesized", "kind": "conv", "batch": batch, "model": models["conv"],
                      "synthesized": max(1, int(20_000 * args.records_scale))})
    # stochflow's default parallelism (sessions per core, threads shared
    # among them) against one session with ONNX Runtime's default threads,
    # the bare loop's own session options.
    for kind in ("heavy", "digits", "conv"):
        cases.append({"name": f"{kind}_b256_1session", "kind": kind, "batch": 256, "model": models[kind],
                      "infer_extra": ", threads: 0, sessions: 1"})

    every_name = [case["name"] for case in cases] + ["noise", "memory"]
    requested = [prefix.strip() for prefix in (args.cases or "").split(",") if prefix.strip()]
    if args.cases is not None and not requested:
        parser.error(f"--cases {args.cases!r} names no case; leave --cases out to run them all")
    unmatched = [prefix for prefix in requested if not any(name.startswith(prefix) for name in every_name)]
    if unmatched:
        parser.error(f"--cases {', '.join(unmatched)} matches no case; the cases are {', '.join(every_name)}")
    selected = {name for name in every_name if not requested or any(name.startswith(prefix) for prefix in requested)}
    cases = [case for case in cases if case["name"] in selected]

    print("building (cargo build --release, cargo bench --no-run)", file=sys.stderr)
    run(["cargo", "build", "--release", "--quiet"], cwd=ROOT)
    built = run(["cargo", "bench", "--no-run", "--bench", "ort_loop", "--bench", "noise", "--message-format", "json",
                 "--quiet"], cwd=ROOT)
    executables = {}
    for line in built.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable") and "bench" in message["target"]["kind"]:
            executables[message["target"]["name"]] = message["executable"]
    binary = ROOT / "target" / "release" / "stochflow"
    run([sys.executable, ROOT / "benches" / "make_models.py", work, "--records-scale", str(args.records_scale)])

    # Two bare loops: one with stochflow's own sessions and threads (the
    # default parallelism, or one session with ONNX Runtime's default
    # threads in the `1session` cases), and the plain loop a user would
    # write: one session, ONNX Runtime's default threads.
    sessions, threads = default_parallelism()
    results = {case["name"]: {"stochflow": [], "ort_same": [], "ort": [], "python": []} for case in cases}
    for round_index in range(args.rounds):
        for case in cases:
            print(f"round {round_index + 1}/{args.rounds}: {case['name']}", file=sys.stderr)
            pipeline = pipeline_yaml(case, work, inputs[case["kind"]])
            results[case["name"]]["stochflow"].append(stochflow_rate(binary, pipeline))
            same = (1, 0) if "infer_extra" in case else (sessions, threads)
            results[case["name"]]["ort_same"].append(ort_rate(executables["ort_loop"], case, inputs[case["kind"]], *same))
            results[case["name"]]["ort"].append(ort_rate(executables["ort_loop"], case, inputs[case["kind"]], 1, 0))
            if args.reference and "infer_extra" not in case:
                results[case["name"]]["python"].append(python_rate(args.reference, case, inputs[case["kind"]], work))

    if cases:
        print_table(cases, results, sessions, threads)
    if "noise" in selected:
        print_noise(executables["noise"], args.rounds)
    if "memory" in selected:
        print_memory(binary, models, work)


def print_table(cases, results, sessions, threads):
    print(f"\nstochflow's default parallelism here: {sessions} session(s) of {threads} intra-op thread(s) each")
    print("\n| case | stochflow rec/s | bare ORT, same sessions | bare ORT, 1 session | Python rec/s "
          "| stochflow / ORT same | stochflow / ORT 1 session | stochflow / Python |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        medians = {side: statistics.median(v) if v else None for side, v in results[case["name"]].items()}
        ours, same, ort, python = medians["stochflow"], medians["ort_same"], medians["ort"], medians["python"]
        python_text = f"{python:,.0f}" if python else "–"
        python_ratio = f"{ours / python:.2f}" if python else "–"
        print(f"| {case['name']} | {ours:,.0f} | {same:,.0f} | {ort:,.0f} | {python_text} "
              f"| {ours / same:.2f} | {ours / ort:.2f} | {python_ratio} |")


def print_noise(noise_bench, rounds):
    noise = [json.loads(run([noise_bench, "4000"]).strip().splitlines()[-1])["samples_per_s"] for _ in range(rounds)]
    numpy_probe = ("import numpy as np, time; g = np.random.default_rng(0); g.standard_normal(10**7, dtype=np.float32); "
                   "t = time.perf_counter(); g.standard_normal(10**7, dtype=np.float32); print(1e7 / (time.perf_counter() - t))")
    numpy_rates = [float(run([sys.executable, "-c", numpy_probe]).strip()) for _ in range(rounds)]
    print(f"\nGaussian float32 samples/s on one core: stochflow {statistics.median(noise) / 1e6:.0f} M "
          f"(per-record streams), numpy Generator.standard_normal {statistics.median(numpy_rates) / 1e6:.0f} M, "
          f"ratio {statistics.median(noise) / statistics.median(numpy_rates):.2f}")


def print_memory(binary, models, work):
    rss = {}
    for records in (100_000, 1_000_000):
        case = {"name": f"digits_rss_{records}", "kind": "digits", "batch": 256, "model": models["digits"]}
        subset = work / f"digits_{records}.npy"
        # Whatever --records-scale is, these inputs hold exactly `records` records.
        run([sys.executable, "-c", UNIFORM_RECORDS, str(subset), str(records)])
        rss[records] = peak_rss_mb([binary, "run", pipeline_yaml(case, work, subset)])
    print(f"Peak RSS, digits pipeline: {rss[100_000]:.0f} MiB for 100,000 records, {rss[1_000_000]:.0f} MiB for "
          f"1,000,000 (ratio {rss[1_000_000] / rss[100_000]:.2f})")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted")
