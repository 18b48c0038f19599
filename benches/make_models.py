#!/usr/bin/env python3
"""Build the benchmark's model and input files.

Usage: python3 benches/make_models.py OUT_DIR [--records-scale F]

Writes into OUT_DIR:
    mlp_heavy.onnx    512 -> 4 x [Gemm 2048 -> Relu -> Gemm 512], seeded weights,
                      a model-bound case (opset 17, IR 8, batch dimension N)
    digits.npy        float32 [2,000,000 x F, 64], uniform in [0, 1]
    conv.npy          float32 [20,000 x F, 3, 64, 64], uniform in [0, 1]
    heavy.npy         float32 [60,000 x F, 512], standard normal

The digits MLP and the conv model are the fixtures in fixtures/models. Files
that already exist with the right shape are kept, so reruns are quick.
"""

import argparse
import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_mlp_heavy(path):
    rng = np.random.default_rng(1234)
    nodes, initializers, current = [], [], "x"
    for block in range(4):
        for layer, (n_in, n_out) in enumerate([(512, 2048), (2048, 512)]):
            weight = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
            bias = np.zeros(n_out, dtype=np.float32)
            name = f"b{block}l{layer}"
            initializers += [numpy_helper.from_array(weight, f"{name}.w"), numpy_helper.from_array(bias, f"{name}.b")]
            nodes.append(helper.make_node("Gemm", [current, f"{name}.w", f"{name}.b"], [f"{name}.out"]))
            current = f"{name}.out"
            if layer == 0:
                nodes.append(helper.make_node("Relu", [current], [f"{name}.relu"]))
                current = f"{name}.relu"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp_heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 512])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    # Written under a temporary name and renamed, so an interrupted run
    # leaves no file under the final name.
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(model.SerializeToString())
    os.replace(partial, path)


def write_npy(path, shape, make):
    if path.exists():
        try:
            if np.load(path, mmap_mode="r").shape == shape:
                return
        except (ValueError, OSError, EOFError):
            pass  # unreadable, for example an empty file: written again
    # Written in chunks so the peak memory stays small, under a temporary
    # name and renamed at the end, so an interrupted run leaves no file
    # with part of its values under the final name.
    partial = path.with_name(path.name + ".partial")
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
    rng = np.random.default_rng(7)
    step = max(1, 2_000_000 // int(np.prod(shape[1:])) * 16)
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        array[start:stop] = make(rng, (stop - start, *shape[1:]))
    array.flush()
    del array
    os.replace(partial, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write into")
    parser.add_argument("--records-scale", type=float, default=1.0, help="factor on the records per file (default 1)")
    args = parser.parse_args()
    if not (args.records_scale > 0 and math.isfinite(args.records_scale)):
        parser.error(f"--records-scale must be a finite number above 0, got {args.records_scale}")
    args.out.mkdir(parents=True, exist_ok=True)

    heavy = args.out / "mlp_heavy.onnx"
    if not heavy.exists():
        build_mlp_heavy(heavy)
    scale = args.records_scale
    uniform = lambda rng, shape: rng.random(shape, dtype=np.float32)
    normal = lambda rng, shape: rng.standard_normal(shape, dtype=np.float32)
    records = lambda base: max(1, int(base * scale))
    write_npy(args.out / "digits.npy", (records(2_000_000), 64), uniform)
    write_npy(args.out / "conv.npy", (records(20_000), 3, 64, 64), uniform)
    write_npy(args.out / "heavy.npy", (records(60_000), 512), normal)
    print(f"models and data in {os.fspath(args.out)}")


if __name__ == "__main__":
    main()
